//! A fake of the kernel maps for the map writer's tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::{
    BackendKey, BackendValue, MemberKey, SERVICE_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue,
};

use super::{MapStore, PinnedState};
use crate::dataplane::codec::{backend_of, frontend_of, member_key};
use crate::model::{Backend, SourceRange};

/// The one fake kernel of the map-writer tests (unit and property): the
/// maps, an op log, optional injected failures, and an
/// invariant check after every write: each frontend's SERVICES entry always
/// points at a complete set of slots.
#[derive(Default)]
pub(crate) struct FakeMaps {
    /// SERVICES, BACKENDS and SOURCE_RANGES (`stray_members` unused).
    pub(crate) state: PinnedState,
    pub(crate) members: BTreeMap<MemberKey, u32>,
    pub(crate) log: Vec<String>,
    /// Fail writes of backends with this IP (a "full map" for that Service).
    pub(crate) fail_backend_ip: Option<Ipv4Addr>,
    /// Fail every delete.
    pub(crate) fail_deletes: bool,
    /// After every write: the backend set each frontend would balance over.
    pub(crate) visible_history: Vec<BTreeMap<ServiceKey, BTreeSet<Backend>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("injected failure")]
pub(crate) struct Injected;

impl FakeMaps {
    fn record(&mut self, op: String) {
        self.log.push(op);
        let mut visible = BTreeMap::new();
        for (key, value) in self.state.services.iter() {
            let slots = self.state.current_backends(value);
            assert_eq!(
                slots.len(),
                value.backend_count as usize,
                "{key:?} points at missing slots after {:?}",
                self.log
            );
            for (index, slot_value) in slots.iter().enumerate() {
                let slot = BackendKey {
                    service_id: value.service_id,
                    generation: value.generation,
                    index: index as u16,
                };
                assert_eq!(
                    self.members.get(&member_key(&slot, slot_value)),
                    Some(&(index as u32)),
                    "{key:?}: a live slot has no member entry after {:?}",
                    self.log
                );
            }
            visible.insert(*key, slots.iter().map(backend_of).collect());
            if value.flags & SERVICE_FLAG_SOURCE_RANGES != 0 {
                assert!(
                    self.state
                        .source_ranges
                        .iter()
                        .any(|(id, _)| *id == value.service_id),
                    "{key:?} checks source ranges but has none after {:?}",
                    self.log
                );
            }
        }
        self.visible_history.push(visible);
    }
}

impl FakeMaps {
    /// What a new agent reads from these maps.
    pub(crate) fn read_back(&self) -> PinnedState {
        PinnedState::from_maps(
            self.state.services.iter().map(|(k, v)| (*k, *v)),
            self.state.backends.iter(),
            self.members.clone(),
            self.state.source_ranges.clone(),
        )
    }

    /// Whether MEMBERS holds exactly the members of the slots.
    pub(crate) fn members_match_slots(&self) -> bool {
        self.read_back().members().collect::<BTreeMap<_, _>>() == self.members
    }
}

impl MapStore for FakeMaps {
    type Error = Injected;
    fn put_member(&mut self, key: &MemberKey, index: u32) -> Result<(), Injected> {
        self.members.insert(*key, index);
        self.record(format!("put_member {}/{}", key.service_id, key.generation));
        Ok(())
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), Injected> {
        if self.fail_deletes {
            return Err(Injected);
        }
        self.members.remove(key);
        self.record(format!(
            "delete_member {}/{}",
            key.service_id, key.generation
        ));
        Ok(())
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Injected> {
        self.state.services.insert(*key, *value);
        self.record(format!("put_service {}", frontend_of(key).unwrap()));
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), Injected> {
        if self.fail_deletes {
            return Err(Injected);
        }
        self.state.services.remove(key);
        self.record(format!("delete_service {}", frontend_of(key).unwrap()));
        Ok(())
    }
    fn put_backend(&mut self, key: &BackendKey, value: &BackendValue) -> Result<(), Injected> {
        if self.fail_backend_ip == Some(backend_of(value).ip) {
            return Err(Injected);
        }
        self.state.backends.insert(*key, *value);
        self.record(format!(
            "put_backend {}/{}/{}",
            key.service_id, key.generation, key.index
        ));
        Ok(())
    }
    fn delete_backend(&mut self, key: &BackendKey) -> Result<(), Injected> {
        if self.fail_deletes {
            return Err(Injected);
        }
        self.state.backends.remove(key);
        self.record(format!(
            "delete_backend {}/{}/{}",
            key.service_id, key.generation, key.index
        ));
        Ok(())
    }
    fn put_source_range(&mut self, service_id: u32, range: &SourceRange) -> Result<(), Injected> {
        self.state.source_ranges.insert((service_id, *range));
        self.record(format!("put_source_range {service_id} {range}"));
        Ok(())
    }
    fn delete_source_range(
        &mut self,
        service_id: u32,
        range: &SourceRange,
    ) -> Result<(), Injected> {
        if self.fail_deletes {
            return Err(Injected);
        }
        self.state.source_ranges.remove(&(service_id, *range));
        self.record(format!("delete_source_range {service_id} {range}"));
        Ok(())
    }
}

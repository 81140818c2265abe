//! The map contents the agent believes are in the kernel, and the ordered,
//! make-before-break steps that turn them into the desired contents.
//!
//! Pure apart from the [`MapStore`] it writes through, so the ordering rules
//! are unit-tested with a fake store.

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common::{
    BackendKey, BackendValue, MemberKey, SERVICE_FLAG_AFFINITY, SERVICE_FLAG_DROP_WITHOUT_BACKENDS,
    SERVICE_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue,
};

use super::codec::{backend_value, frontend_of, member_key, service_key};
use crate::model::{DesiredDataplane, Frontend, FrontendEntry, Model, SourceRange};

/// What the maps should hold, frontend by frontend: the whole desired
/// state of a test, or the agent's incremental [`Model`].
pub trait DesiredFrontends {
    fn entry(&self, frontend: &Frontend) -> Option<&FrontendEntry>;
    fn each(&self) -> Box<dyn Iterator<Item = (&Frontend, &FrontendEntry)> + '_>;
}

impl DesiredFrontends for DesiredDataplane {
    fn entry(&self, frontend: &Frontend) -> Option<&FrontendEntry> {
        self.frontends.get(frontend)
    }

    fn each(&self) -> Box<dyn Iterator<Item = (&Frontend, &FrontendEntry)> + '_> {
        Box::new(self.frontends.iter())
    }
}

impl DesiredFrontends for Model {
    fn entry(&self, frontend: &Frontend) -> Option<&FrontendEntry> {
        Model::entry(self, frontend)
    }

    fn each(&self) -> Box<dyn Iterator<Item = (&Frontend, &FrontendEntry)> + '_> {
        Box::new(self.frontends())
    }
}

/// A mirror of SERVICES, BACKENDS and MEMBERS. The agent is their only
/// writer, so after reading them once at start it keeps this copy exact by
/// updating it after every successful map write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedState {
    pub services: ServiceEntries,
    pub backends: Slots,
    /// MEMBERS entries no slot accounts for (an agent died while freeing
    /// retired slots). Every other MEMBERS entry is
    /// `member_key(slot, value) -> slot.index` of a slot in `backends`, so
    /// it is not kept twice: at a million backends that copy was the
    /// agent's largest allocation.
    pub stray_members: BTreeSet<MemberKey>,
    /// (frontend id, allowed source prefix): SOURCE_RANGES.
    pub source_ranges: BTreeSet<(u32, SourceRange)>,
}

/// Writes to the kernel maps (or to a fake in tests).
pub trait MapStore {
    type Error: std::error::Error + Send + Sync + 'static;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Self::Error>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
    fn put_backend(&mut self, key: &BackendKey, value: &BackendValue) -> Result<(), Self::Error>;
    fn delete_backend(&mut self, key: &BackendKey) -> Result<(), Self::Error>;
    fn put_member(&mut self, key: &MemberKey, index: u32) -> Result<(), Self::Error>;
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), Self::Error>;
    fn put_source_range(&mut self, service_id: u32, range: &SourceRange)
    -> Result<(), Self::Error>;
    fn delete_source_range(
        &mut self,
        service_id: u32,
        range: &SourceRange,
    ) -> Result<(), Self::Error>;
    /// Makes every write so far take effect. A store may hold slot and
    /// member writes back until the next write of another kind (the
    /// SERVICES flip that makes them reachable) or this.
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// The SERVICES value for a frontend's id, generation and settings.
fn service_value(
    service_id: u32,
    generation: u16,
    count: u16,
    entry: &FrontendEntry,
) -> ServiceValue {
    ServiceValue {
        service_id,
        backend_count: count,
        generation,
        flags: flag_if(entry.affinity_timeout_s.is_some(), SERVICE_FLAG_AFFINITY)
            | flag_if(!entry.source_ranges.is_empty(), SERVICE_FLAG_SOURCE_RANGES)
            | flag_if(
                entry.drop_without_backends,
                SERVICE_FLAG_DROP_WITHOUT_BACKENDS,
            ),
        affinity_timeout_s: entry.affinity_timeout_s.unwrap_or(0),
    }
}

fn flag_if(condition: bool, flag: u32) -> u32 {
    if condition { flag } else { 0 }
}

/// Why one frontend could not be programmed. Every other frontend is
/// unaffected, and this one keeps serving its previous backends (if any).
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error(
        "{count} backends exceed the limit of {limit} per Service (--max-backends-per-service)"
    )]
    TooManyBackends { count: usize, limit: usize },
    #[error(
        "{wanted} more backends would exceed the node's limit of {limit} (--max-backends); {in_use} are in use"
    )]
    BackendLimit {
        wanted: usize,
        in_use: usize,
        limit: usize,
    },
    #[error("the limit of {0} Service frontends is reached (--max-services)")]
    NoServiceId(u32),
    #[error("writing the maps: {0}")]
    Map(String),
}

impl FrontendError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooManyBackends { .. } => "backends_per_service_limit",
            Self::BackendLimit { .. } => "backend_limit",
            Self::NoServiceId(_) => "service_limit",
            Self::Map(_) => "map_write",
        }
    }
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub updated: usize,
    /// Frontends that did not exist before.
    pub added: usize,
    pub removed: usize,
    pub failed: Vec<(Frontend, FrontendError)>,
    /// Backend slots no SERVICES entry reaches any more (an old
    /// generation, a removed frontend's): freed after a grace period.
    pub unreachable: Vec<BackendKey>,
}

impl PinnedState {
    /// The state a new agent reads from the maps: MEMBERS is checked
    /// against the slots rather than copied.
    pub fn from_maps(
        services: impl IntoIterator<Item = (ServiceKey, ServiceValue)>,
        backends: impl IntoIterator<Item = (BackendKey, BackendValue)>,
        members: impl IntoIterator<Item = (MemberKey, u32)>,
        source_ranges: BTreeSet<(u32, SourceRange)>,
    ) -> Self {
        // In key order, so each generation is sealed once, when complete.
        let mut backends: Vec<(BackendKey, BackendValue)> = backends.into_iter().collect();
        backends.sort_unstable_by_key(|(key, _)| *key);
        let backends: Slots = backends.into_iter().collect();
        let stray_members = members
            .into_iter()
            .filter(|(member, index)| {
                let slot = BackendKey {
                    service_id: member.service_id,
                    generation: member.generation,
                    index: u16::try_from(*index).unwrap_or(u16::MAX),
                };
                backends
                    .get(&slot)
                    .is_none_or(|value| member_key(&slot, value) != *member)
            })
            .map(|(member, _)| member)
            .collect();
        Self {
            services: services.into_iter().collect(),
            backends,
            stray_members,
            source_ranges,
        }
    }

    /// The MEMBERS entries the slots account for.
    pub fn members(&self) -> impl Iterator<Item = (MemberKey, u32)> + '_ {
        self.backends
            .iter()
            .map(|(slot, value)| (member_key(&slot, &value), u32::from(slot.index)))
    }

    /// The backends a frontend currently balances over, in slot order.
    pub fn current_backends(&self, value: &ServiceValue) -> Vec<BackendValue> {
        (0..value.backend_count)
            .map_while(|index| {
                self.backends
                    .get(&BackendKey {
                        service_id: value.service_id,
                        generation: value.generation,
                        index,
                    })
                    .copied()
            })
            .collect()
    }

    /// Backend slots that no Service entry can reach any more.
    pub fn unreachable_backends(&self) -> BTreeSet<BackendKey> {
        let live: BTreeSet<(u32, u16)> = self
            .services
            .values()
            .map(|v| (v.service_id, v.generation))
            .collect();
        let counts: BTreeMap<u32, u16> = self
            .services
            .values()
            .map(|v| (v.service_id, v.backend_count))
            .collect();
        self.backends
            .keys()
            .filter(|k| {
                !live.contains(&(k.service_id, k.generation))
                    || counts
                        .get(&k.service_id)
                        .is_none_or(|count| k.index >= *count)
            })
            .collect()
    }

    /// Ids that must not be handed out: those of SERVICES entries, and those
    /// that still own backend slots (a deleted frontend's slots wait for the
    /// release; a new frontend must never start on top of them).
    fn ids_in_use(&self) -> BTreeSet<u32> {
        let mut ids: Vec<u32> = self.services.values().map(|v| v.service_id).collect();
        ids.extend(self.backends.ids());
        ids.extend(self.stray_members.iter().map(|member| member.service_id));
        ids.extend(self.source_ranges.iter().map(|(id, _)| *id));
        ids.into_iter().collect()
    }

    /// Makes the maps hold `desired`, frontend by frontend:
    ///
    /// 1. delete SERVICES entries that are no longer desired (first, so their
    ///    capacity is free for new frontends of the same sync);
    /// 2. for each new or changed frontend, write a complete new generation
    ///    of backend slots, then flip the SERVICES entry to it in one update.
    ///    A frontend over a limit is refused whole and keeps its old entry.
    ///
    /// Slots of old generations are left for [`PinnedState::free_retired`], which
    /// the caller runs a grace period later, so a connect() that read the
    /// old entry an instant before the flip still finds its backend.
    pub fn apply<S: MapStore>(
        &mut self,
        desired: &impl DesiredFrontends,
        store: &mut S,
        limits: &Limits,
    ) -> ApplyReport {
        let unwanted: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|key| frontend_of(key).is_none_or(|f| desired.entry(&f).is_none()))
            .copied()
            .collect();
        self.write(&unwanted, desired.each(), store, limits)
    }

    /// Like [`PinnedState::apply`], for the `changed` frontends only: what
    /// a sync after a few changes costs does not grow with the cluster.
    pub fn apply_changed<S: MapStore>(
        &mut self,
        desired: &impl DesiredFrontends,
        changed: &BTreeSet<Frontend>,
        store: &mut S,
        limits: &Limits,
    ) -> ApplyReport {
        let unwanted: Vec<ServiceKey> = changed
            .iter()
            .filter(|f| desired.entry(f).is_none())
            .map(service_key)
            .filter(|key| self.services.contains_key(key))
            .collect();
        let wanted = changed.iter().filter_map(|f| Some((f, desired.entry(f)?)));
        self.write(&unwanted, wanted, store, limits)
    }

    /// Deletes `unwanted` first (their capacity is free for the new
    /// frontends of the same sync), then writes each of `wanted`.
    fn write<'a, S: MapStore>(
        &mut self,
        unwanted: &[ServiceKey],
        wanted: impl Iterator<Item = (&'a Frontend, &'a FrontendEntry)>,
        store: &mut S,
        limits: &Limits,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        self.remove(unwanted, store, &mut report);
        let mut budget = Budget {
            limits,
            ids: IdAllocator::new(limits.max_services),
            live_backends: self.live_backend_count(),
        };
        for (frontend, entry) in wanted {
            self.apply_one(frontend, entry, store, &mut budget, &mut report);
        }
        // Only writes of attempts that failed can still be held back; their
        // slots are already reported unreachable, so whether they reach
        // the map changes nothing that is served.
        let _ = store.flush();
        report
    }

    fn apply_one<S: MapStore>(
        &mut self,
        frontend: &Frontend,
        entry: &FrontendEntry,
        store: &mut S,
        budget: &mut Budget,
        report: &mut ApplyReport,
    ) {
        let key = service_key(frontend);
        let before = self.services.get(&key).copied();
        let mut attempt = None;
        match self.apply_frontend(frontend, entry, store, budget, &mut attempt) {
            Ok(true) => {
                report.updated += 1;
                match before {
                    None => report.added += 1,
                    Some(before) => {
                        if self.services.get(&key).map(|v| v.generation) != Some(before.generation)
                        {
                            report.unreachable.extend(slots_of(&before));
                        }
                    }
                }
            }
            Ok(false) => {}
            Err(error) => {
                // The slots of a half-written new generation are reachable
                // from nothing.
                if let Some((id, generation)) = attempt
                    && self
                        .services
                        .get(&key)
                        .is_none_or(|live| live.generation != generation)
                {
                    report
                        .unreachable
                        .extend(self.backends.of_generation(id, generation));
                }
                report.failed.push((*frontend, error));
            }
        }
    }

    /// Backends the Service entries currently balance over, in total.
    pub fn live_backend_count(&self) -> usize {
        self.services.live_backends()
    }

    fn remove<S: MapStore>(
        &mut self,
        unwanted: &[ServiceKey],
        store: &mut S,
        report: &mut ApplyReport,
    ) {
        for key in unwanted {
            match store.delete_service(key) {
                Ok(()) => {
                    if let Some(removed) = self.services.remove(key) {
                        report.unreachable.extend(slots_of(&removed));
                        if let Err(error) = self.set_source_ranges(store, removed.service_id, &[])
                            && let Some(frontend) = frontend_of(key)
                        {
                            report.failed.push((frontend, error));
                        }
                    }
                    report.removed += 1;
                }
                Err(error) => {
                    if let Some(frontend) = frontend_of(key) {
                        report
                            .failed
                            .push((frontend, FrontendError::Map(error.to_string())));
                    }
                }
            }
        }
    }

    /// Returns whether the frontend changed.
    fn apply_frontend<S: MapStore>(
        &mut self,
        frontend: &Frontend,
        entry: &FrontendEntry,
        store: &mut S,
        budget: &mut Budget,
        attempt: &mut Option<(u32, u16)>,
    ) -> Result<bool, FrontendError> {
        let limits = budget.limits;
        // Slot indexes and counts are u16 in the maps.
        let limit = limits.max_backends_per_service.min(usize::from(u16::MAX));
        if entry.backends.len() > limit {
            return Err(FrontendError::TooManyBackends {
                count: entry.backends.len(),
                limit,
            });
        }
        let key = service_key(frontend);
        let wanted: Vec<BackendValue> = entry.backends.iter().map(backend_value).collect();
        let count = wanted.len() as u16;
        let map_error = |e: S::Error| FrontendError::Map(e.to_string());
        let current = self.services.get(&key).copied();
        if let Some(current) = current
            && current.backend_count == count
            && self.current_backends(&current) == wanted
        {
            // Same backends: at most the settings (affinity) change, in
            // place, with the same generation.
            let value = service_value(current.service_id, current.generation, count, entry);
            let ranges_same = self.ranges_of(current.service_id) == entry.source_ranges;
            if value == current && ranges_same {
                return Ok(false);
            }
            self.add_source_ranges(store, current.service_id, &entry.source_ranges)?;
            store.put_service(&key, &value).map_err(map_error)?;
            self.services.insert(key, value);
            self.set_source_ranges(store, current.service_id, &entry.source_ranges)?;
            return Ok(true);
        }
        let previous_count = current.map_or(0, |c| usize::from(c.backend_count));
        let others = budget.live_backends - previous_count;
        if others + wanted.len() > limits.max_backends {
            return Err(FrontendError::BackendLimit {
                wanted: wanted.len(),
                in_use: others,
                limit: limits.max_backends,
            });
        }
        let (service_id, generation) = match current {
            Some(current) => (current.service_id, current.generation.wrapping_add(1)),
            None => (
                budget
                    .ids
                    .allocate(self)
                    .ok_or(FrontendError::NoServiceId(budget.ids.max))?,
                0,
            ),
        };
        *attempt = Some((service_id, generation));
        for (index, value) in wanted.iter().enumerate() {
            let slot = BackendKey {
                service_id,
                generation,
                // Bounded by the limit check above, at most u16::MAX.
                index: index as u16,
            };
            store.put_backend(&slot, value).map_err(map_error)?;
            // A slot left by a failed attempt at this generation held
            // another backend: its member must not outlive it. (Should a
            // write below fail, the mirror counts a member the map may
            // lack: harmless, as this generation is not live and a retry
            // or the release writes or deletes it again.)
            let overwritten = self
                .backends
                .insert(slot, *value)
                .map(|old| member_key(&slot, &old));
            let member = member_key(&slot, value);
            store
                .put_member(&member, u32::from(slot.index))
                .map_err(map_error)?;
            if let Some(old) = overwritten.filter(|old| *old != member) {
                store.delete_member(&old).map_err(map_error)?;
            }
        }
        self.backends.seal(service_id, generation);
        self.add_source_ranges(store, service_id, &entry.source_ranges)?;
        let value = service_value(service_id, generation, count, entry);
        store.put_service(&key, &value).map_err(map_error)?;
        self.services.insert(key, value);
        budget.live_backends = others + wanted.len();
        self.set_source_ranges(store, service_id, &entry.source_ranges)?;
        Ok(true)
    }

    /// The allowed source prefixes of a frontend id, in order.
    fn ranges_of(&self, service_id: u32) -> Vec<SourceRange> {
        self.source_ranges
            .range((service_id, SourceRange::MIN)..=(service_id, SourceRange::MAX))
            .map(|(_, range)| *range)
            .collect()
    }

    /// Writes the prefixes of `wanted` that are missing. Done before the
    /// SERVICES entry that enables the check is written, so a frontend
    /// never checks against a half-written set.
    fn add_source_ranges<S: MapStore>(
        &mut self,
        store: &mut S,
        service_id: u32,
        wanted: &[SourceRange],
    ) -> Result<(), FrontendError> {
        for range in wanted {
            if self.source_ranges.insert((service_id, *range)) {
                store
                    .put_source_range(service_id, range)
                    .inspect_err(|_| {
                        self.source_ranges.remove(&(service_id, *range));
                    })
                    .map_err(|e| FrontendError::Map(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Makes the prefixes of `service_id` exactly `wanted` by deleting the
    /// others (after the SERVICES entry no longer needs them).
    fn set_source_ranges<S: MapStore>(
        &mut self,
        store: &mut S,
        service_id: u32,
        wanted: &[SourceRange],
    ) -> Result<(), FrontendError> {
        self.add_source_ranges(store, service_id, wanted)?;
        for range in self.ranges_of(service_id) {
            if !wanted.contains(&range) {
                store
                    .delete_source_range(service_id, &range)
                    .map_err(|e| FrontendError::Map(e.to_string()))?;
                self.source_ranges.remove(&(service_id, range));
            }
        }
        Ok(())
    }

    /// Which of `keys` are slots no SERVICES entry reaches (freed ones are
    /// not slots any more): costs a lookup per key, whatever the size of
    /// the maps.
    pub fn unreachable_of<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a BackendKey>,
    ) -> BTreeSet<BackendKey> {
        keys.into_iter()
            .filter(|key| self.backends.contains_key(key))
            .filter(|key| {
                self.services
                    .by_id(key.service_id)
                    .is_none_or(|(generation, count)| {
                        generation != key.generation || key.index >= count
                    })
            })
            .copied()
            .collect()
    }

    /// Deletes backend slots in `retired` that are still unreachable, each
    /// with its MEMBERS entry (first, so a member never outlives its slot).
    /// Returns how many slots were deleted and the first error, if any.
    pub fn free_retired<S: MapStore>(
        &mut self,
        retired: &BTreeSet<BackendKey>,
        store: &mut S,
    ) -> (usize, Option<S::Error>) {
        let unreachable = self.unreachable_of(retired);
        let mut deleted = 0;
        let mut first_error = None;
        for key in &unreachable {
            let member = self.backends.get(key).map(|value| member_key(key, value));
            if let Some(member) = member
                && let Err(error) = store.delete_member(&member)
            {
                first_error.get_or_insert(error);
                continue;
            }
            match store.delete_backend(key) {
                Ok(()) => {
                    self.backends.remove(key);
                    deleted += 1;
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        (deleted, first_error)
    }

    /// Deletes the members no slot accounts for (left by an agent that
    /// died while freeing retired slots), found when the maps were read.
    pub fn free_orphan_members<S: MapStore>(&mut self, store: &mut S) -> Option<S::Error> {
        let mut first_error = None;
        for member in std::mem::take(&mut self.stray_members) {
            if let Err(error) = store.delete_member(&member) {
                first_error.get_or_insert(error);
                self.stray_members.insert(member);
            }
        }
        first_error
    }
}

/// The slots a SERVICES entry points at.
fn slots_of(value: &ServiceValue) -> impl Iterator<Item = BackendKey> + '_ {
    (0..value.backend_count).map(|index| BackendKey {
        service_id: value.service_id,
        generation: value.generation,
        index,
    })
}

/// What one apply may still hand out: ids, and room for backends.
struct Budget<'l> {
    limits: &'l Limits,
    ids: IdAllocator,
    /// Backends the Service entries balance over, in total, so far.
    live_backends: usize,
}

/// Hands out the lowest free Service ids during one apply, scanning forward
/// only, so programming N new frontends costs O(N + max) rather than O(N²).
/// The ids in use are gathered on the first allocation only: a sync that
/// creates no frontend never pays for it.
struct IdAllocator {
    in_use: Option<BTreeSet<u32>>,
    next: u32,
    max: u32,
}

impl IdAllocator {
    fn new(max: u32) -> Self {
        Self {
            in_use: None,
            next: 1,
            max,
        }
    }

    fn allocate(&mut self, state: &PinnedState) -> Option<u32> {
        let in_use = self.in_use.get_or_insert_with(|| state.ids_in_use());
        let id = (self.next..=self.max).find(|id| !in_use.contains(id))?;
        in_use.insert(id);
        self.next = id + 1;
        Some(id)
    }
}

/// Capacity limits the agent enforces before touching the maps.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Service frontends (ip, port, protocol) on this node.
    pub max_services: u32,
    pub max_backends_per_service: usize,
    /// Backends over all frontends. Half the BACKENDS map by default: an
    /// update writes a frontend's new generation before the old one is
    /// freed, so a sync that changes everything needs room for both.
    pub max_backends: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: dataplane_common::SERVICES_MAX_ENTRIES,
            max_backends_per_service: usize::from(u16::MAX),
            max_backends: dataplane_common::BACKENDS_MAX_ENTRIES as usize / 2,
        }
    }
}

mod entries;
mod slots;
pub use entries::ServiceEntries;
pub use slots::Slots;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

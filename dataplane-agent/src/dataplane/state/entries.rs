//! The mirror of SERVICES, with what a sync of one change asks of all of
//! it kept up to date as entries come and go: the backends in use, and
//! which generation each id is at. At 100,000 frontends a walk over the
//! map for either costs milliseconds, and every change would pay it.

use std::collections::{BTreeMap, HashMap};

use dataplane_common::{ServiceKey, ServiceValue};

#[derive(Clone, Debug, Default)]
pub struct ServiceEntries {
    entries: BTreeMap<ServiceKey, ServiceValue>,
    /// The sum of the entries' backend counts.
    live_backends: usize,
    /// Id -> (generation, backend count) of the entry with that id.
    by_id: HashMap<u32, (u16, u16)>,
}

impl ServiceEntries {
    pub fn insert(&mut self, key: ServiceKey, value: ServiceValue) -> Option<ServiceValue> {
        let previous = self.entries.insert(key, value);
        if let Some(previous) = &previous {
            self.forget(previous);
        }
        self.live_backends += usize::from(value.backend_count);
        self.by_id
            .insert(value.service_id, (value.generation, value.backend_count));
        previous
    }

    pub fn remove(&mut self, key: &ServiceKey) -> Option<ServiceValue> {
        let removed = self.entries.remove(key)?;
        self.forget(&removed);
        Some(removed)
    }

    fn forget(&mut self, value: &ServiceValue) {
        self.live_backends -= usize::from(value.backend_count);
        // Ids are unique among entries: the check only guards against a
        // map that says otherwise.
        if self.by_id.get(&value.service_id) == Some(&(value.generation, value.backend_count)) {
            self.by_id.remove(&value.service_id);
        }
    }

    /// The backends the entries balance over, in total.
    pub fn live_backends(&self) -> usize {
        self.live_backends
    }

    /// (generation, backend count) of the entry with this id.
    pub fn by_id(&self, service_id: u32) -> Option<(u16, u16)> {
        self.by_id.get(&service_id).copied()
    }
}

impl std::ops::Deref for ServiceEntries {
    type Target = BTreeMap<ServiceKey, ServiceValue>;

    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

impl PartialEq for ServiceEntries {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for ServiceEntries {}

impl PartialEq<BTreeMap<ServiceKey, ServiceValue>> for ServiceEntries {
    fn eq(&self, other: &BTreeMap<ServiceKey, ServiceValue>) -> bool {
        self.entries == *other
    }
}

impl FromIterator<(ServiceKey, ServiceValue)> for ServiceEntries {
    fn from_iter<I: IntoIterator<Item = (ServiceKey, ServiceValue)>>(iter: I) -> Self {
        let mut entries = Self::default();
        for (key, value) in iter {
            entries.insert(key, value);
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(vip: u32) -> ServiceKey {
        ServiceKey {
            vip_be: vip,
            port_be: 80,
            protocol: 6,
            scope: 0,
        }
    }

    fn value(service_id: u32, generation: u16, backend_count: u16) -> ServiceValue {
        ServiceValue {
            service_id,
            backend_count,
            generation,
            flags: 0,
            affinity_timeout_s: 0,
        }
    }

    #[test]
    fn the_totals_follow_inserts_replacements_and_removals() {
        let mut entries = ServiceEntries::default();
        entries.insert(key(1), value(1, 0, 3));
        entries.insert(key(2), value(2, 0, 5));
        assert_eq!(entries.live_backends(), 8);
        entries.insert(key(1), value(1, 1, 2));
        assert_eq!(entries.live_backends(), 7);
        assert_eq!(entries.by_id(1), Some((1, 2)));
        entries.remove(&key(2));
        assert_eq!(entries.live_backends(), 2);
        assert_eq!(entries.by_id(2), None);
        assert_eq!(entries.remove(&key(2)), None);
        assert_eq!(entries.live_backends(), 2);
        let rebuilt: ServiceEntries = entries.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(rebuilt, entries);
        assert_eq!(rebuilt.live_backends(), 2);
        assert_eq!(rebuilt.by_id(1), Some((1, 2)));
    }
}

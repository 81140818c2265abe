//! The mirror of BACKENDS, grouped by (id, generation): one vector per
//! generation instead of a tree entry per slot. A million slots as tree
//! entries cost about 40 bytes each; grouped, about 20.

use std::collections::BTreeMap;

use dataplane_common::{BackendKey, BackendValue};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    /// (id, generation) -> value by slot index; None where the map has no
    /// slot (a write that failed, a slot already freed). Never empty, and
    /// never ends with None.
    generations: BTreeMap<(u32, u16), Vec<Option<BackendValue>>>,
    len: usize,
}

impl Slots {
    pub fn get(&self, key: &BackendKey) -> Option<&BackendValue> {
        self.generations
            .get(&(key.service_id, key.generation))?
            .get(usize::from(key.index))?
            .as_ref()
    }

    pub fn contains_key(&self, key: &BackendKey) -> bool {
        self.get(key).is_some()
    }

    pub fn insert(&mut self, key: BackendKey, value: BackendValue) -> Option<BackendValue> {
        let slots = self
            .generations
            .entry((key.service_id, key.generation))
            .or_default();
        let index = usize::from(key.index);
        if slots.len() <= index {
            slots.resize(index + 1, None);
        }
        let previous = slots[index].replace(value);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    pub fn remove(&mut self, key: &BackendKey) -> Option<BackendValue> {
        let generation = (key.service_id, key.generation);
        let slots = self.generations.get_mut(&generation)?;
        let removed = slots.get_mut(usize::from(key.index))?.take()?;
        self.len -= 1;
        while slots.last().is_some_and(Option::is_none) {
            slots.pop();
        }
        if slots.is_empty() {
            self.generations.remove(&generation);
        }
        Some(removed)
    }

    /// Gives back the room a generation's vector kept for growth, once
    /// all of its slots are written.
    pub fn seal(&mut self, service_id: u32, generation: u16) {
        if let Some(slots) = self.generations.get_mut(&(service_id, generation)) {
            slots.shrink_to_fit();
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every slot, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (BackendKey, BackendValue)> + '_ {
        self.generations
            .iter()
            .flat_map(|((service_id, generation), slots)| {
                slots.iter().enumerate().filter_map(move |(index, value)| {
                    Some((
                        BackendKey {
                            service_id: *service_id,
                            generation: *generation,
                            // Indexes come from u16 keys.
                            index: index as u16,
                        },
                        (*value)?,
                    ))
                })
            })
    }

    pub fn keys(&self) -> impl Iterator<Item = BackendKey> + '_ {
        self.iter().map(|(key, _)| key)
    }

    /// The slots of one generation.
    pub fn of_generation(
        &self,
        service_id: u32,
        generation: u16,
    ) -> impl Iterator<Item = BackendKey> + '_ {
        self.generations
            .get(&(service_id, generation))
            .into_iter()
            .flat_map(move |slots| {
                slots
                    .iter()
                    .enumerate()
                    .filter(|(_, value)| value.is_some())
                    .map(move |(index, _)| BackendKey {
                        service_id,
                        generation,
                        index: index as u16,
                    })
            })
    }

    /// The ids that own slots, each once.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        let mut last = None;
        self.generations.keys().filter_map(move |(id, _)| {
            let new = last != Some(*id);
            last = Some(*id);
            new.then_some(*id)
        })
    }
}

impl std::ops::Index<&BackendKey> for Slots {
    type Output = BackendValue;

    fn index(&self, key: &BackendKey) -> &BackendValue {
        self.get(key).unwrap_or_else(|| panic!("no slot {key:?}"))
    }
}

impl FromIterator<(BackendKey, BackendValue)> for Slots {
    fn from_iter<I: IntoIterator<Item = (BackendKey, BackendValue)>>(iter: I) -> Self {
        let mut slots = Self::default();
        let mut last = None;
        for (key, value) in iter {
            let generation = (key.service_id, key.generation);
            if let Some((id, gen_)) = last.filter(|last| *last != generation) {
                slots.seal(id, gen_);
            }
            last = Some(generation);
            slots.insert(key, value);
        }
        if let Some((id, gen_)) = last {
            slots.seal(id, gen_);
        }
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(service_id: u32, generation: u16, index: u16) -> BackendKey {
        BackendKey {
            service_id,
            generation,
            index,
        }
    }

    fn value(last_octet: u8) -> BackendValue {
        BackendValue {
            ip_be: u32::from_be_bytes([10, 0, 0, last_octet]).to_be(),
            node_ip_be: 0,
            port_be: 8080u16.to_be(),
            flags: 0,
        }
    }

    #[test]
    fn reads_as_a_map_of_slots() {
        let mut slots = Slots::default();
        assert_eq!(slots.insert(key(2, 0, 1), value(1)), None);
        assert_eq!(slots.insert(key(1, 5, 0), value(2)), None);
        assert_eq!(slots.insert(key(2, 0, 1), value(3)), Some(value(1)));
        assert_eq!(slots.len(), 2);
        assert_eq!(slots.get(&key(2, 0, 0)), None, "a hole is no slot");
        assert_eq!(slots[&key(2, 0, 1)], value(3));
        assert_eq!(
            slots.iter().collect::<Vec<_>>(),
            vec![(key(1, 5, 0), value(2)), (key(2, 0, 1), value(3))]
        );
        assert_eq!(slots.ids().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            slots.of_generation(2, 0).collect::<Vec<_>>(),
            vec![key(2, 0, 1)]
        );
    }

    #[test]
    fn removing_the_last_slot_of_a_generation_forgets_it() {
        let mut slots: Slots = [(key(1, 0, 0), value(1)), (key(1, 0, 1), value(2))]
            .into_iter()
            .collect();
        assert_eq!(slots.remove(&key(1, 0, 1)), Some(value(2)));
        assert_eq!(slots.remove(&key(1, 0, 1)), None);
        assert_eq!(slots.remove(&key(1, 0, 0)), Some(value(1)));
        assert!(slots.is_empty());
        assert_eq!(slots, Slots::default(), "no empty generation is left");
        assert_eq!(slots.ids().count(), 0);
    }

    #[test]
    fn equal_contents_compare_equal_whatever_the_order_of_writes() {
        let mut a = Slots::default();
        a.insert(key(1, 0, 2), value(3));
        a.insert(key(1, 0, 0), value(1));
        a.insert(key(1, 0, 1), value(2));
        let b: Slots = a.iter().collect();
        a.seal(1, 0);
        assert_eq!(a, b);
    }
}

//! PORTS, the bitmap that lets the interface programs pass every packet
//! that cannot concern a Service after one array lookup. A bit is set
//! before a frontend that needs it is written, and cleared only when no
//! frontend and no tracked flow uses it any more, so a packet that needs
//! translating is never skipped.

use std::{collections::BTreeMap, time::Instant};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData};
use dataplane_common::{
    CT_FORWARD, CT_REPLY, CT_TUNNEL_RETURN, CtKey, CtValue, PORT_KIND_BACKEND, PORT_KIND_FRONTEND,
    PORTS_WORDS, map_names, port_bit,
};

use super::{maps, pins::PinLayout};
use crate::model::{Frontend, FrontendEntry};

/// A PORTS bitmap in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap(pub Vec<u64>);

impl Default for Bitmap {
    fn default() -> Self {
        Self(vec![0; PORTS_WORDS as usize])
    }
}

impl Bitmap {
    pub fn set(&mut self, kind: u8, protocol: u8, port: u16) {
        if let Some((word, mask)) = port_bit(kind, protocol, port) {
            self.0[word as usize] |= mask;
        }
    }

    pub fn contains(&self, kind: u8, protocol: u8, port: u16) -> bool {
        port_bit(kind, protocol, port).is_some_and(|(word, mask)| self.0[word as usize] & mask != 0)
    }

    pub fn union(&self, other: &Bitmap) -> Bitmap {
        Bitmap(self.0.iter().zip(&other.0).map(|(a, b)| a | b).collect())
    }
}

/// The ports the desired frontends need: every frontend's port (any
/// scope: a ClusterIP can be reached from outside too) and every backend's
/// port.
pub fn of_frontends<'a>(
    frontends: impl Iterator<Item = (&'a Frontend, &'a FrontendEntry)>,
) -> Bitmap {
    let mut bitmap = Bitmap::default();
    for (frontend, entry) in frontends {
        let protocol = frontend.protocol.number();
        bitmap.set(PORT_KIND_FRONTEND, protocol, frontend.port);
        for backend in &entry.backends {
            bitmap.set(PORT_KIND_BACKEND, protocol, backend.port);
        }
    }
    bitmap
}

/// The ports tracked flows still need: forward entries their frontend's
/// port, reply and tunnel-return entries their backend's port.
pub fn of_flows(entries: &BTreeMap<CtKey, CtValue>) -> Bitmap {
    let mut bitmap = Bitmap::default();
    for (key, value) in entries {
        let (kind, port_be) = match value.kind {
            CT_FORWARD => (PORT_KIND_FRONTEND, key.dst_port_be),
            CT_REPLY | CT_TUNNEL_RETURN => (PORT_KIND_BACKEND, key.src_port_be),
            _ => continue,
        };
        bitmap.set(kind, key.protocol, u16::from_be(port_be));
    }
    bitmap
}

/// What the sync loop asked PORTS to hold, and since when. A sweep's
/// report describes the flows as its walk found them; the bits to keep
/// with it are those of every set in force at any time since that walk
/// began (a sync may have added and removed a frontend since, and a flow
/// of it may exist that the walk did not see).
#[derive(Debug, Default)]
pub struct WantedHistory {
    /// Oldest first.
    sets: Vec<(Instant, Bitmap)>,
}

impl WantedHistory {
    pub fn push(&mut self, at: Instant, wanted: Bitmap) {
        self.sets.push((at, wanted));
    }

    pub fn latest(&self) -> Option<&Bitmap> {
        self.sets.last().map(|(_, set)| set)
    }

    /// The union of the sets in force at any time since `since`; None
    /// before the first set.
    pub fn in_force_since(&self, since: Instant) -> Option<Bitmap> {
        let first = self.first_in_force_at(since);
        let mut sets = self.sets.get(first..)?.iter().map(|(_, set)| set);
        let first_set = sets.next()?.clone();
        Some(sets.fold(first_set, |all, set| all.union(set)))
    }

    /// Forgets the sets no longer in force at `since`.
    pub fn forget_before(&mut self, since: Instant) {
        let first = self.first_in_force_at(since);
        self.sets.drain(..first);
    }

    /// The index of the set in force at `since` (the last one set at or
    /// before it; the first one if all came later).
    fn first_in_force_at(&self, since: Instant) -> usize {
        self.sets
            .iter()
            .rposition(|(at, _)| *at <= since)
            .unwrap_or(0)
    }
}

/// The pinned PORTS map and what the agent wanted in it. Owned by the sync
/// loop: a sync or a carry over from another pin layout only adds bits;
/// after each conntrack sweep the loop clears those that neither the
/// frontends (since the sweep's walk) nor the remaining flows use.
pub struct PortFilter {
    map: Array<MapData, u64>,
    current: Bitmap,
    wanted: WantedHistory,
}

impl PortFilter {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let map: Array<MapData, u64> = maps::open_pinned(layout, map_names::PORTS)?;
        let mut current = Bitmap::default();
        for (index, word) in current.0.iter_mut().enumerate() {
            *word = map
                .get(&(index as u32), 0)
                .with_context(|| format!("reading PORTS word {index}"))?;
        }
        Ok(Self {
            map,
            current,
            wanted: WantedHistory::default(),
        })
    }

    /// Sets the bits `wanted` needs (before the frontends that need them
    /// are written); clears nothing.
    pub fn want(&mut self, wanted: Bitmap) -> Result<()> {
        let target = self.current.union(&wanted);
        self.write(&target)?;
        self.wanted.push(Instant::now(), wanted);
        Ok(())
    }

    /// Adds `extra` to what is wanted (the ports of flows carried over from
    /// another pin layout) until a sweep has seen those flows.
    pub fn add(&mut self, extra: &Bitmap) -> Result<()> {
        let wanted = self
            .wanted
            .latest()
            .map_or_else(|| extra.clone(), |latest| latest.union(extra));
        self.want(wanted)
    }

    /// Clears the bits that neither the sets wanted since `walked_at` nor
    /// `flows` (what the sweep that began then found) need. Does nothing
    /// before the first [`PortFilter::want`]. Returns how many words
    /// changed.
    pub fn retain(&mut self, flows: &Bitmap, walked_at: Instant) -> Result<usize> {
        let Some(wanted) = self.wanted.in_force_since(walked_at) else {
            return Ok(0);
        };
        let changed = self.write(&wanted.union(flows))?;
        self.wanted.forget_before(walked_at);
        Ok(changed)
    }

    fn write(&mut self, target: &Bitmap) -> Result<usize> {
        let mut changed = 0;
        for (index, (current, wanted)) in self.current.0.iter_mut().zip(&target.0).enumerate() {
            if current != wanted {
                self.map
                    .set(index as u32, wanted, 0)
                    .with_context(|| format!("writing PORTS word {index}"))?;
                *current = *wanted;
                changed += 1;
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use dataplane_common::{IPPROTO_TCP, IPPROTO_UDP};

    use super::*;
    use crate::model::{Backend, DesiredDataplane, ObjectName, Protocol};

    #[test]
    fn frontends_mark_their_ports_and_their_backends_ports() {
        let mut desired = DesiredDataplane::default();
        desired.frontends.insert(
            Frontend::cluster(Ipv4Addr::new(10, 96, 0, 10), 53, Protocol::Udp),
            FrontendEntry {
                service: ObjectName::new("kube-system", "dns"),
                port_name: "".into(),
                backends: vec![Backend::routed(Ipv4Addr::new(10, 0, 0, 1), 5353)],
                affinity_timeout_s: None,
                source_ranges: vec![],
                drop_without_backends: false,
            },
        );
        let bitmap = of_frontends(desired.frontends.iter());
        assert!(bitmap.contains(PORT_KIND_FRONTEND, IPPROTO_UDP, 53));
        assert!(bitmap.contains(PORT_KIND_BACKEND, IPPROTO_UDP, 5353));
        assert!(!bitmap.contains(PORT_KIND_FRONTEND, IPPROTO_TCP, 53));
        assert!(!bitmap.contains(PORT_KIND_BACKEND, IPPROTO_UDP, 53));
        assert!(!bitmap.contains(PORT_KIND_FRONTEND, IPPROTO_UDP, 5353));
        assert_eq!(bitmap.0.iter().map(|w| w.count_ones()).sum::<u32>(), 2);
    }

    #[test]
    fn flows_keep_their_ports() {
        let key = |src_port: u16, dst_port: u16| CtKey {
            src_be: 1,
            dst_be: 2,
            src_port_be: src_port.to_be(),
            dst_port_be: dst_port.to_be(),
            protocol: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let value = |kind| CtValue {
            nat_ip_be: 0,
            snat_ip_be: 0,
            tunnel_ip_be: 0,
            nat_port_be: 0,
            snat_port_be: 0,
            kind,
            flags: 0,
            _pad: 0,
            service_id: 0,
            last_seen_ns: 0,
        };
        let flows = BTreeMap::from([
            (key(40000, 30080), value(CT_FORWARD)),
            (key(8080, 40000), value(CT_REPLY)),
            (key(9090, 40001), value(CT_TUNNEL_RETURN)),
        ]);
        let bitmap = of_flows(&flows);
        assert!(bitmap.contains(PORT_KIND_FRONTEND, IPPROTO_TCP, 30080));
        assert!(bitmap.contains(PORT_KIND_BACKEND, IPPROTO_TCP, 8080));
        assert!(bitmap.contains(PORT_KIND_BACKEND, IPPROTO_TCP, 9090));
        assert!(!bitmap.contains(PORT_KIND_FRONTEND, IPPROTO_TCP, 40000));
    }

    #[test]
    fn a_sweep_keeps_every_set_wanted_since_its_walk_began() {
        let start = Instant::now();
        let at = |ms| start + std::time::Duration::from_millis(ms);
        let ports = |port| {
            let mut bitmap = Bitmap::default();
            bitmap.set(PORT_KIND_FRONTEND, IPPROTO_TCP, port);
            bitmap
        };
        let mut history = WantedHistory::default();
        assert_eq!(history.in_force_since(at(0)), None, "nothing wanted yet");
        history.push(at(10), ports(80));
        // A frontend on 443 comes and goes between the walk and the trim.
        history.push(at(20), ports(80).union(&ports(443)));
        history.push(at(30), ports(80));
        let kept = history.in_force_since(at(15)).unwrap();
        assert!(kept.contains(PORT_KIND_FRONTEND, IPPROTO_TCP, 443));
        assert!(kept.contains(PORT_KIND_FRONTEND, IPPROTO_TCP, 80));
        // A walk after the removal needs only what is in force since.
        let later = history.in_force_since(at(35)).unwrap();
        assert!(!later.contains(PORT_KIND_FRONTEND, IPPROTO_TCP, 443));
        // A walk before the first set: everything since.
        assert!(history.in_force_since(at(0)).unwrap().contains(
            PORT_KIND_FRONTEND,
            IPPROTO_TCP,
            443
        ));
        history.forget_before(at(25));
        assert_eq!(history.sets.len(), 2, "the set in force at 25 and later");
        assert!(history.in_force_since(at(25)).unwrap().contains(
            PORT_KIND_FRONTEND,
            IPPROTO_TCP,
            443
        ));
    }
}

//! Expiring idle flows from the CONNTRACK map. The programs only refresh
//! timestamps (and the LRU evicts under pressure); the agent decides when a
//! flow is over, per pair of entries, so one direction is never removed
//! while the other is still in use.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use dataplane_common::{
    CT_FLAG_FIN_SEEN, CT_FLAG_RST_SEEN, CT_FORWARD, CT_REPLY, CtKey, CtValue, IPPROTO_TCP,
    map_names,
};

use super::{maps, pins::PinLayout, ports};

/// How long a flow may stay idle.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub tcp_established: Duration,
    /// After a FIN or RST in either direction.
    pub tcp_closing: Duration,
    pub udp: Duration,
}

impl Timeouts {
    fn for_flow(&self, protocol: u8, flags: u8) -> Duration {
        if protocol != IPPROTO_TCP {
            self.udp
        } else if flags & (CT_FLAG_FIN_SEEN | CT_FLAG_RST_SEEN) != 0 {
            self.tcp_closing
        } else {
            self.tcp_established
        }
    }
}

/// A backend as a frontend id uses it: (service id, address, port), both
/// in network order as in the maps.
pub type LiveBackend = (u32, u32, u16);

/// The keys to delete: forward/reply pairs idle (in both directions) for
/// longer than their timeout, and lone entries idle for longer than theirs.
/// With `live`, UDP flows to a backend their frontend no longer uses go at
/// once: UDP has no connection to end, so without this a client that keeps
/// sending would talk to a removed backend forever (kube-proxy clears such
/// conntrack entries for the same reason). TCP flows keep their backend
/// until they end, as with kube-proxy.
pub fn expired(
    entries: &BTreeMap<CtKey, CtValue>,
    now_ns: u64,
    timeouts: &Timeouts,
    live: Option<&BTreeSet<LiveBackend>>,
) -> Vec<(CtKey, Expiry)> {
    let idle_longer_than = |last_seen_ns: u64, timeout: Duration| {
        u128::from(now_ns.saturating_sub(last_seen_ns)) > timeout.as_nanos()
    };
    let stale = |key: &CtKey, value: &CtValue| {
        key.protocol != IPPROTO_TCP
            && live.is_some_and(|live| {
                !live.contains(&(value.service_id, value.nat_ip_be, value.nat_port_be))
            })
    };
    let mut out = Vec::new();
    let mut paired = BTreeSet::new();
    for (key, value) in entries.iter().filter(|(_, v)| v.kind == CT_FORWARD) {
        let reply_key = key.reply_of(value);
        if stale(key, value) {
            out.push((*key, Expiry::BackendGone));
            if entries.contains_key(&reply_key) {
                paired.insert(reply_key);
                out.push((reply_key, Expiry::BackendGone));
            }
            continue;
        }
        match entries.get(&reply_key).filter(|r| r.kind == CT_REPLY) {
            Some(reply) => {
                paired.insert(reply_key);
                let last_seen = value.last_seen_ns.max(reply.last_seen_ns);
                let timeout = timeouts.for_flow(key.protocol, value.flags | reply.flags);
                if idle_longer_than(last_seen, timeout) {
                    out.push((*key, Expiry::Idle));
                    out.push((reply_key, Expiry::Idle));
                }
            }
            None => {
                if idle_longer_than(
                    value.last_seen_ns,
                    timeouts.for_flow(key.protocol, value.flags),
                ) {
                    out.push((*key, Expiry::Idle));
                }
            }
        }
    }
    for (key, value) in entries
        .iter()
        .filter(|(k, v)| v.kind != CT_FORWARD && !paired.contains(k))
    {
        if idle_longer_than(
            value.last_seen_ns,
            timeouts.for_flow(key.protocol, value.flags),
        ) {
            out.push((*key, Expiry::Idle));
        }
    }
    out
}

/// Why a conntrack entry goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Idle for longer than its timeout.
    Idle,
    /// A UDP flow whose backend left its frontend (what kube-proxy's
    /// conntrack reconciler deletes).
    BackendGone,
}

/// What one sweep saw and did.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub entries: usize,
    pub expired: usize,
    /// Of `expired`, UDP flows cut because their backend left.
    pub backend_gone: usize,
    /// The ports the remaining flows need in PORTS.
    pub ports_in_use: ports::Bitmap,
}

/// Reads the whole CONNTRACK map and deletes expired flows. Blocking (one
/// syscall per entry): run it off the async workers.
/// `live` is asked after the walk: the backends must be at least as new as
/// every flow the walk saw, or a flow to a backend added during the walk
/// would look stale.
pub fn sweep(
    layout: &PinLayout,
    timeouts: &Timeouts,
    now_ns: u64,
    live: impl FnOnce() -> Option<BTreeSet<LiveBackend>>,
) -> Result<SweepReport> {
    let mut map: HashMap<MapData, CtKey, CtValue> =
        maps::open_pinned(layout, map_names::CONNTRACK)?;
    let mut entries = BTreeMap::new();
    // Entries can vanish (LRU eviction) during the walk; skip those.
    for entry in map.iter().filter_map(Result::ok) {
        entries.insert(entry.0, entry.1);
    }
    let live = live();
    let expired = expired(&entries, now_ns, timeouts, live.as_ref());
    let mut removed = 0;
    let mut backend_gone = 0;
    for (key, why) in &expired {
        // The tuple may have started a new flow since the walk (a client
        // reusing its port): its entry then has a newer timestamp, and
        // stays.
        let seen = entries.get(key).map(|v| v.last_seen_ns);
        match map.get(key, 0) {
            Ok(now) if Some(now.last_seen_ns) != seen => {
                entries.insert(*key, now);
                continue;
            }
            Err(aya::maps::MapError::KeyNotFound) => {
                entries.remove(key);
                continue;
            }
            _ => {}
        }
        match map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(error) => return Err(error).context("deleting an expired CONNTRACK entry"),
        }
        entries.remove(key);
        removed += 1;
        if *why == Expiry::BackendGone {
            backend_gone += 1;
        }
    }
    Ok(SweepReport {
        entries: entries.len(),
        expired: removed,
        backend_gone,
        ports_in_use: ports::of_flows(&entries),
    })
}

#[cfg(test)]
mod tests {
    use dataplane_common::{CT_FLAG_REMOTE, CT_FLAG_SNAT, CT_TUNNEL_RETURN, IPPROTO_UDP};

    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const TIMEOUTS: Timeouts = Timeouts {
        tcp_established: Duration::from_secs(3600),
        tcp_closing: Duration::from_secs(10),
        udp: Duration::from_secs(60),
    };

    fn key(src: u32, src_port: u16, dst: u32, dst_port: u16, protocol: u8) -> CtKey {
        CtKey::new(src, src_port, dst, dst_port, protocol)
    }

    fn value(kind: u8, nat: (u32, u16), last_seen_s: u64, flags: u8) -> CtValue {
        CtValue {
            nat_ip_be: nat.0,
            snat_ip_be: 0,
            tunnel_ip_be: 0,
            nat_port_be: nat.1,
            snat_port_be: 0,
            kind,
            flags,
            _pad: 0,
            service_id: 1,
            last_seen_ns: last_seen_s * SECOND,
        }
    }

    /// Client 1:1000 -> frontend 9:80, backend 5:8080, with the given last
    /// use of each direction.
    fn pair(protocol: u8, forward_s: u64, reply_s: u64, flags: u8) -> BTreeMap<CtKey, CtValue> {
        BTreeMap::from([
            (
                key(1, 1000, 9, 80, protocol),
                value(CT_FORWARD, (5, 8080), forward_s, flags),
            ),
            (
                key(5, 8080, 1, 1000, protocol),
                value(CT_REPLY, (9, 80), reply_s, 0),
            ),
        ])
    }

    #[test]
    fn a_pair_lives_while_either_direction_is_used() {
        // The client went quiet an hour ago, the backend still sends.
        let entries = pair(IPPROTO_TCP, 0, 3000, 0);
        assert!(expired(&entries, 3601 * SECOND, &TIMEOUTS, None).is_empty());
        assert_eq!(expired(&entries, 6601 * SECOND, &TIMEOUTS, None).len(), 2);
    }

    #[test]
    fn closed_tcp_and_udp_expire_sooner() {
        let closed = pair(IPPROTO_TCP, 100, 100, CT_FLAG_FIN_SEEN);
        assert!(expired(&closed, 105 * SECOND, &TIMEOUTS, None).is_empty());
        assert_eq!(expired(&closed, 111 * SECOND, &TIMEOUTS, None).len(), 2);
        let udp = pair(IPPROTO_UDP, 100, 100, 0);
        assert!(expired(&udp, 150 * SECOND, &TIMEOUTS, None).is_empty());
        assert_eq!(expired(&udp, 161 * SECOND, &TIMEOUTS, None).len(), 2);
    }

    #[test]
    fn lone_entries_expire_on_their_own_clock() {
        let mut entries = pair(IPPROTO_UDP, 0, 0, 0);
        // The LRU evicted the forward entry; the reply entry is alone.
        entries.remove(&key(1, 1000, 9, 80, IPPROTO_UDP));
        entries.insert(
            key(7, 53, 2, 4000, IPPROTO_UDP),
            value(CT_TUNNEL_RETURN, (0, 0), 100, 0),
        );
        let due = expired(&entries, 61 * SECOND, &TIMEOUTS, None);
        assert_eq!(
            due,
            vec![(key(5, 8080, 1, 1000, IPPROTO_UDP), Expiry::Idle)]
        );
    }

    #[test]
    fn udp_flows_to_a_removed_backend_go_at_once_tcp_flows_stay() {
        let live = BTreeSet::from([(1, 6, 8080)]);
        let udp = pair(IPPROTO_UDP, 100, 100, 0);
        let cut = expired(&udp, 101 * SECOND, &TIMEOUTS, Some(&live));
        assert_eq!(cut.len(), 2);
        assert!(cut.iter().all(|(_, why)| *why == Expiry::BackendGone));
        let still_used = BTreeSet::from([(1, 5, 8080)]);
        assert!(expired(&udp, 101 * SECOND, &TIMEOUTS, Some(&still_used)).is_empty());
        let tcp = pair(IPPROTO_TCP, 100, 100, 0);
        assert!(expired(&tcp, 101 * SECOND, &TIMEOUTS, Some(&live)).is_empty());
    }

    #[test]
    fn snat_replies_are_found_by_the_translated_port() {
        let forward_key = key(1, 1000, 9, 80, IPPROTO_TCP);
        let mut forward = value(CT_FORWARD, (5, 8080), 0, CT_FLAG_SNAT);
        forward.snat_ip_be = 3;
        forward.snat_port_be = 61000;
        assert_eq!(
            forward_key.reply_of(&forward),
            key(5, 8080, 3, 61000, IPPROTO_TCP)
        );
    }

    /// A packet as (source, source port, destination, destination port).
    type Packet = (u32, u16, u32, u16);

    /// What the programs do to a packet with the entry of its direction.
    fn translate(packet: Packet, entry: &CtValue) -> Packet {
        let (mut src, mut src_port, mut dst, mut dst_port) = packet;
        let snat = entry.flags & CT_FLAG_SNAT != 0;
        if entry.kind == CT_FORWARD {
            (dst, dst_port) = (entry.nat_ip_be, entry.nat_port_be);
            if snat {
                (src, src_port) = (entry.snat_ip_be, entry.snat_port_be);
            }
        } else {
            (src, src_port) = (entry.nat_ip_be, entry.nat_port_be);
            if snat {
                (dst, dst_port) = (entry.snat_ip_be, entry.snat_port_be);
            }
        }
        (src, src_port, dst, dst_port)
    }

    #[test]
    fn the_reply_entry_undoes_the_forward_translation_seen_from_the_client() {
        let client_to_frontend: Packet = (1, 1000, 9, 80);
        let forward_key = key(1, 1000, 9, 80, IPPROTO_TCP);
        let direct = value(CT_FORWARD, (5, 8080), 0, 0);
        let mut snat = value(CT_FORWARD, (5, 8080), 0, CT_FLAG_SNAT | CT_FLAG_REMOTE);
        (snat.snat_ip_be, snat.snat_port_be) = (3, 61000);
        for forward in [direct, snat] {
            let (src, src_port, dst, dst_port) = translate(client_to_frontend, &forward);
            // The backend answers the packet it got...
            let answer: Packet = (dst, dst_port, src, src_port);
            let reply_key = forward_key.reply_of(&forward);
            assert_eq!(
                reply_key,
                key(answer.0, answer.1, answer.2, answer.3, IPPROTO_TCP),
                "the answer is found under the reply key"
            );
            // ...and the client gets it from the address it dialled.
            let reply = CtValue::reply_of(&forward_key, &forward);
            assert_eq!(reply.kind, CT_REPLY);
            assert_eq!(reply.service_id, forward.service_id);
            assert_eq!(translate(answer, &reply), (9, 80, 1, 1000));
        }
    }
}

//! Our own connection tracking for flows translated on the node
//! interfaces: one LRU entry per direction, both created together, so every
//! packet of a flow is translated the same way without consulting the
//! Service maps again (a backend that leaves the Service keeps its
//! established flows, as with kube-proxy's conntrack).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    CT_FLAG_FIN_SEEN, CT_FLAG_RST_SEEN, CT_FLAG_SNAT, CT_REPLY, CT_TUNNEL_RETURN, CtKey, CtValue,
    Stat,
};

use crate::{
    maps::{CONNTRACK, count},
    packet::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The key of the direction `flow` travels in.
#[inline(always)]
pub fn key_of(flow: &Flow) -> CtKey {
    CtKey::new(
        flow.src_be,
        flow.src_port_be,
        flow.dst_be,
        flow.dst_port_be,
        flow.protocol,
    )
}

/// The entry of `key`, for in-place refreshes.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(key)
}

/// Whether a TCP packet starts a new connection on a tuple whose previous
/// connection was closed: the old entry must not decide where it goes.
#[inline(always)]
pub fn reopens(entry: *const CtValue, flow: &Flow) -> bool {
    // SAFETY: `entry` points into the map; a racing update of the flags
    // only makes this decision one packet late.
    let flags = unsafe { (*entry).flags };
    flow.is_tcp()
        && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && flags & (CT_FLAG_FIN_SEEN | CT_FLAG_RST_SEEN) != 0
}

/// Marks the entry used now, and remembers a TCP close so the agent's
/// sweep expires it soon.
#[inline(always)]
pub fn refresh(entry: *mut CtValue, flow: &Flow) {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut closing = 0;
    if flow.tcp_flags & TCP_FIN != 0 {
        closing |= CT_FLAG_FIN_SEEN;
    }
    if flow.tcp_flags & TCP_RST != 0 {
        closing |= CT_FLAG_RST_SEEN;
    }
    // SAFETY: `entry` points into the LRU map's value, valid for this
    // program run; concurrent writers only race on a timestamp and on
    // flags that are only ever added.
    unsafe {
        (*entry).last_seen_ns = now;
        if closing != 0 {
            (*entry).flags |= closing;
        }
    }
}

/// Whether `reply_key` already belongs to another live flow (the same
/// client address and port to two frontends that chose the same backend,
/// or a flow tunnelled here from another node): writing it would redirect
/// that flow's replies.
#[inline(always)]
pub fn clashes(reply_key: &CtKey, reply: &CtValue) -> bool {
    let Some(existing) = lookup(reply_key) else {
        return false;
    };
    // SAFETY: copied out of the map value at once.
    let existing = unsafe { *existing };
    let same_flow = existing.kind == reply.kind
        && existing.nat_ip_be == reply.nat_ip_be
        && existing.nat_port_be == reply.nat_port_be;
    !same_flow && is_live(&existing)
}

/// Whether an entry belongs to a flow that has not ended (no FIN or RST).
#[inline(always)]
pub fn is_live(entry: &CtValue) -> bool {
    entry.flags & (CT_FLAG_FIN_SEEN | CT_FLAG_RST_SEEN) == 0
}

/// Whether a backend's SYN-ACK matches the reply entry of a flow that is
/// over: its forward entry is gone or closing, so the SYN this answers did
/// not come through our translation (a new connection reusing the tuple).
#[inline(always)]
pub fn is_stale_reply(flow: &Flow, reply: &CtValue) -> bool {
    if !flow.is_tcp() || flow.tcp_flags & (TCP_SYN | TCP_ACK) != (TCP_SYN | TCP_ACK) {
        return false;
    }
    let forward_key = CtKey::new(
        flow.dst_be,
        flow.dst_port_be,
        reply.nat_ip_be,
        reply.nat_port_be,
        flow.protocol,
    );
    match lookup(&forward_key) {
        Some(forward) => {
            // SAFETY: read of the map value's flags.
            let flags = unsafe { (*forward).flags };
            flags & (CT_FLAG_FIN_SEEN | CT_FLAG_RST_SEEN) != 0
        }
        None => true,
    }
}

/// Ends the translated flow whose tuple a UDP packet from outside now uses
/// straight to the backend (not through a frontend): the client talks to
/// the backend directly, so the old flow is over. Left alone, its reply
/// entry would rewrite (or tunnel back) the direct flow's replies, and be
/// kept alive by them. TCP needs no such check: a new connection on the
/// tuple starts with a SYN (`is_stale_reply`).
#[inline(always)]
pub fn end_flow_replaced_by_direct(flow: &Flow) {
    let reply_key = CtKey::new(
        flow.dst_be,
        flow.dst_port_be,
        flow.src_be,
        flow.src_port_be,
        flow.protocol,
    );
    let Some(entry) = lookup(&reply_key) else {
        return;
    };
    // SAFETY: copied out of the map value at once.
    let reply = unsafe { *entry };
    if reply.kind == CT_REPLY && reply.flags & CT_FLAG_SNAT == 0 {
        forget(&CtKey::new(
            flow.src_be,
            flow.src_port_be,
            reply.nat_ip_be,
            reply.nat_port_be,
            flow.protocol,
        ));
        forget(&reply_key);
    } else if reply.kind == CT_TUNNEL_RETURN {
        forget(&reply_key);
    }
}

/// Removes an entry (one that must not translate any more).
#[inline(always)]
pub fn forget(key: &CtKey) {
    let _ = CONNTRACK.remove(key);
}

/// Stores both directions of a new flow. If the map refuses either, the
/// flow is not translated at all (never one direction only).
#[inline(always)]
pub fn create(
    forward_key: &CtKey,
    forward: &CtValue,
    reply_key: &CtKey,
    reply: &CtValue,
) -> Result<(), ()> {
    if CONNTRACK.insert(reply_key, reply, 0).is_err() {
        count(Stat::ExtConntrackFull);
        return Err(());
    }
    if CONNTRACK.insert(forward_key, forward, 0).is_err() {
        let _ = CONNTRACK.remove(reply_key);
        count(Stat::ExtConntrackFull);
        return Err(());
    }
    count(Stat::ExtConntrackCreated);
    count(Stat::ExtConntrackCreated);
    Ok(())
}

/// Stores one entry (the tunnel's return path on a backend's node).
#[inline(always)]
pub fn put(key: &CtKey, value: &CtValue) -> Result<(), ()> {
    match CONNTRACK.insert(key, value, 0) {
        Ok(()) => {
            count(Stat::ExtConntrackCreated);
            Ok(())
        }
        Err(_) => {
            count(Stat::ExtConntrackFull);
            Err(())
        }
    }
}

/// Now, on the clock the entries and the agent's sweep use.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

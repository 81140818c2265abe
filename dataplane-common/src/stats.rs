//! The per-CPU STATS counters.

/// Indexes into the per-CPU STATS array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect() or an unconnected sendmsg() to a frontend translated to a
    /// backend.
    SockTranslated = 0,
    /// connect() or sendmsg() to a frontend without usable endpoints, refused.
    SockRefusedNoEndpoints = 1,
    /// The chosen backend slot was missing: the maps were inconsistent.
    SockBackendMissing = 2,
    /// The reverse-translation map was full and an entry could not be stored.
    SockRevUpdateFailed = 3,
    /// A connection reused its client's affine backend.
    SockAffinityHit = 4,
    /// A new external flow was translated to a backend on this node.
    ExtNewLocal = 5,
    /// A new external flow was sent through the tunnel to another node.
    ExtNewTunnel = 6,
    /// A new external flow was SNATed to a backend on another node.
    ExtNewSnat = 7,
    /// A packet of a known external flow was translated.
    ExtEstablished = 8,
    /// A packet from the tunnel was decapsulated for a local backend.
    ExtDecapsulated = 9,
    /// External traffic to a frontend without endpoints was rejected
    /// (TCP RST or ICMP port unreachable).
    ExtRejected = 10,
    /// Dropped: externalTrafficPolicy Local and no endpoint on this node.
    ExtDropNoLocalEndpoint = 11,
    /// Dropped: the source is outside loadBalancerSourceRanges.
    ExtDropSourceRange = 12,
    /// A fragment or a packet with a truncated or malformed header addressed
    /// a frontend and was passed untranslated.
    ExtPassedMalformed = 13,
    /// The conntrack map refused an entry (the flow was not translated).
    ExtConntrackFull = 14,
    /// Encapsulation, redirect or a rewrite failed; the packet was dropped.
    ExtDropDatapathError = 15,
    /// An ICMP error about a translated flow was translated too.
    ExtIcmpTranslated = 16,
    /// No free SNAT source port was found; the packet was dropped.
    ExtSnatPortsExhausted = 17,
    /// A packet too big for the tunnel got ICMP "fragmentation needed".
    ExtTooBigForTunnel = 18,
    /// CONNTRACK entries written (two per new flow, one per tunnel-return).
    ExtConntrackCreated = 19,
    /// CONNTRACK entries the agent's sweep removed. Written by the agent,
    /// never by the programs: created - expired - present = evicted by the
    /// LRU under pressure.
    ConntrackExpired = 20,
    /// A new flow was refused: its reply direction is a live flow of
    /// another frontend (same client address and port, same backend).
    ExtConntrackClash = 21,
}

impl Stat {
    pub const COUNT: u32 = 22;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::SockTranslated,
        Stat::SockRefusedNoEndpoints,
        Stat::SockBackendMissing,
        Stat::SockRevUpdateFailed,
        Stat::SockAffinityHit,
        Stat::ExtNewLocal,
        Stat::ExtNewTunnel,
        Stat::ExtNewSnat,
        Stat::ExtEstablished,
        Stat::ExtDecapsulated,
        Stat::ExtRejected,
        Stat::ExtDropNoLocalEndpoint,
        Stat::ExtDropSourceRange,
        Stat::ExtPassedMalformed,
        Stat::ExtConntrackFull,
        Stat::ExtDropDatapathError,
        Stat::ExtIcmpTranslated,
        Stat::ExtSnatPortsExhausted,
        Stat::ExtTooBigForTunnel,
        Stat::ExtConntrackCreated,
        Stat::ConntrackExpired,
        Stat::ExtConntrackClash,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::SockTranslated => "sock_translated",
            Stat::SockRefusedNoEndpoints => "sock_refused_no_endpoints",
            Stat::SockBackendMissing => "sock_backend_missing",
            Stat::SockRevUpdateFailed => "sock_rev_update_failed",
            Stat::SockAffinityHit => "sock_affinity_hit",
            Stat::ExtNewLocal => "ext_new_local",
            Stat::ExtNewTunnel => "ext_new_tunnel",
            Stat::ExtNewSnat => "ext_new_snat",
            Stat::ExtEstablished => "ext_established",
            Stat::ExtDecapsulated => "ext_decapsulated",
            Stat::ExtRejected => "ext_rejected",
            Stat::ExtDropNoLocalEndpoint => "ext_drop_no_local_endpoint",
            Stat::ExtDropSourceRange => "ext_drop_source_range",
            Stat::ExtPassedMalformed => "ext_passed_malformed",
            Stat::ExtConntrackFull => "ext_conntrack_full",
            Stat::ExtDropDatapathError => "ext_drop_datapath_error",
            Stat::ExtIcmpTranslated => "ext_icmp_translated",
            Stat::ExtSnatPortsExhausted => "ext_snat_ports_exhausted",
            Stat::ExtTooBigForTunnel => "ext_too_big_for_tunnel",
            Stat::ExtConntrackCreated => "ext_conntrack_created",
            Stat::ConntrackExpired => "conntrack_expired",
            Stat::ExtConntrackClash => "ext_conntrack_clash",
        }
    }
}

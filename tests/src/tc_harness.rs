//! The node-interface programs loaded (not attached) with their real pinned
//! maps, run on crafted packets with BPF_PROG_TEST_RUN: deterministic
//! program tests, packet fuzzing and per-packet cost.
//!
//! The harness moves the calling thread into a network namespace of its own
//! (the programs' FIB lookups see an empty one) and back on drop; its pins
//! are uniquely named and removed on drop.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, MapData};
use dataplane_agent::{
    dataplane::{
        loader::LoadedObject,
        maps::{self, KernelMaps},
        pins::{self, PinLayout, ensure_bpffs_dir},
        ports,
        state::{Limits, PinnedState},
    },
    model::{
        Backend, DesiredDataplane, Frontend, FrontendEntry, ObjectName, Protocol, Scope,
        SourceRange,
    },
};
use dataplane_common::{
    ConfigValue, CtKey, CtValue, EXTERNAL_MODE_TUNNEL, NODE_IP_PRESENT, Stat, map_names,
    program_names,
};

use crate::testbed::{ip, unique_id};

/// Which program a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
    /// The no-op TC program (the floor of the cost measurements).
    Noop,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Self::Ingress => program_names::TC_INGRESS,
            Self::Egress => program_names::TC_EGRESS,
            Self::Noop => program_names::TC_NOOP,
        }
    }
}

/// TC verdicts as the programs return them.
pub const VERDICT_PASS: i32 = -1;
pub const VERDICT_OK: i32 = 0;
pub const VERDICT_DROP: i32 = 2;
pub const VERDICT_REDIRECT: i32 = 7;

/// What a program did to one packet.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: i32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
}

/// The standard cluster the harness programs (see [`TcHarness::standard`]).
pub mod standard {
    use std::net::Ipv4Addr;

    pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
    pub const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
    pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
    pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 202, 1, 2);
    pub const POD_PORT: u16 = 8080;
    pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
    /// TCP and UDP nodePort to both pods.
    pub const NODE_PORT: u16 = 30080;
    /// TCP nodePort to the local pod only.
    pub const LOCAL_NODE_PORT: u16 = 30081;
    /// TCP nodePort to the remote pod only.
    pub const REMOTE_NODE_PORT: u16 = 30082;
    /// TCP and UDP nodePort without endpoints: rejected.
    pub const EMPTY_NODE_PORT: u16 = 30090;
    /// TCP nodePort, externalTrafficPolicy Local without a local endpoint.
    pub const DROP_NODE_PORT: u16 = 30091;
    pub const TUNNEL_PORT: u16 = 4789;
    pub const VNI: u32 = 0xce11;
    /// The MSS tunnelled SYNs and SYN-ACKs are clamped to: below what
    /// senders usually announce, so the rewrite is exercised.
    pub const TUNNEL_MSS_CLAMP: u16 = 1200;
}

pub struct TcHarness {
    loaded: LoadedObject,
    desired: DesiredDataplane,
    /// Dropped after the programs: pins, then the namespace.
    place: Place,
}

/// The harness' pins and network namespace, removed on drop (also when
/// building the harness fails half way).
struct Place {
    layout: PinLayout,
    netns: String,
    original_netns: Option<File>,
}

impl Place {
    fn new() -> Result<Self> {
        let id = unique_id();
        let mut place = Self {
            layout: PinLayout::new(PathBuf::from("/sys/fs/bpf").join(&id)),
            netns: format!("{id}-prog"),
            original_netns: None,
        };
        ip(&["netns", "add", &place.netns])?;
        let original =
            File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let enter = File::open(PathBuf::from("/run/netns").join(&place.netns))
            .with_context(|| format!("opening netns {}", place.netns))?;
        // SAFETY: setns on this thread with a valid namespace descriptor.
        if unsafe { libc::setns(enter.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "entering netns {}: {}",
                place.netns,
                std::io::Error::last_os_error()
            );
        }
        place.original_netns = Some(original);
        ensure_bpffs_dir(&place.layout)?;
        Ok(place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(original) = &self.original_netns {
            // SAFETY: back to the namespace this thread came from.
            unsafe { libc::setns(original.as_raw_fd(), libc::CLONE_NEWNET) };
        }
        let _ = pins::cleanup(&self.layout);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

impl TcHarness {
    /// Loads the programs with fresh pins, writes `desired`, `config`,
    /// this node's addresses and the tunnel peers.
    pub fn new(
        desired: DesiredDataplane,
        config: ConfigValue,
        node_ips: &BTreeSet<Ipv4Addr>,
        peers: &BTreeSet<Ipv4Addr>,
    ) -> Result<Self> {
        let place = Place::new()?;
        let mut loaded = LoadedObject::load(place.layout.clone())?;
        let mut maps: KernelMaps = loaded.take_maps()?;
        let mut mirror = PinnedState::default();
        let report = mirror.apply(&desired, &mut maps, &Limits::default());
        if !report.failed.is_empty() {
            bail!("programming the harness' frontends: {:?}", report.failed);
        }
        ports::PortFilter::open(&place.layout)?
            .want(ports::of_frontends(desired.frontends.iter()))?;
        let mut interface = loaded.take_interface_maps()?;
        interface.set_config(&config)?;
        // Every address serves nodePorts, as without --nodeport-addresses.
        interface.set_node_ips(&node_ips.iter().map(|ip| (*ip, NODE_IP_PRESENT)).collect())?;
        interface.set_tunnel_peers(peers)?;
        for hook in [Hook::Ingress, Hook::Egress, Hook::Noop] {
            loaded.load_tc_program(hook.program())?;
        }
        Ok(Self {
            loaded,
            desired,
            place,
        })
    }

    /// Tunnel mode, this node 192.0.2.11, peer 192.0.2.12, and the frontends
    /// of [`standard`]: nodePorts (both pods, local only, remote only, none,
    /// Local policy without a local pod), an LB IP admitting only
    /// 192.0.2.100/32, an externalIP (local pod, UDP), a ClusterIP.
    pub fn standard() -> Result<Self> {
        use standard::*;
        let local = Backend::routed(LOCAL_POD, POD_PORT);
        let remote = Backend {
            ip: REMOTE_POD,
            port: POD_PORT,
            remote_node: Some(PEER),
        };
        let entry = |name: &str, backends: Vec<Backend>| FrontendEntry {
            service: ObjectName::new("default", name),
            port_name: "".into(),
            backends,
            affinity_timeout_s: None,
            source_ranges: Vec::new(),
            drop_without_backends: false,
        };
        let node_port = |port, protocol| Frontend {
            ip: Ipv4Addr::UNSPECIFIED,
            port,
            protocol,
            scope: Scope::NodePort,
        };
        let external = |ip, protocol| Frontend {
            ip,
            port: 80,
            protocol,
            scope: Scope::External,
        };
        let mut desired = DesiredDataplane::default();
        let both = vec![local, remote];
        let frontends = [
            (
                node_port(NODE_PORT, Protocol::Tcp),
                entry("web", both.clone()),
            ),
            (
                node_port(NODE_PORT, Protocol::Udp),
                entry("web", both.clone()),
            ),
            (
                node_port(LOCAL_NODE_PORT, Protocol::Tcp),
                entry("local", vec![local]),
            ),
            (
                node_port(REMOTE_NODE_PORT, Protocol::Tcp),
                entry("remote", vec![remote]),
            ),
            (
                node_port(EMPTY_NODE_PORT, Protocol::Tcp),
                entry("empty", vec![]),
            ),
            (
                node_port(EMPTY_NODE_PORT, Protocol::Udp),
                entry("empty", vec![]),
            ),
            (
                node_port(DROP_NODE_PORT, Protocol::Tcp),
                FrontendEntry {
                    drop_without_backends: true,
                    ..entry("local-policy", vec![])
                },
            ),
            (
                external(LB_IP, Protocol::Tcp),
                FrontendEntry {
                    source_ranges: vec![SourceRange {
                        ip: CLIENT,
                        prefix_len: 32,
                    }],
                    ..entry("lb", both.clone())
                },
            ),
            (
                external(EXTERNAL_IP, Protocol::Udp),
                entry("external", vec![local]),
            ),
            (
                Frontend::cluster(CLUSTER_IP, 80, Protocol::Tcp),
                entry("cluster", both),
            ),
        ];
        desired.frontends = frontends.into_iter().collect();
        let config = ConfigValue {
            external_mode: EXTERNAL_MODE_TUNNEL,
            node_ip_be: u32::from_ne_bytes(NODE.octets()),
            vni: VNI,
            tunnel_port_be: TUNNEL_PORT.to_be(),
            snat_port_min: 61000,
            snat_port_max: 65535,
            tunnel_mss_clamp: TUNNEL_MSS_CLAMP,
        };
        Self::new(
            desired,
            config,
            &BTreeSet::from([NODE]),
            &BTreeSet::from([NODE, PEER]),
        )
    }

    /// The frontends this harness programmed.
    pub fn desired(&self) -> &DesiredDataplane {
        &self.desired
    }

    /// Runs `packet` through `hook` once.
    pub fn run(&mut self, hook: Hook, packet: &[u8]) -> Result<Outcome> {
        // Room for the tunnel's 50 bytes and a grown ICMP answer.
        let mut out = vec![0u8; packet.len().max(64) + 128];
        let result = self
            .loaded
            .test_run_tc(hook.program(), packet, &mut out, 1)?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome {
            verdict: result.return_value as i32,
            packet: out,
        })
    }

    /// The average time of one run of `packet` through `hook` over
    /// `repeat` runs inside the kernel (BPF_PROG_TEST_RUN's own timing).
    pub fn time(&mut self, hook: Hook, packet: &[u8], repeat: u32) -> Result<Duration> {
        let mut out = vec![0u8; packet.len() + 128];
        let result = self
            .loaded
            .test_run_tc(hook.program(), packet, &mut out, repeat)?;
        Ok(result.duration)
    }

    /// The CONNTRACK map's entries.
    pub fn conntrack(&self) -> Result<BTreeMap<CtKey, CtValue>> {
        let map: HashMap<MapData, CtKey, CtValue> =
            maps::open_pinned(&self.place.layout, map_names::CONNTRACK)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Empties CONNTRACK (so a packet is a new flow again).
    pub fn clear_conntrack(&self) -> Result<()> {
        let mut map: HashMap<MapData, CtKey, CtValue> =
            maps::open_pinned(&self.place.layout, map_names::CONNTRACK)?;
        let keys: Vec<CtKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// A datapath counter.
    pub fn stat(&self, stat: Stat) -> Result<u64> {
        Ok(maps::read_stats(&self.place.layout)?
            .into_iter()
            .find(|(s, _)| *s == stat)
            .map_or(0, |(_, value)| value))
    }
}

//! The BPF side of the dataplane: loading the object with its pinned maps,
//! attaching and pinning program links, and the map store the agent writes
//! through.

use std::{fs::File, path::Path};

use anyhow::{Context as _, Result};
use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions, TestRunResult,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, links::FdLink,
        tc::TcAttachOptions,
    },
};
use dataplane_common::{
    BackendKey, BackendValue, ConfigValue, MemberKey, ServiceKey, ServiceValue, SourceRangeKey,
    Stat, map_names, program_names,
};

use super::{
    failpoint::MapWriteFailpoint,
    pins::PinLayout,
    state::{MapStore, PinnedState, ipv4_be, ipv4_of_be},
};
use crate::model::SourceRange;

/// The programs, built by build.rs from the dataplane-ebpf crate.
static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane-ebpf"));

/// Socket-LB programs; each link is pinned under its program's name. The
/// reverse hooks come first so that no socket is ever translated without
/// its replies being translated back.
pub const SOCKET_PROGRAMS: [&str; 4] = [
    program_names::SOCK_RECVMSG4,
    program_names::SOCK_GETPEERNAME4,
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
];

/// Programs of the node interfaces, with the hook each runs on. Egress
/// first, for the same reason as in [`SOCKET_PROGRAMS`].
pub const INTERFACE_PROGRAMS: [(&str, TcAttachType); 2] = [
    (program_names::TC_EGRESS, TcAttachType::Egress),
    (program_names::TC_INGRESS, TcAttachType::Ingress),
];

pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    members: HashMap<MapData, MemberKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    failpoint: MapWriteFailpoint,
}

/// The SOURCE_RANGES key: all 32 bits of the id, then the prefix.
fn source_range_key(service_id: u32, range: &SourceRange) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        32 + u32::from(range.prefix_len),
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            source_be: ipv4_be(range.ip),
        },
    )
}

impl MapStore for KernelMaps {
    type Error = MapError;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.counted(|maps| maps.services.insert(key, value, 0))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.counted(|maps| ignore_missing(maps.services.remove(key)))
    }
    fn put_backend(&mut self, key: &BackendKey, value: &BackendValue) -> Result<(), MapError> {
        self.counted(|maps| maps.backends.insert(key, value, 0))
    }
    fn delete_backend(&mut self, key: &BackendKey) -> Result<(), MapError> {
        self.counted(|maps| ignore_missing(maps.backends.remove(key)))
    }
    fn put_member(&mut self, key: &MemberKey, index: u32) -> Result<(), MapError> {
        self.counted(|maps| maps.members.insert(key, index, 0))
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), MapError> {
        self.counted(|maps| ignore_missing(maps.members.remove(key)))
    }
    fn put_source_range(&mut self, service_id: u32, range: &SourceRange) -> Result<(), MapError> {
        self.counted(|maps| {
            maps.source_ranges
                .insert(&source_range_key(service_id, range), 1, 0)
        })
    }
    fn delete_source_range(
        &mut self,
        service_id: u32,
        range: &SourceRange,
    ) -> Result<(), MapError> {
        self.counted(|maps| {
            ignore_missing(
                maps.source_ranges
                    .remove(&source_range_key(service_id, range)),
            )
        })
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl KernelMaps {
    /// One map write, seen by the (test-only) failpoint.
    fn counted<T>(&mut self, write: impl FnOnce(&mut Self) -> T) -> T {
        let result = write(self);
        self.failpoint.wrote();
        result
    }

    /// Reads both maps completely: what a previous agent left is the
    /// starting point, so ids stay stable and unchanged Services are not
    /// rewritten.
    pub fn read(&self) -> Result<PinnedState> {
        let mut state = PinnedState::default();
        for entry in self.services.iter() {
            let (key, value) = entry.context("reading SERVICES")?;
            state.services.insert(key, value);
        }
        for entry in self.backends.iter() {
            let (key, value) = entry.context("reading BACKENDS")?;
            state.backends.insert(key, value);
        }
        for entry in self.members.iter() {
            let (key, index) = entry.context("reading MEMBERS")?;
            state.members.insert(key, index);
        }
        for key in self.source_ranges.keys() {
            let key = key.context("reading SOURCE_RANGES")?;
            let data = key.data();
            state.source_ranges.insert((
                u32::from_be(data.service_id_be),
                SourceRange {
                    ip: ipv4_of_be(data.source_be),
                    prefix_len: key.prefix_len().saturating_sub(32) as u8,
                },
            ));
        }
        Ok(state)
    }
}

/// The loaded object: programs not yet attached, maps pinned (created, or
/// reused from a previous agent).
pub struct Loaded {
    ebpf: Ebpf,
    pub layout: PinLayout,
}

impl Loaded {
    /// Loads with the compiled-in map sizes.
    pub fn load(layout: PinLayout) -> Result<Self> {
        Self::load_with(layout, dataplane_common::CONNTRACK_MAX_ENTRIES)
    }

    /// Loads with a CONNTRACK of `conntrack_entries` (a size only applies
    /// when the map is created; pinned maps keep theirs).
    pub fn load_with(layout: PinLayout, conntrack_entries: u32) -> Result<Self> {
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&layout.dir)
            .map_max_entries(map_names::CONNTRACK, conntrack_entries)
            .load(PROGRAM_OBJECT)
            .with_context(|| {
                format!(
                    "loading the BPF object with maps pinned in {}; if they were made by an incompatible version, run `dataplane-agent cleanup`",
                    layout.dir.display()
                )
            })?;
        Ok(Self { ebpf, layout })
    }

    /// Forwards the programs' aya-log records to this process's log (at
    /// their own level, debug for the datapath's), read as they arrive.
    pub fn forward_program_logs(&mut self) {
        let logger = match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => logger,
            Err(error) => {
                tracing::warn!(%error, "program logs are not forwarded");
                return;
            }
        };
        // SAFETY: the logger owns its ring buffer's descriptor for its whole
        // life and always reports that same descriptor.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut logger = match registered {
            Ok(logger) => logger,
            Err(error) => {
                tracing::warn!(error = %error, "program logs are not forwarded");
                return;
            }
        };
        tokio::spawn(async move {
            while let Ok(mut ready) = logger.readable_mut().await {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
    }

    pub fn take_maps(&mut self) -> Result<KernelMaps> {
        Ok(KernelMaps {
            services: typed_map(self.ebpf.take_map(map_names::SERVICES), map_names::SERVICES)?,
            backends: typed_map(self.ebpf.take_map(map_names::BACKENDS), map_names::BACKENDS)?,
            members: typed_map(self.ebpf.take_map(map_names::MEMBERS), map_names::MEMBERS)?,
            source_ranges: typed_map(
                self.ebpf.take_map(map_names::SOURCE_RANGES),
                map_names::SOURCE_RANGES,
            )?,
            failpoint: MapWriteFailpoint::from_env(),
        })
    }

    /// The maps that configure the node-interface programs.
    pub fn take_interface_maps(&mut self) -> Result<InterfaceMaps> {
        Ok(InterfaceMaps {
            config: typed_map(self.ebpf.take_map(map_names::CONFIG), map_names::CONFIG)?,
            node_ips: typed_map(self.ebpf.take_map(map_names::NODE_IPS), map_names::NODE_IPS)?,
            tunnel_peers: typed_map(
                self.ebpf.take_map(map_names::TUNNEL_PEERS),
                map_names::TUNNEL_PEERS,
            )?,
        })
    }

    /// Attaches the socket-LB programs to `cgroup` and pins their links.
    ///
    /// If a previous agent's links are pinned, the new links are attached
    /// first (cgroup links are multi-attach: both programs run, and the
    /// second sees an address that is no longer a Service) and then renamed
    /// over the old pins, which drops the old links' last reference and
    /// detaches them. No connect() ever runs without a program.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<()> {
        let cgroup_dir =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let targets = SOCKET_PROGRAMS
            .iter()
            .map(|name| Target::Cgroup {
                program: name,
                dir: &cgroup_dir,
                path: cgroup,
            })
            .collect();
        self.attach_staged(targets)
    }

    /// Attaches the node-interface programs to every interface in
    /// `interfaces` (TCX links, pinned as `<program>_<interface>`), with the
    /// same make-before-break replacement of a previous agent's links as
    /// [`Loaded::attach_socket_lb`]; links of interfaces no longer listed
    /// are removed.
    pub fn attach_interfaces(&mut self, interfaces: &[String]) -> Result<()> {
        for (name, _) in INTERFACE_PROGRAMS {
            self.load_tc_program(name)?;
        }
        let mut targets = Vec::new();
        let mut wanted_pins = BTreeSet::new();
        for interface in interfaces {
            for (program, hook) in INTERFACE_PROGRAMS {
                wanted_pins.insert(interface_pin_name(program, interface));
                targets.push(Target::Interface {
                    program,
                    interface,
                    hook,
                });
            }
        }
        self.attach_staged(targets)?;
        self.remove_interface_pins_except(&wanted_pins)
    }

    /// Loads a TC program (through the verifier) if it is not loaded yet.
    pub fn load_tc_program(&mut self, name: &str) -> Result<()> {
        let program = self.tc_program(name)?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("loading {name} into the kernel (verifier)"))?;
        }
        Ok(())
    }

    fn tc_program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()
            .with_context(|| format!("{name} is not a TC program"))
    }

    /// Runs a loaded TC program on `packet` (Ethernet frame) `repeat` times
    /// with BPF_PROG_TEST_RUN, without attaching it: for program tests,
    /// packet fuzzing and per-packet cost. The program's maps are the real
    /// pinned ones. `out` receives the packet as the program left it.
    pub fn test_run_tc(
        &mut self,
        name: &str,
        packet: &[u8],
        out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunResult> {
        let program = self.tc_program(name)?;
        program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(out),
                repeat,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))
    }

    /// Detaches node-interface programs of interfaces no longer configured.
    fn remove_interface_pins_except(&self, wanted: &BTreeSet<String>) -> Result<()> {
        let links_dir = self.layout.links_dir();
        for entry in std::fs::read_dir(&links_dir)
            .with_context(|| format!("listing {}", links_dir.display()))?
        {
            let entry = entry.with_context(|| format!("listing {}", links_dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_interface_pin = INTERFACE_PROGRAMS
                .iter()
                .any(|(program, _)| name.starts_with(&format!("{program}_")));
            if is_interface_pin && !wanted.contains(&name) && !name.ends_with("_staged") {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing link pin {}", entry.path().display()))?;
                tracing::info!(link = %name, "detached from an interface no longer configured");
            }
        }
        Ok(())
    }

    /// All or nothing: every new link is attached and pinned under a
    /// staging name first. Only when all are in place do they replace the
    /// old pins; if one fails, the staged ones are removed (detaching them)
    /// and whatever was attached before stays as it was.
    fn attach_staged(&mut self, targets: Vec<Target>) -> Result<()> {
        std::fs::create_dir_all(self.layout.links_dir())
            .with_context(|| format!("creating {}", self.layout.links_dir().display()))?;
        let mut staged = Vec::new();
        let result = targets.iter().try_for_each(|target| {
            let link = self.attach_one(target)?;
            let pin = self.layout.link(&target.pin_name());
            let staged_pin = staged_path(&pin);
            if staged_pin.exists() {
                std::fs::remove_file(&staged_pin)
                    .with_context(|| format!("removing stale {}", staged_pin.display()))?;
            }
            link.pin(&staged_pin)
                .with_context(|| format!("pinning link at {}", staged_pin.display()))?;
            staged.push((staged_pin, pin));
            Ok(())
        });
        if let Err(error) = result {
            for (staged_pin, _) in &staged {
                let _ = std::fs::remove_file(staged_pin);
            }
            return Err(error);
        }
        for (staged_pin, pin) in staged {
            std::fs::rename(&staged_pin, &pin)
                .with_context(|| format!("moving link pin to {}", pin.display()))?;
        }
        Ok(())
    }

    fn attach_one(&mut self, target: &Target) -> Result<FdLink> {
        match target {
            Target::Cgroup { program, dir, path } => self.attach_cgroup(program, dir, path),
            Target::Interface {
                program,
                interface,
                hook,
            } => self.attach_interface(program, interface, *hook),
        }
    }

    fn attach_cgroup(&mut self, name: &str, cgroup_dir: &File, cgroup: &Path) -> Result<FdLink> {
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()
            .with_context(|| format!("{name} is not a cgroup sock_addr program"))?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("loading {name} into the kernel (verifier)"))?;
        }
        // A cgroup bpf_link is always multi-attach and the kernel rejects
        // any flag on it (kernel/bpf/cgroup.c, cgroup_bpf_link_attach), so
        // `Single` (flags 0) is right here.
        let link_id = program
            .attach(cgroup_dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        program
            .take_link(link_id)
            .with_context(|| format!("taking the link of {name}"))?
            .try_into()
            .with_context(|| format!("{name} was not attached through a bpf_link (kernel < 5.7?)"))
    }

    fn attach_interface(
        &mut self,
        name: &str,
        interface: &str,
        hook: TcAttachType,
    ) -> Result<FdLink> {
        let program = self.tc_program(name)?;
        // Appended after any program already there (a previous agent's, or
        // another vendor's): ours pass what is not theirs to the next.
        let link_id = program
            .attach_with_options(
                interface,
                hook,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| {
                format!("attaching {name} to {interface} with TCX (needs kernel >= 6.6)")
            })?;
        program
            .take_link(link_id)
            .with_context(|| format!("taking the link of {name} on {interface}"))?
            .try_into()
            .with_context(|| format!("{name} on {interface} is not a TCX link"))
    }
}

/// Something to attach a program to.
enum Target<'a> {
    Cgroup {
        program: &'a str,
        dir: &'a File,
        path: &'a Path,
    },
    Interface {
        program: &'a str,
        interface: &'a str,
        hook: TcAttachType,
    },
}

impl Target<'_> {
    fn pin_name(&self) -> String {
        match self {
            Self::Cgroup { program, .. } => (*program).to_owned(),
            Self::Interface {
                program, interface, ..
            } => interface_pin_name(program, interface),
        }
    }
}

fn interface_pin_name(program: &str, interface: &str) -> String {
    // bpffs refuses dots in names; interface names may contain them.
    format!("{program}_{}", interface.replace('.', "-"))
}

/// CONFIG and NODE_IPS: how the node-interface programs behave, and which
/// addresses are this node's.
pub struct InterfaceMaps {
    config: Array<MapData, ConfigValue>,
    node_ips: HashMap<MapData, u32, u32>,
    tunnel_peers: HashMap<MapData, u32, u32>,
}

impl InterfaceMaps {
    pub fn set_config(&mut self, config: &ConfigValue) -> Result<()> {
        self.config.set(0, config, 0).context("writing CONFIG")
    }

    /// Makes NODE_IPS hold exactly this node's `addresses`.
    pub fn set_node_ips(&mut self, addresses: &BTreeSet<Ipv4Addr>) -> Result<()> {
        set_addresses(&mut self.node_ips, addresses, map_names::NODE_IPS)
    }

    /// Makes TUNNEL_PEERS hold exactly the cluster's node `addresses`.
    pub fn set_tunnel_peers(&mut self, addresses: &BTreeSet<Ipv4Addr>) -> Result<()> {
        set_addresses(&mut self.tunnel_peers, addresses, map_names::TUNNEL_PEERS)
    }
}

/// Makes an address set map hold exactly `addresses` (new ones first, then
/// the stale ones removed).
fn set_addresses(
    map: &mut HashMap<MapData, u32, u32>,
    addresses: &BTreeSet<Ipv4Addr>,
    name: &str,
) -> Result<()> {
    for address in addresses {
        map.insert(ipv4_be(*address), 1, 0)
            .with_context(|| format!("adding {address} to {name}"))?;
    }
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !addresses.contains(&ipv4_of_be(*key)))
        .collect();
    for key in stale {
        ignore_missing(map.remove(&key))
            .with_context(|| format!("removing {} from {name}", ipv4_of_be(key)))?;
    }
    Ok(())
}

/// Where a new link waits until it replaces `pin`. bpffs refuses names with
/// a dot (kernel/bpf/inode.c, bpf_lookup), hence the suffix.
fn staged_path(pin: &Path) -> std::path::PathBuf {
    let mut name = pin.file_name().unwrap_or_default().to_os_string();
    name.push("_staged");
    pin.with_file_name(name)
}

fn typed_map<M>(map: Option<Map>, name: &str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    map.with_context(|| format!("map {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("map {name} has an unexpected type"))
}

/// Opens a pinned map by name, for readers such as `dump`.
pub fn open_pinned<M>(layout: &PinLayout, name: &str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let path = layout.map(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {}: is the agent running with this --bpffs-dir?",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data)
        .with_context(|| format!("{} is not a map this agent can read", path.display()))?;
    typed_map(Some(map), name)
}

pub fn open_pinned_maps(layout: &PinLayout) -> Result<KernelMaps> {
    Ok(KernelMaps {
        services: open_pinned(layout, map_names::SERVICES)?,
        backends: open_pinned(layout, map_names::BACKENDS)?,
        members: open_pinned(layout, map_names::MEMBERS)?,
        source_ranges: open_pinned(layout, map_names::SOURCE_RANGES)?,
        failpoint: MapWriteFailpoint::default(),
    })
}

/// Sums the per-CPU STATS counters.
pub fn read_stats(layout: &PinLayout) -> Result<Vec<(Stat, u64)>> {
    let stats: PerCpuArray<MapData, u64> = open_pinned(layout, map_names::STATS)?;
    Stat::ALL
        .iter()
        .map(|stat| {
            let values = stats
                .get(&(*stat as u32), 0)
                .with_context(|| format!("reading stat {}", stat.name()))?;
            Ok((*stat, values.iter().sum()))
        })
        .collect()
}

/// Adds `expired` to the agent-written ConntrackExpired counter (on the
/// first CPU's slot: the programs never write that slot, so there is no
/// race with them).
pub fn add_conntrack_expired(layout: &PinLayout, expired: u64) -> Result<()> {
    if expired == 0 {
        return Ok(());
    }
    let mut stats: PerCpuArray<MapData, u64> = open_pinned(layout, map_names::STATS)?;
    let index = Stat::ConntrackExpired as u32;
    let mut values: Vec<u64> = stats
        .get(&index, 0)
        .context("reading the ConntrackExpired counter")?
        .iter()
        .copied()
        .collect();
    if let Some(first) = values.first_mut() {
        *first += expired;
    }
    let values = aya::maps::PerCpuValues::try_from(values)
        .context("building the ConntrackExpired values")?;
    stats
        .set(index, values, 0)
        .context("writing the ConntrackExpired counter")
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub links: Vec<String>,
    pub maps: Vec<String>,
}

/// Detaches every program (by removing the link pins, their last
/// reference) and removes every map pin and the directory.
pub fn cleanup(layout: &PinLayout) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let links_dir = layout.links_dir();
    if links_dir.exists() {
        for entry in std::fs::read_dir(&links_dir)
            .with_context(|| format!("listing {}", links_dir.display()))?
        {
            let path = entry
                .with_context(|| format!("listing {}", links_dir.display()))?
                .path();
            std::fs::remove_file(&path)
                .with_context(|| format!("removing link pin {}", path.display()))?;
            report.links.push(path.display().to_string());
        }
        std::fs::remove_dir(&links_dir)
            .with_context(|| format!("removing {}", links_dir.display()))?;
    }
    for name in map_names::ALL {
        let path = layout.map(name);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing map pin {}", path.display()))?;
            report.maps.push(path.display().to_string());
        }
    }
    let names = crate::dump::names_path(&layout.dir);
    if names.exists() {
        std::fs::remove_file(&names).with_context(|| format!("removing {}", names.display()))?;
    }
    if layout.dir.exists() {
        std::fs::remove_dir(&layout.dir).with_context(|| {
            format!(
                "removing {}: it holds files the agent did not create",
                layout.dir.display()
            )
        })?;
    }
    Ok(report)
}

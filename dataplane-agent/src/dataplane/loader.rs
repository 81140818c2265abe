//! Loading the BPF object with its pinned maps, and attaching and pinning
//! the program links (make-before-break over a previous agent's).

use std::{collections::BTreeSet, fs::File, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions, TestRunResult,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, links::FdLink,
        tc::TcAttachOptions,
    },
};
use dataplane_common::{map_names, program_names};

use super::{
    maps::{InterfaceMaps, KernelMaps},
    pins::PinLayout,
};

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

/// The loaded object: programs not yet attached, maps pinned (created, or
/// reused from a previous agent).
pub struct LoadedObject {
    ebpf: Ebpf,
    pub layout: PinLayout,
}

impl LoadedObject {
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
        KernelMaps::take_from(&mut self.ebpf)
    }

    /// The maps that configure the node-interface programs.
    pub fn take_interface_maps(&mut self) -> Result<InterfaceMaps> {
        InterfaceMaps::take_from(&mut self.ebpf)
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
    /// [`LoadedObject::attach_socket_lb`]; links of interfaces no longer listed
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
        load_once(self.tc_program(name)?, name)
    }

    /// Puts every program the agent attaches through the verifier (the
    /// node-interface ones when `interfaces`), without attaching any: the
    /// agent does it on another core while its first sync writes the maps.
    pub fn load_programs(&mut self, interfaces: bool) -> Result<()> {
        for name in SOCKET_PROGRAMS {
            load_once(self.cgroup_program(name)?, name)?;
        }
        if interfaces {
            for (name, _) in INTERFACE_PROGRAMS {
                self.load_tc_program(name)?;
            }
        }
        Ok(())
    }

    fn cgroup_program(&mut self, name: &str) -> Result<&mut CgroupSockAddr> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()
            .with_context(|| format!("{name} is not a cgroup sock_addr program"))
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
        let program = self.cgroup_program(name)?;
        load_once(program, name)?;
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

/// Where a new link waits until it replaces `pin`. bpffs refuses names with
/// a dot (kernel/bpf/inode.c, bpf_lookup), hence the suffix.
fn staged_path(pin: &Path) -> std::path::PathBuf {
    let mut name = pin.file_name().unwrap_or_default().to_os_string();
    name.push("_staged");
    pin.with_file_name(name)
}

/// Loads `program` (through the verifier) unless it is loaded already.
fn load_once<P: LoadOnce>(program: &mut P, name: &str) -> Result<()> {
    if !program.is_loaded() {
        program
            .load_program()
            .with_context(|| format!("loading {name} into the kernel (verifier)"))?;
    }
    Ok(())
}

/// The two kinds of programs the agent loads, for [`load_once`].
trait LoadOnce {
    fn is_loaded(&self) -> bool;
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl LoadOnce for CgroupSockAddr {
    fn is_loaded(&self) -> bool {
        self.fd().is_ok()
    }
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl LoadOnce for SchedClassifier {
    fn is_loaded(&self) -> bool {
        self.fd().is_ok()
    }
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

//! A node network namespace with hosts (clients, pods) hanging off it by
//! veth pairs, a cgroup for socket load balancing, a bpffs pin directory, a
//! manifest directory and the real agent binary: all uniquely named and
//! removed on drop, also after a panic.
//!
//! ```text
//!   host "client" 10.200.1.2 --eth0--+
//!   host "pod1"   10.200.2.2 --eth0--+-- node netns (routes between them)
//!   host "pod2"   10.200.3.2 --eth0--+
//! ```

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::probe::{Attempt, parse_attempts};

/// Names start with this and the creating process id, so a later run can
/// tell leftovers of a killed run from a live run's objects.
const PREFIX: &str = "dpt";
const NETNS_DIR: &str = "/run/netns";

/// `ip netns add` races with itself when it first sets up /run/netns.
static NETNS_LOCK: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

pub struct Testbed {
    pub id: String,
    pub node_netns: String,
    /// The node's name, as the agent is told (`--hostname-override`).
    pub node_name: String,
    /// Hosts get 10.<subnet>.<n>.2.
    subnet: u8,
    pub hosts: Vec<Host>,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub work_dir: PathBuf,
    pub manifests: PathBuf,
    agent: Mutex<Option<Child>>,
    children: Vec<Child>,
}

fn run(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// `count` client UDP ports no other exchange of this test process uses.
/// With ports the kernel picks at random, two exchanges to different
/// frontends that share a backend can meet on one reply tuple while the
/// first flow is live, and the datapath refuses the second flow
/// (`ext_conntrack_clash`): a test failing by chance. The ports are below
/// the kernel's ephemeral range, so no TCP connection takes them either.
fn udp_source_ports(count: usize) -> u16 {
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let count = count as u32;
    let start = NEXT.fetch_add(count, Ordering::Relaxed) % SPAN;
    // A batch never straddles the end of the span.
    let start = if start + count > SPAN { 0 } else { start };
    (FIRST + start) as u16
}

/// A binary built next to the running executable (target/<profile>/ or its
/// deps/ subdirectory), refused if older than the sources it is built from:
/// a plain `cargo test` does not rebuild other packages' binaries.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            check_fresh(&candidate, name)?;
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not built next to {}; run `cargo build -p dataplane-agent -p dataplane-testbed` (cargo xtask test does)",
        exe.display()
    )
}

/// Fails if any source `binary` (named `name`) is built from changed after
/// it was built.
fn check_fresh(binary: &Path, name: &str) -> Result<()> {
    let built = std::fs::metadata(binary)?.modified()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources: &[&str] = if name == "dataplane-agent" {
        &[
            "dataplane-agent/src",
            "dataplane-ebpf/src",
            "dataplane-common/src",
        ]
    } else {
        &["tests/src"]
    };
    let mut pending: Vec<PathBuf> = sources.iter().map(|dir| workspace.join(dir)).collect();
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Unit-test-only sources do not change the binary (cargo does
            // not relink it for them).
            let test_only = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.ends_with("tests.rs") || n == "fixtures.rs" || n == "properties.rs"
            });
            // Nor do the sources of the package's other binaries.
            let other_binary = path.parent().is_some_and(|dir| dir.ends_with("bin"))
                && path.file_stem().and_then(|stem| stem.to_str())
                    != name.strip_prefix("dataplane-");
            if path.is_dir() {
                pending.push(path);
            } else if !test_only
                && !other_binary
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|m| m > built)
            {
                bail!(
                    "{} is older than {}: run `cargo xtask build` (or `cargo xtask test`)",
                    binary.display(),
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// A name no other test object has, from which a later run can tell a
/// leftover of this (then dead) process; removes earlier runs' leftovers.
pub fn unique_id() -> String {
    remove_leftovers();
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn cgroup2_root() -> Result<PathBuf> {
    dataplane_agent::dataplane::pins::default_cgroup2_root()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid embedded in a name such as `dpt123x4-node`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    rest.split('x').next()?.parse().ok()
}

/// Removes namespaces, pins, work directories and cgroups that a killed
/// run left behind.
fn remove_leftovers() {
    let dead = |name: &str| owner_pid(name).is_some_and(|pid| !pid_alive(pid));
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    let pin_root = Path::new("/sys/fs/bpf");
    if let Ok(entries) = std::fs::read_dir(pin_root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = dataplane_agent::dataplane::pins::cleanup(
                    &dataplane_agent::dataplane::pins::PinLayout::new(entry.path()),
                );
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(root) = cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

impl Testbed {
    /// A node namespace, a cgroup, a pin directory and a manifest directory.
    pub fn new() -> Result<Self> {
        Self::node("node-a", 200)
    }

    /// A node named `node_name` whose hosts get addresses 10.`subnet`.n.2.
    pub fn node(node_name: &str, subnet: u8) -> Result<Self> {
        let id = unique_id();
        let work_dir = std::env::temp_dir().join(&id);
        let testbed = Self {
            node_netns: format!("{id}-node"),
            node_name: node_name.into(),
            subnet,
            cgroup: cgroup2_root()?.join(&id),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            manifests: work_dir.join("manifests"),
            work_dir,
            id,
            hosts: Vec::new(),
            agent: Mutex::new(None),
            children: Vec::new(),
        };
        // From here on, Drop cleans up whatever was created.
        testbed.add_netns(&testbed.node_netns.clone())?;
        ip(&["-n", &testbed.node_netns, "link", "set", "lo", "up"])?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &testbed.node_netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]))?;
        std::fs::create_dir_all(&testbed.cgroup)
            .with_context(|| format!("creating cgroup {}", testbed.cgroup.display()))?;
        std::fs::create_dir_all(&testbed.manifests)?;
        mount_tmpfs(&testbed.manifests)?;
        Ok(testbed)
    }

    pub fn add_netns(&self, name: &str) -> Result<()> {
        let _guard = NETNS_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ip(&["netns", "add", name])
    }

    /// Adds a host namespace `name` wired to the node, with address
    /// 10.<subnet>.<n>.2 and a default route through the node
    /// (10.<subnet>.<n>.1).
    pub fn host(&mut self, name: &str) -> Result<Host> {
        let index = self.hosts.len() + 1;
        let subnet = self.subnet;
        let netns = format!("{}-{name}", self.id);
        self.add_netns(&netns)?;
        self.hosts.push(Host {
            name: name.into(),
            netns: netns.clone(),
            ip: Ipv4Addr::new(10, subnet, index as u8, 2),
        });
        let node_if = format!("h{index}");
        let (node_ip, host_ip) = (
            format!("10.{subnet}.{index}.1/24"),
            format!("10.{subnet}.{index}.2/24"),
        );
        let node = self.node_netns.clone();
        ip(&[
            "-n", &node, "link", "add", &node_if, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ])?;
        ip(&["-n", &node, "addr", "add", &node_ip, "dev", &node_if])?;
        ip(&["-n", &node, "link", "set", &node_if, "up"])?;
        ip(&["-n", &netns, "addr", "add", &host_ip, "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{subnet}.{index}.1"),
        ])?;
        self.hosts.last().cloned().context("host just added")
    }

    /// A command that will run inside `netns`, and inside the testbed's
    /// cgroup if `in_cgroup` (so socket load balancing applies to it).
    pub fn command_in(
        &self,
        netns: &str,
        in_cgroup: bool,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let netns_file = File::open(Path::new(NETNS_DIR).join(netns))
            .with_context(|| format!("opening netns {netns}"))?;
        let procs = if in_cgroup {
            Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(self.cgroup.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", self.cgroup.display()))?,
            )
        } else {
            None
        };
        let mut command = Command::new(program);
        // SAFETY: only async-signal-safe calls (setns, write) between fork
        // and exec, on descriptors opened before the fork.
        unsafe {
            command.pre_exec(move || {
                // Children die with the test thread that started them, so a
                // killed test run leaves no agent or server behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(procs) = &procs {
                    // "0" moves the writing process itself.
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Starts a TCP server in `host` that answers with its name and the
    /// source address it saw; returns once it listens.
    pub fn serve(&mut self, host: &Host, port: u16) -> Result<()> {
        let listen = format!("0.0.0.0:{port}");
        self.serve_with(host, &["serve", "--listen", &listen, "--name", &host.name])
    }

    /// Starts a probe server in `host` with `args` (`serve ...`,
    /// `serve-closing ...`); returns once it listens.
    pub fn serve_with(&mut self, host: &Host, args: &[&str]) -> Result<()> {
        let mut child = self
            .command_in(&host.netns, false, sibling_binary("dataplane-probe")?)?
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the probe server")?;
        let stdout = child.stdout.take().context("probe stdout")?;
        self.children.push(child);
        let mut line = String::new();
        // The probe prints this line once bound, or exits (EOF) if it cannot.
        std::io::BufRead::read_line(&mut BufReader::new(stdout), &mut line)
            .context("reading the probe server's first line")?;
        if !line.starts_with("listening") {
            bail!("probe server in {} did not start: {line:?}", host.name);
        }
        Ok(())
    }

    /// `count` TCP connections from `host` (inside the testbed's cgroup) to
    /// `to`, one result per attempt.
    pub fn connect(&self, host: &Host, to: &str, count: usize) -> Result<Vec<Attempt>> {
        self.exchange(host, to, count, "tcp")
    }

    /// Keeps connecting from `host` to `to` (in batches of 20, `pause`
    /// between batches) for as long as `during` runs, and returns every
    /// attempt. The loop also stops if `during` panics, so a failing test
    /// ends instead of hanging.
    pub fn connect_during(
        &self,
        host: &Host,
        to: &str,
        pause: Duration,
        during: impl FnOnce(),
    ) -> Result<Vec<Attempt>> {
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let running = std::sync::atomic::AtomicBool::new(true);
        std::thread::scope(|scope| {
            let looping = scope.spawn(|| {
                let mut attempts = Vec::new();
                while running.load(Ordering::Relaxed) {
                    attempts.extend(self.connect(host, to, 20)?);
                    std::thread::sleep(pause);
                }
                Ok(attempts)
            });
            {
                let _stop = StopOnDrop(&running);
                during();
            }
            looping
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the connection loop panicked")))
        })
    }

    /// Like [`Testbed::connect`], over UDP: `mode` is `udp` (connected
    /// socket) or `udp-unconnected` (sendto/recvfrom).
    pub fn exchange(
        &self,
        host: &Host,
        to: &str,
        count: usize,
        mode: &str,
    ) -> Result<Vec<Attempt>> {
        self.exchange_in(&host.netns, true, to, count, mode)
    }

    /// Like [`Testbed::exchange`] from any namespace, inside the testbed's
    /// cgroup or not (a client outside the cluster is not).
    pub fn exchange_in(
        &self,
        netns: &str,
        in_cgroup: bool,
        to: &str,
        count: usize,
        mode: &str,
    ) -> Result<Vec<Attempt>> {
        let mut command = self.command_in(netns, in_cgroup, sibling_binary("dataplane-probe")?)?;
        command
            .args(["connect", "--to", to, "--count", &count.to_string()])
            .args(["--timeout-ms", "2000", "--mode", mode]);
        if mode.starts_with("udp") {
            command
                .arg("--udp-source-port")
                .arg(udp_source_ports(count).to_string());
        }
        let output = run(&mut command)?;
        let attempts = parse_attempts(&String::from_utf8_lossy(&output.stdout))?;
        if attempts.len() != count {
            bail!("the probe reported {} of {count} attempts", attempts.len());
        }
        Ok(attempts)
    }

    /// `GET <path>` from `address` inside the node namespace: the status
    /// line, then the body.
    pub fn http_get_in_node(&self, address: &str, path: &str) -> Result<String> {
        let output = run(self
            .command_in(&self.node_netns, false, sibling_binary("dataplane-probe")?)?
            .args(["http-get", "--to", address, "--path", path]))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The agent's Prometheus metrics (default address, in the node
    /// namespace).
    pub fn metrics(&self) -> Result<String> {
        self.http_get_in_node("127.0.0.1:10249", "/metrics")
    }

    /// Runs `dataplane-probe <args>` in `host`, inside the testbed's cgroup
    /// (so socket load balancing applies) or not, and returns its stdout.
    pub fn probe(&self, host: &Host, in_cgroup: bool, args: &[&str]) -> Result<String> {
        let output = run(self
            .command_in(&host.netns, in_cgroup, sibling_binary("dataplane-probe")?)?
            .args(args))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `program args` in the node namespace and returns its stdout.
    pub fn in_node(&self, program: &str, args: &[&str]) -> Result<String> {
        let output = run(self
            .command_in(&self.node_netns, false, program)?
            .args(args))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts `connections` long-lived TCP connections from `host` to `to`,
    /// exchanging a line on each every 200 ms for at most `seconds`; see
    /// [`Hold`].
    pub fn hold(&self, host: &Host, to: &str, connections: usize, seconds: u64) -> Result<Hold> {
        self.hold_in(&host.netns, true, to, connections, seconds)
    }

    /// [`Testbed::hold`] from any namespace, inside the testbed's cgroup or
    /// not.
    pub fn hold_in(
        &self,
        netns: &str,
        in_cgroup: bool,
        to: &str,
        connections: usize,
        seconds: u64,
    ) -> Result<Hold> {
        let mut child = self
            .command_in(netns, in_cgroup, sibling_binary("dataplane-probe")?)?
            .args([
                "hold",
                "--to",
                to,
                "--connections",
                &connections.to_string(),
            ])
            .args(["--seconds", &seconds.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the probe's hold")?;
        let stdout = child
            .stdout
            .take()
            .context("the probe's hold has no stdout")?;
        Ok(Hold {
            child,
            stdout: BufReader::new(stdout),
        })
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        // Write then rename, so the agent never reads half a file.
        // Staged as a hidden file of the same directory (the agent skips
        // hidden files) so the rename stays on one filesystem.
        let staged = self.manifests.join(format!(".{file}.tmp"));
        File::create(&staged)?.write_all(yaml.as_bytes())?;
        std::fs::rename(&staged, self.manifests.join(file))?;
        Ok(())
    }

    pub fn agent_log_path(&self) -> PathBuf {
        self.work_dir.join("agent.log")
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    /// The agent with this testbed's manifests, cgroup and pins, run in the
    /// node namespace; returns once it reports ready.
    pub fn start_agent(&self, extra_args: &[&str]) -> Result<()> {
        self.start_agent_on(&AgentSource::Manifests, extra_args)
    }

    /// [`Testbed::start_agent`] for a large cluster: waits up to `ready`
    /// for the first sync (the benchmarks program 100,000 Services).
    pub fn start_agent_within(
        &self,
        source: &AgentSource,
        extra_args: &[&str],
        ready: Duration,
    ) -> Result<()> {
        self.launch_agent_within(self.agent_command(source, extra_args)?, ready)
    }

    /// The agent on `source`, as [`Testbed::start_agent`].
    pub fn start_agent_on(&self, source: &AgentSource, extra_args: &[&str]) -> Result<()> {
        self.launch_agent(self.agent_command(source, extra_args)?)
    }

    /// The command [`Testbed::start_agent_on`] runs, to adjust (say, its
    /// RUST_LOG) before [`Testbed::launch_agent`].
    pub fn agent_command(&self, source: &AgentSource, extra_args: &[&str]) -> Result<Command> {
        self.agent_command_named(source, Some(&self.node_name), extra_args)
    }

    /// [`Testbed::agent_command`] without a node name (no
    /// --hostname-override, no NODE_NAME), for tests of where else the
    /// agent takes it from.
    pub fn agent_command_unnamed(
        &self,
        source: &AgentSource,
        extra_args: &[&str],
    ) -> Result<Command> {
        self.agent_command_named(source, None, extra_args)
    }

    fn agent_command_named(
        &self,
        source: &AgentSource,
        node_name: Option<&str>,
        extra_args: &[&str],
    ) -> Result<Command> {
        let mut command =
            self.command_in(&self.node_netns, false, sibling_binary("dataplane-agent")?)?;
        command.arg("run");
        match source {
            AgentSource::Manifests => command.arg("--manifests").arg(&self.manifests),
            AgentSource::Kubeconfig(path) => command.arg("--kubeconfig").arg(path),
        };
        command
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs-dir")
            .arg(&self.pin_dir);
        match node_name {
            Some(name) => command.args(["--hostname-override", name]),
            None => command.env_remove("NODE_NAME"),
        };
        command.args(extra_args).env("RUST_LOG", "info");
        Ok(command)
    }

    /// Starts an agent from a command made with [`Testbed::command_in`]
    /// (for tests that must control every flag), logging to the testbed's
    /// agent log; returns once it reports ready.
    pub fn launch_agent(&self, command: Command) -> Result<()> {
        self.launch_agent_within(command, Duration::from_secs(30))
    }

    fn launch_agent_within(&self, mut command: Command, ready: Duration) -> Result<()> {
        let mut agent = self.agent_slot();
        if agent.is_some() {
            bail!("an agent is already running in this testbed; stop it first");
        }
        let ready_marks_before = self.agent_log().matches(READY_MARK).count();
        let child = self.spawn_agent_logged(&mut command)?;
        let child = agent.insert(child);
        let deadline = Instant::now() + ready;
        while self.agent_log().matches(READY_MARK).count() == ready_marks_before {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "dataplane-agent exited with {status}:\n{}",
                    self.agent_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "dataplane-agent not ready after {ready:?}:\n{}",
                    self.agent_log()
                );
            }
            // Short: the benchmarks time the start-up by this loop.
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Starts `command` with its output appended to the agent log.
    fn spawn_agent_logged(&self, command: &mut Command) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log_path())?;
        command
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dataplane-agent")
    }

    /// Runs an agent that is expected to end by itself (a failpoint kills
    /// it, or it refuses to start), logging to the agent log, and returns
    /// how it ended. Fails if it is still running after `timeout`.
    pub fn run_agent_to_exit(
        &self,
        mut command: Command,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        if self.agent_slot().is_some() {
            bail!("an agent is already running in this testbed; stop it first");
        }
        let mut child = self.spawn_agent_logged(&mut command)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                child.kill().context("killing the agent")?;
                child.wait().context("reaping the agent")?;
                bail!(
                    "dataplane-agent still running after {timeout:?}:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent_slot().as_ref().map(Child::id)
    }

    fn agent_slot(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.agent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stops the agent: SIGKILL models a crash, SIGTERM a normal stop. An
    /// agent that ignores SIGTERM for 5 s is killed.
    pub fn stop_agent(&self, signal: i32) -> Result<()> {
        self.stop_agent_within(signal, Duration::from_secs(5))
    }

    /// [`Testbed::stop_agent`], allowing the agent `grace` to stop (a sync
    /// of tens of thousands of Services finishes before the signal is
    /// handled).
    pub fn stop_agent_within(&self, signal: i32, grace: Duration) -> Result<()> {
        let Some(mut agent) = self.agent_slot().take() else {
            return Ok(());
        };
        // SAFETY: kill on our own, not yet reaped, child's pid.
        unsafe { libc::kill(agent.id() as i32, signal) };
        let deadline = Instant::now() + grace;
        while agent.try_wait().context("waiting for the agent")?.is_none() {
            if Instant::now() > deadline {
                agent.kill().context("killing a stuck agent")?;
                agent.wait().context("reaping the agent")?;
                bail!("the agent did not stop within {grace:?} of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// What the `n`-th agent started in this testbed (1-based) logged up to
    /// its ready line: its adoption of the maps and its first sync.
    pub fn agent_startup_log(&self, n: usize) -> String {
        let log = self.agent_log();
        log.split(READY_MARK)
            .nth(n.saturating_sub(1))
            .map(str::to_owned)
            .unwrap_or_default()
    }

    /// Runs `dataplane-agent <args>` against this testbed's pins.
    pub fn agent_cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(sibling_binary("dataplane-agent")?)
            .args(args)
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .env("NO_COLOR", "1")
            .output()
            .context("running dataplane-agent")
    }

    /// `dump services -o json`.
    pub fn dump_services(&self) -> Result<Vec<serde_json::Value>> {
        let output = self.agent_cli(&["dump", "services", "-o", "json"])?;
        if !output.status.success() {
            bail!("dump failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Polls `condition` until it holds or `timeout` passes.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if condition()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting until {what}; agent log:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Where the agent takes cluster state from.
pub enum AgentSource<'a> {
    /// The testbed's manifest directory.
    Manifests,
    /// An API server, through this kubeconfig.
    Kubeconfig(&'a Path),
}

/// What `dataplane-probe hold` reports.
#[derive(Debug, serde::Deserialize)]
pub struct HoldSummary {
    pub open: usize,
    pub rounds: u64,
    pub failures: Vec<String>,
    pub backends: std::collections::BTreeMap<String, usize>,
}

/// A running `dataplane-probe hold`: it prints `{"opened": N}` once its
/// connections are open, then a [`HoldSummary`] when it ends (after its
/// `seconds`, or as soon as [`Hold::summary`] closes its stdin).
pub struct Hold {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Hold {
    /// Waits until the probe has opened its connections (returns how many
    /// it could open), so a test can disturb them knowing they exist.
    pub fn opened(&mut self) -> Result<usize> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("reading the hold's first line")?;
        let opened: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("the hold printed {line:?} first"))?;
        opened["opened"]
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("the hold printed {line:?} first"))
    }

    /// Ends the hold (at the end of its current round) and reads its
    /// summary.
    pub fn summary(mut self) -> Result<HoldSummary> {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        self.stdout
            .read_to_string(&mut rest)
            .context("reading the hold's output")?;
        self.child.wait().context("waiting for the hold")?;
        let last = rest.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| format!("hold printed {rest:?}"))
    }
}

/// One exchange of `dataplane-probe udp-stream`.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct StreamExchange {
    /// Unix time in milliseconds, when the answer (or the error) came.
    pub at_ms: u64,
    /// Which socket: 1 for the first, +1 for each reconnect after an error.
    pub socket: u32,
    /// The pod that answered.
    pub backend: Option<String>,
    /// The error instead (0: no answer within the interval).
    pub errno: Option<i32>,
}

/// A running `dataplane-probe udp-stream`: one connected UDP socket
/// exchanging a datagram every 50 ms, each exchange collected as it
/// happens. Killed on drop.
pub struct UdpStream {
    child: Child,
    exchanges: std::sync::Arc<Mutex<Vec<StreamExchange>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Testbed {
    /// Starts a [`UdpStream`] from `netns` (inside the testbed's cgroup if
    /// `in_cgroup`) to `to`.
    pub fn udp_stream_in(&self, netns: &str, in_cgroup: bool, to: &str) -> Result<UdpStream> {
        let mut child = self
            .command_in(netns, in_cgroup, sibling_binary("dataplane-probe")?)?
            .args(["udp-stream", "--to", to])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the probe's udp-stream")?;
        let stdout = child.stdout.take().context("udp-stream has no stdout")?;
        let exchanges = std::sync::Arc::new(Mutex::new(Vec::new()));
        let collected = exchanges.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(exchange) = serde_json::from_str::<StreamExchange>(&line) {
                    collected
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push(exchange);
                }
            }
        });
        Ok(UdpStream {
            child,
            exchanges,
            reader: Some(reader),
        })
    }
}

impl UdpStream {
    /// The exchanges so far.
    pub fn exchanges(&self) -> Vec<StreamExchange> {
        self.exchanges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Waits (at most `within`) until `pod` has answered.
    pub fn wait_for_answer_from(&self, pod: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let exchanges = self.exchanges();
            if exchanges.iter().any(|e| e.backend.as_deref() == Some(pod)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tail: Vec<_> = exchanges.iter().rev().take(10).collect();
                bail!(
                    "udp-stream: {pod} did not answer within {within:?}; last exchanges: {tail:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the stream and returns every exchange.
    pub fn stop(mut self) -> Result<Vec<StreamExchange>> {
        drop(self.child.stdin.take());
        self.child.wait().context("waiting for udp-stream")?;
        if let Some(reader) = self.reader.take() {
            reader
                .join()
                .map_err(|_| anyhow::anyhow!("the udp-stream reader panicked"))?;
        }
        Ok(self.exchanges())
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Now, as Unix time in milliseconds (what [`StreamExchange::at_ms`]
/// counts).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The line the agent logs once its programs are attached.
pub const READY_MARK: &str = "socket load balancing attached; ready";

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log of {} ---\n{}", self.id, self.agent_log());
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.stop_agent(libc::SIGTERM);
        if dataplane_agent::dataplane::pins::cleanup(
            &dataplane_agent::dataplane::pins::PinLayout::new(&self.pin_dir),
        )
        .is_err()
        {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.netns]);
        }
        let _ = ip(&["netns", "del", &self.node_netns]);
        // A cgroup can be removed once its last process has gone; processes
        // just killed may take a moment to leave.
        for _ in 0..50 {
            if !self.cgroup.exists() || std::fs::remove_dir(&self.cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(path) = std::ffi::CString::new(self.manifests.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path; detaching has no other
            // preconditions.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// Mounts a tmpfs on `dir`. The manifests live in memory, as a ConfigMap
/// projected by the kubelet would be read from its page cache: on the
/// disk's filesystem, reading a file just replaced by rename sometimes
/// waited 30-200 ms for the journal, which the benchmarks' change latency
/// then counted as the agent's.
fn mount_tmpfs(dir: &Path) -> Result<()> {
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .context("manifest directory path")?;
    // SAFETY: NUL-terminated strings that outlive the call; no mount data.
    let mounted = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if mounted != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting a tmpfs on {}", dir.display()));
    }
    Ok(())
}

/// Ids of the programs behind the link pins of this build's pin layout
/// under `pin_dir`.
pub fn pinned_program_ids(pin_dir: &Path) -> Result<Vec<u32>> {
    pinned_program_ids_of(&dataplane_agent::dataplane::pins::PinLayout::new(pin_dir))
}

/// Ids of the programs behind the link pins of `layout`.
pub fn pinned_program_ids_of(
    layout: &dataplane_agent::dataplane::pins::PinLayout,
) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(layout.links_dir())? {
        let path = entry.context("listing link pins")?.path();
        let link = aya::programs::links::PinnedLink::from_pin(&path)
            .with_context(|| format!("opening link pin {}", path.display()))?;
        let link: aya::programs::links::FdLink = link.into();
        ids.push(link.info()?.program_id());
    }
    Ok(ids)
}

/// Ids of every BPF program loaded in the kernel.
pub fn loaded_program_ids() -> Result<std::collections::BTreeSet<u32>> {
    aya::programs::loaded_programs()
        .map(|info| Ok(info?.id()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_read_back_from_names() {
        assert_eq!(owner_pid("dpt123x4-node"), Some(123));
        assert_eq!(owner_pid("dpt123x4"), Some(123));
        assert_eq!(owner_pid("dataplane"), None);
        assert_eq!(owner_pid("other"), None);
    }
}

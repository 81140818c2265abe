//! `cargo xtask setup`: installs what a fresh machine lacks to build and run
//! the dataplane, following shared/TOOLCHAIN.md. Idempotent: every step first
//! checks whether it is already done.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::util::{command_succeeds, run, stdout_of};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

pub(crate) fn setup() -> Result<()> {
    check_kernel()?;
    ensure_nightly_with_rust_src().context("setup step 1/5: nightly toolchain with rust-src")?;
    ensure_bpf_linker().context("setup step 2/5: bpf-linker against nightly's own LLVM")?;
    ensure_bpffs().context("setup step 3/5: mounting bpffs")?;
    ensure_kubernetes_validate().context("setup step 4/5: kubernetes-validate for deploy/")?;
    ensure_packet_filters().context("setup step 5/5: iptables and nftables")?;
    Ok(())
}

/// The TrueType font the benchmark charts are labelled with (the same path
/// as `bench/src/charts.rs`, which reads it).
pub(crate) const CHART_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The chart font, for `cargo xtask bench` only (the tests need none).
pub(crate) fn ensure_chart_font() -> Result<()> {
    if PathBuf::from(CHART_FONT).exists() {
        return Ok(());
    }
    println!("setup: installing the DejaVu fonts for the benchmark charts (Debian package)");
    apt_install(&["fonts-dejavu-core"])
}

/// iptables and nft: the tests build kube-proxy's leftovers with them (and
/// the benchmarks kube-proxy's rule sets), from Debian's packages.
fn ensure_packet_filters() -> Result<()> {
    let present = |tool: &str| command_succeeds(Command::new(tool).arg("--version"));
    if present("iptables-save") && present("nft") && present("iptables-legacy") {
        return Ok(());
    }
    println!("setup: installing iptables and nftables (Debian packages)");
    apt_install(&["iptables", "nftables"])
}

/// `apt-get install`; on a machine whose package lists were never fetched
/// the first try fails, so it fetches them once and tries again.
fn apt_install(packages: &[&str]) -> Result<()> {
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    install()
        .or_else(|error| {
            println!(
                "setup: apt-get install failed ({error:#}); updating the package lists and trying again"
            );
            run(Command::new("apt-get").args(["update", "-q"]))?;
            install()
        })
        .with_context(|| {
            format!(
                "apt-get install {} failed; it needs root and the Debian package registry",
                packages.join(" ")
            )
        })
}

const KUBERNETES_VALIDATE_VERSION: &str = "1.34.1";

/// Where the offline schema validator is installed: inside the checkout's
/// target/ (pip's `--target`), because Debian's python3 refuses installs
/// into the system (PEP 668) and a user-wide install would outlive the
/// clone that needs it.
fn kubernetes_validate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools")
        .join(format!("kubernetes-validate-{KUBERNETES_VALIDATE_VERSION}"))
}

/// The stamp says which python3 the packages were installed for (their
/// compiled parts only load in that version).
fn kubernetes_validate_stamp() -> Result<String> {
    let python = stdout_of(Command::new("python3").arg("--version"))
        .context("running python3: validating deploy/ needs python3 with pip")?;
    Ok(format!("{KUBERNETES_VALIDATE_VERSION} {}", python.trim()))
}

/// `kubernetes-validate`, as installed by [`setup`].
pub(crate) fn kubernetes_validate() -> Command {
    let mut command = Command::new("python3");
    command.env("PYTHONPATH", kubernetes_validate_dir()).args([
        "-c",
        "import sys; from kubernetes_validate.__main__ import main; sys.exit(main())",
    ]);
    command
}

/// The offline Kubernetes schema validator (it ships the schemas), from PyPI.
fn ensure_kubernetes_validate() -> Result<()> {
    let dir = kubernetes_validate_dir();
    let stamp_path = dir.join(".dataplane-installed");
    let stamp = kubernetes_validate_stamp()?;
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(());
    }
    println!(
        "setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {} (schemas for validating deploy/)",
        dir.display()
    );
    if !command_succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
        println!("setup: installing pip for python3 (Debian package)");
        apt_install(&["python3-pip"])?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"])
        .arg("--target")
        .arg(&dir)
        .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}")))
    .context("pip install kubernetes-validate failed; it needs python3 with pip and the package registry")?;
    std::fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))
}

fn check_kernel() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release: the dataplane needs Linux")?;
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < (6, 6) {
        bail!(
            "kernel {} is too old: the dataplane needs Linux >= 6.6 (TCX links, bpf_set_retval in sock_addr programs)",
            release.trim()
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("setup: warning: not root; loading programs, tests and the demo need root");
    }
    Ok(())
}

fn ensure_nightly_with_rust_src() -> Result<()> {
    let toolchains = stdout_of(Command::new("rustup").args(["toolchain", "list"]))
        .context("running rustup: the build needs rustup to fetch the nightly toolchain")?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (BPF programs need -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !installed.lines().any(|line| line.starts_with("rust-src")) {
        println!("setup: adding rust-src to nightly (needed to build core for bpfel-unknown-none)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    Ok(())
}

/// The libLLVM shipped inside the nightly toolchain, which bpf-linker must
/// link against so both speak the same LLVM bitcode.
struct NightlyLlvm {
    lib_dir: PathBuf,
    /// e.g. `LLVM-22-rust-1.97.0-nightly`, for `-l dylib=`.
    link_name: String,
    major: u32,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let sysroot = stdout_of(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    for entry in
        std::fs::read_dir(&lib_dir).with_context(|| format!("listing {}", lib_dir.display()))?
    {
        let name = entry
            .with_context(|| format!("listing {}", lib_dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        // libLLVM-22-rust-1.97.0-nightly.so
        let Some(link_name) = name.strip_prefix("lib").and_then(|n| n.strip_suffix(".so")) else {
            continue;
        };
        let Some(rest) = link_name.strip_prefix("LLVM-") else {
            continue;
        };
        if let Some(major) = rest.split('-').next().and_then(|m| m.parse().ok()) {
            return Ok(NightlyLlvm {
                lib_dir,
                link_name: link_name.to_owned(),
                major,
            });
        }
    }
    bail!(
        "no libLLVM-<major>-rust-*.so in {}: the nightly toolchain does not ship its LLVM as a shared library",
        lib_dir.display()
    )
}

fn ensure_bpf_linker() -> Result<()> {
    let llvm = nightly_llvm()?;
    let stamp = cargo_home().join(".dataplane-bpf-linker-llvm");
    let wanted_stamp = format!("{BPF_LINKER_VERSION} {}", llvm.link_name);
    let stamp_matches = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted_stamp);
    if stamp_matches && command_succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {}); about a minute",
        llvm.link_name, llvm.major
    );
    let lib_dir = llvm.lib_dir.display();
    let rustflags = format!(
        "-L {lib_dir} -l dylib={} -C link-arg=-Wl,-rpath,{lib_dir}",
        llvm.link_name
    );
    run(Command::new("cargo")
        .env("RUSTFLAGS", rustflags)
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{},no-llvm-linking", llvm.major)))
    .context("cargo install bpf-linker failed; it needs the package registry and a C toolchain")?;
    if !command_succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    std::fs::write(&stamp, wanted_stamp).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

pub(crate) fn bpffs_mounted() -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    }))
}

fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted()? {
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPFFS}");
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .context("mount -t bpf failed: pinned maps need bpffs, and mounting it needs root")
}

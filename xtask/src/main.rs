//! The one entry point for everything beyond `cargo build`.
//!
//! xtask itself builds with the stable toolchain alone: it depends on no
//! crate whose build compiles the BPF programs (`dependency_guard` checks
//! it), so `cargo xtask demo|test|bench` can install what that build needs
//! before anything builds it, then run the demo and the benchmarks as the
//! binaries of their own crates.
#[cfg(test)]
mod dependency_guard;
mod deploy;
mod setup;
mod util;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use crate::util::run;

#[derive(Parser)]
#[command(about = "Build, test and demo the eBPF Service dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs (nightly rust-src, bpf-linker, bpffs).
    Setup,
    /// Build the agent (with its BPF programs), the probe, the demo and the
    /// benchmarks.
    Build,
    /// fmt, clippy, and every unit, program and integration test (root).
    Test {
        /// Arguments passed to `cargo test` after `--` (e.g. a test name).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Benchmarks: ours beside kube-proxy's iptables and nftables modes and
    /// direct pod-to-pod, at several Service counts, in one run. Arguments
    /// go to `dataplane-bench` (`cargo xtask bench --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        bench_args: Vec<String>,
    },
    /// Render and validate deploy/ against the Kubernetes schemas, offline.
    ValidateDeploy,
    /// Build the container image (podman or buildah), if one is installed.
    Image {
        /// The Debian-based variant with iptables and nft (for
        /// --cleanup-kube-proxy-rules); needs a registry for its base.
        #[arg(long)]
        with_iptables: bool,
    },
    /// A small namespace cluster, the real agent, traffic through a Service.
    /// Arguments go to `dataplane-demo` (`--connections N`; `--help`).
    #[command(disable_help_flag = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        demo_args: Vec<String>,
    },
}

/// How `build` compiles: the tests and the demo use the debug build (the
/// tests' failpoints live there), the benchmarks the release build the
/// image ships.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

impl Profile {
    fn cargo_args(self) -> &'static [&'static str] {
        match self {
            Self::Debug => &[],
            Self::Release => &["--release"],
        }
    }
}

/// The agent, the probe, the demo and the benchmarks: everything the tests
/// and the long-running tasks start.
fn build(profile: Profile) -> Result<()> {
    run(Command::new("cargo")
        .args([
            "build",
            "-p",
            "dataplane-agent",
            "-p",
            "dataplane-testbed",
            "-p",
            "dataplane-bench",
            "--bins",
        ])
        .args(profile.cargo_args()))
}

/// Runs one of the binaries `build` made, with its arguments. Ctrl-C
/// reaches it too (same process group); xtask only waits, so the binary
/// can remove its namespaces and pins before the shell prompt returns.
fn run_binary(profile: Profile, package: &str, binary: &str, args: &[String]) -> Result<()> {
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    run(Command::new("cargo")
        .args(["run", "--quiet"])
        .args(profile.cargo_args())
        .args(["-p", package, "--bin", binary, "--"])
        .args(args))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} loads BPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

fn test(cargo_test_args: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    setup::setup()?;
    println!("xtask: cargo fmt --check");
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    println!("xtask: cargo clippy (host crates)");
    run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    println!("xtask: cargo clippy (BPF programs, bpfel target)");
    run(Command::new("cargo")
        .args([
            "+nightly",
            "clippy",
            "-p",
            "dataplane-ebpf",
            "--bins",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .env("CARGO_TARGET_DIR", "target/bpf-clippy")
        .env("RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\""))?;
    println!("xtask: deploy/ manifests");
    deploy::validate()?;
    deploy::image(false)?;
    build(Profile::Debug)?;
    println!("xtask: cargo test (unit, program and integration tests)");
    run(Command::new("cargo")
        .args(["test", "--no-fail-fast", "--"])
        .args(cargo_test_args))?;
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            build(Profile::Debug)
        }
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Bench { bench_args } => {
            require_root("cargo xtask bench")?;
            setup::setup()?;
            setup::ensure_chart_font()?;
            build(Profile::Release)?;
            run_binary(
                Profile::Release,
                "dataplane-bench",
                "dataplane-bench",
                &bench_args,
            )
        }
        Task::ValidateDeploy => {
            setup::setup()?;
            deploy::validate()
        }
        Task::Image { with_iptables } => deploy::image(with_iptables),
        Task::Demo { demo_args } => {
            require_root("cargo xtask demo")?;
            setup::setup()?;
            build(Profile::Debug)?;
            run_binary(
                Profile::Debug,
                "dataplane-testbed",
                "dataplane-demo",
                &demo_args,
            )
        }
    }
}

//! The one entry point for everything beyond `cargo build`.
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
    }
}

//! Builds the BPF programs (nightly, bpfel target, bpf-linker) into OUT_DIR,
//! where `dataplane::program_object()` embeds them.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dataplane-ebpf")
        .canonicalize()
        .context("locating the dataplane-ebpf crate")?;
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("dataplane-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "dataplane-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the BPF programs; run `cargo xtask setup` if bpf-linker or rust-src is missing",
    )
}

//! Where the dataplane lives in bpffs, and making sure bpffs and cgroup v2
//! are mounted.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use dataplane_common::map_names;

/// `statfs(2)` magic numbers (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the agent mounts bpffs or cgroup v2 when the host has not.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
pub const FALLBACK_CGROUP2: &str = "/run/dataplane/cgroupv2";

/// Layout of the agent's bpffs directory: one pin per map by name, one per
/// program link under `links/`.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub dir: PathBuf,
}

impl PinLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }
}

fn filesystem_magic(path: &Path) -> Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes()).context("path contains NUL")?;
    // SAFETY: statfs writes into the zeroed struct; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between architectures"
    )]
    Ok(stat.f_type as i64)
}

fn mount(fstype: &str, target: &Path) -> Result<()> {
    let source = CString::new(fstype).context("filesystem type contains NUL")?;
    let target_c = CString::new(target.as_os_str().as_bytes())
        .with_context(|| format!("{} contains NUL", target.display()))?;
    // SAFETY: all strings are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mount -t {fstype} {fstype} {}", target.display()));
    }
    Ok(())
}

/// Makes sure `dir` can hold pins: its nearest existing ancestor must be on
/// bpffs. If it is not and `dir` lies under /sys/fs/bpf, mounts bpffs there
/// (hosts often do not mount it at boot). Then creates `dir`.
pub fn ensure_bpffs_dir(dir: &Path) -> Result<()> {
    let ancestor = dir
        .ancestors()
        .find(|a| a.exists())
        .context("no existing ancestor of the bpffs directory")?;
    if filesystem_magic(ancestor)? != BPF_FS_MAGIC {
        if !dir.starts_with(DEFAULT_BPFFS) {
            bail!(
                "{} is not on a bpffs mount; mount one (mount -t bpf bpf <dir>) or pick a directory under {DEFAULT_BPFFS}",
                dir.display()
            );
        }
        ensure_bpffs_mount(Path::new(DEFAULT_BPFFS))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Only root may open the pins: whoever can write SERVICES decides where
    // every connection of the node goes (docs/security.md).
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", dir.display()))?;
    Ok(())
}

/// Mounts bpffs at `path` unless bpffs is already mounted there. Returns
/// whether it mounted.
pub fn ensure_bpffs_mount(path: &Path) -> Result<bool> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    if filesystem_magic(path)? == BPF_FS_MAGIC {
        return Ok(false);
    }
    mount("bpf", path).context("mounting bpffs (needs CAP_SYS_ADMIN)")?;
    Ok(true)
}

/// The cgroup v2 root to attach socket programs to: the first cgroup2 mount
/// of this mount namespace, or a new mount at [`FALLBACK_CGROUP2`].
pub fn default_cgroup2_root() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let found = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    });
    if let Some(root) = found {
        return Ok(root);
    }
    let fallback = PathBuf::from(FALLBACK_CGROUP2);
    std::fs::create_dir_all(&fallback)
        .with_context(|| format!("creating {}", fallback.display()))?;
    mount("cgroup2", &fallback).context("no cgroup v2 mount found and mounting one failed")?;
    Ok(fallback)
}

pub fn ensure_cgroup2(path: &Path) -> Result<()> {
    if filesystem_magic(path)? != CGROUP2_SUPER_MAGIC {
        bail!("{} is not a cgroup v2 directory", path.display());
    }
    Ok(())
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
    let names = super::names::names_path(&layout.dir);
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

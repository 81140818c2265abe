//! Where the dataplane lives in bpffs, and making sure bpffs and cgroup v2
//! are mounted.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use dataplane_common::{PIN_LAYOUT_VERSION, map_names};

/// `statfs(2)` magic numbers (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the agent mounts bpffs or cgroup v2 when the host has not.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
pub const FALLBACK_CGROUP2: &str = "/run/dataplane/cgroupv2";

/// Layout of the agent's bpffs directory (`--bpffs-dir`, the *base*): the
/// pins of each layout version live in their own directory under it, one
/// pin per map by name and one per program link under `links/`.
///
/// Version 0 is the layout of the first releases, with the pins straight
/// in the base; version N > 0 lives in `<base>/v<N>`. A release that
/// changes what a pinned map holds bumps [`PIN_LAYOUT_VERSION`], so it never
/// misreads an older agent's pins: it builds its own next to them and
/// carries their state over (`upgrade.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    pub base: PathBuf,
    pub version: u32,
    pub dir: PathBuf,
}

impl PinLayout {
    /// The layout this agent pins in under `base`.
    pub fn new(base: impl Into<PathBuf>) -> Self {
        let version = super::failpoint::pin_layout_version_override().unwrap_or(PIN_LAYOUT_VERSION);
        Self::of_version(base, version)
    }

    pub fn of_version(base: impl Into<PathBuf>, version: u32) -> Self {
        let base = base.into();
        let dir = if version == 0 {
            base.clone()
        } else {
            base.join(format!("v{version}"))
        };
        Self { base, version, dir }
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

    /// Whether this layout has pins: its directory (a versioned layout's is
    /// the agent's alone), or for layout 0 any pin this build knows by name.
    pub fn exists(&self) -> bool {
        if self.version != 0 {
            return self.dir.exists();
        }
        self.links_dir().exists() || map_names::ALL.iter().any(|name| self.map(name).exists())
    }

    /// The layouts other than `self` that have pins under the same base:
    /// an older agent's (an upgrade) or a newer one's (a rollback).
    pub fn others(&self) -> Result<Vec<PinLayout>> {
        let mut found = Vec::new();
        let legacy = Self::of_version(&self.base, 0);
        if self.version != 0 && legacy.exists() {
            found.push(legacy);
        }
        if !self.base.exists() {
            return Ok(found);
        }
        for entry in std::fs::read_dir(&self.base)
            .with_context(|| format!("listing {}", self.base.display()))?
        {
            let entry = entry.with_context(|| format!("listing {}", self.base.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = layout_version_of_dir(&name) else {
                continue;
            };
            let layout = Self::of_version(&self.base, version);
            if version != self.version && layout.exists() {
                found.push(layout);
            }
        }
        found.sort_by_key(|layout| layout.version);
        Ok(found)
    }
}

/// `v<N>` with N > 0: the directory of layout version N.
fn layout_version_of_dir(name: &str) -> Option<u32> {
    let version: u32 = name.strip_prefix('v')?.parse().ok()?;
    (version > 0 && name == format!("v{version}")).then_some(version)
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

/// Makes sure the layout's directory can hold pins: the nearest existing
/// ancestor of the base must be on bpffs. If it is not and the base lies
/// under /sys/fs/bpf, mounts bpffs there (hosts often do not mount it at
/// boot). Then creates the base and the layout's directory.
pub fn ensure_bpffs_dir(layout: &PinLayout) -> Result<()> {
    let base = &layout.base;
    let ancestor = base
        .ancestors()
        .find(|a| a.exists())
        .context("no existing ancestor of the bpffs directory")?;
    if filesystem_magic(ancestor)? != BPF_FS_MAGIC {
        if !base.starts_with(DEFAULT_BPFFS) {
            bail!(
                "{} is not on a bpffs mount; mount one (mount -t bpf bpf <dir>) or pick a directory under {DEFAULT_BPFFS}",
                base.display()
            );
        }
        ensure_bpffs_mount(Path::new(DEFAULT_BPFFS))?;
    }
    for dir in [base, &layout.dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Only root may open the pins: whoever can write SERVICES decides
        // where every connection of the node goes (docs/security.md).
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("restricting {} to its owner", dir.display()))?;
    }
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
/// reference) and removes every map pin and directory under the layout's
/// base, of every layout version.
pub fn cleanup(layout: &PinLayout) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let current = PinLayout::of_version(&layout.base, PIN_LAYOUT_VERSION);
    let mut layouts = current.others()?;
    layouts.push(current);
    for layout in &layouts {
        report.links.extend(remove_links(layout)?);
        report.maps.extend(remove_maps(layout)?);
    }
    let names = super::names::names_path(&layout.base);
    if names.exists() {
        std::fs::remove_file(&names).with_context(|| format!("removing {}", names.display()))?;
    }
    if layout.base.exists() {
        std::fs::remove_dir(&layout.base).with_context(|| {
            format!(
                "removing {}: it holds files the agent did not create",
                layout.base.display()
            )
        })?;
    }
    Ok(report)
}

/// Removes the link pins of one layout, which detaches its programs
/// unless a running process still holds the links. Returns their paths.
pub fn remove_links(layout: &PinLayout) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let links_dir = layout.links_dir();
    if !links_dir.exists() {
        return Ok(removed);
    }
    for entry in
        std::fs::read_dir(&links_dir).with_context(|| format!("listing {}", links_dir.display()))?
    {
        let path = entry
            .with_context(|| format!("listing {}", links_dir.display()))?
            .path();
        std::fs::remove_file(&path)
            .with_context(|| format!("removing link pin {}", path.display()))?;
        removed.push(path.display().to_string());
    }
    std::fs::remove_dir(&links_dir).with_context(|| format!("removing {}", links_dir.display()))?;
    Ok(removed)
}

/// Removes the map pins of one layout and, for a versioned layout, its
/// directory with everything in it (another release's layout may have maps
/// this build does not know). Layout 0 shares the base with the other
/// layouts' directories: only the map names this build knows are removed
/// there. Returns the removed pins' paths.
pub fn remove_maps(layout: &PinLayout) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if layout.dir == layout.base {
        for name in map_names::ALL {
            let path = layout.map(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing map pin {}", path.display()))?;
                removed.push(path.display().to_string());
            }
        }
        return Ok(removed);
    }
    if !layout.dir.exists() {
        return Ok(removed);
    }
    removed.extend(remove_links(layout)?);
    for entry in std::fs::read_dir(&layout.dir)
        .with_context(|| format!("listing {}", layout.dir.display()))?
    {
        let path = entry
            .with_context(|| format!("listing {}", layout.dir.display()))?
            .path();
        std::fs::remove_file(&path).with_context(|| format!("removing pin {}", path.display()))?;
        removed.push(path.display().to_string());
    }
    std::fs::remove_dir(&layout.dir)
        .with_context(|| format!("removing {}", layout.dir.display()))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_zero_pins_in_the_base_and_later_versions_in_their_own_directory() {
        let legacy = PinLayout::of_version("/sys/fs/bpf/dataplane", 0);
        assert_eq!(legacy.dir, Path::new("/sys/fs/bpf/dataplane"));
        assert_eq!(
            legacy.map("SERVICES"),
            Path::new("/sys/fs/bpf/dataplane/SERVICES")
        );
        let v3 = PinLayout::of_version("/sys/fs/bpf/dataplane", 3);
        assert_eq!(
            v3.link("tc_ingress_eth0"),
            Path::new("/sys/fs/bpf/dataplane/v3/links/tc_ingress_eth0")
        );
    }

    #[test]
    fn only_canonical_version_directories_are_layouts() {
        assert_eq!(layout_version_of_dir("v1"), Some(1));
        assert_eq!(layout_version_of_dir("v12"), Some(12));
        for not_a_layout in ["v0", "v01", "v", "vx", "links", "SERVICES", "v-1"] {
            assert_eq!(layout_version_of_dir(not_a_layout), None, "{not_a_layout}");
        }
    }
}

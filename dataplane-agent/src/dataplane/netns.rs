//! The node's network namespaces, to visit each one: a pod's sockets are
//! only visible from inside its namespace.

use std::{
    collections::BTreeSet,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// Where named namespaces are bind-mounted (`ip netns`, CNI plugins).
const NAMED_NAMESPACES: &str = "/run/netns";

/// One path per distinct network namespace: those of every process this
/// agent can see (all of the node's with `hostPID`), then the named ones
/// no process holds. Processes come and go during the walk; those that
/// vanish are skipped.
pub fn all() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut namespaces = Vec::new();
    let mut visit = |path: PathBuf| {
        if let Ok(metadata) = std::fs::metadata(&path)
            && seen.insert((metadata.dev(), metadata.ino()))
        {
            namespaces.push(path);
        }
    };
    if let Ok(processes) = std::fs::read_dir("/proc") {
        for process in processes.flatten() {
            let name = process.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                visit(process.path().join("ns/net"));
            }
        }
    }
    if let Ok(named) = std::fs::read_dir(NAMED_NAMESPACES) {
        for entry in named.flatten() {
            visit(entry.path());
        }
    }
    namespaces
}

/// Runs `visit` inside each namespace of `namespaces`, on a thread of its
/// own (entering a namespace changes the calling thread's, and the
/// runtime's threads must stay where they are). A namespace that cannot be
/// entered (its last process exited) is skipped and reported to `skipped`.
pub fn visit_each<F>(
    namespaces: Vec<PathBuf>,
    mut visit: F,
    mut skipped: impl FnMut(&Path, anyhow::Error) + Send,
) -> Result<()>
where
    F: FnMut(&Path) + Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                for namespace in &namespaces {
                    match enter(namespace) {
                        Ok(()) => visit(namespace),
                        Err(error) => skipped(namespace, error),
                    }
                }
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace walk panicked"))
    })
}

fn enter(namespace: &Path) -> Result<()> {
    let file = File::open(namespace).with_context(|| format!("opening {}", namespace.display()))?;
    // SAFETY: setns on a descriptor we own; it changes this thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering {}", namespace.display()));
    }
    Ok(())
}

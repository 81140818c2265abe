//! Which Service each frontend belongs to: the maps hold only addresses,
//! so the agent records the names for `dump`, in a file under /run
//! named after the pin directory.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::model::Model;

/// Where the names live: bpffs takes no regular files, so under /run,
/// named after the pin directory.
pub fn names_path(bpffs_dir: &Path) -> PathBuf {
    let pins = bpffs_dir
        .file_name()
        .map_or_else(|| "dataplane".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from("/run/dataplane").join(format!("{pins}.services.json"))
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrontendName {
    pub service: String,
    pub port_name: String,
}

/// Records the Service name of every frontend, atomically (write, rename).
pub fn write_names(bpffs_dir: &Path, model: &Model) -> Result<()> {
    let names: BTreeMap<String, FrontendName> = model
        .frontends()
        .map(|(frontend, entry)| {
            (
                frontend.to_string(),
                FrontendName {
                    service: entry.service.to_string(),
                    port_name: entry.port_name.to_string(),
                },
            )
        })
        .collect();
    let path = names_path(bpffs_dir);
    let dir = path.parent().context("names path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staged = path.with_extension("json.tmp");
    std::fs::write(&staged, serde_json::to_vec(&names)?)
        .with_context(|| format!("writing {}", staged.display()))?;
    std::fs::rename(&staged, &path).with_context(|| format!("moving {} into place", path.display()))
}

/// The recorded names, or none if the agent has not written any.
pub fn read_names(bpffs_dir: &Path) -> BTreeMap<String, FrontendName> {
    std::fs::read(names_path(bpffs_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

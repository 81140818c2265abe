//! Reading the manifests under deploy/, for the tests that run the agent
//! exactly as they deploy it.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde_yaml::Value;

/// The `agent` container of a DaemonSet manifest, or of a patch of one,
/// under deploy/ (`file` relative to it).
pub fn agent_container(file: &str) -> Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let daemonset: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "agent")
        .cloned()
        .with_context(|| format!("{} has no agent container", path.display()))
}

/// The strings of a YAML list (args, command); none if it is not a list.
pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

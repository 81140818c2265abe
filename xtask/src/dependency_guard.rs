//! xtask must build where the BPF toolchain is not installed yet: that is
//! the machine `cargo xtask setup` is for. So nothing in xtask's dependency
//! closure may compile the BPF programs, or depend on a crate that does.
//! The test at the bottom reads the real `cargo metadata` and fails the
//! moment someone adds such a dependency back.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

/// Workspace crates whose build needs nightly's rust-src and bpf-linker
/// (the agent's build script compiles `dataplane-ebpf`; the testbed and the
/// benchmarks depend on the agent).
const NEEDS_BPF_TOOLCHAIN: [&str; 4] = [
    "dataplane-agent",
    "dataplane-ebpf",
    "dataplane-testbed",
    "dataplane-bench",
];

/// The build-dependency that marks a build script compiling BPF programs.
const BPF_BUILDER: &str = "aya-build";

/// The packages in `root`'s dependency closure (what `cargo build -p root`
/// builds: normal and build dependencies, and the root's dev-dependencies
/// for its tests) that need the BPF toolchain to build, each with why.
/// `metadata` is `cargo metadata --format-version 1` output.
pub(crate) fn bpf_builders_in_closure(metadata: &Value, root: &str) -> Result<Vec<String>, String> {
    let packages: HashMap<&str, &Value> = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata has no packages")?
        .iter()
        .filter_map(|package| Some((package["id"].as_str()?, package)))
        .collect();
    let nodes: HashMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .ok_or("cargo metadata has no resolve graph")?
        .iter()
        .filter_map(|node| Some((node["id"].as_str()?, node)))
        .collect();
    let root_id = metadata["workspace_members"]
        .as_array()
        .ok_or("cargo metadata has no workspace members")?
        .iter()
        .filter_map(Value::as_str)
        .find(|id| {
            packages
                .get(id)
                .is_some_and(|package| package["name"] == root)
        })
        .ok_or_else(|| format!("{root} is not in the workspace"))?;

    let mut seen = BTreeSet::from([root_id]);
    let mut pending = vec![root_id];
    while let Some(id) = pending.pop() {
        let Some(node) = nodes.get(id) else { continue };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let Some(dep_id) = dep["pkg"].as_str() else {
                continue;
            };
            let built_for_root = id == root_id || !only_dev(dep);
            if built_for_root && seen.insert(dep_id) {
                pending.push(dep_id);
            }
        }
    }

    let mut offenders = Vec::new();
    for id in seen {
        let Some(package) = packages.get(id) else {
            continue;
        };
        let name = package["name"].as_str().unwrap_or(id);
        if NEEDS_BPF_TOOLCHAIN.contains(&name) {
            offenders.push(format!("{name} (builds or depends on the BPF programs)"));
        } else if builds_bpf(package) {
            offenders.push(format!(
                "{name} (built with {BPF_BUILDER}, part of the BPF build chain)"
            ));
        }
    }
    Ok(offenders)
}

fn only_dev(dep: &Value) -> bool {
    let kinds = dep["dep_kinds"].as_array().into_iter().flatten();
    let mut any = false;
    for kind in kinds {
        any = true;
        if kind["kind"].as_str() != Some("dev") {
            return false;
        }
    }
    any
}

fn builds_bpf(package: &Value) -> bool {
    package["dependencies"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|dep| dep["kind"] == "build" && dep["name"] == BPF_BUILDER)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use serde_json::json;

    use super::*;

    fn workspace_metadata() -> Value {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let output = Command::new(cargo)
            // Every feature on: an optional dependency counts too.
            .args(["metadata", "--format-version", "1", "--all-features"])
            .args(["--manifest-path", manifest])
            .output()
            .expect("running cargo metadata");
        assert!(
            output.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
    }

    #[test]
    fn xtask_builds_without_the_bpf_toolchain() {
        let offenders = bpf_builders_in_closure(&workspace_metadata(), "xtask").unwrap();
        assert!(
            offenders.is_empty(),
            "xtask must build on a machine that `cargo xtask setup` has not set up yet, but its \
             dependencies include: {}. Run such code as a binary of its own crate (see \
             dataplane-demo, dataplane-bench) instead.",
            offenders.join(", ")
        );
    }

    #[test]
    fn the_guard_sees_the_agent_and_the_bpf_builders() {
        // The real workspace: the agent and the testbed need the toolchain.
        let metadata = workspace_metadata();
        let agent = bpf_builders_in_closure(&metadata, "dataplane-agent").unwrap();
        assert!(agent.iter().any(|o| o.starts_with("dataplane-agent")));
        assert!(agent.iter().any(|o| o.starts_with("dataplane-ebpf")));
        let testbed = bpf_builders_in_closure(&metadata, "dataplane-testbed").unwrap();
        assert!(testbed.iter().any(|o| o.starts_with("dataplane-agent")));
    }

    fn package(name: &str, build_deps: &[&str]) -> Value {
        let dependencies: Vec<Value> = build_deps
            .iter()
            .map(|dep| json!({"name": dep, "kind": "build"}))
            .collect();
        json!({"id": name, "name": name, "dependencies": dependencies})
    }

    fn edge(to: &str, kind: Option<&str>) -> Value {
        json!({"pkg": to, "dep_kinds": [{"kind": kind}]})
    }

    #[test]
    fn a_transitive_bpf_build_script_is_found_and_dev_edges_of_dependencies_are_not() {
        let metadata = json!({
            "workspace_members": ["xtask"],
            "packages": [
                package("xtask", &[]),
                package("helper", &[]),
                package("sneaky", &["aya-build"]),
                package("test-only", &["aya-build"]),
            ],
            "resolve": {"nodes": [
                {"id": "xtask", "deps": [edge("helper", None)]},
                {"id": "helper", "deps": [edge("sneaky", Some("build")), edge("test-only", Some("dev"))]},
                {"id": "sneaky", "deps": []},
                {"id": "test-only", "deps": []},
            ]},
        });
        let offenders = bpf_builders_in_closure(&metadata, "xtask").unwrap();
        assert_eq!(offenders.len(), 1, "{offenders:?}");
        assert!(offenders[0].starts_with("sneaky"));
    }

    #[test]
    fn an_unknown_root_is_an_error() {
        let metadata = json!({"workspace_members": [], "packages": [], "resolve": {"nodes": []}});
        assert!(bpf_builders_in_closure(&metadata, "xtask").is_err());
    }
}

//! Checks of `deploy/`: render the kustomization and validate every object
//! against the Kubernetes JSON schemas, offline; and `cargo xtask image`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_yaml::Value;

use crate::util::{command_succeeds, run, stdout_of};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.34.0";

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Kinds without a namespace, which the namespace transformer leaves alone.
const CLUSTER_SCOPED: [&str; 5] = [
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "CustomResourceDefinition",
];

/// Renders `dir/kustomization.yaml`: its `resources` in order, with its
/// `namespace` set on namespaced objects. The subset of kustomize this
/// repository uses; anything else in the file is refused rather than
/// silently ignored.
pub(crate) fn render_kustomization(dir: &Path) -> Result<Vec<Value>> {
    let path = dir.join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let kustomization: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mapping = kustomization
        .as_mapping()
        .context("kustomization.yaml is not a mapping")?;
    for key in mapping.keys() {
        let key = key.as_str().unwrap_or_default();
        if !["apiVersion", "kind", "namespace", "resources"].contains(&key) {
            bail!(
                "kustomization.yaml uses `{key}`, which `cargo xtask` cannot render; extend xtask/src/deploy.rs"
            );
        }
    }
    let namespace = kustomization.get("namespace").and_then(Value::as_str);
    let mut objects = Vec::new();
    for resource in kustomization
        .get("resources")
        .and_then(Value::as_sequence)
        .context("kustomization.yaml has no resources")?
    {
        let file = dir.join(resource.as_str().context("a resource is not a path")?);
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let mut object = serde::Deserialize::deserialize(document)
                .with_context(|| format!("parsing {}", file.display()))?;
            if matches!(object, Value::Null) {
                continue;
            }
            set_namespace(&mut object, namespace);
            objects.push(object);
        }
    }
    Ok(objects)
}

/// A YAML value as text with every mapping's keys sorted, so two renderings
/// compare equal whatever order their keys came in.
fn canonical(value: &Value) -> String {
    match value {
        Value::Mapping(mapping) => {
            let mut entries: Vec<(String, String)> = mapping
                .iter()
                .map(|(k, v)| (canonical(k), canonical(v)))
                .collect();
            entries.sort();
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Sequence(items) => {
            let inner: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", inner.join(","))
        }
        Value::Tagged(tagged) => canonical(&tagged.value),
        scalar => serde_yaml::to_string(scalar)
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

fn set_namespace(object: &mut Value, namespace: Option<&str>) {
    let Some(namespace) = namespace else { return };
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if CLUSTER_SCOPED.contains(&kind) {
        return;
    }
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_mapping_mut) {
        metadata.insert("namespace".into(), namespace.into());
    }
}

/// Renders and validates the install and the uninstall manifests. Where
/// kubectl exists, its kustomize must render the same objects.
pub(crate) fn validate() -> Result<()> {
    let dir = deploy_dir();
    let objects = render_kustomization(&dir)?;
    if command_succeeds(Command::new("kubectl").arg("version").arg("--client")) {
        let rendered = stdout_of(Command::new("kubectl").arg("kustomize").arg(&dir))?;
        let theirs: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
            .map(|d| serde::Deserialize::deserialize(d).context("parsing kubectl kustomize output"))
            .collect::<Result<_>>()?;
        let sorted = |objects: &[Value]| {
            let mut keys: Vec<String> = objects.iter().map(canonical).collect();
            keys.sort();
            keys
        };
        if sorted(&objects) != sorted(&theirs) {
            bail!("xtask's rendering of deploy/ differs from `kubectl kustomize deploy/`");
        }
    } else {
        println!(
            "xtask: kubectl not found; rendered deploy/ with xtask's own kustomize subset only"
        );
    }
    let rendered_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/deploy-rendered.yaml");
    let documents: Vec<String> = objects
        .iter()
        .map(serde_yaml::to_string)
        .collect::<Result<_, _>>()
        .context("serialising the rendered objects")?;
    std::fs::write(&rendered_path, documents.join("---\n"))
        .with_context(|| format!("writing {}", rendered_path.display()))?;
    run(crate::setup::kubernetes_validate()
        .args([
            "--kubernetes-version",
            KUBERNETES_VERSION,
            "--strict",
            "--quiet",
        ])
        .arg(&rendered_path)
        .arg(dir.join("uninstall/cleanup-daemonset.yaml"))
        .arg(dir.join("examples/demo.yaml")))
    .context("a manifest in deploy/ does not match the Kubernetes schemas")?;
    for patch in [
        "kube-proxy/park.yaml",
        "kube-proxy/unpark.yaml",
        "kube-proxy-config/daemonset-patch.yaml",
    ] {
        let path = dir.join(patch);
        let text = std::fs::read_to_string(&path)?;
        let value: Value =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if value.get("spec").and_then(|s| s.get("template")).is_none() {
            bail!("{} is not a DaemonSet pod-template patch", path.display());
        }
    }
    println!("xtask: deploy/ renders and validates against Kubernetes {KUBERNETES_VERSION}");
    Ok(())
}

/// The container tool on this machine, if any.
fn container_tool() -> Option<&'static str> {
    ["podman", "buildah"]
        .into_iter()
        .find(|tool| command_succeeds(Command::new(tool).arg("--version")))
}

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds the image with podman or buildah from a static (musl) binary;
/// `with_iptables` builds the Debian-based variant instead. Without either
/// tool, says so and succeeds (there is nothing to build the image with).
pub(crate) fn image(with_iptables: bool) -> Result<()> {
    let Some(tool) = container_tool() else {
        println!(
            "xtask: image: skipped, neither podman nor buildah is installed (the Containerfile is deploy/Containerfile)"
        );
        return Ok(());
    };
    // ring and other C dependencies need a musl C compiler for this target.
    if !command_succeeds(Command::new("musl-gcc").arg("--version")) {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "musl-tools"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "dataplane-agent",
        "--target",
        MUSL_TARGET,
    ]))?;
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let context = target.join("image-context");
    std::fs::create_dir_all(&context)?;
    let binary = target.join(MUSL_TARGET).join("release/dataplane-agent");
    std::fs::copy(&binary, context.join("dataplane-agent"))
        .with_context(|| format!("copying {}", binary.display()))?;
    let (containerfile, suffix) = if with_iptables {
        ("Containerfile.iptables", "-iptables")
    } else {
        ("Containerfile", "")
    };
    let tag = format!("dataplane-agent:{}{suffix}", env!("CARGO_PKG_VERSION"));
    // Also :latest{suffix}, the tag deploy/ refers to.
    let latest = format!("dataplane-agent:latest{suffix}");
    let build = if tool == "podman" { "build" } else { "bud" };
    run(Command::new(tool)
        .args([build, "-f"])
        .arg(deploy_dir().join(containerfile))
        .args(["-t", &tag, "-t", &latest])
        .arg(&context))?;
    println!("xtask: built image {tag} (also {latest}) with {tool}");
    Ok(())
}

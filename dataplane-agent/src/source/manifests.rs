//! A directory of Kubernetes YAML (Service, EndpointSlice, Node; several
//! documents per file and `kind: List` allowed) as the cluster state,
//! watched for changes. The embedded default for local runs and demos, and
//! plain L4 load balancing without Kubernetes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    serde::de::DeserializeOwned,
};
use notify::{RecursiveMode, Watcher as _};
use serde::Deserialize as _;

use crate::model::{ClusterState, NodeRecord, ObjectName, ServiceRecord, SliceRecord, Update};

/// A document or object that could not be used, for one log line and one
/// counter increment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseProblem {
    pub file: PathBuf,
    /// 1-based position of the YAML document in its file.
    pub document: usize,
    pub reason: String,
}

impl std::fmt::Display for ParseProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.document {
            0 => write!(f, "{}: {}", self.file.display(), self.reason),
            n => write!(f, "{} document {n}: {}", self.file.display(), self.reason),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub cluster: ClusterState,
    pub problems: Vec<ParseProblem>,
    /// True when a file could not be read or parsed to its end.
    pub fatal: bool,
}

/// A watched manifest directory. Remembers each file's last parse, so an
/// unchanged file is never parsed again and a change yields updates for
/// that file's objects only; and each file's last complete parse, so that a
/// file caught half-written or with a syntax error keeps its previous
/// objects instead of withdrawing their Services (kube-proxy keeps its last
/// good state when the API hands it nothing better).
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Objects defined in more than one file: how many extra definitions.
    duplicates: BTreeMap<(&'static str, String), usize>,
    /// Files read ahead of the first refresh, used by it where unchanged.
    prefetched: Option<Prefetch>,
}

/// The directory read and parsed on a thread of its own while the agent
/// loads its programs, so the first sync finds the files parsed (at 10,000
/// Services, parsing is half the start-up).
#[derive(Debug)]
pub struct Prefetch {
    reader: std::thread::JoinHandle<BTreeMap<PathBuf, (FileStamp, Loaded)>>,
}

impl Prefetch {
    pub fn start(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let reader = std::thread::spawn(move || {
            let mut parsed = BTreeMap::new();
            // An unlistable directory is the first refresh's error to report.
            for file in list_manifests(&dir).unwrap_or_default() {
                // Stamped before reading: a file replaced meanwhile has
                // another stamp by the refresh, which then reads it again.
                let Some(stamp) = FileStamp::of(&file) else {
                    continue;
                };
                if let (loaded, true) = read_and_parse(&file) {
                    parsed.insert(file, (stamp, loaded));
                }
            }
            parsed
        });
        Self { reader }
    }

    /// The parsed files; none when the reader panicked (every file is then
    /// read again).
    fn take(self) -> BTreeMap<PathBuf, (FileStamp, Loaded)> {
        self.reader.join().unwrap_or_default()
    }
}

#[derive(Debug)]
struct FileState {
    /// The file's identity at its last parse (None: it could not be read).
    stamp: Option<FileStamp>,
    /// The objects in effect: the last complete parse, or what the last
    /// parse got before its error when no parse was complete yet.
    objects: ClusterState,
    complete: bool,
    /// Problems of its last parse.
    problems: usize,
}

/// What tells two versions of a file apart: writers replace files by
/// rename (a new inode) or rewrite them (a new mtime and usually length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            inode: metadata.ino(),
            len: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

/// What a [`ManifestDir::refresh`] found.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// The objects of the changed files, as the directory now defines them.
    pub updates: Vec<Update>,
    /// Problems of the files parsed again.
    pub problems: Vec<ParseProblem>,
    /// Objects of the changed files that another file defines too.
    pub duplicates: Vec<ParseProblem>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            duplicates: BTreeMap::new(),
            prefetched: None,
        }
    }

    /// The directory, with what `prefetch` has read of it for the first
    /// refresh.
    pub fn with_prefetch(dir: impl Into<PathBuf>, prefetch: Prefetch) -> Self {
        Self {
            prefetched: Some(prefetch),
            ..Self::new(dir)
        }
    }

    /// Parses the files that changed since the last refresh and returns
    /// their objects as the directory now defines them (the first file in
    /// name order wins a Service or EndpointSlice defined twice, the last
    /// a Node). A bad document is reported and skipped; the rest load.
    pub fn refresh(&mut self) -> Result<Refreshed> {
        let mut prefetched = self
            .prefetched
            .take()
            .map(Prefetch::take)
            .unwrap_or_default();
        let files = list_manifests(&self.dir)?;
        let mut out = Refreshed::default();
        let mut touched = ClusterNames::default();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|file| !files.contains(file))
            .cloned()
            .collect();
        for file in gone {
            if let Some(state) = self.files.remove(&file) {
                touched.add(&state.objects);
            }
        }
        for file in &files {
            let stamp = FileStamp::of(file);
            let previous = self.files.get(file);
            if stamp.is_some() && previous.is_some_and(|p| p.stamp == stamp) {
                continue;
            }
            let (mut parsed, readable) = match prefetched.remove(file) {
                Some((read, loaded)) if Some(read) == stamp => (loaded, true),
                _ => read_and_parse(file),
            };
            // An unreadable file is read again at every refresh (a chmod
            // changes no stamp compared here).
            let stamp = stamp.filter(|_| readable);
            let mut problems = parsed.problems.len();
            out.problems.append(&mut parsed.problems);
            let complete = !parsed.fatal;
            let objects = match (parsed.fatal, previous) {
                (true, Some(previous)) if previous.complete => {
                    problems += 1;
                    out.problems.push(ParseProblem {
                        file: file.clone(),
                        document: 0,
                        reason: "keeping the objects of its last readable version".into(),
                    });
                    previous.objects.clone()
                }
                _ => parsed.cluster,
            };
            if let Some(previous) = previous {
                touched.add(&previous.objects);
            }
            touched.add(&objects);
            let complete = complete || previous.is_some_and(|p| p.complete);
            self.files.insert(
                file.clone(),
                FileState {
                    stamp,
                    objects,
                    complete,
                    problems,
                },
            );
        }
        self.resolve(&touched, &mut out);
        Ok(out)
    }

    /// Problems of the files as last parsed, and extra definitions of
    /// objects defined in several files.
    pub fn problem_count(&self) -> usize {
        self.files.values().map(|f| f.problems).sum::<usize>()
            + self.duplicates.values().sum::<usize>()
    }

    /// The directory's definition of each touched name.
    fn resolve(&mut self, touched: &ClusterNames, out: &mut Refreshed) {
        for name in &touched.services {
            self.duplicates.remove(&("Service", name.to_string()));
        }
        for name in &touched.endpoint_slices {
            self.duplicates.remove(&("EndpointSlice", name.to_string()));
        }
        for name in &touched.nodes {
            self.duplicates.remove(&("Node", name.clone()));
        }
        let duplicates = &mut self.duplicates;
        let mut duplicate = |kind: &'static str, name: String, file: &Path, reason: String| {
            *duplicates.entry((kind, name)).or_default() += 1;
            out.duplicates.push(ParseProblem {
                file: file.to_path_buf(),
                document: 0,
                reason,
            })
        };
        let files = &self.files;
        for name in &touched.services {
            let mut defined = files
                .iter()
                .filter_map(|(file, state)| Some((file, state.objects.services.get(name)?)));
            let first = defined.next();
            for (file, _) in defined {
                duplicate(
                    "Service",
                    name.to_string(),
                    file,
                    format!("Service {name} is defined twice; the first one is used"),
                );
            }
            out.updates
                .push(Update::Service(name.clone(), first.map(|(_, s)| s.clone())));
        }
        for name in &touched.endpoint_slices {
            let mut defined = files
                .iter()
                .filter_map(|(file, state)| Some((file, state.objects.endpoint_slices.get(name)?)));
            let first = defined.next();
            for (file, _) in defined {
                duplicate(
                    "EndpointSlice",
                    name.to_string(),
                    file,
                    format!("EndpointSlice {name} is defined twice; the first one is used"),
                );
            }
            out.updates
                .push(Update::Slice(name.clone(), first.map(|(_, s)| s.clone())));
        }
        for name in &touched.nodes {
            let defined: Vec<(&PathBuf, &NodeRecord)> = files
                .iter()
                .filter_map(|(file, state)| Some((file, state.objects.nodes.get(name)?)))
                .collect();
            for (file, _) in defined.iter().skip(1) {
                duplicate(
                    "Node",
                    name.clone(),
                    file,
                    format!("Node {name} is defined twice; the last one is used"),
                );
            }
            out.updates.push(Update::Node(
                name.clone(),
                defined.last().map(|(_, n)| (*n).clone()),
            ));
        }
    }

    /// The whole directory as it is now, for tests: refreshes, then
    /// resolves every name as a refresh resolves the changed ones,
    /// reporting the problems of the files parsed again and every object
    /// defined twice.
    #[cfg(test)]
    pub fn load(&mut self) -> Result<Loaded> {
        let refreshed = self.refresh()?;
        let mut every_name = ClusterNames::default();
        for state in self.files.values() {
            every_name.add(&state.objects);
        }
        let mut whole = Refreshed::default();
        self.resolve(&every_name, &mut whole);
        let mut cluster = ClusterState::default();
        for update in whole.updates {
            match update {
                Update::Service(name, Some(record)) => {
                    cluster.services.insert(name, record);
                }
                Update::Slice(name, Some(record)) => {
                    cluster.endpoint_slices.insert(name, record);
                }
                Update::Node(name, Some(record)) => {
                    cluster.nodes.insert(name, record);
                }
                _ => {}
            }
        }
        let mut problems = refreshed.problems;
        problems.extend(whole.duplicates);
        Ok(Loaded {
            cluster,
            problems,
            fatal: false,
        })
    }
}

/// Names of objects, by kind.
#[derive(Debug, Default)]
struct ClusterNames {
    services: BTreeSet<ObjectName>,
    endpoint_slices: BTreeSet<ObjectName>,
    nodes: BTreeSet<String>,
}

impl ClusterNames {
    fn add(&mut self, cluster: &ClusterState) {
        self.services.extend(cluster.services.keys().cloned());
        self.endpoint_slices
            .extend(cluster.endpoint_slices.keys().cloned());
        self.nodes.extend(cluster.nodes.keys().cloned());
    }
}

/// Every `*.yaml`, `*.yml` and `*.json` file of the directory (not
/// recursively, hidden files skipped, as `kubectl apply -f DIR` does), in
/// name order.
fn list_manifests(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("reading manifest directory {}", dir.display()))?
    {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if is_manifest(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The file's objects, and whether it could be read at all.
fn read_and_parse(file: &Path) -> (Loaded, bool) {
    match std::fs::read_to_string(file) {
        Ok(text) => (parse_file(file, &text), true),
        Err(error) => (
            Loaded {
                problems: vec![ParseProblem {
                    file: file.to_path_buf(),
                    document: 0,
                    reason: format!("cannot read: {error}"),
                }],
                fatal: true,
                ..Loaded::default()
            },
            false,
        ),
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    !hidden && path.is_file() && matches!(extension, Some("yaml" | "yml" | "json"))
}

/// Parses one file's documents. A large file (a generated manifest of
/// thousands of Services) is cut at its `---` lines and the pieces are
/// parsed on every core; documents of a known kind are read straight into
/// their type, without a generic YAML value first.
pub fn parse_file(file: &Path, text: &str) -> Loaded {
    let pieces = split_documents(text);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(pieces.len() / PIECES_PER_THREAD)
        .max(1);
    let parsed: Vec<ParsedPiece> = if threads == 1 {
        pieces.iter().map(|piece| parse_piece(piece)).collect()
    } else {
        let per_thread = pieces.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = pieces
                .chunks(per_thread)
                .map(|chunk| {
                    scope.spawn(move || chunk.iter().map(|piece| parse_piece(piece)).collect())
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| {
                    worker
                        .join()
                        .unwrap_or_else(|_| vec![ParsedPiece::panicked()])
                })
                .collect()
        })
    };
    if parsed.iter().any(|piece| piece.fatal.is_some()) {
        // Syntax errors are rare; their line numbers must be the file's,
        // so the file is read again as one.
        return parse_sequentially(file, text);
    }
    let mut loaded = Loaded::default();
    let mut position = 0;
    for piece in parsed {
        for items in piece.documents {
            position += 1;
            add_items(file, position, items, &mut loaded);
        }
    }
    loaded
}

/// Below this many documents per core, one thread parses the file.
const PIECES_PER_THREAD: usize = 1_000;

/// The file cut before every line that starts a YAML document (`---` at
/// the start of a line, alone or followed by a space). Each piece holds one
/// document, or more when the file uses other document markers; parsing
/// the pieces in order yields the file's documents in order.
fn split_documents(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (at, _) in text.match_indices("\n---") {
        let marker = at + 1;
        let after = text.as_bytes().get(marker + 3);
        if matches!(after, None | Some(b'\n' | b'\r' | b' ' | b'\t')) {
            pieces.push(&text[start..marker]);
            start = marker;
        }
    }
    pieces.push(&text[start..]);
    pieces
}

/// One object or problem of a document, in document order.
enum Item {
    Service(ObjectName, ServiceRecord),
    Slice(ObjectName, SliceRecord),
    Node(String, NodeRecord),
    Problem(String),
}

/// The documents of one piece, each as its items; `fatal` when the piece
/// has a syntax error (after which nothing can be read).
#[derive(Default)]
struct ParsedPiece {
    documents: Vec<Vec<Item>>,
    fatal: Option<String>,
}

impl ParsedPiece {
    fn panicked() -> Self {
        Self {
            documents: Vec::new(),
            fatal: Some("the parser panicked".into()),
        }
    }
}

fn parse_piece(piece: &str) -> ParsedPiece {
    if let Some(item) = parse_typed(piece) {
        return ParsedPiece {
            documents: vec![vec![item]],
            fatal: None,
        };
    }
    let mut parsed = ParsedPiece::default();
    for document in serde_yaml::Deserializer::from_str(piece) {
        match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => parsed.documents.push(Vec::new()),
            Ok(value) => {
                let mut items = Vec::new();
                items_of(value, &mut items);
                parsed.documents.push(items);
            }
            Err(error) => {
                parsed.fatal = Some(error.to_string());
                break;
            }
        }
    }
    parsed
}

/// A one-document piece of a kind read here, straight into its type;
/// None sends it the generic way (other kinds, lists, schema errors, whose
/// messages the generic way words).
fn parse_typed(piece: &str) -> Option<Item> {
    let mut lines = piece.lines();
    let first = lines.next()?;
    if first.starts_with("---") && first.trim_end() != "---" {
        return None;
    }
    let mut kind = None;
    for line in std::iter::once(first).chain(lines) {
        if line.starts_with("---") && line != first || line.starts_with("...") {
            return None;
        }
        if let Some(value) = line.strip_prefix("kind:") {
            kind = Some(value.trim().trim_matches(|c| c == '"' || c == '\''));
        }
    }
    match kind? {
        "Service" => {
            let service: Service = serde_yaml::from_str(piece).ok()?;
            let name = ObjectName::of(&service.metadata);
            let record = ServiceRecord::new(&name, &service);
            Some(Item::Service(name, record))
        }
        "EndpointSlice" => {
            let slice: EndpointSlice = serde_yaml::from_str(piece).ok()?;
            Some(Item::Slice(
                ObjectName::of(&slice.metadata),
                SliceRecord::new(&slice),
            ))
        }
        "Node" => {
            let node: Node = serde_yaml::from_str(piece).ok()?;
            Some(Item::Node(
                node.metadata.name.clone().unwrap_or_default(),
                NodeRecord::new(&node),
            ))
        }
        _ => None,
    }
}

/// The whole text through one parser, with a syntax error's position as
/// the file has it.
fn parse_sequentially(file: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let position = index + 1;
        match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => {
                let mut items = Vec::new();
                items_of(value, &mut items);
                add_items(file, position, items, &mut loaded);
            }
            Err(error) => {
                loaded.problems.push(ParseProblem {
                    file: file.to_path_buf(),
                    document: position,
                    reason: format!("invalid YAML: {error}"),
                });
                // The parser cannot resynchronise after a syntax error.
                loaded.fatal = true;
                break;
            }
        }
    }
    loaded
}

/// Adds one document's items, reporting them with the document's
/// position.
fn add_items(file: &Path, position: usize, items: Vec<Item>, loaded: &mut Loaded) {
    let problems = &mut loaded.problems;
    let mut report = |reason: String| {
        problems.push(ParseProblem {
            file: file.to_path_buf(),
            document: position,
            reason,
        })
    };
    let cluster = &mut loaded.cluster;
    for item in items {
        match item {
            Item::Service(name, record) => {
                insert_unique(&mut cluster.services, name, record, "Service", &mut report)
            }
            Item::Slice(name, record) => insert_unique(
                &mut cluster.endpoint_slices,
                name,
                record,
                "EndpointSlice",
                &mut report,
            ),
            Item::Node(name, record) => {
                if cluster.nodes.insert(name.clone(), record).is_some() {
                    report(format!(
                        "Node {name} is defined twice; the last one is used"
                    ));
                }
            }
            Item::Problem(reason) => report(reason),
        }
    }
}

fn items_of(value: serde_yaml::Value, items: &mut Vec<Item>) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    let report = Item::Problem;
    match kind.as_str() {
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
            let list = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in list {
                items_of(item, items);
            }
        }
        "Service" => items.push(match typed::<Service>(value, &kind) {
            Ok(service) => {
                let name = ObjectName::of(&service.metadata);
                let record = ServiceRecord::new(&name, &service);
                Item::Service(name, record)
            }
            Err(reason) => report(reason),
        }),
        "EndpointSlice" => items.push(match typed::<EndpointSlice>(value, &kind) {
            Ok(slice) => Item::Slice(ObjectName::of(&slice.metadata), SliceRecord::new(&slice)),
            Err(reason) => report(reason),
        }),
        "Node" => items.push(match typed::<Node>(value, &kind) {
            Ok(node) => Item::Node(
                node.metadata.name.clone().unwrap_or_default(),
                NodeRecord::new(&node),
            ),
            Err(reason) => report(reason),
        }),
        "" => items.push(report("document has no kind".into())),
        other => tracing::debug!(kind = other, "ignoring a kind the dataplane does not use"),
    }
}

fn typed<T: DeserializeOwned>(value: serde_yaml::Value, kind: &str) -> Result<T, String> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    serde_yaml::from_value(value)
        .map_err(|error| format!("{kind} {name} does not match the Kubernetes schema: {error}"))
}

fn insert_unique<T>(
    objects: &mut BTreeMap<ObjectName, T>,
    name: ObjectName,
    object: T,
    kind: &str,
    report: &mut dyn FnMut(String),
) {
    if name.name.is_empty() {
        report(format!("{kind} has no metadata.name"));
        return;
    }
    match objects.entry(name) {
        std::collections::btree_map::Entry::Occupied(existing) => report(format!(
            "{kind} {} is defined twice; the first one is used",
            existing.key()
        )),
        std::collections::btree_map::Entry::Vacant(slot) => {
            slot.insert(object);
        }
    }
}

/// Watches `dir` and sends a unit on `changes` for every change (the
/// receiver coalesces). The watch lasts as long as the returned watcher.
pub fn watch_dir(dir: &Path, changes: super::Changes) -> Result<notify::RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if event.kind.is_access() => {}
            Ok(_) => {
                changes.send(super::Change::Directory);
            }
            Err(error) => {
                tracing::warn!(%error, "manifest directory watch error; resyncing");
                changes.send(super::Change::Directory);
            }
        })
        .context("creating the manifest directory watcher")?;
    // Recursive so that ConfigMap volumes, which swap a `..data` symlink to
    // a new hidden directory, are noticed too.
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Loaded {
        parse_file(Path::new("test.yaml"), text)
    }

    const SERVICE_AND_SLICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
"#;

    #[test]
    fn a_large_file_parsed_in_pieces_on_every_core_reads_as_one() {
        let mut documents = Vec::new();
        for i in 0..5_000 {
            documents.push(format!(
                "kind: Service\nmetadata: {{name: s{i}, namespace: shop}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n",
                i / 250,
                i % 250 + 1
            ));
        }
        // A duplicate, a schema error, a list, a foreign kind, an empty
        // document and an inline document marker, far apart.
        documents[100] = documents[99].clone();
        documents[2_000] = "kind: Service\nmetadata: {name: broken}\nspec: {ports: 7}\n".into();
        documents[3_000] = "kind: List\nitems:\n- {kind: Node, metadata: {name: n1}}\n".into();
        documents[3_500] = "kind: ConfigMap\nmetadata: {name: c}\n".into();
        documents[4_000] = String::new();
        documents[4_500] = "--- {kind: Node, metadata: {name: n2}}\n".into();
        let text = documents
            .iter()
            .map(|d| {
                if d.starts_with("---") {
                    d.clone()
                } else {
                    format!("---\n{d}")
                }
            })
            .collect::<String>();
        let file = Path::new("big.yaml");
        let pieces = parse_file(file, &text);
        let whole = parse_sequentially(file, &text);
        assert!(!pieces.fatal);
        assert_eq!(pieces.cluster, whole.cluster);
        assert_eq!(pieces.problems, whole.problems);
        assert_eq!(pieces.cluster.services.len(), 4_994);
        assert_eq!(pieces.cluster.nodes.len(), 2);
        let reasons: Vec<String> = pieces.problems.iter().map(ToString::to_string).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("document 101") && reasons[0].contains("defined twice"));
        assert!(reasons[1].contains("document 2001") && reasons[1].contains("Service broken"));
    }

    #[test]
    fn a_syntax_error_in_a_large_file_is_reported_at_the_files_line() {
        let mut text = String::new();
        for i in 0..3_000 {
            text += &format!(
                "---\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
            );
        }
        text += "---\nkind: Service\nmetadata: [unclosed\n";
        let loaded = parse_file(Path::new("big.yaml"), &text);
        assert!(loaded.fatal);
        assert_eq!(loaded.cluster.services.len(), 3_000);
        let problem = loaded.problems.last().unwrap();
        assert_eq!(problem.document, 3_001);
        // The line in the file, not in a piece of it.
        assert!(problem.reason.contains("line 12003"), "{problem}");
    }

    #[test]
    fn reads_multi_document_files() {
        let loaded = parse(SERVICE_AND_SLICE);
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        assert!(
            loaded
                .cluster
                .services
                .contains_key(&ObjectName::new("shop", "web"))
        );
        assert!(
            loaded
                .cluster
                .endpoint_slices
                .contains_key(&ObjectName::new("shop", "web-abc"))
        );
    }

    #[test]
    fn reads_lists_and_nodes_and_ignores_other_kinds() {
        let loaded = parse(
            r#"
kind: List
items:
- {kind: Node, metadata: {name: node-a}}
- {kind: ConfigMap, metadata: {name: cfg}, data: {a: b}}
- {kind: Service, metadata: {name: s}, spec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}}
"#,
        );
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        assert!(loaded.cluster.nodes.contains_key("node-a"));
        assert_eq!(loaded.cluster.services.len(), 1);
    }

    #[test]
    fn a_schema_error_skips_only_that_object() {
        let loaded = parse(&format!(
            "{SERVICE_AND_SLICE}\n---\nkind: Service\nmetadata: {{name: broken}}\nspec: {{ports: 7}}\n"
        ));
        assert_eq!(loaded.cluster.services.len(), 1);
        assert_eq!(loaded.problems.len(), 1);
        let problem = loaded.problems[0].to_string();
        assert!(problem.contains("document 3"), "{problem}");
        assert!(problem.contains("Service broken"), "{problem}");
    }

    #[test]
    fn invalid_yaml_is_reported_with_its_position_and_earlier_documents_load() {
        let loaded = parse(&format!(
            "{SERVICE_AND_SLICE}\n---\nkind: Service\nmetadata: [unclosed\n"
        ));
        assert_eq!(loaded.cluster.services.len(), 1);
        assert_eq!(loaded.problems.len(), 1);
        assert!(
            loaded.problems[0].reason.contains("invalid YAML"),
            "{:?}",
            loaded.problems
        );
    }

    #[test]
    fn duplicates_and_nameless_objects_are_reported() {
        let loaded = parse(&format!(
            "{SERVICE_AND_SLICE}\n---\n{SERVICE_AND_SLICE}\n---\nkind: Service\nmetadata: {{}}\n---\nfoo: bar\n"
        ));
        let reasons: Vec<&str> = loaded.problems.iter().map(|p| p.reason.as_str()).collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons[0].contains("shop/web is defined twice"));
        assert!(reasons[1].contains("shop/web-abc is defined twice"));
        assert!(reasons[2].contains("no metadata.name"));
        assert!(reasons[3].contains("no kind"));
    }

    /// A scratch manifest directory removed on drop.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("dataplane-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn write(&self, file: &str, text: &str) {
            std::fs::write(self.0.join(file), text).unwrap();
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_directory_yields_manifest_files_only() {
        let scratch = ScratchDir::new("manifest-files");
        scratch.write("a.yaml", SERVICE_AND_SLICE);
        scratch.write("notes.txt", "kind: Service");
        scratch.write(".hidden.yaml", "kind: Service");
        let loaded = ManifestDir::new(&scratch.0).load().unwrap();
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        assert_eq!(loaded.cluster.services.len(), 1);
    }

    #[test]
    fn a_file_that_turns_unparsable_keeps_its_last_good_objects() {
        let scratch = ScratchDir::new("manifest-last-good");
        scratch.write("a.yaml", SERVICE_AND_SLICE);
        let mut dir = ManifestDir::new(&scratch.0);
        assert_eq!(dir.load().unwrap().cluster.services.len(), 1);

        scratch.write("a.yaml", "kind: Service\nmetadata: [half-written");
        let loaded = dir.load().unwrap();
        assert_eq!(
            loaded.cluster.services.len(),
            1,
            "the Service is not withdrawn"
        );
        assert_eq!(loaded.cluster.endpoint_slices.len(), 1);
        let reasons: Vec<String> = loaded.problems.iter().map(ToString::to_string).collect();
        assert!(reasons[0].contains("invalid YAML"), "{reasons:?}");
        assert!(reasons[1].contains("last readable version"), "{reasons:?}");

        std::fs::remove_file(scratch.0.join("a.yaml")).unwrap();
        assert!(
            dir.load().unwrap().cluster.services.is_empty(),
            "a deleted file's objects go"
        );
    }

    #[test]
    fn an_object_defined_in_two_files_is_reported_with_the_second_file() {
        let scratch = ScratchDir::new("manifest-dupes");
        scratch.write("a.yaml", SERVICE_AND_SLICE);
        scratch.write("b.yaml", SERVICE_AND_SLICE);
        let loaded = ManifestDir::new(&scratch.0).load().unwrap();
        assert_eq!(loaded.cluster.services.len(), 1);
        let reasons: Vec<String> = loaded.problems.iter().map(ToString::to_string).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(
            reasons[0].contains("b.yaml: Service shop/web is defined twice"),
            "{reasons:?}"
        );
    }

    #[test]
    fn the_first_refresh_uses_what_was_read_ahead_and_reads_files_changed_since() {
        let service = |name: &str| {
            SERVICE_AND_SLICE
                .replace("name: web,", &format!("name: {name},"))
                .replace("name: web-abc", &format!("name: {name}-abc"))
        };
        let scratch = ScratchDir::new("manifest-prefetch");
        scratch.write("a.yaml", &service("aaa"));
        scratch.write("b.yaml", &service("bbb"));
        scratch.write("c.yaml", &service("ccc"));
        scratch.write("d.yaml", &service("ddd"));
        scratch.write("e.yaml", "kind: Service\nmetadata: [half-written");
        let prefetch = Prefetch::start(&scratch.0);
        while !prefetch.reader.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let set_modified = |file: &str, modified: std::time::SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(scratch.0.join(file))
                .unwrap()
                .set_modified(modified)
                .unwrap();
        };
        let modified_of = |file: &str| {
            std::fs::metadata(scratch.0.join(file))
                .unwrap()
                .modified()
                .unwrap()
        };

        // Replaced by rename (another inode): read again.
        scratch.write(".a.tmp", &service("new"));
        std::fs::rename(scratch.0.join(".a.tmp"), scratch.0.join("a.yaml")).unwrap();
        // Rewritten in place with its stamp kept: the read-ahead objects
        // stand, which shows they were used rather than the file read again.
        let b_modified = modified_of("b.yaml");
        scratch.write("b.yaml", &service("bbc"));
        set_modified("b.yaml", b_modified);
        // Rewritten in place, same inode and length, a later mtime: read
        // again.
        let c_modified = modified_of("c.yaml");
        scratch.write("c.yaml", &service("ccd"));
        set_modified("c.yaml", c_modified + std::time::Duration::from_secs(1));
        // Deleted after the read-ahead: gone.
        std::fs::remove_file(scratch.0.join("d.yaml")).unwrap();
        // Created after the read-ahead: read.
        scratch.write("f.yaml", &service("fff"));

        let mut dir = ManifestDir::with_prefetch(&scratch.0, prefetch);
        let loaded = dir.load().unwrap();
        let names: Vec<String> = loaded
            .cluster
            .services
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["shop/bbb", "shop/ccd", "shop/fff", "shop/new"]);
        // The broken file read ahead reports its problem, once.
        let problems: Vec<String> = loaded.problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("e.yaml"), "{problems:?}");
        assert!(dir.prefetched.is_none(), "used once");
    }
}

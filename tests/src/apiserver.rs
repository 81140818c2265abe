//! A stand-in Kubernetes API server for tests. It speaks the list/watch
//! protocol kube-runtime's watcher (default `ListWatch` strategy) relies on,
//! for Services, EndpointSlices and Nodes, and can be made to misbehave
//! (compact its history, drop watches, answer 503, stall) so tests can check
//! that the agent relists, resumes and recovers as it must against a real
//! cluster.
//!
//! Every change is kept as an event in one history ordered by a global
//! resourceVersion; a watch stream is a cursor into that history, woken
//! whenever the store changes.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

/// The real API server sends bookmarks about once a minute; tests cannot
/// wait that long.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// How the server answers requests, for fault injection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Healthy,
    /// Every request gets 503; open watch streams are closed.
    Unavailable,
    /// Requests are accepted but not answered, and open watch streams stop
    /// sending, until the mode changes: a hung control plane.
    Stalled,
}

/// List and watch requests served so far, by kind (`"Service"`, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub lists: BTreeMap<String, usize>,
    pub watches: BTreeMap<String, usize>,
    /// Requests that arrived while the server was [`Mode::Stalled`] (they
    /// wait, unanswered): a test can tell that a client is waiting on it.
    pub stalled: usize,
}

/// A kind the server stores, with where the API serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Kind {
    name: &'static str,
    api_version: &'static str,
    resource: &'static str,
    namespaced: bool,
}

#[rustfmt::skip]
const KINDS: [Kind; 3] = [
    Kind { name: "Service", api_version: "v1", resource: "services", namespaced: true },
    Kind { name: "EndpointSlice", api_version: "discovery.k8s.io/v1", resource: "endpointslices", namespaced: true },
    Kind { name: "Node", api_version: "v1", resource: "nodes", namespaced: false },
];

impl Kind {
    fn parse(name: &str) -> Result<Self> {
        KINDS
            .into_iter()
            .find(|kind| kind.name == name)
            .ok_or_else(|| anyhow!("the stand-in API server does not serve kind {name:?}"))
    }
}

/// Where an object lives: kind, namespace ("" when cluster-scoped), name.
type ObjectKey = (Kind, String, String);

struct Event {
    resource_version: u64,
    kind: Kind,
    change: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    resource_version: u64,
    /// History before this version is forgotten: lists and watches that
    /// ask for an older version get 410 Gone.
    compacted: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<Event>,
    mode: Mode,
    /// Bumped to end every open watch stream.
    watch_epoch: u64,
    requests: Requests,
}

impl Store {
    fn record(&mut self, kind: Kind, change: &'static str, object: &mut Value) -> u64 {
        self.resource_version += 1;
        let resource_version = self.resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        self.history.push(Event {
            resource_version,
            kind,
            change,
            object: object.clone(),
        });
        resource_version
    }
}

struct Shared {
    store: Mutex<Store>,
    /// Wakes watch streams and stalled requests after any change.
    changed: watch::Sender<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A test that panicked while holding the lock must not wedge the
        // server for the tests' cleanup.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update<T>(&self, change: impl FnOnce(&mut Store) -> T) -> T {
        let result = change(&mut self.lock());
        self.changed.send_replace(());
        result
    }
}

pub struct ApiServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves on 127.0.0.1 (ephemeral port) inside network namespace `netns`
    /// (a name under /run/netns), or in the caller's namespace when `None`.
    pub fn start(netns: Option<&str>) -> Result<Self> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: watch::Sender::new(()),
        });
        let netns_file = netns
            .map(|name| {
                File::open(Path::new("/run/netns").join(name))
                    .with_context(|| format!("opening netns {name}"))
            })
            .transpose()?;
        let (started_tx, started_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        // Only GET: the agent never writes, and axum answers 405 for the rest.
        let app = Router::new()
            .route("/{*path}", get(handle))
            .with_state(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                let (listener, runtime) = match bind(netns_file) {
                    Ok(bound) => bound,
                    Err(error) => {
                        let _ = started_tx.send(Err(error));
                        return;
                    }
                };
                let _ = started_tx.send(listener.local_addr().context("reading the address"));
                let served = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    // Not a graceful shutdown: stalled requests and watch
                    // streams never finish, so dropping the runtime cuts them.
                    tokio::select! {
                        served = axum::serve(listener, app).into_future() => served,
                        _ = shutdown_rx => Ok(()),
                    }
                });
                if let Err(error) = served {
                    eprintln!("stand-in API server failed: {error}");
                }
            })
            .context("spawning the API server thread")?;
        let address = started_rx
            .recv()
            .context("the API server thread died while starting")??;
        Ok(Self {
            address,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Writes a kubeconfig for this server, plain HTTP and no credentials.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: standin
  cluster:
    server: http://{}
users:
- name: standin
  user: {{}}
contexts:
- name: standin
  context:
    cluster: standin
    user: standin
current-context: standin
",
            self.address
        );
        std::fs::write(path, kubeconfig)
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Creates or replaces a Service, EndpointSlice or Node (namespace
    /// "default" unless given) and tells matching watchers; returns the new
    /// resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let kind = Kind::parse(object["kind"].as_str().unwrap_or_default())?;
        if object["apiVersion"] != kind.api_version {
            bail!("a {} must have apiVersion {}", kind.name, kind.api_version);
        }
        let metadata = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .with_context(|| format!("{} without metadata", kind.name))?;
        let name = metadata
            .get("name")
            .and_then(Value::as_str)
            .with_context(|| format!("{} without metadata.name", kind.name))?
            .to_owned();
        let namespace = if kind.namespaced {
            let namespace = metadata.get("namespace").and_then(Value::as_str);
            let namespace = namespace.unwrap_or("default").to_owned();
            metadata.insert("namespace".into(), json!(namespace));
            namespace
        } else {
            metadata.remove("namespace");
            String::new()
        };
        Ok(self.shared.update(|store| {
            let key = (kind, namespace, name);
            let (change, uid) = match store.objects.get(&key) {
                Some(old) => ("MODIFIED", old["metadata"]["uid"].clone()),
                // Real objects always carry a uid, and some clients key by it.
                None => (
                    "ADDED",
                    json!(format!(
                        "00000000-0000-4000-8000-{:012x}",
                        store.resource_version + 1
                    )),
                ),
            };
            object["metadata"]["uid"] = uid;
            let resource_version = store.record(kind, change, &mut object);
            store.objects.insert(key, object);
            resource_version
        }))
    }

    /// Applies each object in turn; returns the last resourceVersion.
    pub fn apply_all(&self, objects: impl IntoIterator<Item = Value>) -> Result<u64> {
        let mut resource_version = self.shared.lock().resource_version;
        for object in objects {
            resource_version = self.apply(object)?;
        }
        Ok(resource_version)
    }

    /// Deletes an object and sends DELETED (with the object as last seen) to
    /// matching watchers; returns the new resourceVersion.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<u64> {
        let kind = Kind::parse(kind)?;
        let namespace = match kind.namespaced {
            true => namespace.unwrap_or("default"),
            false => "",
        };
        self.shared.update(|store| {
            let key = (kind, namespace.to_owned(), name.to_owned());
            let mut object = store
                .objects
                .remove(&key)
                .with_context(|| format!("no {} {namespace}/{name} to delete", kind.name))?;
            Ok(store.record(kind, "DELETED", &mut object))
        })
    }

    /// Forgets all history up to now, so lists and watches at any version
    /// seen so far get 410 Gone, and ends every open watch so clients come
    /// back at their last resourceVersion, hit the 410 and relist.
    pub fn compact(&self) {
        self.shared.update(|store| {
            // A version of its own, as if some other object had changed: a
            // client that was fully caught up must still be too old, yet a
            // relist must give it a version it can watch from.
            store.resource_version += 1;
            store.compacted = store.resource_version;
            store.history.clear();
            store.watch_epoch += 1;
        });
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.update(|store| {
            store.mode = mode;
            if mode == Mode::Unavailable {
                store.watch_epoch += 1;
            }
        });
    }

    /// Ends every open watch stream; clients resume from their last
    /// resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.update(|store| store.watch_epoch += 1);
    }

    pub fn requests(&self) -> Requests {
        self.shared.lock().requests.clone()
    }
}

/// Moves the calling thread into `netns` and binds there: sockets belong to
/// the netns of the thread that creates them.
fn bind(netns: Option<File>) -> Result<(TcpListener, tokio::runtime::Runtime)> {
    if let Some(netns) = netns {
        // SAFETY: setns on a descriptor we own; it only changes the calling
        // thread's namespace.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("entering the API server's netns");
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the API server")?;
    listener
        .set_nonblocking(true)
        .context("making the API server socket non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the API server's runtime")?;
    Ok((listener, runtime))
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The thread may already be gone; then there is nothing to stop.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic on that thread has been printed already.
            let _ = thread.join();
        }
    }
}

/// An error answered the way the API server does: a Status object.
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code, axum::Json(self.status())).into_response()
    }
}

fn too_old(requested: u64, compacted: u64) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "Expired",
        format!("too old resource version: {requested} ({compacted})"),
    )
}

/// The collection a path names: its kind and, if namespaced, namespace.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io/v1", rest),
        _ => return None,
    };
    let (namespace, resource) = match rest {
        [resource] => (None, *resource),
        ["namespaces", namespace, resource] => (Some((*namespace).to_owned()), *resource),
        _ => return None,
    };
    let kind = KINDS
        .into_iter()
        .find(|kind| kind.api_version == api_version && kind.resource == resource)?;
    (kind.namespaced || namespace.is_none()).then_some((kind, namespace))
}

async fn handle(State(shared): State<Arc<Shared>>, uri: Uri) -> Result<Response, ApiError> {
    wait_while_stalled(&shared).await;
    if shared.lock().mode == Mode::Unavailable {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the stand-in API server is set to be unavailable",
        ));
    }
    if uri.path() == "/version" {
        let version = json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0"});
        return Ok(axum::Json(version).into_response());
    }
    let (kind, namespace) = route(uri.path()).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    })?;
    let query = parse_query(uri.query().unwrap_or_default())?;
    let flag = |name: &str| matches!(query.get(name).map(String::as_str), Some("true" | "1"));
    if flag("sendInitialEvents") {
        // kube-runtime falls back to list+watch when streaming lists are
        // refused, as with servers that lack the WatchList feature.
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "sendInitialEvents is not supported by the stand-in API server",
        ));
    }
    let filter = Filter {
        kind,
        namespace,
        labels: parse_selector(query.get("labelSelector"), true)?,
        fields: parse_selector(query.get("fieldSelector"), false)?,
    };
    let number = |name: &str| match query.get(name).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid {name} {text:?}"))),
    };
    // "0" asks for any version; serving from the newest is one right answer.
    let requested = number("resourceVersion")?.filter(|&version| version != 0);
    if flag("watch") {
        let bookmarks = flag("allowWatchBookmarks");
        let timeout = number("timeoutSeconds")?;
        Ok(start_watch(shared, filter, requested, bookmarks, timeout))
    } else {
        let exact = query
            .get("resourceVersionMatch")
            .is_some_and(|m| m == "Exact");
        list(&shared, &filter, requested.filter(|_| exact))
    }
}

async fn wait_while_stalled(shared: &Shared) {
    let mut changed = shared.changed.subscribe();
    {
        let mut store = shared.lock();
        if store.mode == Mode::Stalled {
            store.requests.stalled += 1;
        }
    }
    loop {
        changed.borrow_and_update();
        if shared.lock().mode != Mode::Stalled {
            return;
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}

/// Lists the current objects; `exact` is the version a client insisted on.
fn list(shared: &Shared, filter: &Filter, exact: Option<u64>) -> Result<Response, ApiError> {
    let mut store = shared.lock();
    *store
        .requests
        .lists
        .entry(filter.kind.name.into())
        .or_default() += 1;
    if let Some(requested) = exact.filter(|&requested| requested < store.compacted) {
        return Err(too_old(requested, store.compacted));
    }
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((kind, _, _), object)| filter.matches(*kind, object))
        .map(|(_, object)| object)
        .collect();
    let body = json!({
        "apiVersion": filter.kind.api_version,
        "kind": format!("{}List", filter.kind.name),
        "metadata": {"resourceVersion": store.resource_version.to_string()},
        "items": items,
    });
    Ok(axum::Json(body).into_response())
}

fn start_watch(
    shared: Arc<Shared>,
    filter: Filter,
    requested: Option<u64>,
    bookmarks: bool,
    timeout: Option<u64>,
) -> Response {
    let mut store = shared.lock();
    *store
        .requests
        .watches
        .entry(filter.kind.name.into())
        .or_default() += 1;
    let watching = |body| {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    };
    let cursor = requested.unwrap_or(store.resource_version);
    if cursor < store.compacted {
        // The real API server accepts the watch and then sends the 410 as
        // an ERROR event; kube-runtime only relists on that event.
        let error = json!({"type": "ERROR", "object": too_old(cursor, store.compacted).status()});
        return watching(Body::from(format!("{error}\n")));
    }
    let now = Instant::now();
    let watch = Watch {
        changed: shared.changed.subscribe(),
        epoch: store.watch_epoch,
        shared: Arc::clone(&shared),
        filter,
        cursor,
        next_bookmark: bookmarks.then_some(now + BOOKMARK_INTERVAL),
        deadline: timeout.map(|seconds| now + Duration::from_secs(seconds)),
    };
    drop(store);
    watching(Body::from_stream(futures::stream::unfold(
        watch,
        Watch::next_chunk,
    )))
}

/// One open watch stream: a cursor into the store's history.
struct Watch {
    shared: Arc<Shared>,
    changed: watch::Receiver<()>,
    epoch: u64,
    filter: Filter,
    /// Every event up to here has been sent or skipped.
    cursor: u64,
    next_bookmark: Option<Instant>,
    deadline: Option<Instant>,
}

enum Step {
    Send(String),
    End,
    /// Nothing to send; `healthy` says whether the stream's timers run.
    Wait {
        healthy: bool,
    },
}

impl Watch {
    /// The next lines to send, waiting for them; `None` ends the stream.
    async fn next_chunk(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        loop {
            self.changed.borrow_and_update();
            let healthy = match self.step(Instant::now()) {
                Step::Send(lines) => return Some((Ok(lines.into()), self)),
                Step::End => return None,
                Step::Wait { healthy } => healthy,
            };
            // A stalled server sends nothing, not even the end of a stream.
            let timers = [self.deadline, self.next_bookmark];
            let wake_at = timers.into_iter().flatten().min().filter(|_| healthy);
            tokio::select! {
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = sleep_until(wake_at) => {}
            }
        }
    }

    fn step(&mut self, now: Instant) -> Step {
        let store = self.shared.lock();
        if store.watch_epoch != self.epoch {
            return Step::End;
        }
        if store.mode != Mode::Healthy {
            return Step::Wait { healthy: false };
        }
        let start = store
            .history
            .partition_point(|event| event.resource_version <= self.cursor);
        let mut lines = String::new();
        for event in &store.history[start..] {
            if self.filter.matches(event.kind, &event.object) {
                let line = json!({"type": event.change, "object": event.object});
                lines.push_str(&format!("{line}\n"));
            }
        }
        self.cursor = self.cursor.max(store.resource_version);
        if !lines.is_empty() {
            return Step::Send(lines);
        }
        if self.deadline.is_some_and(|deadline| now >= deadline) {
            return Step::End;
        }
        if self.next_bookmark.is_some_and(|due| now >= due) {
            self.next_bookmark = Some(now + BOOKMARK_INTERVAL);
            let kind = self.filter.kind;
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "kind": kind.name,
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": self.cursor.to_string()},
            }});
            return Step::Send(format!("{bookmark}\n"));
        }
        Step::Wait { healthy: true }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One `key=value`-style requirement of a label or field selector.
#[derive(Debug, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    Absent(String),
    Equals(String, String),
    Differs(String, String),
}

impl Requirement {
    /// `value` is the object's label or field, `None` when it has none.
    fn matches(&self, value: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Exists(key) => value(key).is_some(),
            Requirement::Absent(key) => value(key).is_none(),
            Requirement::Equals(key, wanted) => value(key).as_deref() == Some(wanted),
            // As in Kubernetes, `key!=value` also selects objects without `key`.
            Requirement::Differs(key, unwanted) => value(key).as_deref() != Some(unwanted),
        }
    }
}

/// Parses `a,!b,c=d,e==f,g!=h`; fields only allow the (in)equalities on
/// `metadata.name` and `metadata.namespace`, as the API server does for
/// these kinds.
fn parse_selector(selector: Option<&String>, labels: bool) -> Result<Vec<Requirement>, ApiError> {
    let Some(selector) = selector.filter(|selector| !selector.trim().is_empty()) else {
        return Ok(Vec::new());
    };
    let invalid =
        |why: &str| ApiError::bad_request(format!("unable to parse selector {selector:?}: {why}"));
    if selector.contains('(') {
        return Err(invalid("set-based requirements are not supported"));
    }
    let mut requirements = Vec::new();
    for term in selector.split(',').map(str::trim) {
        let split = |op: &str| {
            term.split_once(op)
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        };
        let requirement = if let Some((key, value)) = split("!=") {
            Requirement::Differs(key, value)
        } else if let Some((key, value)) = split("==").or_else(|| split("=")) {
            Requirement::Equals(key, value)
        } else if let Some(key) = term.strip_prefix('!') {
            Requirement::Absent(key.trim().to_owned())
        } else {
            Requirement::Exists(term.to_owned())
        };
        match &requirement {
            Requirement::Equals(key, _) | Requirement::Differs(key, _)
                if labels || key == "metadata.name" || key == "metadata.namespace" => {}
            Requirement::Exists(_) | Requirement::Absent(_) if labels => {}
            _ => return Err(invalid(&format!("unsupported requirement {term:?}"))),
        }
        requirements.push(requirement);
    }
    Ok(requirements)
}

/// What a list or watch asks for.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Filter {
    fn matches(&self, kind: Kind, object: &Value) -> bool {
        let metadata = &object["metadata"];
        let text = |value: &Value| value.as_str().map(str::to_owned);
        let label = |key: &str| text(&metadata["labels"][key]);
        let field = |key: &str| match key {
            "metadata.name" => text(&metadata["name"]),
            // Cluster-scoped objects have the empty namespace.
            "metadata.namespace" => Some(text(&metadata["namespace"]).unwrap_or_default()),
            _ => None,
        };
        kind == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|namespace| metadata["namespace"] == **namespace)
            && self
                .labels
                .iter()
                .all(|requirement| requirement.matches(label))
            && self
                .fields
                .iter()
                .all(|requirement| requirement.matches(field))
    }
}

fn parse_query(query: &str) -> Result<BTreeMap<String, String>, ApiError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(key)?, percent_decode(value)?))
        })
        .collect()
}

/// Decodes `application/x-www-form-urlencoded`, which is how kube-rs
/// encodes query parameters (`+` for space).
fn percent_decode(text: &str) -> Result<String, ApiError> {
    let invalid = || ApiError::bad_request(format!("malformed query parameter {text:?}"));
    let mut bytes = Vec::with_capacity(text.len());
    let mut input = text.bytes();
    while let Some(byte) = input.next() {
        bytes.push(match byte {
            b'+' => b' ',
            b'%' => {
                let mut digit = || input.next().and_then(|d| char::from(d).to_digit(16));
                let (Some(high), Some(low)) = (digit(), digit()) else {
                    return Err(invalid());
                };
                // Two hex digits always fit a byte.
                (high * 16 + low) as u8
            }
            byte => byte,
        });
    }
    String::from_utf8(bytes).map_err(|_| invalid())
}

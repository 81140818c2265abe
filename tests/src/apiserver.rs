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
//!
//! Lists page like kube-apiserver 1.34 (`limit`, `continue`,
//! `remainingItemCount`), each page of one list read from the same snapshot
//! as etcd serves them. So every object version not yet compacted is kept
//! per key, in etcd's key order (`namespace/name`), and a list reads the
//! store as it was at any such version.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    ops::Bound,
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
    http::{HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

/// The real API server sends bookmarks about once a minute; tests cannot
/// wait that long.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a list that asks for a resourceVersion the store has not reached
/// waits for it before answering 504, as the watch cache does
/// (`blockTimeout`).
const FRESHNESS_TIMEOUT: Duration = Duration::from_secs(3);

/// The version of continue tokens kube-apiserver writes and accepts.
const CONTINUE_TOKEN_VERSION: &str = "meta.k8s.io/v1";

/// etcd's answer to a list at a compacted resourceVersion.
const LIST_TOO_OLD: &str = "The resourceVersion for the provided list is too old.";

/// etcd's answer to a continue token whose snapshot has been compacted; the
/// 410 carries a token that resumes from the same key at the newest version.
const CONTINUE_TOO_OLD: &str = "The provided continue parameter is too old to display a \
consistent list result. You can start a new list without the continue parameter, or use the \
continue token in this response to retrieve the remainder of the results. Continuing with the \
provided token results in an inconsistent list - objects that were created, modified, or \
deleted between the time the first chunk was returned and now may show up in the list.";

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

/// Where an object lives: its kind and its etcd key within the kind,
/// `namespace/name`, or `name` for cluster-scoped kinds. Ordering by the
/// whole string, not by (namespace, name), is etcd's order: `a-b/x` comes
/// before `a/x`, and pages and continue tokens follow it.
type ObjectKey = (Kind, String);

/// Whether `new` is `old` again, apart from what the server sets itself
/// (uid, resourceVersion).
fn unchanged(old: &Value, new: &Value) -> bool {
    let mut new = new.clone();
    if let Some(metadata) = new.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["uid", "resourceVersion"] {
            match old["metadata"].get(field) {
                Some(value) => metadata.insert(field.into(), value.clone()),
                None => metadata.remove(field),
            };
        }
    }
    *old == new
}

fn storage_key(namespace: &str, name: &str) -> String {
    match namespace {
        "" => name.to_owned(),
        namespace => format!("{namespace}/{name}"),
    }
}

/// An object's versions not yet compacted, oldest first; `None` is its
/// deletion. Shared with the watch history, which holds the same versions.
type Revisions = Vec<(u64, Option<Arc<Value>>)>;

/// The object as the store held it at `version`, if it existed then.
fn version_at(revisions: &Revisions, version: u64) -> Option<&Arc<Value>> {
    let newer = revisions.partition_point(|(changed, _)| *changed <= version);
    revisions[..newer].last()?.1.as_ref()
}

struct Event {
    resource_version: u64,
    kind: Kind,
    change: &'static str,
    object: Arc<Value>,
}

#[derive(Default)]
struct Store {
    resource_version: u64,
    /// History before this version is forgotten: lists and watches that
    /// ask for an older version get 410 Gone.
    compacted: u64,
    objects: BTreeMap<ObjectKey, Revisions>,
    history: Vec<Event>,
    mode: Mode,
    /// Bumped to end every open watch stream.
    watch_epoch: u64,
    requests: Requests,
    /// How many objects a paginated list without selectors has left from
    /// a continue token's start key, at the token's version. Counting them
    /// again for every page would make a list of n objects cost n²/limit;
    /// a snapshot never changes, so the count stays right until compaction
    /// makes the version unreadable. Taken when used: a token used twice
    /// is counted again.
    remaining_counts: BTreeMap<CountedFrom, usize>,
}

/// Where a count of remaining objects starts: kind, the list's key prefix
/// (a namespace's list ends where the namespace does), start key, version.
type CountedFrom = (Kind, String, String, u64);

/// Counts kept for lists that were never finished are dropped beyond this.
const REMAINING_COUNTS_KEPT: usize = 1024;

impl Store {
    fn current(&self, key: &ObjectKey) -> Option<&Arc<Value>> {
        version_at(self.objects.get(key)?, u64::MAX)
    }

    /// Stores a new version of `key` (`object` is what a DELETED event
    /// carries for a deletion) and returns its resourceVersion.
    fn record(&mut self, key: ObjectKey, change: &'static str, mut object: Value) -> u64 {
        self.resource_version += 1;
        let resource_version = self.resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        let object = Arc::new(object);
        self.history.push(Event {
            resource_version,
            kind: key.0,
            change,
            object: Arc::clone(&object),
        });
        let stored = (change != "DELETED").then_some(object);
        self.objects
            .entry(key)
            .or_default()
            .push((resource_version, stored));
        resource_version
    }

    /// One page of a list as the store was at `version`, from `start` (a key
    /// relative to the list's prefix, "" for the first page), as etcd
    /// serves it: at most `limit` matching objects in key order, and a
    /// continue token if any object (matching or not) follows the last one.
    fn page(&mut self, filter: &Filter, version: u64, start: &str, limit: Option<usize>) -> Page {
        let prefix = filter.key_prefix();
        let from = (filter.kind, format!("{prefix}{start}"));
        let counted =
            self.remaining_counts
                .remove(&(filter.kind, prefix.clone(), from.1.clone(), version));
        // A range from the start key, so a page costs its own length, not
        // the length of the list before it.
        let mut live = self
            .objects
            .range((Bound::Included(from), Bound::Unbounded))
            .take_while(|((kind, key), _)| *kind == filter.kind && key.starts_with(&prefix))
            .filter_map(|((_, key), revisions)| Some((key, version_at(revisions, version)?)));
        let mut items = Vec::new();
        let mut last = None;
        for (key, object) in live.by_ref() {
            if filter.matches(filter.kind, object) {
                items.push(Arc::clone(object));
                last = Some(key);
                if limit.is_some_and(|limit| items.len() >= limit) {
                    break;
                }
            }
        }
        let full = limit.is_some_and(|limit| items.len() >= limit);
        let (continue_token, remaining_item_count) = match last.filter(|_| full) {
            None => (None, None),
            // The real server counts what is left only when no selector
            // filters the list: it counts keys, not matches.
            Some(last) if filter.selects_all() => {
                // Every live key matches here, so the count left after the
                // previous page, less this page, is the count left now.
                let remaining = match counted {
                    Some(counted) => counted.saturating_sub(items.len()),
                    None => live.count(),
                };
                if remaining == 0 {
                    (None, None)
                } else {
                    if self.remaining_counts.len() >= REMAINING_COUNTS_KEPT {
                        self.remaining_counts.clear();
                    }
                    let next = (filter.kind, prefix.clone(), format!("{last}\0"), version);
                    self.remaining_counts.insert(next, remaining);
                    (Some(last), Some(remaining))
                }
            }
            Some(last) => (live.next().map(|_| last), None),
        };
        Page {
            items,
            continue_token: continue_token.map(|last| {
                let start = format!("{}\0", &last[prefix.len()..]);
                encode_continue(i64::try_from(version).unwrap_or(i64::MAX), &start)
            }),
            remaining_item_count,
        }
    }
}

/// What a list request gets: its items and, if it is cut short, how to
/// continue it.
struct Page {
    items: Vec<Arc<Value>>,
    continue_token: Option<String>,
    remaining_item_count: Option<usize>,
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
            let key = (kind, storage_key(&namespace, &name));
            if let Some(old) = store.current(&key)
                && unchanged(old, &object)
            {
                // As the API server's no-op update: no new resourceVersion,
                // no event.
                return old["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|rv| rv.parse().ok())
                    .unwrap_or(store.resource_version);
            }
            let (change, uid) = match store.current(&key) {
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
            store.record(key, change, object)
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
            let key = (kind, storage_key(namespace, name));
            let object = store
                .current(&key)
                .map(|object| Value::clone(object))
                .with_context(|| format!("no {} {namespace}/{name} to delete", kind.name))?;
            Ok(store.record(key, "DELETED", object))
        })
    }

    /// Forgets all history up to now, so lists, continue tokens and watches
    /// at any version seen so far get 410 Gone, and ends every open watch so clients come
    /// back at their last resourceVersion, hit the 410 and relist.
    pub fn compact(&self) {
        self.shared.update(|store| {
            // A version of its own, as if some other object had changed: a
            // client that was fully caught up must still be too old, yet a
            // relist must give it a version it can watch from.
            store.resource_version += 1;
            store.compacted = store.resource_version;
            store.history.clear();
            store.remaining_counts.clear();
            // Only each object's newest version is left, and deleted
            // objects are gone for good.
            store.objects.retain(|_, revisions| {
                let newest = revisions.pop();
                revisions.clear();
                match newest {
                    Some(newest @ (_, Some(_))) => {
                        revisions.push(newest);
                        true
                    }
                    _ => false,
                }
            });
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
#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    /// The Status' `details`, where the real server gives some.
    details: Option<Value>,
    /// The Status' `metadata.continue`: a 410 for an expired continue token
    /// carries one that resumes the list at the newest version.
    continue_token: Option<String>,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            continue_token: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some(token) = &self.continue_token {
            status["metadata"]["continue"] = json!(token);
        }
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self
            .details
            .as_ref()
            .and_then(|details| details["retryAfterSeconds"].as_u64());
        let mut response = (self.code, axum::Json(self.status())).into_response();
        // As the real server does for a Status with retryAfterSeconds.
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

fn too_old(requested: u64, compacted: u64) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "Expired",
        format!("too old resource version: {requested} ({compacted})"),
    )
}

/// The watch cache's answer when the store does not reach a requested
/// resourceVersion in time.
fn too_large(requested: u64, current: u64) -> ApiError {
    ApiError {
        details: Some(json!({
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        })),
        ..ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!("Timeout: Too large resource version: {requested}, current: {current}"),
        )
    }
}

/// One error ValidateListOptions finds, all of them on
/// `resourceVersionMatch`: a `field.Error` type and its text.
struct FieldError {
    cause: &'static str,
    text: String,
}

impl FieldError {
    fn forbidden(why: &str) -> Self {
        Self {
            cause: "FieldValueForbidden",
            text: format!("Forbidden: {why}"),
        }
    }
}

/// kube-apiserver rejects inconsistent list options before reading
/// anything: 422, an Invalid ListOptions.
fn invalid_list_options(errors: &[FieldError]) -> ApiError {
    let field = "resourceVersionMatch";
    let texts: Vec<String> = errors
        .iter()
        .map(|error| format!("{field}: {}", error.text))
        .collect();
    let aggregate = match texts.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let causes: Vec<Value> = errors
        .iter()
        .map(|error| json!({"reason": error.cause, "message": error.text, "field": field}))
        .collect();
    ApiError {
        details: Some(json!({"group": "meta.k8s.io", "kind": "ListOptions", "causes": causes})),
        ..ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("ListOptions.meta.k8s.io \"\" is invalid: {aggregate}"),
        )
    }
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
    if !flag("watch") {
        return list(&shared, &filter, &query).await;
    }
    let number = |name: &str| match query.get(name).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid {name} {text:?}"))),
    };
    // "0" asks for any version; serving from the newest is one right answer.
    let requested = number("resourceVersion")?.filter(|&version| version != 0);
    let bookmarks = flag("allowWatchBookmarks");
    let timeout = number("timeoutSeconds")?;
    Ok(start_watch(shared, filter, requested, bookmarks, timeout))
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

/// Which data a list reads.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// The newest data, once the store has reached `at_least`.
    Newest { at_least: u64 },
    /// The store exactly as it was at this version.
    Exact(u64),
    /// The rest of a list after `start` (relative to the list's key
    /// prefix): at the version of its first page, or at the newest one
    /// (`None`) for the token a 410 hands out.
    Continue { version: Option<u64>, start: String },
}

#[derive(Debug, PartialEq, Eq)]
struct ListRequest {
    read: Read,
    /// At most this many items per page; `None` lists everything.
    limit: Option<usize>,
}

/// Reads list options the way kube-apiserver 1.34 does (ValidateListOptions,
/// then the storage layer's rules):
///
/// - `resourceVersion` unset: the newest data (a consistent read), paged.
/// - `resourceVersion=0`: any data, and the newest is served. 1.34 serves
///   it from the watch cache, which ignores `limit` for it
///   (`computeListLimit`: the whole list, no continue token). kube-rs does
///   not send `resourceVersion=0` with a limit for this reason.
/// - `resourceVersion=N` with `resourceVersionMatch=NotOlderThan`, or
///   without a match and without a limit: data at least as new as N.
/// - `resourceVersion=N` with `resourceVersionMatch=Exact`, or without a
///   match but with a limit (the legacy rule): the store exactly at N, 410
///   when compacted.
/// - `continue`: the snapshot of the first page; `resourceVersion` must
///   then be unset or 0 (400), and `resourceVersionMatch` unset (422).
fn parse_list_request(query: &BTreeMap<String, String>) -> Result<ListRequest, ApiError> {
    let text = |name: &str| {
        query
            .get(name)
            .map(String::as_str)
            .filter(|text| !text.is_empty())
    };
    let continue_token = text("continue");
    let resource_version = text("resourceVersion");
    let version_match = text("resourceVersionMatch");
    // The API server pages only for a positive limit.
    let limit = match text("limit") {
        None => None,
        Some(limit) => {
            let limit = limit
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {limit:?}")))?;
            usize::try_from(limit).ok().filter(|&limit| limit > 0)
        }
    };

    let mut invalid = Vec::new();
    if let Some(version_match) = version_match {
        if resource_version.is_none() {
            invalid.push(FieldError::forbidden(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if continue_token.is_some() {
            invalid.push(FieldError::forbidden(
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if version_match == "Exact" && resource_version == Some("0") {
            invalid.push(FieldError::forbidden(
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
        if !matches!(version_match, "Exact" | "NotOlderThan") {
            invalid.push(FieldError {
                cause: "FieldValueNotSupported",
                text: format!(
                    "Unsupported value: {version_match:?}: supported values: \"Exact\", \"NotOlderThan\", \"\""
                ),
            });
        }
    }
    if !invalid.is_empty() {
        return Err(invalid_list_options(&invalid));
    }

    if let Some(token) = continue_token {
        let (version, start) = decode_continue(token)
            .map_err(|why| ApiError::bad_request(format!("invalid continue token: {why}")))?;
        if resource_version.is_some_and(|version| version != "0") {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let read = Read::Continue { version, start };
        return Ok(ListRequest { read, limit });
    }
    let Some(resource_version) = resource_version else {
        let read = Read::Newest { at_least: 0 };
        return Ok(ListRequest { read, limit });
    };
    let version = resource_version.parse::<u64>().map_err(|_| {
        ApiError::bad_request(format!("invalid resource version: {resource_version:?}"))
    })?;
    let read = match (version, version_match) {
        (0, _) => {
            let read = Read::Newest { at_least: 0 };
            return Ok(ListRequest { read, limit: None });
        }
        (version, Some("Exact")) => Read::Exact(version),
        (version, None) if limit.is_some() => Read::Exact(version),
        (version, _) => Read::Newest { at_least: version },
    };
    Ok(ListRequest { read, limit })
}

/// Lists a page of objects as `query` asks.
async fn list(
    shared: &Shared,
    filter: &Filter,
    query: &BTreeMap<String, String>,
) -> Result<Response, ApiError> {
    *shared
        .lock()
        .requests
        .lists
        .entry(filter.kind.name.into())
        .or_default() += 1;
    let request = parse_list_request(query)?;
    let needed = match &request.read {
        Read::Newest { at_least } => *at_least,
        Read::Exact(version)
        | Read::Continue {
            version: Some(version),
            ..
        } => *version,
        Read::Continue { version: None, .. } => 0,
    };
    wait_for_version(shared, needed).await?;
    let (version, page) = {
        let mut store = shared.lock();
        let (version, start) = match &request.read {
            Read::Newest { .. } => (store.resource_version, ""),
            Read::Exact(version) if *version < store.compacted => {
                return Err(ApiError::new(StatusCode::GONE, "Expired", LIST_TOO_OLD));
            }
            Read::Exact(version) => (*version, ""),
            Read::Continue {
                version: Some(version),
                start,
            } if *version < store.compacted => {
                return Err(ApiError {
                    continue_token: Some(encode_continue(-1, start)),
                    ..ApiError::new(StatusCode::GONE, "Expired", CONTINUE_TOO_OLD)
                });
            }
            Read::Continue { version, start } => {
                (version.unwrap_or(store.resource_version), start.as_str())
            }
        };
        (version, store.page(filter, version, start, request.limit))
    };
    // Encoded after unlocking: a big list must not hold up the store.
    let body = ListBody {
        api_version: filter.kind.api_version,
        kind: format!("{}List", filter.kind.name),
        metadata: ListMeta {
            resource_version: version.to_string(),
            continue_token: page.continue_token,
            remaining_item_count: page.remaining_item_count,
        },
        items: page.items.iter().map(|item| &**item).collect(),
    };
    let body = serde_json::to_vec(&body).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("encoding the list: {error}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody<'a> {
    api_version: &'static str,
    kind: String,
    metadata: ListMeta,
    items: Vec<&'a Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    continue_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_item_count: Option<usize>,
}

/// Waits until the store has reached `version`, as the watch cache does for
/// a list that asks for data at least that new, and answers 504 if it does
/// not in time.
async fn wait_for_version(shared: &Shared, version: u64) -> Result<(), ApiError> {
    let deadline = Instant::now() + FRESHNESS_TIMEOUT;
    let mut changed = shared.changed.subscribe();
    loop {
        changed.borrow_and_update();
        let current = shared.lock().resource_version;
        if current >= version {
            return Ok(());
        }
        tokio::select! {
            changed = changed.changed() => {
                if changed.is_err() {
                    return Err(too_large(version, current));
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(too_large(version, shared.lock().resource_version));
            }
        }
    }
}

/// A continue token as kube-apiserver writes it: base64url (unpadded) JSON
/// `{"v":"meta.k8s.io/v1","rv":N,"start":"<key after the prefix>\u0000"}`;
/// rv -1 means "at the newest version".
#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct ContinueToken {
    v: String,
    rv: i64,
    start: String,
}

fn encode_continue(version: i64, start: &str) -> String {
    let token = ContinueToken {
        v: CONTINUE_TOKEN_VERSION.into(),
        rv: version,
        start: start.into(),
    };
    // Encoding two strings and a number to JSON cannot fail.
    base64url_encode(&serde_json::to_vec(&token).unwrap_or_default())
}

/// The version (`None` for the newest) and relative start key of a token,
/// checked as storage.DecodeContinue checks it; the error is its message.
fn decode_continue(token: &str) -> Result<(Option<u64>, String), String> {
    let invalid = "continue key is not valid";
    let json = base64url_decode(token).ok_or_else(|| format!("{invalid}: illegal base64 data"))?;
    let token: ContinueToken =
        serde_json::from_slice(&json).map_err(|error| format!("{invalid}: {error}"))?;
    if token.v != CONTINUE_TOKEN_VERSION {
        return Err(format!(
            "{invalid}: server does not recognize this encoded version {}",
            token.v
        ));
    }
    if token.rv == 0 {
        return Err(format!(
            "{invalid}: incorrect encoded start resourceVersion (version {CONTINUE_TOKEN_VERSION})"
        ));
    }
    if token.start.is_empty() {
        return Err(format!(
            "{invalid}: encoded start key empty (version {CONTINUE_TOKEN_VERSION})"
        ));
    }
    // The real server refuses a start key that path.Clean would change, so
    // a token cannot reach above the list's own prefix.
    let key = match token.start.strip_prefix('/') {
        Some(_) => token.start.clone(),
        None => format!("/{}", token.start),
    };
    let clean = key == "/"
        || (!key.ends_with('/')
            && key[1..]
                .split('/')
                .all(|segment| !matches!(segment, "" | "." | "..")));
    if !clean {
        return Err(format!("{invalid}: invalid start key: {}", token.start));
    }
    Ok((u64::try_from(token.rv).ok(), key[1..].to_owned()))
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Go's base64.RawURLEncoding (no padding), which continue tokens use.
fn base64url_encode(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let group = chunk.iter().enumerate().fold(0u32, |group, (i, &byte)| {
            group | u32::from(byte) << (16 - 8 * i)
        });
        for i in 0..=chunk.len() {
            text.push(char::from(BASE64URL[(group >> (18 - 6 * i) & 63) as usize]));
        }
    }
    text
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(text.len() / 4 * 3 + 2);
    for chunk in text.as_bytes().chunks(4) {
        // One leftover character cannot encode a byte.
        if chunk.len() == 1 {
            return None;
        }
        let mut group = 0u32;
        for (i, &symbol) in chunk.iter().enumerate() {
            let value = BASE64URL.iter().position(|&known| known == symbol)?;
            group |= u32::try_from(value).ok()? << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            bytes.push((group >> (16 - 8 * i)) as u8);
        }
    }
    Some(bytes)
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
                let line = json!({"type": event.change, "object": &*event.object});
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
    /// Where the list's keys start: a namespace's objects share `namespace/`.
    fn key_prefix(&self) -> String {
        self.namespace
            .as_ref()
            .map(|namespace| format!("{namespace}/"))
            .unwrap_or_default()
    }

    /// Whether no label or field selector narrows the list.
    fn selects_all(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

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

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test, with its location.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn query(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn code(result: Result<ListRequest, ApiError>) -> u16 {
        result.err().map_or(200, |error| error.code.as_u16())
    }

    #[test]
    fn continue_tokens_are_the_real_servers_bytes() {
        // What kube-apiserver writes for the 500th Service of a list at 1250
        // (base64url of the JSON, as Go's RawURLEncoding gives it).
        let token = encode_continue(1250, "default/svc-00499\0");
        assert_eq!(
            token,
            "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MTI1MCwic3RhcnQiOiJkZWZhdWx0L3N2Yy0wMDQ5OVx1MDAwMCJ9"
        );
        assert_eq!(
            decode_continue(&token).unwrap(),
            (Some(1250), "default/svc-00499\0".to_owned())
        );
        // The token a 410 hands out continues at the newest version.
        assert_eq!(
            decode_continue(&encode_continue(-1, "b\0")).unwrap(),
            (None, "b\0".to_owned())
        );
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
        for length in 0..8 {
            let bytes: Vec<u8> = (0..length).map(|i| 250 - i).collect();
            assert_eq!(base64url_decode(&base64url_encode(&bytes)), Some(bytes));
        }
    }

    #[test]
    fn bad_continue_tokens_are_refused() {
        let json = |text: &str| base64url_encode(text.as_bytes());
        for (token, why) in [
            ("not base64!".to_owned(), "illegal base64"),
            ("A".to_owned(), "illegal base64"),
            (json("[]"), "continue key is not valid"),
            (
                json(r#"{"v":"meta.k8s.io/v2","rv":3,"start":"a"}"#),
                "does not recognize",
            ),
            (
                json(r#"{"v":"meta.k8s.io/v1","start":"a"}"#),
                "start resourceVersion",
            ),
            (json(r#"{"v":"meta.k8s.io/v1","rv":3}"#), "start key empty"),
            (
                json(r#"{"v":"meta.k8s.io/v1","rv":3,"start":"../kube-system/a"}"#),
                "invalid start key",
            ),
            (
                json(r#"{"v":"meta.k8s.io/v1","rv":3,"start":"a//b"}"#),
                "invalid start key",
            ),
        ] {
            let error = decode_continue(&token).expect_err(&token);
            assert!(error.contains(why), "{token}: {error}");
        }
        // A leading slash is what path.Clean leaves alone.
        assert_eq!(
            decode_continue(&json(r#"{"v":"meta.k8s.io/v1","rv":3,"start":"/a/b"}"#)).unwrap(),
            (Some(3), "a/b".to_owned())
        );
    }

    #[test]
    fn list_options_follow_the_api_servers_rules() {
        let read = |pairs: &[(&str, &str)]| parse_list_request(&query(pairs)).unwrap();
        let newest = |at_least| Read::Newest { at_least };
        assert_eq!(
            read(&[("limit", "500")]),
            ListRequest {
                read: newest(0),
                limit: Some(500)
            }
        );
        // rv=0 is served from the watch cache, which ignores the limit.
        assert_eq!(
            read(&[("limit", "500"), ("resourceVersion", "0")]).limit,
            None
        );
        let with = |match_: &str| {
            read(&[
                ("limit", "5"),
                ("resourceVersion", "7"),
                ("resourceVersionMatch", match_),
            ])
            .read
        };
        assert_eq!(with("Exact"), Read::Exact(7));
        assert_eq!(with("NotOlderThan"), newest(7));
        // Without a match, a limit makes resourceVersion exact (legacy).
        assert_eq!(with(""), Read::Exact(7));
        assert_eq!(read(&[("resourceVersion", "7")]).read, newest(7));
        assert_eq!(read(&[("limit", "0")]).limit, None);
        assert_eq!(read(&[("limit", "-3")]).limit, None);
        let token = encode_continue(4, "a\0");
        assert_eq!(
            read(&[("continue", &token), ("resourceVersion", "0")]).read,
            Read::Continue {
                version: Some(4),
                start: "a\0".into()
            }
        );

        let status = |pairs: &[(&str, &str)]| code(parse_list_request(&query(pairs)));
        assert_eq!(status(&[("resourceVersionMatch", "NotOlderThan")]), 422);
        assert_eq!(
            status(&[("resourceVersion", "0"), ("resourceVersionMatch", "Exact")]),
            422
        );
        assert_eq!(
            status(&[("resourceVersion", "1"), ("resourceVersionMatch", "Newest")]),
            422
        );
        assert_eq!(
            status(&[
                ("continue", &token),
                ("resourceVersion", "4"),
                ("resourceVersionMatch", "Exact")
            ]),
            422
        );
        assert_eq!(
            status(&[("continue", &token), ("resourceVersion", "4")]),
            400
        );
        assert_eq!(status(&[("continue", "garbage")]), 400);
        assert_eq!(status(&[("resourceVersion", "abc")]), 400);
        assert_eq!(status(&[("limit", "many")]), 400);

        let both = parse_list_request(&query(&[
            ("continue", &token),
            ("resourceVersionMatch", "NotOlderThan"),
        ]))
        .unwrap_err();
        assert_eq!(
            both.status()["message"],
            "ListOptions.meta.k8s.io \"\" is invalid: [resourceVersionMatch: Forbidden: \
             resourceVersionMatch is forbidden unless resourceVersion is provided, \
             resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when continue \
             is provided]"
        );
        assert_eq!(
            both.status()["details"]["causes"][1]["field"],
            "resourceVersionMatch"
        );
    }

    #[test]
    fn store_reads_any_uncompacted_version_in_etcd_key_order() {
        let mut store = Store::default();
        let service = |name: &str, namespace: &str, port: u16| {
            json!({"kind": "Service", "metadata": {"name": name, "namespace": namespace},
                   "spec": {"ports": [{"port": port}]}})
        };
        let kind = Kind::parse("Service").unwrap();
        let key = |namespace: &str, name: &str| (kind, storage_key(namespace, name));
        store.record(key("a", "x"), "ADDED", service("x", "a", 1));
        store.record(key("a-b", "y"), "ADDED", service("y", "a-b", 1));
        let before = store.record(key("a", "z"), "ADDED", service("z", "a", 1));
        store.record(key("a", "x"), "MODIFIED", service("x", "a", 2));
        store.record(key("a", "z"), "DELETED", service("z", "a", 1));
        let filter = Filter {
            kind,
            namespace: None,
            labels: Vec::new(),
            fields: Vec::new(),
        };
        let summary = |page: &Page| -> Vec<(String, u64)> {
            page.items
                .iter()
                .map(|item| {
                    let name = item["metadata"]["name"].as_str().unwrap().to_owned();
                    (name, item["spec"]["ports"][0]["port"].as_u64().unwrap())
                })
                .collect()
        };
        // "a-b/y" sorts before "a/x": '-' is below '/'.
        let then = store.page(&filter, before, "", None);
        assert_eq!(
            summary(&then),
            [("y".into(), 1), ("x".into(), 1), ("z".into(), 1)]
        );
        let now = store.page(&filter, store.resource_version, "", Some(1));
        assert_eq!(summary(&now), [("y".into(), 1)]);
        assert_eq!(now.remaining_item_count, Some(1));
        let (_, start) = decode_continue(now.continue_token.as_deref().unwrap()).unwrap();
        let rest = store.page(&filter, store.resource_version, &start, Some(1));
        assert_eq!(summary(&rest), [("x".into(), 2)]);
        // The deleted object does not count, so nothing is left.
        assert_eq!(rest.continue_token, None);
        assert_eq!(rest.remaining_item_count, None);
    }
}

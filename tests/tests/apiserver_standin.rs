//! The stand-in API server speaks list/watch the way kube-runtime's watcher
//! expects. These tests talk raw HTTP/1.1 to it, so they check the wire
//! format rather than one client's reading of it.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use dataplane_testbed::apiserver::{ApiServer, Mode};
use serde_json::{Value, json};

/// Long enough for any answer the server should give at once.
const PATIENCE: Duration = Duration::from_secs(2);

fn service(name: &str, namespace: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn slice(name: &str, service: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.200.2.2"], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

/// An HTTP/1.1 response whose head has been read and whose body is still on
/// the socket.
struct Response {
    status: u16,
    chunked: bool,
    reader: BufReader<TcpStream>,
    /// Body bytes read but not yet returned as a watch event.
    pending: Vec<u8>,
}

impl Response {
    /// The next piece of the body, `None` at its end.
    fn chunk(&mut self) -> Result<Option<Vec<u8>>> {
        let mut data = Vec::new();
        if !self.chunked {
            // Every request says `Connection: close`, so the body ends at EOF.
            self.reader.read_to_end(&mut data)?;
            return Ok((!data.is_empty()).then_some(data));
        }
        let mut size = String::new();
        self.reader
            .read_line(&mut size)
            .context("reading a chunk size")?;
        let size = size.trim().split(';').next().unwrap_or_default();
        let size =
            usize::from_str_radix(size, 16).with_context(|| format!("chunk size {size:?}"))?;
        // Each chunk, the last (empty) one too, ends with CRLF.
        data.resize(size + 2, 0);
        self.reader.read_exact(&mut data)?;
        data.truncate(size);
        Ok((size > 0).then_some(data))
    }

    fn json(mut self) -> Result<Value> {
        let mut body = Vec::new();
        while let Some(chunk) = self.chunk()? {
            body.extend(chunk);
        }
        serde_json::from_slice(&body).with_context(|| String::from_utf8_lossy(&body).into_owned())
    }

    /// The next line of a watch stream, `None` when the server ends it.
    fn event(&mut self) -> Result<Option<Value>> {
        loop {
            if let Some(end) = self.pending.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            match self.chunk()? {
                Some(chunk) => self.pending.extend(chunk),
                None if self.pending.is_empty() => return Ok(None),
                None => bail!("watch stream ended mid-line"),
            }
        }
    }

    fn expect_event(&mut self) -> Result<Value> {
        self.event()?.context("watch stream ended early")
    }
}

fn send(address: SocketAddr, path: &str) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    Ok(stream)
}

fn read_head(stream: TcpStream) -> Result<Response> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the status line")?;
    let status = line
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let Some((name, value)) = line.split_once(':') else {
            break;
        };
        chunked |= name.eq_ignore_ascii_case("transfer-encoding")
            && value.trim().eq_ignore_ascii_case("chunked");
    }
    Ok(Response {
        status,
        chunked,
        reader,
        pending: Vec::new(),
    })
}

fn get(server: &ApiServer, path: &str) -> Result<Response> {
    read_head(send(server.address(), path)?)
}

/// GETs a list and checks it succeeded.
fn list(server: &ApiServer, path: &str) -> Result<Value> {
    let response = get(server, path)?;
    if response.status != 200 {
        let status = response.status;
        bail!("GET {path}: {status} {}", response.json()?);
    }
    response.json()
}

fn names(list: &Value) -> Vec<&str> {
    let items = list["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|item| item["metadata"]["name"].as_str())
        .collect()
}

fn list_version(list: &Value) -> Result<u64> {
    Ok(list["metadata"]["resourceVersion"]
        .as_str()
        .context("list without resourceVersion")?
        .parse()?)
}

fn summary(event: &Value) -> (String, String, String) {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let object = &event["object"];
    (
        text(&event["type"]),
        text(&object["metadata"]["name"]),
        text(&object["metadata"]["resourceVersion"]),
    )
}

#[test]
fn list_returns_applied_objects_with_their_resource_versions() -> Result<()> {
    let server = ApiServer::start(None)?;
    server.apply(service("web", "default", json!({})))?;
    server.apply(service("db", "shop", json!({})))?;
    server.apply(slice("web-abc", "web"))?;
    let last = server.apply(node("node-1"))?;
    assert_eq!(last, 4);

    let services = list(&server, "/api/v1/services?limit=500")?;
    assert_eq!(services["kind"], "ServiceList");
    assert_eq!(services["apiVersion"], "v1");
    assert_eq!(list_version(&services)?, last);
    // Sorted by namespace, then name, like the real API server.
    assert_eq!(names(&services), ["web", "db"]);
    assert_eq!(services["items"][0]["kind"], "Service");
    assert_eq!(services["items"][0]["metadata"]["resourceVersion"], "1");
    assert_eq!(services["items"][1]["metadata"]["namespace"], "shop");

    let slices = list(&server, "/apis/discovery.k8s.io/v1/endpointslices")?;
    assert_eq!(slices["kind"], "EndpointSliceList");
    assert_eq!(slices["items"][0]["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(slices["items"][0]["metadata"]["namespace"], "default");

    let nodes = list(&server, "/api/v1/nodes")?;
    assert_eq!(names(&nodes), ["node-1"]);
    assert!(nodes["items"][0]["metadata"].get("namespace").is_none());

    let shop = list(&server, "/api/v1/namespaces/shop/services")?;
    assert_eq!(names(&shop), ["db"]);
    Ok(())
}

#[test]
fn applying_again_modifies_and_keeps_the_uid() -> Result<()> {
    let server = ApiServer::start(None)?;
    server.apply(service("web", "default", json!({})))?;
    let first = list(&server, "/api/v1/services")?;
    server.apply(service("web", "default", json!({"app": "web"})))?;
    let second = list(&server, "/api/v1/services")?;
    assert_eq!(names(&second), ["web"]);
    assert_eq!(second["items"][0]["metadata"]["resourceVersion"], "2");
    assert_eq!(
        second["items"][0]["metadata"]["uid"],
        first["items"][0]["metadata"]["uid"]
    );
    assert!(
        server
            .apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}))
            .is_err()
    );
    assert!(server.delete("Service", None, "missing").is_err());
    Ok(())
}

#[test]
fn applying_the_same_object_again_is_a_no_op_without_an_event() -> Result<()> {
    let server = ApiServer::start(None)?;
    let first = server.apply(service("web", "default", json!({})))?;
    // As the API server: an update that changes nothing keeps the
    // resourceVersion and tells no watcher.
    assert_eq!(server.apply(service("web", "default", json!({})))?, first);
    let changed = server.apply(service("web", "default", json!({"app": "web"})))?;
    assert_eq!(changed, first + 1);
    let mut watch = get(
        &server,
        &format!("/api/v1/namespaces/default/services?watch=1&resourceVersion={first}"),
    )?;
    assert_eq!(
        summary(&watch.expect_event()?),
        ("MODIFIED".into(), "web".into(), changed.to_string())
    );
    Ok(())
}

#[test]
fn label_selectors_filter_like_kube_proxy_asks() -> Result<()> {
    let server = ApiServer::start(None)?;
    server.apply_all([
        service("plain", "default", json!({})),
        service("web", "default", json!({"app": "web"})),
        service(
            "other-proxy",
            "default",
            json!({"service.kubernetes.io/service-proxy-name": "x"}),
        ),
        service(
            "headless",
            "default",
            json!({"service.kubernetes.io/headless": ""}),
        ),
        slice("web-abc", "web"),
        slice("db-abc", "db"),
    ])?;
    let selected = |selector: &str| -> Result<Vec<String>> {
        let list = list(
            &server,
            &format!("/api/v1/services?labelSelector={selector}"),
        )?;
        Ok(names(&list).into_iter().map(str::to_owned).collect())
    };
    // kube-proxy's own selector, form-encoded as kube-rs sends it.
    assert_eq!(
        selected(
            "%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless"
        )?,
        ["plain", "web"]
    );
    assert_eq!(selected("app=web")?, ["web"]);
    assert_eq!(selected("app%3D%3Dweb")?, ["web"]);
    // `!=` also selects objects without the label, as in Kubernetes.
    assert_eq!(
        selected("app%21%3Dweb")?,
        ["headless", "other-proxy", "plain"]
    );
    assert_eq!(selected("app")?, ["web"]);

    let slices = list(
        &server,
        "/apis/discovery.k8s.io/v1/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dweb",
    )?;
    assert_eq!(names(&slices), ["web-abc"]);

    let set_based = get(&server, "/api/v1/services?labelSelector=app+in+%28web%29")?;
    assert_eq!(set_based.status, 400);
    Ok(())
}

#[test]
fn field_selectors_filter_by_name_and_namespace() -> Result<()> {
    let server = ApiServer::start(None)?;
    server.apply_all([
        service("web", "default", json!({})),
        service("web", "shop", json!({})),
        service("db", "shop", json!({})),
        node("node-1"),
        node("node-2"),
    ])?;
    let by_name = list(
        &server,
        "/api/v1/services?fieldSelector=metadata.name%3Dweb",
    )?;
    assert_eq!(names(&by_name), ["web", "web"]);
    let both = list(
        &server,
        "/api/v1/services?fieldSelector=metadata.name%3Dweb%2Cmetadata.namespace%3Dshop",
    )?;
    assert_eq!(both["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(both["items"][0]["metadata"]["namespace"], "shop");
    let nodes = list(
        &server,
        "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-2",
    )?;
    assert_eq!(names(&nodes), ["node-2"]);

    let unsupported = get(
        &server,
        "/api/v1/services?fieldSelector=spec.clusterIP%3DNone",
    )?;
    assert_eq!(unsupported.status, 400);
    assert_eq!(unsupported.json()?["kind"], "Status");
    Ok(())
}

#[test]
fn watch_from_list_version_streams_later_changes_in_order() -> Result<()> {
    let server = ApiServer::start(None)?;
    server.apply(service("old", "default", json!({})))?;
    let version = list_version(&list(&server, "/api/v1/services")?)?;
    let mut watch = get(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={version}&timeoutSeconds=290"),
    )?;
    assert_eq!(watch.status, 200);
    assert!(watch.chunked, "a watch streams its body");

    let added = server.apply(service("web", "default", json!({})))?;
    // Other kinds never show up on a Service watch.
    server.apply(slice("web-abc", "web"))?;
    let modified = server.apply(service("web", "default", json!({"app": "web"})))?;
    let deleted = server.delete("Service", None, "web")?;

    let expected = [
        ("ADDED", added),
        ("MODIFIED", modified),
        ("DELETED", deleted),
    ];
    for (change, version) in expected {
        let event = watch.expect_event()?;
        assert_eq!(
            summary(&event),
            (change.into(), "web".into(), version.to_string())
        );
        assert_eq!(event["object"]["kind"], "Service");
    }
    Ok(())
}

#[test]
fn watch_from_an_older_version_replays_what_happened_since() -> Result<()> {
    let server = ApiServer::start(None)?;
    let start = server.apply(service("a", "default", json!({})))?;
    server.apply(service("b", "default", json!({})))?;
    server.apply(service("b", "other", json!({})))?;
    let mut watch = get(
        &server,
        &format!("/api/v1/namespaces/default/services?watch=1&resourceVersion={start}"),
    )?;
    assert_eq!(
        summary(&watch.expect_event()?),
        ("ADDED".into(), "b".into(), "2".into())
    );

    // A dropped watch resumed from its last version loses nothing.
    server.drop_watches();
    assert!(watch.event()?.is_none(), "drop_watches ends the stream");
    server.apply(service("c", "default", json!({})))?;
    let mut resumed = get(
        &server,
        "/api/v1/namespaces/default/services?watch=true&resourceVersion=2",
    )?;
    assert_eq!(
        summary(&resumed.expect_event()?),
        ("ADDED".into(), "c".into(), "4".into())
    );
    Ok(())
}

#[test]
fn watch_from_compacted_version_gets_410_error_event() -> Result<()> {
    let server = ApiServer::start(None)?;
    let old = server.apply(service("web", "default", json!({})))?;
    let mut open = get(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={old}"),
    )?;
    let seen = server.apply(service("db", "default", json!({})))?;
    assert_eq!(summary(&open.expect_event()?).1, "db");
    server.compact();
    assert!(open.event()?.is_none(), "compaction ends open watches");

    // Even a client that had seen everything must relist. Like the real API
    // server: 200, then an ERROR event, then the end.
    let mut watch = get(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={seen}"),
    )?;
    assert_eq!(watch.status, 200);
    let error = watch.expect_event()?;
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert_eq!(
        error["object"]["message"],
        "too old resource version: 2 (3)"
    );
    assert!(watch.event()?.is_none());

    let exact = get(
        &server,
        &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact"),
    )?;
    assert_eq!(exact.status, 410);
    // A relist at "any version" serves the current state, from which a
    // watch works again.
    let relist = list(
        &server,
        "/api/v1/services?resourceVersion=0&resourceVersionMatch=NotOlderThan",
    )?;
    assert_eq!(names(&relist), ["db", "web"]);
    let version = list_version(&relist)?;
    let mut watch = get(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={version}"),
    )?;
    server.delete("Service", Some("default"), "db")?;
    assert_eq!(summary(&watch.expect_event()?).0, "DELETED");
    Ok(())
}

#[test]
fn unavailable_server_answers_503_and_closes_watches() -> Result<()> {
    let server = ApiServer::start(None)?;
    let mut watch = get(&server, "/api/v1/services?watch=true")?;
    server.set_mode(Mode::Unavailable);
    assert!(watch.event()?.is_none());

    let response = get(&server, "/api/v1/services")?;
    assert_eq!(response.status, 503);
    let status = response.json()?;
    assert_eq!(
        (status["kind"].as_str(), status["code"].as_u64()),
        (Some("Status"), Some(503))
    );
    assert_eq!(get(&server, "/api/v1/services?watch=true")?.status, 503);

    server.set_mode(Mode::Healthy);
    assert_eq!(get(&server, "/api/v1/services")?.status, 200);
    Ok(())
}

#[test]
fn bookmarks_arrive_when_asked_and_carry_the_current_version() -> Result<()> {
    let server = ApiServer::start(None)?;
    let version = server.apply(slice("web-abc", "web"))?;
    let started = Instant::now();
    let mut watch = get(
        &server,
        "/apis/discovery.k8s.io/v1/endpointslices?watch=true&allowWatchBookmarks=true",
    )?;
    let bookmark = watch.expect_event()?;
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "EndpointSlice");
    assert_eq!(bookmark["object"]["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        version.to_string()
    );
    Ok(())
}

#[test]
fn watch_ends_after_timeout_seconds() -> Result<()> {
    let server = ApiServer::start(None)?;
    let started = Instant::now();
    let mut watch = get(&server, "/api/v1/nodes?watch=true&timeoutSeconds=1")?;
    assert!(watch.event()?.is_none());
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < PATIENCE,
        "{elapsed:?}"
    );
    Ok(())
}

#[test]
fn stalled_server_answers_only_after_recovering() -> Result<()> {
    let server = ApiServer::start(None)?;
    let mut watch = get(
        &server,
        "/api/v1/services?watch=true&allowWatchBookmarks=true",
    )?;
    server.set_mode(Mode::Stalled);
    server.apply(service("web", "default", json!({})))?;
    let request = send(server.address(), "/api/v1/services")?;
    request.set_read_timeout(Some(Duration::from_millis(500)))?;
    let waited = request.peek(&mut [0]);
    assert!(
        matches!(&waited, Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "a stalled server must not answer: {waited:?}"
    );
    // Nor does the open watch send anything, not even a bookmark.
    watch
        .reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))?;
    assert!(watch.event().is_err());

    server.set_mode(Mode::Healthy);
    request.set_read_timeout(Some(PATIENCE))?;
    let response = read_head(request)?;
    assert_eq!(response.status, 200);
    assert_eq!(names(&response.json()?), ["web"]);
    watch.reader.get_ref().set_read_timeout(Some(PATIENCE))?;
    assert_eq!(summary(&watch.expect_event()?).0, "ADDED");
    Ok(())
}

#[test]
fn streaming_lists_are_refused_so_clients_fall_back() -> Result<()> {
    let server = ApiServer::start(None)?;
    let response = get(
        &server,
        "/api/v1/services?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
    )?;
    assert_eq!(response.status, 422);
    assert_eq!(response.json()?["kind"], "Status");
    Ok(())
}

#[test]
fn requests_are_counted_per_kind() -> Result<()> {
    let server = ApiServer::start(None)?;
    list(&server, "/api/v1/services")?;
    list(&server, "/api/v1/namespaces/default/services")?;
    list(&server, "/api/v1/nodes")?;
    let watch = get(
        &server,
        "/apis/discovery.k8s.io/v1/endpointslices?watch=true",
    )?;
    assert_eq!(watch.status, 200);
    assert_eq!(get(&server, "/version")?.json()?["gitVersion"], "v1.34.0");

    let requests = server.requests();
    let counts = |map: &std::collections::BTreeMap<String, usize>| {
        map.iter()
            .map(|(kind, n)| (kind.clone(), *n))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        counts(&requests.lists),
        [("Node".into(), 1), ("Service".into(), 2)]
    );
    assert_eq!(counts(&requests.watches), [("EndpointSlice".into(), 1)]);
    Ok(())
}

#[test]
fn kubeconfig_points_at_the_server_without_credentials() -> Result<()> {
    let server = ApiServer::start(None)?;
    let path = std::env::temp_dir().join(format!("apiserver-standin-{}.yaml", std::process::id()));
    server.write_kubeconfig(&path)?;
    let kubeconfig = std::fs::read_to_string(&path)?;
    std::fs::remove_file(&path)?;
    let server_line = format!("server: http://127.0.0.1:{}", server.address().port());
    assert!(kubeconfig.contains(&server_line), "{kubeconfig}");
    assert!(kubeconfig.contains("current-context: standin"));
    Ok(())
}

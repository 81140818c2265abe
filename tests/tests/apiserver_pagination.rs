//! Paginated lists on the stand-in API server: `limit`, `continue`,
//! `remainingItemCount` and the resourceVersion rules of list, as
//! kube-apiserver 1.34 serves them. Raw HTTP checks the wire format; the
//! agent's own kube-rs reflectors check that a real client pages through.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use dataplane_agent::{
    model::Model,
    source::{
        Change, Changes,
        kube::{KubeSource, client},
    },
};
use dataplane_testbed::apiserver::ApiServer;
use serde_json::{Value, json};

/// Longer than the server's 3 s wait for a resourceVersion it has not
/// reached.
const PATIENCE: Duration = Duration::from_secs(10);

const CONTINUE_TOO_OLD: &str = "The provided continue parameter is too old to display a \
consistent list result. You can start a new list without the continue parameter, or use the \
continue token in this response to retrieve the remainder of the results. Continuing with the \
provided token results in an inconsistent list - objects that were created, modified, or \
deleted between the time the first chunk was returned and now may show up in the list.";

fn service(namespace: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn slice(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.200.2.2"], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    })
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// One GET over a fresh connection, the whole body read.
fn get(server: &ApiServer, path: &str) -> Result<Reply> {
    let address = server.address();
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context("reading the reply")?;
    let end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8(raw[..end].to_vec())?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .context("no status line")?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(key, value)| {
        key.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    let body = serde_json::from_slice(&body)
        .with_context(|| format!("GET {path}: {}", String::from_utf8_lossy(&body)))?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|window| window == b"\r\n")
            .context("chunk size")?;
        let size = std::str::from_utf8(&data[..line_end])?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16)?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = data
            .get(line_end + 2..line_end + 2 + size)
            .context("short chunk")?;
        body.extend_from_slice(chunk);
        data = &data[line_end + 4 + size..];
    }
}

/// GETs a list and checks it succeeded.
fn list(server: &ApiServer, path: &str) -> Result<Value> {
    let reply = get(server, path)?;
    if reply.status != 200 {
        bail!("GET {path}: {} {}", reply.status, reply.body);
    }
    Ok(reply.body)
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `namespace/name` of each item: etcd's key, the order of a list.
fn keys(list: &Value) -> Vec<String> {
    let items = list["items"].as_array().unwrap();
    items
        .iter()
        .map(|item| {
            let metadata = &item["metadata"];
            format!(
                "{}/{}",
                metadata["namespace"].as_str().unwrap(),
                metadata["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn continue_token(list: &Value) -> Option<String> {
    list["metadata"]["continue"].as_str().map(str::to_owned)
}

/// Query parameters are form-encoded, and tokens are base64url: only `=`
/// would need escaping, and the real server never pads.
fn with_token(path: &str, token: &str) -> String {
    assert!(!token.contains('='), "{token}");
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}continue={token}")
}

/// Follows continue tokens to the end; returns the pages.
fn all_pages(server: &ApiServer, path: &str) -> Result<Vec<Value>> {
    let mut pages = vec![list(server, path)?];
    while let Some(token) = pages.last().and_then(continue_token) {
        pages.push(list(server, &with_token(path, &token))?);
    }
    Ok(pages)
}

#[test]
fn limit_500_pages_1250_services_with_tokens_and_remaining_counts() -> Result<()> {
    let server = ApiServer::start(None)?;
    let mut expected = Vec::new();
    let mut objects = Vec::new();
    for i in 0..1250 {
        // Namespaces whose keys do not sort as (namespace, name) tuples:
        // "team-a/..." comes before "team/...".
        let namespace = ["team", "team-a", "default"][i % 3];
        let name = format!("svc-{i:04}");
        expected.push(format!("{namespace}/{name}"));
        objects.push(service(namespace, &name, json!({})));
        // Other kinds share the store and must not show up.
        if i % 100 == 0 {
            objects.push(slice(namespace, &name));
        }
    }
    expected.sort();
    let version = server.apply_all(objects)?;

    let pages = all_pages(&server, "/api/v1/services?limit=500")?;
    let sizes: Vec<usize> = pages.iter().map(|page| keys(page).len()).collect();
    assert_eq!(sizes, [500, 500, 250]);
    let remaining: Vec<Option<u64>> = pages
        .iter()
        .map(|page| page["metadata"]["remainingItemCount"].as_u64())
        .collect();
    assert_eq!(remaining, [Some(750), Some(250), None]);
    assert!(pages[2]["metadata"].get("continue").is_none());
    assert!(pages[2]["metadata"].get("remainingItemCount").is_none());
    for page in &pages {
        assert_eq!(page["kind"], "ServiceList");
        assert_eq!(page["metadata"]["resourceVersion"], version.to_string());
    }
    let listed: Vec<String> = pages.iter().flat_map(keys).collect();
    assert_eq!(listed, expected);
    assert_eq!(server.requests().lists.get("Service"), Some(&3));

    // A limit the list fills exactly leaves no token behind.
    let exact = list(&server, "/api/v1/services?limit=1250")?;
    assert_eq!(keys(&exact).len(), 1250);
    assert!(exact["metadata"].get("continue").is_none());

    // Within one namespace the token's key is relative to it.
    let team = all_pages(&server, "/api/v1/namespaces/team/services?limit=100")?;
    let team_keys: Vec<String> = team.iter().flat_map(keys).collect();
    let expected_team: Vec<&String> = expected
        .iter()
        .filter(|key| key.starts_with("team/"))
        .collect();
    assert_eq!(team.len(), expected_team.len().div_ceil(100));
    assert_eq!(team_keys.iter().collect::<Vec<_>>(), expected_team);
    for (i, page) in team.iter().enumerate() {
        let left = expected_team.len().saturating_sub(100 * (i + 1));
        assert_eq!(
            page["metadata"]["remainingItemCount"].as_u64(),
            (left > 0).then_some(left as u64),
            "page {i}"
        );
    }
    Ok(())
}

#[test]
fn later_pages_come_from_the_first_pages_snapshot() -> Result<()> {
    let server = ApiServer::start(None)?;
    let names_of = |range: std::ops::Range<u32>| -> Vec<String> {
        range.map(|i| format!("svc-{i:02}")).collect()
    };
    for name in names_of(0..10) {
        server.apply(service("default", &name, json!({"v": "old"})))?;
    }
    let path = "/api/v1/services?limit=4";
    let first = list(&server, path)?;
    let snapshot = first["metadata"]["resourceVersion"].clone();
    assert_eq!(names(&first), names_of(0..4));
    let token = continue_token(&first).context("no token")?;

    server.apply(service("default", "svc-01", json!({"v": "new"})))?;
    server.apply(service("default", "svc-05", json!({"v": "new"})))?;
    server.delete("Service", None, "svc-06")?;
    server.apply(service("default", "svc-04a", json!({"v": "new"})))?;
    server.apply(service("default", "svc-99", json!({"v": "new"})))?;

    // The rest of the list is as it was when the first page was read, and
    // the same token can be used again.
    for _ in 0..2 {
        let second = list(&server, &with_token(path, &token))?;
        assert_eq!(second["metadata"]["resourceVersion"], snapshot);
        assert_eq!(names(&second), names_of(4..8));
        assert_eq!(second["metadata"]["remainingItemCount"], 2);
        for item in second["items"].as_array().unwrap() {
            assert_eq!(item["metadata"]["labels"]["v"], "old", "{item}");
            let version: u64 = item["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()?;
            assert!(version <= snapshot.as_str().unwrap().parse()?);
        }
        let third = list(
            &server,
            &with_token(path, &continue_token(&second).unwrap()),
        )?;
        assert_eq!(names(&third), names_of(8..10));
        assert!(continue_token(&third).is_none());
    }

    // A fresh list sees every change.
    let fresh: Vec<Value> = all_pages(&server, path)?;
    let fresh_names: Vec<String> = fresh.iter().flat_map(names).collect();
    assert_eq!(
        fresh_names,
        [
            "svc-00", "svc-01", "svc-02", "svc-03", "svc-04", "svc-04a", "svc-05", "svc-07",
            "svc-08", "svc-09", "svc-99"
        ]
    );
    assert_ne!(fresh[0]["metadata"]["resourceVersion"], snapshot);
    let svc05 = &fresh[1]["items"][2];
    assert_eq!(svc05["metadata"]["name"], "svc-05");
    assert_eq!(svc05["metadata"]["labels"]["v"], "new");
    Ok(())
}

#[test]
fn compaction_expires_continue_tokens_and_exact_versions() -> Result<()> {
    let server = ApiServer::start(None)?;
    for i in 0..6 {
        server.apply(service("default", &format!("svc-{i}"), json!({})))?;
    }
    let path = "/api/v1/services?limit=2";
    let first = list(&server, path)?;
    let token = continue_token(&first).context("no token")?;
    let old: u64 = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()?;

    // Before compaction an older version can still be read exactly.
    server.apply(service("default", "svc-6", json!({})))?;
    let exact = list(
        &server,
        &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact"),
    )?;
    assert_eq!(exact["metadata"]["resourceVersion"], old.to_string());
    assert_eq!(names(&exact).len(), 6);
    // A limit without a match reads exactly too (the legacy rule).
    let legacy = list(
        &server,
        &format!("/api/v1/services?resourceVersion={old}&limit=10"),
    )?;
    assert_eq!(names(&legacy).len(), 6);

    server.compact();
    let expired = get(&server, &with_token(path, &token))?;
    assert_eq!(expired.status, 410);
    assert_eq!(expired.body["kind"], "Status");
    assert_eq!(expired.body["code"], 410);
    assert_eq!(expired.body["reason"], "Expired");
    assert_eq!(expired.body["message"], CONTINUE_TOO_OLD);
    // The 410 offers a token for the rest at the newest version, which
    // does show what changed since the first page.
    let newest = expired.body["metadata"]["continue"]
        .as_str()
        .context("410 without a continue token")?;
    let rest = all_pages(&server, &with_token(path, newest))?;
    let rest_names: Vec<String> = rest.iter().flat_map(names).collect();
    assert_eq!(rest_names, ["svc-2", "svc-3", "svc-4", "svc-5", "svc-6"]);
    assert_ne!(rest[0]["metadata"]["resourceVersion"], old.to_string());

    let gone = get(
        &server,
        &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact"),
    )?;
    assert_eq!(gone.status, 410);
    assert_eq!(gone.body["reason"], "Expired");
    assert_eq!(
        gone.body["message"],
        "The resourceVersion for the provided list is too old."
    );
    // A new list works again and pages from the new snapshot.
    assert_eq!(all_pages(&server, path)?.len(), 4);
    Ok(())
}

#[test]
fn inconsistent_list_options_are_refused_like_the_api_server() -> Result<()> {
    let server = ApiServer::start(None)?;
    for i in 0..3 {
        server.apply(service("default", &format!("svc-{i}"), json!({})))?;
    }
    let first = list(&server, "/api/v1/services?limit=1")?;
    let token = continue_token(&first).context("no token")?;

    let garbage = get(&server, "/api/v1/services?limit=1&continue=bm90LWpzb24")?;
    assert_eq!(garbage.status, 400);
    assert_eq!(garbage.body["kind"], "Status");
    assert_eq!(garbage.body["reason"], "BadRequest");
    assert!(
        garbage.body["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid continue token: continue key is not valid"),
        "{}",
        garbage.body
    );

    let with_version = get(
        &server,
        &format!(
            "{}&resourceVersion=2",
            with_token("/api/v1/services?limit=1", &token)
        ),
    )?;
    assert_eq!(with_version.status, 400);
    assert_eq!(
        with_version.body["message"],
        "specifying resource version is not allowed when using continue"
    );
    // resourceVersion=0 with a token is ignored, as on the real server.
    let with_zero = list(
        &server,
        &format!(
            "{}&resourceVersion=0",
            with_token("/api/v1/services?limit=1", &token)
        ),
    )?;
    assert_eq!(names(&with_zero), ["svc-1"]);

    // The options validation: 422 Invalid, before anything is read.
    let with_match = get(
        &server,
        &format!(
            "{}&resourceVersion=2&resourceVersionMatch=NotOlderThan",
            with_token("/api/v1/services?limit=1", &token)
        ),
    )?;
    assert_eq!(with_match.status, 422);
    assert_eq!(
        with_match.body["message"],
        "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: \
         resourceVersionMatch is forbidden when continue is provided"
    );
    let match_alone = get(&server, "/api/v1/services?resourceVersionMatch=Exact")?;
    assert_eq!(match_alone.status, 422);
    assert_eq!(match_alone.body["reason"], "Invalid");
    assert_eq!(
        match_alone.body["message"],
        "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: \
         resourceVersionMatch is forbidden unless resourceVersion is provided"
    );
    let exact_zero = get(
        &server,
        "/api/v1/services?resourceVersion=0&resourceVersionMatch=Exact",
    )?;
    assert_eq!(exact_zero.status, 422);
    Ok(())
}

#[test]
fn selected_lists_page_by_matches_without_a_remaining_count() -> Result<()> {
    let server = ApiServer::start(None)?;
    for i in 0..10 {
        let labels = if i % 2 == 0 {
            json!({"app": "web"})
        } else {
            json!({})
        };
        server.apply(service("default", &format!("svc-{i}"), labels))?;
    }
    let pages = all_pages(&server, "/api/v1/services?labelSelector=app%3Dweb&limit=2")?;
    let listed: Vec<Vec<String>> = pages.iter().map(names).collect();
    assert_eq!(
        listed,
        [
            vec!["svc-0", "svc-2"],
            vec!["svc-4", "svc-6"],
            vec!["svc-8"]
        ]
    );
    // The real server counts keys, not matches, so it gives no count when a
    // selector filters.
    assert!(
        pages
            .iter()
            .all(|page| page["metadata"].get("remainingItemCount").is_none())
    );

    // A full page with only non-matching keys after it still has a token,
    // and the page it leads to is empty, as etcd serves it.
    let five = all_pages(&server, "/api/v1/services?labelSelector=app%3Dweb&limit=5")?;
    let five_names: Vec<Vec<String>> = five.iter().map(names).collect();
    let empty: Vec<&str> = Vec::new();
    assert_eq!(
        five_names,
        [vec!["svc-0", "svc-2", "svc-4", "svc-6", "svc-8"], empty]
    );
    Ok(())
}

#[test]
fn resource_version_zero_serves_everything_despite_a_limit() -> Result<()> {
    let server = ApiServer::start(None)?;
    let version = server
        .apply_all((0..1250).map(|i| service("default", &format!("svc-{i:04}"), json!({}))))?;
    for path in [
        "/api/v1/services?limit=500&resourceVersion=0",
        "/api/v1/services?limit=500&resourceVersion=0&resourceVersionMatch=NotOlderThan",
    ] {
        let all = list(&server, path)?;
        assert_eq!(names(&all).len(), 1250, "{path}");
        assert!(all["metadata"].get("continue").is_none(), "{path}");
        assert_eq!(all["metadata"]["resourceVersion"], version.to_string());
    }
    // NotOlderThan at a version the store has serves the newest data, paged.
    let paged = list(
        &server,
        "/api/v1/services?limit=500&resourceVersion=3&resourceVersionMatch=NotOlderThan",
    )?;
    assert_eq!(names(&paged).len(), 500);
    assert_eq!(paged["metadata"]["resourceVersion"], version.to_string());
    assert_eq!(paged["metadata"]["remainingItemCount"], 750);
    Ok(())
}

#[test]
fn lists_wait_for_a_newer_resource_version_then_time_out() -> Result<()> {
    let server = ApiServer::start(None)?;
    let version = server.apply(service("default", "svc-0", json!({})))?;
    let wanted = version + 1;
    let path =
        format!("/api/v1/services?resourceVersion={wanted}&resourceVersionMatch=NotOlderThan");
    std::thread::scope(|scope| -> Result<()> {
        let waiting = scope.spawn(|| list(&server, &path));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !waiting.is_finished(),
            "answered before the version existed"
        );
        server.apply(service("default", "svc-1", json!({})))?;
        let fresh = waiting.join().unwrap()?;
        assert_eq!(fresh["metadata"]["resourceVersion"], wanted.to_string());
        assert_eq!(names(&fresh), ["svc-0", "svc-1"]);
        Ok(())
    })?;

    let started = Instant::now();
    let future = wanted + 10;
    let timeout = get(
        &server,
        &format!("/api/v1/services?resourceVersion={future}&resourceVersionMatch=Exact"),
    )?;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(2900), "{waited:?}");
    assert_eq!(timeout.status, 504);
    assert_eq!(timeout.body["reason"], "Timeout");
    assert_eq!(
        timeout.body["message"],
        format!("Timeout: Too large resource version: {future}, current: {wanted}")
    );
    assert_eq!(
        timeout.body["details"]["causes"][0]["reason"],
        "ResourceVersionTooLarge"
    );
    assert_eq!(timeout.header("retry-after"), Some("1"));
    Ok(())
}

/// The agent's own reflectors (kube-rs' watcher, pages of 500, kube-proxy's
/// selectors) list through the stand-in page by page.
#[test]
fn kube_rs_reflectors_page_through_every_object() -> Result<()> {
    let server = ApiServer::start(None)?;
    let mut objects = Vec::new();
    for i in 0..1250 {
        let namespace = ["default", "shop"][i % 2];
        objects.push(service(namespace, &format!("svc-{i:04}"), json!({})));
        if i < 600 {
            objects.push(slice(namespace, &format!("svc-{i:04}")));
        }
    }
    // kube-proxy's selector leaves these out.
    for i in 0..30 {
        let headless = json!({"service.kubernetes.io/headless": ""});
        objects.push(service("default", &format!("headless-{i}"), headless));
    }
    objects.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}));
    server.apply_all(objects)?;
    let kubeconfig =
        std::env::temp_dir().join(format!("apiserver-pagination-{}.yaml", std::process::id()));
    server.write_kubeconfig(&kubeconfig)?;

    let runtime = tokio::runtime::Runtime::new()?;
    let snapshot = runtime.block_on(async {
        let client = client(Some(&kubeconfig)).await?;
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::time::timeout(
            PATIENCE,
            KubeSource::start(client, Changes::new(sender, || {})),
        )
        .await
        .context("the watches never finished their first list")??;
        // What the agent's sync loop does with the changes sent so far.
        let mut model = Model::new("node-1");
        while let Ok(change) = receiver.try_recv() {
            if let Change::Object(update) = change {
                model.update(update);
            }
        }
        anyhow::Ok(model.cluster().clone())
    });
    std::fs::remove_file(&kubeconfig)?;
    let snapshot = snapshot?;
    assert_eq!(snapshot.services.len(), 1250);
    assert_eq!(snapshot.endpoint_slices.len(), 600);
    assert_eq!(snapshot.nodes.len(), 1);
    // 1,250 of the Services match, in pages of 500; the headless ones are
    // skipped within the first page.
    let lists = server.requests().lists;
    assert_eq!(lists.get("Service"), Some(&3));
    assert_eq!(lists.get("EndpointSlice"), Some(&2));
    assert_eq!(lists.get("Node"), Some(&1));
    Ok(())
}

#[test]
fn fifty_thousand_services_and_slices_page_quickly() -> Result<()> {
    let server = ApiServer::start(None)?;
    let count = 50_000;
    server.apply_all((0..count).flat_map(|i| {
        let namespace = format!("ns-{}", i % 50);
        let name = format!("svc-{i:05}");
        [
            service(&namespace, &name, json!({})),
            slice(&namespace, &name),
        ]
    }))?;
    for path in [
        "/api/v1/services?limit=500",
        "/apis/discovery.k8s.io/v1/endpointslices?limit=500",
        "/api/v1/services?limit=500&labelSelector=%21nothing",
    ] {
        let started = Instant::now();
        let pages = all_pages(&server, path)?;
        let elapsed = started.elapsed();
        assert_eq!(pages.len(), count / 500);
        let listed: usize = pages.iter().map(|page| keys(page).len()).sum();
        assert_eq!(listed, count);
        eprintln!(
            "{path}: {count} objects in {} pages, {elapsed:?}",
            pages.len()
        );
        // Generous for a debug build on a loaded machine; re-reading the
        // list before each page (quadratic) takes several times longer.
        assert!(elapsed < Duration::from_secs(60), "{path}: {elapsed:?}");
    }
    Ok(())
}

//! `dataplane-agent run --config FILE` with kube-proxy's own
//! KubeProxyConfiguration: the file's settings are used, a flag given on
//! the command line wins over them, and a mode this agent cannot take over
//! stops it at start.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use dataplane_testbed::{
    Host, Testbed,
    deploy::{agent_container, strings},
    manifests::{Ep, Svc, join, slice},
    testbed::AgentSource,
};

const VIP: &str = "10.96.0.10";
/// Not the testbed's node name: only the file names the node this way.
const NODE_FROM_FILE: &str = "node-from-file";
/// Metrics addresses other than the default (127.0.0.1:10249), so that an
/// answer there can only come from the file or the flag. Every port is free
/// in the testbed's own node namespace.
const FILE_METRICS: &str = "127.0.0.1:19249";
const FLAG_METRICS: &str = "127.0.0.1:19250";

/// A kube-proxy configuration as a cluster would have it, with this test's
/// node name and metrics address.
fn kube_proxy_config(mode: &str) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: ""
  qps: 5
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 0
  min: null
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocalMode: ClusterCIDR
healthzBindAddress: ""
hostnameOverride: {NODE_FROM_FILE}
iptables:
  localhostNodePorts: false
  masqueradeAll: false
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
metricsBindAddress: {FILE_METRICS}
mode: "{mode}"
nodePortAddresses: null
oomScoreAdj: -999
"#
    )
}

/// A testbed with one client and one pod, and a Service whose only endpoint
/// is on the node the file names, with internalTrafficPolicy Local: it is
/// served only if the agent takes its node name from the file.
fn cluster() -> (Testbed, Host, PathBuf) {
    let mut tb = Testbed::new().unwrap();
    let client = tb.host("client").unwrap();
    let pod = tb.host("pod1").unwrap();
    tb.serve(&pod, 8080).unwrap();
    tb.write_manifest(
        "web.yaml",
        &join(&[
            Svc::new("web", VIP)
                .port("http", 80, "TCP", 8080)
                .spec("internalTrafficPolicy: Local")
                .yaml(),
            slice(
                "web-1",
                "web",
                &[("http", 8080, "TCP")],
                &[Ep::ready(&pod).on_node(NODE_FROM_FILE)],
            ),
        ]),
    )
    .unwrap();
    let config = tb.work_dir.join("config.conf");
    (tb, client, config)
}

/// `dataplane-agent run --config <config>` on the testbed's manifests,
/// without a node name of its own, plus `extra_args`.
fn agent_with_config(tb: &Testbed, config: &Path, extra_args: &[&str]) -> Command {
    let config = format!("--config={}", config.display());
    let args: Vec<&str> = [config.as_str()]
        .into_iter()
        .chain(extra_args.iter().copied())
        .collect();
    tb.agent_command_unnamed(&AgentSource::Manifests, &args)
        .unwrap()
}

fn scrape(tb: &Testbed, address: &str) -> String {
    tb.http_get_in_node(address, "/metrics").unwrap_or_default()
}

/// Whether nothing listens on `address` in the node namespace: the
/// connection is refused (any other failure is not an answer).
fn nobody_listens_on(tb: &Testbed, address: &str) -> bool {
    match tb.http_get_in_node(address, "/metrics") {
        Ok(_) => false,
        Err(error) => {
            let error = format!("{error:#}");
            assert!(error.contains("refused"), "{address}: {error}");
            true
        }
    }
}

fn wait_for_metrics(tb: &Testbed, address: &str) {
    tb.wait_until(
        &format!("metrics served on {address}"),
        Duration::from_secs(10),
        || Ok(scrape(tb, address).contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds")),
    )
    .unwrap();
}

#[test]
fn the_agent_takes_its_node_name_and_metrics_address_from_kube_proxys_file() {
    let (tb, client, config) = cluster();
    std::fs::write(&config, kube_proxy_config("")).unwrap();
    tb.launch_agent(agent_with_config(&tb, &config, &[]))
        .unwrap();

    wait_for_metrics(&tb, FILE_METRICS);
    assert!(
        nobody_listens_on(&tb, "127.0.0.1:10249"),
        "the default metrics address is not served"
    );
    // The endpoint is on the node the file names, and the policy is Local.
    let attempts = tb.connect(&client, &format!("{VIP}:80"), 5).unwrap();
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    let log = tb.agent_log();
    assert!(
        log.contains("settings read from kube-proxy's configuration"),
        "{log}"
    );
}

#[test]
fn a_flag_given_on_the_command_line_wins_over_the_file() {
    let (tb, client, config) = cluster();
    std::fs::write(&config, kube_proxy_config("")).unwrap();
    let metrics_flag = format!("--metrics-bind-address={FLAG_METRICS}");
    tb.launch_agent(agent_with_config(&tb, &config, &[&metrics_flag]))
        .unwrap();

    wait_for_metrics(&tb, FLAG_METRICS);
    assert!(
        nobody_listens_on(&tb, FILE_METRICS),
        "the file's address is not served"
    );
    // The rest of the file still applies: its node name.
    let attempts = tb.connect(&client, &format!("{VIP}:80"), 5).unwrap();
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
}

#[test]
fn ipvs_mode_stops_the_agent_at_start_naming_the_mode() {
    let (tb, _client, config) = cluster();
    std::fs::write(&config, kube_proxy_config("ipvs")).unwrap();
    let output = agent_with_config(&tb, &config, &[])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("mode: \"ipvs\" is not supported")
            && stderr.contains(&*config.to_string_lossy()),
        "{stderr}"
    );
    // Refused before anything was loaded or pinned.
    assert!(!tb.pin_dir.exists(), "{}", tb.pin_dir.display());
}

/// The component's patch replaces the container's args (a strategic merge
/// replaces lists without a merge key), so they must follow the base's.
#[test]
fn the_kube_proxy_config_component_keeps_the_base_args_but_the_files_addresses() {
    let base = strings(&agent_container("daemonset.yaml").unwrap()["args"]);
    let patch = agent_container("kube-proxy-config/daemonset-patch.yaml").unwrap();
    let mut expected: Vec<String> = base
        .into_iter()
        .filter(|arg| {
            !arg.starts_with("--healthz-bind-address") && !arg.starts_with("--metrics-bind-address")
        })
        .collect();
    let config = "--config=/var/lib/kube-proxy/config.conf";
    expected.push(config.to_owned());
    assert_eq!(strings(&patch["args"]), expected);
    let mount = &patch["volumeMounts"][0];
    assert_eq!(mount["name"], "kube-proxy");
    assert!(
        config.ends_with(&format!(
            "{}/config.conf",
            mount["mountPath"].as_str().unwrap()
        )),
        "{mount:?}"
    );
}

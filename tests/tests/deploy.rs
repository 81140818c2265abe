//! The DaemonSet's agent, as deployed: its exact command, flags and
//! environment, with only the capabilities it is granted, against the API
//! server stand-in.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use dataplane_testbed::{
    Testbed,
    apiserver::ApiServer,
    deploy::{self, strings},
    manifests::{Ep, Svc, http_service_on, join, objects, slice},
    probe::tally,
    testbed::sibling_binary,
};
use serde_yaml::Value;

/// The agent container of deploy/daemonset.yaml.
fn agent_container() -> Value {
    deploy::agent_container("daemonset.yaml").unwrap()
}

#[test]
fn the_daemonset_agent_programs_services_with_only_its_granted_capabilities() {
    let container = agent_container();
    let command = strings(&container["command"]);
    assert_eq!(command, ["/dataplane-agent"]);
    let mut args = strings(&container["args"]);
    assert_eq!(args[0], "run");

    // Every path the flags name must be a volume mount of the container.
    let mounts: Vec<String> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_owned())
        .collect();
    let mut tb = Testbed::new().unwrap();
    let client = tb.host("client").unwrap();
    let pod = tb.host("pod1").unwrap();
    tb.serve(&pod, 8080).unwrap();
    // The host paths the mounts stand for, on this machine: the testbed's
    // own pin directory and cgroup.
    let host_paths = BTreeMap::from([
        (
            "--bpffs-dir=",
            ("/sys/fs/bpf", tb.pin_dir.display().to_string()),
        ),
        (
            "--cgroup=",
            ("/host/sys/fs/cgroup", tb.cgroup.display().to_string()),
        ),
    ]);
    for arg in &mut args {
        for (flag, (mount, local)) in &host_paths {
            if let Some(path) = arg.strip_prefix(flag) {
                assert!(mounts.iter().any(|m| m == mount), "{mount} is not mounted");
                assert!(
                    path.starts_with(mount),
                    "{arg} is outside its mount {mount}"
                );
                *arg = format!("{flag}{local}");
            }
        }
    }
    assert!(
        mounts.iter().any(|m| m == "/run/dataplane"),
        "the names file needs /run/dataplane"
    );

    // The environment: the downward API's node name, the literal values,
    // and the ConfigMap's API endpoint.
    let api = ApiServer::start(Some(&tb.node_netns)).unwrap();
    let mut env = BTreeMap::new();
    for var in container["env"].as_sequence().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        // An optional ConfigMap key the ConfigMap leaves unset: no variable.
        let optional_key = &var["valueFrom"]["configMapKeyRef"];
        if optional_key["optional"] == Value::Bool(true) {
            assert_eq!(optional_key["name"], "kubernetes-services-endpoint");
            continue;
        }
        let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(value), _) => value.clone(),
            (_, Value::String(path)) if path == "spec.nodeName" => "node-a".to_owned(),
            other => panic!("env {name}: unexpected source {other:?}"),
        };
        env.insert(name, value);
    }
    assert_eq!(
        container["envFrom"][0]["configMapRef"]["name"],
        "kubernetes-services-endpoint"
    );
    env.insert(
        "KUBERNETES_SERVICE_HOST".into(),
        api.address().ip().to_string(),
    );
    env.insert(
        "KUBERNETES_SERVICE_PORT".into(),
        api.address().port().to_string(),
    );
    // The one substitution: the stand-in speaks plain HTTP without service
    // account tokens, so the agent is pointed at it with a kubeconfig
    // instead of the in-cluster config.
    let kubeconfig = tb.work_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    args.push(format!("--kubeconfig={}", kubeconfig.display()));

    let capabilities: Vec<String> = strings(&container["securityContext"]["capabilities"]["add"])
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    assert_eq!(
        strings(&container["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    let bounding = format!("-all,{}", capabilities.join(","));

    api.apply_all(objects(&http_service_on("web", "10.96.0.10", 80, &[&pod])).unwrap())
        .unwrap();
    // And a NodePort, for the interface programs: `--interfaces` is left
    // to its default (`auto`), which finds the interface of the node's
    // default route.
    let node_port = join(&[
        Svc::new("web-np", "10.96.0.11")
            .node_port("http", 80, "TCP", 8080, 30080)
            .spec("type: NodePort")
            .yaml(),
        slice(
            "web-np-1",
            "web-np",
            &[("http", 8080, "TCP")],
            &[Ep::ready(&pod)],
        ),
    ]);
    api.apply_all(objects(&node_port).unwrap()).unwrap();
    tb.in_node(
        "ip",
        &["route", "add", "default", "via", &client.ip.to_string()],
    )
    .unwrap();
    let mut agent = tb.command_in(&tb.node_netns, false, "setpriv").unwrap();
    agent
        .args(["--bounding-set", &bounding, "--inh-caps=-all", "--"])
        .arg(sibling_binary("dataplane-agent").unwrap())
        .args(&args)
        .env_clear()
        .envs(&env);
    tb.launch_agent(agent).unwrap();

    let attempts = tb.connect(&client, "10.96.0.10:80", 10).unwrap();
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    assert_eq!(tally(&attempts).keys().collect::<Vec<_>>(), ["pod1"]);
    let log = tb.agent_log();
    assert!(log.starts_with('{'), "--log-format=json: {log}");
    assert!(
        log.contains("node interfaces attached") && log.contains("h1"),
        "the TC programs attach with the granted capabilities: {log}"
    );
    // From outside the socket-LB cgroup, through the node's own address.
    let node_address = "10.200.1.1:30080";
    let external = tb
        .exchange_in(&client.netns, false, node_address, 5, "tcp")
        .unwrap();
    assert!(external.iter().all(|a| a.ok), "{external:?}");
    assert_eq!(
        tally(&external)["pod1"].sources.keys().collect::<Vec<_>>(),
        [&client.ip.to_string()]
    );
    // The reaper probes the kernel once the agent is ready.
    tb.wait_until(
        "connected UDP sockets can be destroyed with the granted capabilities",
        std::time::Duration::from_secs(10),
        || Ok(tb.agent_log().contains("sock_diag SOCK_DESTROY")),
    )
    .unwrap();
    // The agent really ran with nothing but the granted capabilities
    // (CAP_NET_ADMIN is bit 12, CAP_SYS_ADMIN bit 21, CAP_PERFMON bit 38,
    // CAP_BPF bit 39).
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", tb.agent_pid().unwrap())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        capabilities,
        ["+bpf", "+net_admin", "+perfmon", "+sys_admin"]
    );
    assert_eq!(
        effective,
        (1 << 12) | (1 << 21) | (1 << 38) | (1 << 39),
        "CapEff {effective:#x}"
    );
    let health = tb.http_get_in_node("127.0.0.1:10256", "/healthz").unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

#[test]
fn a_parked_kube_proxys_leftover_rules_are_removed_and_others_kept() {
    let tb = Testbed::new().unwrap();
    // What kube-proxy leaves behind: iptables chains in both backends with
    // jumps into them from the built-in chains, and its nftables table.
    for iptables in ["iptables-nft", "iptables-legacy"] {
        for rule in [
            &["-t", "nat", "-N", "KUBE-SERVICES"][..],
            &["-t", "nat", "-N", "KUBE-SVC-ABCDEF"],
            &[
                "-t",
                "nat",
                "-A",
                "KUBE-SERVICES",
                "-d",
                "10.96.0.10/32",
                "-p",
                "tcp",
                "-j",
                "KUBE-SVC-ABCDEF",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES",
            ],
            &["-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES"],
            &["-t", "filter", "-N", "KUBE-FORWARD"],
            &["-t", "filter", "-A", "FORWARD", "-j", "KUBE-FORWARD"],
            // Not kube-proxy's: must survive (kubelet's own KUBE- chain too).
            &["-t", "filter", "-N", "KUBE-FIREWALL"],
            &["-t", "filter", "-A", "INPUT", "-j", "KUBE-FIREWALL"],
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "9999",
                "-j",
                "ACCEPT",
            ],
        ] {
            tb.in_node(iptables, rule).unwrap();
        }
    }
    tb.in_node("nft", &["add", "table", "ip", "kube-proxy"])
        .unwrap();
    tb.in_node("nft", &["add", "table", "ip", "mine"]).unwrap();

    tb.start_agent(&["--cleanup-kube-proxy-rules"]).unwrap();
    // The cleanup runs once the programs serve (after the ready line).
    tb.wait_until(
        "the cleanup ran",
        std::time::Duration::from_secs(10),
        || {
            Ok(tb
                .agent_log()
                .contains("removed kube-proxy's leftover rules"))
        },
    )
    .unwrap();
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let rules = tb.in_node(save, &[]).unwrap();
        for gone in ["KUBE-SERVICES", "KUBE-SVC-", "KUBE-FORWARD"] {
            assert!(!rules.contains(gone), "{save}:\n{rules}");
        }
        assert!(
            rules.contains("-A INPUT -j KUBE-FIREWALL"),
            "{save}:\n{rules}"
        );
        assert!(rules.contains("--dport 9999 -j ACCEPT"), "{save}:\n{rules}");
    }
    let tables = tb.in_node("nft", &["list", "tables"]).unwrap();
    assert!(
        !tables.contains("kube-proxy") && tables.contains("table ip mine"),
        "{tables}"
    );
    assert!(
        tb.agent_log()
            .contains("removed kube-proxy's leftover rules chains=6 jumps=6 nft_tables=1"),
        "{}",
        tb.agent_log()
    );
}

#[test]
fn a_missing_capability_is_named_at_start() {
    let tb = Testbed::new().unwrap();
    let output = tb
        .command_in(&tb.node_netns, false, "setpriv")
        .unwrap()
        .args(["--bounding-set", "-all,+net_admin", "--inh-caps=-all", "--"])
        .arg(sibling_binary("dataplane-agent").unwrap())
        .arg("run")
        .arg("--manifests")
        .arg(&tb.manifests)
        .arg("--bpffs-dir")
        .arg(&tb.pin_dir)
        .arg("--cgroup")
        .arg(&tb.cgroup)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("missing capabilities: CAP_BPF (to load programs")
            && !stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
}

#[test]
fn pinned_maps_are_closed_to_unprivileged_users() {
    let tb = Testbed::new().unwrap();
    tb.start_agent(&[]).unwrap();
    // As root: readable.
    assert!(
        tb.agent_cli(&["dump", "services"])
            .unwrap()
            .status
            .success()
    );
    // As nobody, even with the path: refused.
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(sibling_binary("dataplane-agent").unwrap())
        .args(["dump", "services", "--bpffs-dir"])
        .arg(&tb.pin_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "nobody read the maps");
    assert!(
        stderr.contains("BPF_OBJ_GET") && stderr.contains("Permission denied"),
        "{stderr}"
    );
}

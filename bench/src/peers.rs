//! kube-proxy's rule sets for the same Services, generated with kube-proxy's
//! real structure so the peers pay the costs kube-proxy pays.

use std::fmt::Write as _;

use super::ServiceSet;

/// Pod CIDR of the benchmark topology: traffic from inside it is not
/// masqueraded, as for pod-to-Service traffic in a cluster.
pub(crate) const CLUSTER_CIDR: &str = "10.200.0.0/16";

/// A kube-proxy-style chain suffix: kube-proxy hashes the Service (and
/// endpoint) name into 16 base32 characters (servicePortChainName,
/// pkg/proxy/iptables/proxier.go); a counter in the same alphabet stands in.
fn chain_suffix(kind: u8, index: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut value = (index as u64) << 8 | u64::from(kind);
    (0..16)
        .map(|_| {
            let c = ALPHABET[(value % 32) as usize] as char;
            value /= 32;
            c
        })
        .collect()
}

/// `iptables-restore` input for the nat table as kube-proxy's iptables mode
/// writes it (pkg/proxy/iptables/proxier.go, syncProxyRules): KUBE-SERVICES
/// with one rule per Service port (a linear scan: the first-packet cost),
/// KUBE-SVC-* with `statistic --mode random` probabilities 1/n, 1/(n-1), ..,
/// KUBE-SEP-* with KUBE-MARK-MASQ and the DNAT, KUBE-NODEPORTS ->
/// KUBE-EXT-* (masquerade, then the Service) reached after the whole
/// KUBE-SERVICES scan, and the masquerade path.
pub(crate) fn iptables_rules(set: &ServiceSet) -> String {
    let mut out = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::new();
    for (s, service) in set.services.iter().enumerate() {
        let svc_chain = format!("KUBE-SVC-{}", chain_suffix(1, s));
        let _ = writeln!(out, ":{svc_chain} - [0:0]");
        let comment = format!("\"{}:http cluster IP\"", service.name);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment {comment} -m tcp --dport {} -j {svc_chain}",
            service.cluster_ip, service.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment {comment} -m tcp --dport {} -j KUBE-MARK-MASQ",
            service.cluster_ip, service.port
        );
        if let Some(node_port) = service.node_port {
            // kube-proxy's external chain: masquerade (externalTrafficPolicy
            // Cluster), then the Service's chain.
            let ext_chain = format!("KUBE-EXT-{}", chain_suffix(1, s));
            let _ = writeln!(out, ":{ext_chain} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{}:http\" -m tcp --dport {node_port} -j {ext_chain}",
                service.name
            );
            let _ = writeln!(
                rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {}:http external destinations\" -j KUBE-MARK-MASQ",
                service.name
            );
            let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
        }
        let count = service.endpoints.len();
        for (e, endpoint) in service.endpoints.iter().enumerate() {
            let sep_chain = format!("KUBE-SEP-{}", chain_suffix(2, s * 1000 + e));
            let _ = writeln!(out, ":{sep_chain} - [0:0]");
            let remaining = count - e;
            if remaining > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{}:http -> {endpoint}:8080\" -m statistic --mode random --probability {:.11} -j {sep_chain}",
                    service.name,
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{}:http -> {endpoint}:8080\" -j {sep_chain}",
                    service.name
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep_chain} -s {endpoint}/32 -m comment --comment \"{}:http\" -j KUBE-MARK-MASQ",
                service.name
            );
            let _ = writeln!(
                rules,
                "-A {sep_chain} -p tcp -m comment --comment \"{}:http\" -m tcp -j DNAT --to-destination {endpoint}:8080",
                service.name
            );
        }
    }
    out += &rules;
    out += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    out += "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n";
    out += "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n";
    out += "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n";
    out += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
    out += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    out += "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    out += "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n";
    out += "COMMIT\n";
    out
}

/// `nft -f` input as kube-proxy's nftables mode writes it
/// (pkg/proxy/nftables/proxier.go): a `service-ips` verdict map keyed by
/// address . protocol . port (one lookup, whatever the number of Services),
/// per-Service chains choosing an endpoint with `numgen random mod n`,
/// per-endpoint chains with the masquerade mark and the DNAT, and nodePorts
/// through a `service-nodeports` verdict map for local destinations.
pub(crate) fn nftables_rules(set: &ServiceSet) -> String {
    let mut out = String::from("table ip kube-proxy {\n");
    out += "  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n";
    out += "  chain masquerading {\n    meta mark & 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n";
    let mut elements = Vec::new();
    let mut node_ports = Vec::new();
    let mut chains = String::new();
    for (s, service) in set.services.iter().enumerate() {
        let svc_chain = format!(
            "service-{}-{}-http",
            chain_suffix(1, s),
            service.name.replace('/', "-")
        );
        elements.push(format!(
            "{} . tcp . {} : goto {svc_chain}",
            service.cluster_ip, service.port
        ));
        let mut vmap = Vec::new();
        for (e, endpoint) in service.endpoints.iter().enumerate() {
            // nft chain names take no dots; kube-proxy's use the endpoint
            // address too, with its own separators.
            let ep_chain = format!(
                "endpoint-{}-{}-8080",
                chain_suffix(2, s * 1000 + e),
                endpoint.to_string().replace('.', "_")
            );
            vmap.push(format!("{e} : goto {ep_chain}"));
            let _ = writeln!(
                chains,
                "  chain {ep_chain} {{\n    ip saddr {endpoint} jump mark-for-masquerade\n    meta l4proto tcp dnat to {endpoint}:8080\n  }}"
            );
        }
        if let Some(node_port) = service.node_port {
            let ext_chain = format!(
                "external-{}-{}-http",
                chain_suffix(1, s),
                service.name.replace('/', "-")
            );
            node_ports.push(format!("tcp . {node_port} : goto {ext_chain}"));
            let _ = writeln!(
                chains,
                "  chain {ext_chain} {{\n    jump mark-for-masquerade\n    goto {svc_chain}\n  }}"
            );
        }
        let _ = writeln!(
            chains,
            "  chain {svc_chain} {{\n    ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}",
            service.cluster_ip,
            service.port,
            service.endpoints.len(),
            vmap.join(", ")
        );
    }
    out += &chains;
    out += "  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = { ";
    out += &elements.join(", ");
    out += " }\n  }\n";
    out += "  map service-nodeports {\n    type inet_proto . inet_service : verdict\n    elements = { ";
    out += &node_ports.join(", ");
    out += " }\n  }\n";
    out += "  chain nodeports {\n    meta l4proto . th dport vmap @service-nodeports\n  }\n";
    out += "  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n    ip daddr != 127.0.0.0/8 fib daddr type local jump nodeports\n  }\n";
    // Base chains last: nft resolves jump targets as it reads.
    for (name, hook, priority, target) in [
        ("nat-prerouting", "prerouting", "dstnat", "services"),
        ("nat-output", "output", "-100", "services"),
        ("nat-postrouting", "postrouting", "srcnat", "masquerading"),
    ] {
        let _ = writeln!(
            out,
            "  chain {name} {{\n    type nat hook {hook} priority {priority}; policy accept;\n    jump {target}\n  }}"
        );
    }
    out += "}\n";
    out
}

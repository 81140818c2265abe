//! Kubernetes YAML for tests, built one object per call so a test reads as
//! its cluster: `Svc::new("web", VIP).port("http", 80, "TCP", 8080)`.

use std::net::Ipv4Addr;

use crate::Host;

/// A Service in namespace `default`.
#[derive(Clone, Debug)]
pub struct Svc {
    name: String,
    cluster_ip: String,
    ports: Vec<String>,
    spec: Vec<String>,
    labels: Vec<String>,
    status: Vec<String>,
}

impl Svc {
    pub fn new(name: &str, cluster_ip: &str) -> Self {
        Self {
            name: name.into(),
            cluster_ip: cluster_ip.into(),
            ports: Vec::new(),
            spec: Vec::new(),
            labels: Vec::new(),
            status: Vec::new(),
        }
    }

    /// A port with a nodePort (for `type: NodePort` or `LoadBalancer`).
    pub fn node_port(
        mut self,
        name: &str,
        port: u16,
        protocol: &str,
        target_port: u16,
        node_port: u16,
    ) -> Self {
        self.ports.push(format!(
            "{{name: {name}, port: {port}, protocol: {protocol}, targetPort: {target_port}, nodePort: {node_port}}}"
        ));
        self
    }

    /// `status.loadBalancer.ingress` with these IPs.
    pub fn load_balancer_ips(mut self, ips: &[&str]) -> Self {
        let ingress: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
        self.status.push(format!(
            "loadBalancer: {{ingress: [{}]}}",
            ingress.join(", ")
        ));
        self
    }

    /// A port whose targetPort is the number `target_port`, named `name`.
    pub fn port(mut self, name: &str, port: u16, protocol: &str, target_port: u16) -> Self {
        self.ports.push(format!(
            "{{name: {name}, port: {port}, protocol: {protocol}, targetPort: {target_port}}}"
        ));
        self
    }

    /// One more line of `spec`, e.g. `internalTrafficPolicy: Local`.
    pub fn spec(mut self, line: &str) -> Self {
        self.spec.push(line.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push(format!("{key}: \"{value}\""));
        self
    }

    pub fn yaml(&self) -> String {
        let mut out = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: default\n  labels: {{{}}}\nspec:\n  clusterIP: {}\n  ports: [{}]\n",
            self.name,
            self.labels.join(", "),
            self.cluster_ip,
            self.ports.join(", ")
        );
        for line in &self.spec {
            out += &format!("  {line}\n");
        }
        if !self.status.is_empty() {
            out += "status:\n";
            for line in &self.status {
                out += &format!("  {line}\n");
            }
        }
        out
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug)]
pub struct Ep {
    ip: Ipv4Addr,
    conditions: &'static str,
    node: String,
    zones: Vec<String>,
}

impl Ep {
    pub fn ready(host: &Host) -> Self {
        Self {
            ip: host.ip,
            conditions: "{ready: true, serving: true, terminating: false}",
            node: "node-a".into(),
            zones: Vec::new(),
        }
    }

    pub fn not_ready(host: &Host) -> Self {
        Self {
            conditions: "{ready: false, serving: false, terminating: false}",
            ..Self::ready(host)
        }
    }

    /// Terminating but still serving: kube-proxy's fallback when no
    /// endpoint is ready.
    pub fn terminating_serving(host: &Host) -> Self {
        Self {
            conditions: "{ready: false, serving: true, terminating: true}",
            ..Self::ready(host)
        }
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.node = node.into();
        self
    }

    /// `hints.forZones`.
    pub fn for_zones(mut self, zones: &[&str]) -> Self {
        self.zones = zones.iter().map(|z| z.to_string()).collect();
        self
    }

    fn yaml(&self) -> String {
        let hints = if self.zones.is_empty() {
            String::new()
        } else {
            let zones: Vec<String> = self
                .zones
                .iter()
                .map(|z| format!("{{name: {z}}}"))
                .collect();
            format!("\n  hints: {{forZones: [{}]}}", zones.join(", "))
        };
        format!(
            "- addresses: [\"{}\"]\n  conditions: {}\n  nodeName: {}{hints}\n",
            self.ip, self.conditions, self.node
        )
    }
}

/// An IPv4 EndpointSlice of Service `service` with `(name, port, protocol)`
/// ports.
pub fn slice(name: &str, service: &str, ports: &[(&str, u16, &str)], endpoints: &[Ep]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(port_name, port, protocol)| {
            format!("{{name: {port_name}, port: {port}, protocol: {protocol}}}")
        })
        .collect();
    let endpoints: String = endpoints.iter().map(Ep::yaml).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{}]\nendpoints:\n{}",
        ports.join(", "),
        if endpoints.is_empty() {
            "[]\n".to_owned()
        } else {
            endpoints
        }
    )
}

/// The usual test Service: port `port`/TCP named http to 8080 on each
/// endpoint.
pub fn http_service(name: &str, cluster_ip: &str, port: u16, endpoints: &[Ep]) -> String {
    join(&[
        Svc::new(name, cluster_ip)
            .port("http", port, "TCP", 8080)
            .yaml(),
        slice(
            &format!("{name}-1"),
            name,
            &[("http", 8080, "TCP")],
            endpoints,
        ),
    ])
}

/// `http_service` with every host a ready endpoint.
pub fn http_service_on(name: &str, cluster_ip: &str, port: u16, hosts: &[&Host]) -> String {
    let endpoints: Vec<Ep> = hosts.iter().map(|h| Ep::ready(h)).collect();
    http_service(name, cluster_ip, port, &endpoints)
}

/// A Node object (for this node's zone).
pub fn node(name: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\n"
    )
}

/// A Node object with an InternalIP (where other nodes tunnel to).
pub fn node_with_ip(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{ip}\"}}]\n"
    )
}

/// A Node object with an InternalIP and the pod CIDR its pods' addresses
/// come from.
pub fn node_with_pod_cidr(name: &str, ip: Ipv4Addr, pod_cidr: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: \"{pod_cidr}\"\n  podCIDRs: [\"{pod_cidr}\"]\nstatus:\n  addresses: [{{type: InternalIP, address: \"{ip}\"}}]\n"
    )
}

/// Documents joined into one multi-document file.
pub fn join(documents: &[String]) -> String {
    documents.join("---\n")
}

/// The objects of a multi-document YAML string, as JSON values (for the API
/// server stand-in).
pub fn objects(yaml: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    use anyhow::Context as _;
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| {
            let value = serde_yaml::Value::deserialize(document).context("parsing test YAML")?;
            serde_json::to_value(value).context("converting test YAML to JSON")
        })
        .filter(|value| !matches!(value, Ok(serde_json::Value::Null)))
        .collect()
}

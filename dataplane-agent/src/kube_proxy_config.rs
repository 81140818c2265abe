//! kube-proxy's own configuration file, for `dataplane-agent run --config`:
//! a `KubeProxyConfiguration` (`kubeproxy.config.k8s.io/v1alpha1`, the
//! fields of kube-proxy 1.34, k8s.io/kube-proxy/config/v1alpha1/types.go),
//! as the `kube-proxy` ConfigMap's `config.conf` holds it.
//!
//! Decoding is strict, as kube-proxy's is: an unknown field is an error.
//! Every real field is accepted, then either *mapped* onto one of `run`'s
//! flags ([`KubeProxyFile`]), *ignored* (a one-line reason at the field
//! below, and in docs/install.md), or *refused* with an error naming the
//! field and why, when it asks for behaviour this agent does not have.
//! Settings this agent accepts but does differently are returned as
//! warnings for the operator's log. The flags given on the command line
//! win over the file, as in kube-proxy; `main.rs` does that part.
//!
//! The v1alpha1 layout is the only one released: `conntrack`, `oomScoreAdj`
//! and the sync periods stay where they are here (the `linux` section exists
//! only in kube-proxy's internal config, for a future v1alpha2), and the sync
//! periods and `masqueradeAll` are read from the section of the selected
//! `mode`, as kube-proxy's conversion does.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// kube-proxy's default ports, appended to an address given without one
/// (kube-proxy's `AppendPortIfNeeded`).
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// What a KubeProxyConfiguration sets that this agent acts on, already in
/// the agent's types. `None`: the file leaves the flag's default (kube-proxy
/// treats the zero value of these fields as "use the default" too).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubeProxyFile {
    /// `hostnameOverride` -> `--hostname-override`.
    pub hostname_override: Option<String>,
    /// `clientConnection.kubeconfig` -> `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `healthzBindAddress` -> `--healthz-bind-address`.
    pub healthz_bind_address: Option<SocketAddr>,
    /// `metricsBindAddress` -> `--metrics-bind-address`.
    pub metrics_bind_address: Option<SocketAddr>,
    /// `<mode>.syncPeriod` -> `--sync-period`.
    pub sync_period: Option<Duration>,
    /// `<mode>.minSyncPeriod` -> `--min-sync-period`.
    pub min_sync_period: Option<Duration>,
    /// `conntrack.maxPerCore` and `conntrack.min` -> `--conntrack-max-entries`.
    pub conntrack_max_entries: Option<u32>,
    /// `conntrack.tcpEstablishedTimeout` -> `--conntrack-tcp-timeout-established`.
    pub conntrack_tcp_timeout_established: Option<Duration>,
    /// `conntrack.udpTimeout` / `udpStreamTimeout` -> `--conntrack-udp-timeout`.
    pub conntrack_udp_timeout: Option<Duration>,
    /// `logging.format` -> `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `nodePortAddresses` -> `--nodeport-addresses` (same syntax).
    pub node_port_addresses: Vec<String>,
    /// Settings accepted but done differently here, one line each, for the
    /// operator's log.
    pub warnings: Vec<String>,
}

/// `logging.format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Reads and maps `path` (YAML, or JSON, which YAML includes).
pub fn load(path: &Path) -> Result<KubeProxyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the kube-proxy configuration {}", path.display()))?;
    // kube-proxy sizes conntrack by runtime.NumCPU(): the CPUs this process
    // may run on.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    parse(&text, u32::try_from(cores).unwrap_or(u32::MAX))
        .with_context(|| format!("kube-proxy configuration {}", path.display()))
}

/// [`load`] on text already read, for a node with `cores` CPUs.
pub fn parse(text: &str, cores: u32) -> Result<KubeProxyFile> {
    check_type(text)?;
    let config: KubeProxyConfiguration = serde_yaml::from_str(text)
        .context("not a KubeProxyConfiguration as kube-proxy 1.34 reads it")?;
    map(config, cores)
}

/// The apiVersion and kind, checked before the fields so that another
/// object (say the whole ConfigMap) gets an error that says so.
fn check_type(text: &str) -> Result<()> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TypeMeta {
        api_version: Option<String>,
        kind: Option<String>,
    }
    let meta: TypeMeta = serde_yaml::from_str(text).context("not a YAML or JSON object")?;
    match meta.kind.as_deref() {
        Some(KIND) => {}
        Some("ConfigMap") => bail!(
            "kind is ConfigMap: --config takes the KubeProxyConfiguration inside it (the ConfigMap's config.conf key), as kube-proxy does"
        ),
        Some(other) => bail!("kind is {other:?}, not {KIND:?}"),
        None => bail!("kind is missing; expected {KIND:?}"),
    }
    match meta.api_version.as_deref() {
        Some(API_VERSION) => Ok(()),
        Some(other) => bail!(
            "apiVersion {other:?} is not supported; expected {API_VERSION:?} (the only version kube-proxy 1.34 reads)"
        ),
        None => bail!("apiVersion is missing; expected {API_VERSION:?}"),
    }
}

/// Go's `time.ParseDuration`, which `metav1.Duration` uses: an optional
/// sign, then one or more decimal numbers (a fraction allowed), each with a
/// unit: `ns`, `us` (or `µs`, `μs`), `ms`, `s`, `m`, `h`; "0" alone is zero.
/// `1h0m0s`, `1.5h`, `100ms`. A negative duration is refused: no field here
/// takes one.
pub fn parse_go_duration(text: &str) -> Result<Duration> {
    let invalid =
        || anyhow::anyhow!("{text:?} is not a Go duration (like 30s, 1m0s, 100ms, 1h30m)");
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    // Nanoseconds, with Go's limit (the largest int64).
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits_end);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(invalid());
        }
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(invalid()),
        };
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| invalid())?
        };
        // Go truncates the fraction's nanoseconds too.
        let mut fraction_ns: u128 = 0;
        let mut scale: u128 = 1;
        for digit in fraction.bytes().take(20) {
            fraction_ns = fraction_ns * 10 + u128::from(digit - b'0');
            scale *= 10;
        }
        total = whole
            .checked_mul(unit_ns)
            .and_then(|n| n.checked_add(fraction_ns * unit_ns / scale))
            .and_then(|n| n.checked_add(total))
            .filter(|&n| n <= i64::MAX as u128)
            .ok_or_else(|| anyhow::anyhow!("{text:?} is longer than a Go duration can be"))?;
        rest = next;
    }
    if negative && total > 0 {
        bail!("{text:?} is negative");
    }
    let nanos = u64::try_from(total).map_err(|_| invalid())?;
    Ok(Duration::from_nanos(nanos))
}

/// `--conntrack-max-entries` from kube-proxy's conntrack sizing: kube-proxy
/// sets the kernel's nf_conntrack_max to `max(maxPerCore * cores, min)`
/// flows, and leaves it alone when maxPerCore is 0 (then so do we: None
/// keeps the flag's default). Our map holds a forward and a reply entry
/// per flow, hence twice as many entries.
pub fn conntrack_max_entries(max_per_core: i32, min: i32, cores: u32) -> Result<Option<u32>> {
    if max_per_core < 0 {
        bail!("conntrack.maxPerCore {max_per_core} is negative");
    }
    if min < 0 {
        bail!("conntrack.min {min} is negative");
    }
    if max_per_core == 0 {
        return Ok(None);
    }
    let flows = (u64::from(max_per_core.unsigned_abs()) * u64::from(cores))
        .max(u64::from(min.unsigned_abs()));
    let entries = u32::try_from(flows * 2).with_context(|| {
        format!(
            "conntrack.maxPerCore {max_per_core} x {cores} CPUs is {flows} flows, more than the conntrack map can hold"
        )
    })?;
    Ok(Some(entries))
}

/// kube-proxy 1.34's feature gates that mean something for Service
/// proxying. Any other gate is accepted with a warning: kube-proxy registers
/// every Kubernetes gate, and a cluster-wide list copied into its
/// configuration would otherwise fail here for gates of other components.
enum Gate {
    /// What we always do; turning the gate off is refused (kube-proxy
    /// itself refuses it for the GA gates locked to true).
    AlwaysOn(&'static str),
    /// No meaning here; any value is accepted.
    NoOp,
}

const GATES: &[(&str, Gate)] = &[
    (
        "TopologyAwareHints",
        Gate::AlwaysOn("EndpointSlice zone hints narrow the endpoints"),
    ),
    (
        "ServiceTrafficDistribution",
        Gate::AlwaysOn("trafficDistribution's hints are followed"),
    ),
    (
        "PreferSameTrafficDistribution",
        Gate::AlwaysOn("node hints (trafficDistribution PreferSameNode) are followed"),
    ),
    (
        "KubeProxyDrainingTerminatingNodes",
        Gate::AlwaysOn("/healthz fails on a node being deleted, so load balancers drain it"),
    ),
    (
        "LoadBalancerIPMode",
        Gate::AlwaysOn("load-balancer IPs with ipMode Proxy are left to the load balancer"),
    ),
    // There are no nftables rules here.
    ("NFTablesProxyMode", Gate::NoOp),
    // Windows only.
    ("WinDSR", Gate::NoOp),
    ("WinOverlay", Gate::NoOp),
    // The logging section is ignored but for its format.
    ("ContextualLogging", Gate::NoOp),
    ("LoggingAlphaOptions", Gate::NoOp),
    ("LoggingBetaOptions", Gate::NoOp),
];

fn check_feature_gates(gates: &BTreeMap<String, bool>, warnings: &mut Vec<String>) -> Result<()> {
    for (name, &enabled) in gates {
        match GATES.iter().find(|(known, _)| known == name) {
            Some((_, Gate::AlwaysOn(what))) if !enabled => bail!(
                "featureGates.{name}: false is not supported: this agent always behaves as with the gate on ({what})"
            ),
            Some(_) => {}
            None => warnings.push(format!(
                "featureGates.{name}={enabled} ignored: not a gate that changes Service proxying here"
            )),
        }
    }
    Ok(())
}

/// A bind address as kube-proxy takes it: `ip:port`, or an IP alone (the
/// default port appended). Empty: kube-proxy's default, which is the flag's.
fn bind_address(field: &str, value: &str, default_port: u16) -> Result<Option<SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    if let Ok(address) = value.parse::<SocketAddr>() {
        return Ok(Some(address));
    }
    let ip = value
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .with_context(|| format!("{field} {value:?} is not ip:port"))?;
    Ok(Some(SocketAddr::new(ip, default_port)))
}

/// A `metav1.Duration` field (Go's syntax, in a string), named in the
/// error. Parsed here rather than while decoding so that the error names
/// the field itself, not only its section.
fn duration(field: &str, value: Option<&str>) -> Result<Option<Duration>> {
    value
        .map(|text| parse_go_duration(text).with_context(|| field.to_owned()))
        .transpose()
}

/// A duration field kube-proxy treats as unset when zero.
fn nonzero(field: &str, value: Option<&str>) -> Result<Option<Duration>> {
    Ok(duration(field, value)?.filter(|d| !d.is_zero()))
}

/// Every duration the file has, mapped or not, so a malformed one anywhere
/// is refused with its name, as kube-proxy's decoding refuses it.
fn check_durations(config: &KubeProxyConfiguration) -> Result<()> {
    let mut fields = vec![("configSyncPeriod", config.config_sync_period.as_deref())];
    if let Some(iptables) = &config.iptables {
        fields.push(("iptables.syncPeriod", iptables.sync_period.as_deref()));
        fields.push((
            "iptables.minSyncPeriod",
            iptables.min_sync_period.as_deref(),
        ));
    }
    if let Some(nftables) = &config.nftables {
        fields.push(("nftables.syncPeriod", nftables.sync_period.as_deref()));
        fields.push((
            "nftables.minSyncPeriod",
            nftables.min_sync_period.as_deref(),
        ));
    }
    if let Some(ipvs) = &config.ipvs {
        fields.push(("ipvs.syncPeriod", ipvs.sync_period.as_deref()));
        fields.push(("ipvs.minSyncPeriod", ipvs.min_sync_period.as_deref()));
        fields.push(("ipvs.tcpTimeout", ipvs.tcp_timeout.as_deref()));
        fields.push(("ipvs.tcpFinTimeout", ipvs.tcp_fin_timeout.as_deref()));
        fields.push(("ipvs.udpTimeout", ipvs.udp_timeout.as_deref()));
    }
    for (field, value) in fields {
        duration(field, value)?;
    }
    Ok(())
}

fn map(config: KubeProxyConfiguration, cores: u32) -> Result<KubeProxyFile> {
    check_durations(&config)?;
    let mut warnings = Vec::new();
    check_feature_gates(&config.feature_gates.unwrap_or_default(), &mut warnings)?;

    // The mode picks the section the sync periods and masqueradeAll come
    // from (kube-proxy's v1alpha1 conversion); the other sections are
    // ignored, as kube-proxy ignores them.
    let mode = config.mode.unwrap_or_default();
    let iptables = config.iptables.unwrap_or_default();
    let nftables = config.nftables.unwrap_or_default();
    let (section, sync_period, min_sync_period, masquerade_all) = match mode.as_str() {
        "" | "iptables" => {
            // kube-proxy's default (unset) is true.
            if iptables.localhost_node_ports != Some(false) {
                warnings.push(
                    "iptables.localhostNodePorts ignored: nodePorts are served on the node's --interfaces addresses, never on 127.0.0.1 (as in kube-proxy's nftables mode)".to_owned(),
                );
            }
            (
                "iptables",
                iptables.sync_period,
                iptables.min_sync_period,
                iptables.masquerade_all,
            )
        }
        "nftables" => (
            "nftables",
            nftables.sync_period,
            nftables.min_sync_period,
            nftables.masquerade_all,
        ),
        "ipvs" => bail!(
            "mode: \"ipvs\" is not supported: this agent replaces kube-proxy's iptables and nftables modes, not IPVS (its schedulers, strictARP and the kube-ipvs0 interface that holds every Service IP have no equivalent here); check the ipvs section, then set mode to \"\" in the copy the agent reads"
        ),
        "kernelspace" => {
            bail!("mode: \"kernelspace\" is kube-proxy's Windows mode; this agent runs on Linux")
        }
        other => bail!(
            "mode: {other:?} is not a kube-proxy mode (iptables, nftables, ipvs, kernelspace)"
        ),
    };
    if masquerade_all == Some(true) {
        bail!(
            "{section}.masqueradeAll: true is not supported: kube-proxy would SNAT all traffic to Service IPs; this agent never masquerades in-cluster traffic (socket load balancing rewrites connect(), so a backend sees the client pod's own address)"
        );
    }
    let sync_period = nonzero(&format!("{section}.syncPeriod"), sync_period.as_deref())?;
    let min_sync_period = nonzero(
        &format!("{section}.minSyncPeriod"),
        min_sync_period.as_deref(),
    )?;

    let conntrack = config.conntrack.unwrap_or_default();
    // kube-proxy's defaults when unset (32768 per core, 131072 at least).
    let conntrack_max_entries = conntrack_max_entries(
        conntrack.max_per_core.unwrap_or(32 * 1024),
        conntrack.min.unwrap_or(128 * 1024),
        cores,
    )?;
    let tcp_established = nonzero(
        "conntrack.tcpEstablishedTimeout",
        conntrack.tcp_established_timeout.as_deref(),
    )?;
    // kube-proxy's value sets only the kernel's CLOSE_WAIT timeout (one side
    // closed, the other still open; kernel default 60s, kube-proxy's 1h).
    // Ours times out every flow after a FIN or RST, which the kernel expires
    // in 10s (CLOSE) to 2m (TIME_WAIT): an hour would hold closed flows,
    // and their SNAT ports, for an hour. So it is not mapped.
    if let Some(close_wait) = nonzero(
        "conntrack.tcpCloseWaitTimeout",
        conntrack.tcp_close_wait_timeout.as_deref(),
    )? && close_wait != Duration::from_secs(3600)
    {
        warnings.push(format!(
            "conntrack.tcpCloseWaitTimeout {} ignored: it is the kernel's CLOSE_WAIT timeout; this agent's closing timeout (after a FIN or RST) is --conntrack-tcp-timeout-closing",
            humantime::format_duration(close_wait)
        ));
    }
    // One UDP timeout here; kube-proxy has one for flows without a reply
    // (udpTimeout) and one for flows with replies (udpStreamTimeout). The
    // longer one, so an answered flow is never cut short; an unanswered
    // flow only holds its entry longer.
    let udp = nonzero("conntrack.udpTimeout", conntrack.udp_timeout.as_deref())?;
    let udp_stream = nonzero(
        "conntrack.udpStreamTimeout",
        conntrack.udp_stream_timeout.as_deref(),
    )?;
    let conntrack_udp_timeout = udp.max(udp_stream);

    let logging = config.logging.unwrap_or_default();
    let log_format = match logging.format.as_deref().unwrap_or("") {
        "" => None,
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        other => bail!("logging.format: {other:?} is not a log format (text, json)"),
    };

    let client = config.client_connection.unwrap_or_default();
    Ok(KubeProxyFile {
        hostname_override: config
            .hostname_override
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty()),
        kubeconfig: client
            .kubeconfig
            .filter(|path| !path.is_empty())
            .map(PathBuf::from),
        healthz_bind_address: bind_address(
            "healthzBindAddress",
            config.healthz_bind_address.as_deref().unwrap_or(""),
            HEALTHZ_PORT,
        )?,
        metrics_bind_address: bind_address(
            "metricsBindAddress",
            config.metrics_bind_address.as_deref().unwrap_or(""),
            METRICS_PORT,
        )?,
        sync_period,
        min_sync_period,
        conntrack_max_entries,
        conntrack_tcp_timeout_established: tcp_established,
        conntrack_udp_timeout,
        log_format,
        node_port_addresses: node_port_addresses(section, config.node_port_addresses),
        warnings,
    })
}

/// The file's nodePortAddresses; in nftables mode an empty list means
/// `primary`, as kube-proxy defaults it there (its iptables mode keeps
/// every address).
fn node_port_addresses(mode_section: &str, listed: Option<Vec<String>>) -> Vec<String> {
    let listed = listed.unwrap_or_default();
    if listed.is_empty() && mode_section == "nftables" {
        return vec!["primary".to_owned()];
    }
    listed
}

// The file's shape. Every field is an Option: Go decodes a missing field and
// a `null` alike, to the zero value, and the defaulted dumps kube-proxy
// writes have `null`s. Fields marked "ignored" are read only so that the
// strict decoding accepts them.

/// KubeProxyConfiguration, kubeproxy.config.k8s.io/v1alpha1 (kube-proxy 1.34).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KubeProxyConfiguration {
    /// Checked by [`check_type`].
    #[expect(dead_code, reason = "checked by check_type before decoding")]
    api_version: Option<String>,
    #[expect(dead_code, reason = "checked by check_type before decoding")]
    kind: Option<String>,
    feature_gates: Option<BTreeMap<String, bool>>,
    client_connection: Option<ClientConnection>,
    logging: Option<Logging>,
    hostname_override: Option<String>,
    /// Ignored: kube-proxy's idea of the node's primary IP (for
    /// nodePortAddresses' `primary` and the default bind addresses' family);
    /// the interface programs use --node-ip or the interfaces' addresses.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    bind_address: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    /// Ignored: the agent keeps retrying a port kube-proxy still holds, so it
    /// can start before kube-proxy is parked.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    bind_address_hard_fail: Option<bool>,
    /// Ignored: there is no pprof handler.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    enable_profiling: Option<bool>,
    /// Ignored: no metric is hidden.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    show_hidden_metrics_for_version: Option<String>,
    mode: Option<String>,
    iptables: Option<IpTables>,
    /// Ignored unless mode is ipvs, which is refused (kube-proxy ignores it
    /// in the other modes too; its defaulted dumps always have it).
    ipvs: Option<Ipvs>,
    nftables: Option<NfTables>,
    /// Ignored: Windows only.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    winkernel: Option<Winkernel>,
    /// Ignored, with detectLocal and clusterCIDR: kube-proxy uses them to
    /// tell pod traffic from outside traffic for masquerading; here socket
    /// load balancing serves whatever runs in the cgroup, and in-cluster
    /// traffic is never masqueraded.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    detect_local_mode: Option<String>,
    #[expect(dead_code, reason = "ignored; see detect_local_mode")]
    detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    #[expect(dead_code, reason = "ignored; see detect_local_mode")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    /// Ignored: set the pod's priority (system-node-critical) instead; the
    /// agent does not write its own oom_score_adj.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    oom_score_adj: Option<i32>,
    conntrack: Option<Conntrack>,
    /// Ignored: the informers' relist period; the agent's watches do not
    /// relist on a timer (--full-resync-period re-reads the maps).
    config_sync_period: Option<String>,
    /// Ignored: unused by kube-proxy itself since the userspace mode went.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    port_range: Option<String>,
    /// Ignored: Windows only.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    windows_run_as_service: Option<bool>,
}

/// componentbaseconfig ClientConnectionConfiguration.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClientConnection {
    kubeconfig: Option<String>,
    /// Ignored, with contentType: the client speaks JSON.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    accept_content_types: Option<String>,
    #[expect(dead_code, reason = "ignored; see accept_content_types")]
    content_type: Option<String>,
    /// Ignored, with burst: the agent only watches, it does not rate-limit
    /// itself.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    qps: Option<f32>,
    #[expect(dead_code, reason = "ignored; see qps")]
    burst: Option<i32>,
}

/// logsapi LoggingConfiguration.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Logging {
    format: Option<String>,
    /// Ignored, as the rest of this section: RUST_LOG sets the verbosity.
    /// A duration string or a number of nanoseconds.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    flush_frequency: Option<serde_yaml::Value>,
    #[expect(dead_code, reason = "ignored; see flush_frequency")]
    verbosity: Option<u32>,
    #[expect(dead_code, reason = "ignored; see flush_frequency")]
    vmodule: Option<Vec<VModuleItem>>,
    #[expect(dead_code, reason = "ignored; see flush_frequency")]
    options: Option<LoggingOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(dead_code, reason = "ignored, as the logging section")]
struct VModuleItem {
    file_pattern: Option<String>,
    verbosity: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "ignored, as the logging section")]
struct LoggingOptions {
    text: Option<OutputRouting>,
    json: Option<OutputRouting>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(dead_code, reason = "ignored, as the logging section")]
struct OutputRouting {
    split_stream: Option<bool>,
    /// A resource quantity: a string ("0", "64Ki") or a number.
    info_buffer_size: Option<serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IpTables {
    /// Ignored: no fwmark is used.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    masquerade_bit: Option<i32>,
    masquerade_all: Option<bool>,
    localhost_node_ports: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NfTables {
    /// Ignored: no fwmark is used.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    masquerade_bit: Option<i32>,
    masquerade_all: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

/// Ignored unless mode is ipvs, which is refused; its durations are
/// checked, as kube-proxy's decoding checks them.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Ipvs {
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    #[expect(dead_code, reason = "ignored; see the struct's doc")]
    scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    #[expect(dead_code, reason = "ignored; see the struct's doc")]
    exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    #[expect(dead_code, reason = "ignored; see the struct's doc")]
    strict_arp: Option<bool>,
    tcp_timeout: Option<String>,
    tcp_fin_timeout: Option<String>,
    udp_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(dead_code, reason = "ignored: Windows only")]
struct Winkernel {
    network_name: Option<String>,
    source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    enable_dsr: Option<bool>,
    root_hns_endpoint_name: Option<String>,
    forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(dead_code, reason = "ignored, as detectLocalMode")]
struct DetectLocal {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Conntrack {
    max_per_core: Option<i32>,
    min: Option<i32>,
    tcp_established_timeout: Option<String>,
    /// Not mapped (a warning if changed): see [`map`].
    tcp_close_wait_timeout: Option<String>,
    /// Ignored: the interface programs do not check TCP windows, so they are
    /// always as liberal as this asks.
    #[expect(dead_code, reason = "ignored; see the field's doc")]
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kube-proxy --write-config-to` writes with kube-proxy 1.34's
    /// defaults, plus a node name and a metrics address on every interface.
    const DEFAULTED_DUMP: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ClusterCIDR
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: worker-1
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 30s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 0.0.0.0:10249
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    fn with(changes: &[(&str, &str)]) -> String {
        changes
            .iter()
            .fold(DEFAULTED_DUMP.to_owned(), |text, (from, to)| {
                assert!(text.contains(from), "{from:?} is not in the dump");
                text.replacen(from, to, 1)
            })
    }

    fn error_of(text: &str) -> String {
        format!("{:#}", parse(text, 4).expect_err("refused"))
    }

    #[test]
    fn a_defaulted_kube_proxy_1_34_dump_maps_onto_the_flags() {
        let file = parse(DEFAULTED_DUMP, 4).unwrap();
        assert_eq!(
            file,
            KubeProxyFile {
                hostname_override: Some("worker-1".into()),
                kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
                healthz_bind_address: Some("0.0.0.0:10256".parse().unwrap()),
                metrics_bind_address: Some("0.0.0.0:10249".parse().unwrap()),
                sync_period: Some(Duration::from_secs(30)),
                min_sync_period: Some(Duration::from_secs(1)),
                // max(32768 x 4, 131072) flows, two entries each.
                conntrack_max_entries: Some(262_144),
                conntrack_tcp_timeout_established: Some(Duration::from_secs(24 * 3600)),
                conntrack_udp_timeout: None,
                log_format: None,
                node_port_addresses: Vec::new(),
                warnings: vec![
                    "iptables.localhostNodePorts ignored: nodePorts are served on the node's --interfaces addresses, never on 127.0.0.1 (as in kube-proxy's nftables mode)".into()
                ],
            }
        );
    }

    #[test]
    fn json_is_read_too() {
        let json = r#"{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "metricsBindAddress": "[::1]:9000", "mode": "nftables",
            "nftables": {"syncPeriod": "1m0s", "minSyncPeriod": "250ms"}}"#;
        let file = parse(json, 2).unwrap();
        assert_eq!(
            file.metrics_bind_address,
            Some("[::1]:9000".parse().unwrap())
        );
        assert_eq!(file.sync_period, Some(Duration::from_secs(60)));
        assert_eq!(file.min_sync_period, Some(Duration::from_millis(250)));
        assert!(file.warnings.is_empty(), "{:?}", file.warnings);
    }

    #[test]
    fn a_minimal_file_leaves_every_flag_to_its_default_but_conntrack() {
        let file = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n",
            1,
        )
        .unwrap();
        // kube-proxy sizes conntrack even when the section is absent, and
        // serves nodePorts on the primary address in nftables mode.
        assert_eq!(
            file,
            KubeProxyFile {
                conntrack_max_entries: Some(262_144),
                node_port_addresses: vec!["primary".into()],
                ..KubeProxyFile::default()
            }
        );
    }

    #[test]
    fn the_sync_periods_come_from_the_selected_modes_section() {
        let file = parse(
            &with(&[
                ("mode: \"\"", "mode: nftables"),
                (
                    "  minSyncPeriod: 1s\n  syncPeriod: 30s\nipvs",
                    "  minSyncPeriod: 2s\n  syncPeriod: 45s\nipvs",
                ),
            ]),
            4,
        )
        .unwrap();
        // The nftables section still has 1s / 30s: the iptables one was changed.
        assert_eq!(file.sync_period, Some(Duration::from_secs(30)));
        assert_eq!(file.min_sync_period, Some(Duration::from_secs(1)));
        let file = parse(
            &with(&[(
                "  minSyncPeriod: 1s\n  syncPeriod: 30s\nipvs",
                "  minSyncPeriod: 2s\n  syncPeriod: 45s\nipvs",
            )]),
            4,
        )
        .unwrap();
        assert_eq!(file.sync_period, Some(Duration::from_secs(45)));
        assert_eq!(file.min_sync_period, Some(Duration::from_secs(2)));
    }

    #[test]
    fn bind_addresses_take_kube_proxys_forms() {
        let metrics = |value: &str| {
            parse(
                &with(&[(
                    "metricsBindAddress: 0.0.0.0:10249",
                    &format!("metricsBindAddress: {value}"),
                )]),
                1,
            )
            .map(|f| f.metrics_bind_address)
        };
        assert_eq!(
            metrics("127.0.0.1:9100").unwrap(),
            Some("127.0.0.1:9100".parse().unwrap())
        );
        // An address alone gets the default port, as kube-proxy appends it.
        assert_eq!(
            metrics("0.0.0.0").unwrap(),
            Some("0.0.0.0:10249".parse().unwrap())
        );
        assert_eq!(
            metrics("\"::\"").unwrap(),
            Some("[::]:10249".parse().unwrap())
        );
        // Empty is kube-proxy's default, which is the flag's.
        assert_eq!(metrics("\"\"").unwrap(), None);
        let error = format!("{:#}", metrics("localhost:10249").unwrap_err());
        assert!(error.contains("metricsBindAddress"), "{error}");
    }

    #[test]
    fn udp_takes_the_longer_of_kube_proxys_two_timeouts() {
        let file = parse(
            &with(&[
                ("udpStreamTimeout: 0s", "udpStreamTimeout: 5m0s"),
                (
                    "  udpTimeout: 0s\ndetectLocal",
                    "  udpTimeout: 30s\ndetectLocal",
                ),
            ]),
            1,
        )
        .unwrap();
        assert_eq!(file.conntrack_udp_timeout, Some(Duration::from_secs(300)));
        let file = parse(
            &with(&[(
                "  udpTimeout: 0s\ndetectLocal",
                "  udpTimeout: 30s\ndetectLocal",
            )]),
            1,
        )
        .unwrap();
        assert_eq!(file.conntrack_udp_timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_changed_close_wait_timeout_is_reported_not_mapped() {
        let file = parse(
            &with(&[("tcpCloseWaitTimeout: 1h0m0s", "tcpCloseWaitTimeout: 2h0m0s")]),
            1,
        )
        .unwrap();
        assert!(
            file.warnings
                .iter()
                .any(|w| w.starts_with("conntrack.tcpCloseWaitTimeout 2h ignored")),
            "{:?}",
            file.warnings
        );
    }

    #[test]
    fn conntrack_max_is_twice_kube_proxys_flow_limit() {
        // max(maxPerCore x cores, min) flows, a forward and a reply entry each.
        assert_eq!(
            conntrack_max_entries(32_768, 131_072, 2).unwrap(),
            Some(262_144)
        );
        assert_eq!(
            conntrack_max_entries(32_768, 131_072, 16).unwrap(),
            Some(1_048_576)
        );
        assert_eq!(conntrack_max_entries(10, 0, 3).unwrap(), Some(60));
        // maxPerCore 0: kube-proxy leaves the limit alone; min is ignored.
        assert_eq!(conntrack_max_entries(0, 131_072, 8).unwrap(), None);
        // Past what the map's u32 size can say.
        let error = conntrack_max_entries(i32::MAX, 0, 4)
            .unwrap_err()
            .to_string();
        assert!(error.contains("conntrack.maxPerCore"), "{error}");
        let error = conntrack_max_entries(-1, 0, 4).unwrap_err().to_string();
        assert!(
            error.contains("conntrack.maxPerCore -1 is negative"),
            "{error}"
        );
        let error = conntrack_max_entries(1, -1, 4).unwrap_err().to_string();
        assert!(error.contains("conntrack.min -1 is negative"), "{error}");
    }

    #[test]
    fn go_durations() {
        let ok = |text: &str| parse_go_duration(text).unwrap();
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("-0s"), Duration::ZERO);
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("+30s"), Duration::from_secs(30));
        assert_eq!(ok("1m0s"), Duration::from_secs(60));
        assert_eq!(ok("1h0m0s"), Duration::from_secs(3600));
        assert_eq!(ok("24h0m0s"), Duration::from_secs(86_400));
        assert_eq!(ok("2h22m"), Duration::from_secs(2 * 3600 + 22 * 60));
        assert_eq!(ok("100ms"), Duration::from_millis(100));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("5.s"), Duration::from_secs(5));
        assert_eq!(ok("1s500ms"), Duration::from_millis(1500));
        assert_eq!(ok("3ns"), Duration::from_nanos(3));
        assert_eq!(ok("7us"), Duration::from_micros(7));
        assert_eq!(ok("7µs"), Duration::from_micros(7));
        assert_eq!(ok("7μs"), Duration::from_micros(7));
        assert_eq!(ok("1.000000001s"), Duration::from_nanos(1_000_000_001));
        // The longest Go can say: 2^63 - 1 ns.
        assert_eq!(
            ok("2562047h47m16.854775807s"),
            Duration::from_nanos(i64::MAX as u64)
        );
        for bad in [
            "",
            "s",
            "5",
            "-5s",
            "1d",
            "1.2.3s",
            ".s",
            "1 s",
            " 1s",
            "1S",
            "ms5",
            "1e3s",
            "2562047h47m16.854775808s",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_bad_duration_names_its_field() {
        let error = error_of(&with(&[(
            "tcpEstablishedTimeout: 24h0m0s",
            "tcpEstablishedTimeout: 1d",
        )]));
        assert!(
            error.contains("conntrack.tcpEstablishedTimeout") && error.contains("\"1d\""),
            "{error}"
        );
        // A number is not a metav1.Duration (kube-proxy refuses it too).
        let error = error_of(&with(&[("syncPeriod: 30s\nipvs", "syncPeriod: 30\nipvs")]));
        assert!(error.contains("iptables.syncPeriod"), "{error}");
    }

    #[test]
    fn an_unknown_field_is_refused_wherever_it_is() {
        let error = error_of(&with(&[(
            "oomScoreAdj: -999",
            "oomScoreAdj: -999\nproxyMode: iptables",
        )]));
        assert!(error.contains("unknown field `proxyMode`"), "{error}");
        // Removed fields of older releases are unknown to 1.34 too.
        let error = error_of(&with(&[(
            "  maxPerCore: 32768",
            "  max: 0\n  maxPerCore: 32768",
        )]));
        assert!(
            error.contains("conntrack") && error.contains("unknown field `max`"),
            "{error}"
        );
        let error = error_of(&with(&[("  verbosity: 0", "  verbosity: 0\n  level: 2")]));
        assert!(
            error.contains("logging") && error.contains("unknown field `level`"),
            "{error}"
        );
    }

    #[test]
    fn the_wrong_kind_or_version_is_refused() {
        let error = error_of(
            &DEFAULTED_DUMP.replace("kind: KubeProxyConfiguration", "kind: KubeletConfiguration"),
        );
        assert!(
            error.contains("kind is \"KubeletConfiguration\""),
            "{error}"
        );
        let configmap = "apiVersion: v1\nkind: ConfigMap\ndata:\n  config.conf: |\n    kind: KubeProxyConfiguration\n";
        assert!(error_of(configmap).contains("config.conf key"));
        let error = error_of(&DEFAULTED_DUMP.replace(
            "kubeproxy.config.k8s.io/v1alpha1",
            "kubeproxy.config.k8s.io/v1alpha2",
        ));
        assert!(
            error.contains("apiVersion \"kubeproxy.config.k8s.io/v1alpha2\" is not supported"),
            "{error}"
        );
        let error =
            error_of(&DEFAULTED_DUMP.replace("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n", ""));
        assert!(error.contains("apiVersion is missing"), "{error}");
        assert!(error_of("[]").contains("not a YAML or JSON object"));
    }

    #[test]
    fn ipvs_and_windows_modes_are_refused() {
        let error = error_of(&with(&[("mode: \"\"", "mode: ipvs")]));
        assert!(error.contains("mode: \"ipvs\" is not supported"), "{error}");
        let error = error_of(&with(&[("mode: \"\"", "mode: kernelspace")]));
        assert!(error.contains("mode: \"kernelspace\""), "{error}");
        let error = error_of(&with(&[("mode: \"\"", "mode: userspace")]));
        assert!(
            error.contains("mode: \"userspace\" is not a kube-proxy mode"),
            "{error}"
        );
        // The ipvs section with settings is fine while the mode is not ipvs.
        parse(
            &with(&[
                ("scheduler: \"\"", "scheduler: lc"),
                ("strictARP: false", "strictARP: true"),
            ]),
            1,
        )
        .unwrap();
        parse(&with(&[("mode: \"\"", "mode: iptables")]), 1).unwrap();
    }

    #[test]
    fn masquerade_all_is_refused_in_the_selected_mode() {
        let error = error_of(&with(&[(
            "  masqueradeAll: false\n  masqueradeBit: 14\n  minSyncPeriod: 1s\n  syncPeriod: 30s\nipvs",
            "  masqueradeAll: true\n  masqueradeBit: 14\n  minSyncPeriod: 1s\n  syncPeriod: 30s\nipvs",
        )]));
        assert!(
            error.contains("iptables.masqueradeAll: true is not supported"),
            "{error}"
        );
        let nftables_masquerades = with(&[(
            "nftables:\n  masqueradeAll: false",
            "nftables:\n  masqueradeAll: true",
        )]);
        // kube-proxy reads the section of its mode only.
        parse(&nftables_masquerades, 1).unwrap();
        let error = error_of(&nftables_masquerades.replace("mode: \"\"", "mode: nftables"));
        assert!(
            error.contains("nftables.masqueradeAll: true is not supported"),
            "{error}"
        );
    }

    #[test]
    fn feature_gates_we_always_honour_cannot_be_turned_off() {
        let gates = |gates: &str| {
            parse(
                &with(&[(
                    "oomScoreAdj: -999",
                    &format!("oomScoreAdj: -999\nfeatureGates:\n{gates}"),
                )]),
                1,
            )
        };
        let file = gates("  PreferSameTrafficDistribution: true\n  NFTablesProxyMode: false\n  WinDSR: true\n  SidecarContainers: true\n").unwrap();
        assert_eq!(
            file.warnings[0],
            "featureGates.SidecarContainers=true ignored: not a gate that changes Service proxying here"
        );
        for gate in [
            "TopologyAwareHints",
            "ServiceTrafficDistribution",
            "PreferSameTrafficDistribution",
            "KubeProxyDrainingTerminatingNodes",
            "LoadBalancerIPMode",
        ] {
            let error = format!("{:#}", gates(&format!("  {gate}: false\n")).unwrap_err());
            assert!(
                error.contains(&format!("featureGates.{gate}: false is not supported")),
                "{error}"
            );
        }
    }

    #[test]
    fn logging_format_maps_and_an_unknown_one_is_refused() {
        let file = parse(
            &with(&[("  verbosity: 0", "  verbosity: 0\n  format: json")]),
            1,
        )
        .unwrap();
        assert_eq!(file.log_format, Some(LogFormat::Json));
        let error = error_of(&with(&[(
            "  verbosity: 0",
            "  verbosity: 0\n  format: logfmt",
        )]));
        assert!(error.contains("logging.format"), "{error}");
    }

    #[test]
    fn node_port_addresses_are_kept_for_the_caller() {
        let file = parse(
            &with(&[(
                "nodePortAddresses: null",
                "nodePortAddresses: [primary, 10.0.0.0/8]",
            )]),
            1,
        )
        .unwrap();
        assert_eq!(file.node_port_addresses, ["primary", "10.0.0.0/8"]);
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("kube-proxy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.conf");
        std::fs::write(&path, with(&[("mode: \"\"", "mode: ipvs")])).unwrap();
        let error = format!("{:#}", load(&path).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            error.contains(&path.display().to_string()) && error.contains("ipvs"),
            "{error}"
        );
        let error = format!("{:#}", load(&dir.join("missing")).unwrap_err());
        assert!(
            error.contains("reading the kube-proxy configuration"),
            "{error}"
        );
    }
}

//! `dataplane-agent dump`: the pinned maps as operators want to read them.
//! Formatting only: the maps are read through `dataplane::maps`.

use std::collections::BTreeMap;

use anyhow::Result;
use dataplane_common::{
    AFFINITY_CLIENT_IPV4, CT_FLAG_FIN_SEEN, CT_FLAG_REMOTE, CT_FLAG_RST_SEEN, CT_FLAG_SNAT,
    CT_FORWARD, CT_REPLY, CT_TUNNEL_RETURN, SERVICE_FLAG_AFFINITY,
};
use serde::Serialize;

use crate::{
    dataplane::{codec, maps, names::FrontendName, pins::PinLayout, state::PinnedState},
    model::Protocol,
};

#[derive(Serialize)]
pub struct ServiceRow {
    /// `namespace/name:port-name`, when the agent recorded it.
    pub service: Option<String>,
    pub frontend: String,
    pub service_id: u32,
    pub generation: u16,
    /// sessionAffinity ClientIP timeout, when affinity is on.
    pub affinity_timeout_s: Option<u32>,
    pub backends: Vec<String>,
}

#[derive(Serialize)]
pub struct BackendRow {
    pub service_id: u32,
    pub generation: u16,
    pub index: u16,
    pub backend: String,
    /// Whether the Service entry currently selects this slot (false for a
    /// retired generation awaiting its release).
    pub live: bool,
}

pub fn service_rows(
    state: &PinnedState,
    names: &BTreeMap<String, FrontendName>,
) -> Vec<ServiceRow> {
    state
        .services
        .iter()
        .map(|(key, value)| {
            let frontend =
                codec::frontend_of(key).map_or_else(|| format!("{key:?}"), |f| f.to_string());
            (frontend, value)
        })
        .map(|(frontend, value)| ServiceRow {
            service: names.get(&frontend).map(|n| {
                if n.port_name.is_empty() {
                    n.service.clone()
                } else {
                    format!("{}:{}", n.service, n.port_name)
                }
            }),
            frontend,
            service_id: value.service_id,
            generation: value.generation,
            affinity_timeout_s: (value.flags & SERVICE_FLAG_AFFINITY != 0)
                .then_some(value.affinity_timeout_s),
            backends: state
                .current_backends(value)
                .iter()
                .map(|b| codec::backend_of(b).to_string())
                .collect(),
        })
        .collect()
}

pub fn backend_rows(state: &PinnedState) -> Vec<BackendRow> {
    let unreachable = state.unreachable_backends();
    state
        .backends
        .iter()
        .map(|(key, value)| BackendRow {
            service_id: key.service_id,
            generation: key.generation,
            index: key.index,
            backend: codec::backend_of(&value).to_string(),
            live: !unreachable.contains(&key),
        })
        .collect()
}

pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut out = format!(
        "{:<32} {:<22} {:>6} {:>4} {:>9}  {}\n",
        "SERVICE", "FRONTEND", "ID", "GEN", "AFFINITY", "BACKENDS"
    );
    for row in rows {
        let backends = if row.backends.is_empty() {
            "(none: refused)".to_owned()
        } else {
            row.backends.join(", ")
        };
        let affinity = row
            .affinity_timeout_s
            .map_or_else(|| "-".to_owned(), |t| format!("{t}s"));
        out += &format!(
            "{:<32} {:<22} {:>6} {:>4} {:>9}  {}\n",
            row.service.as_deref().unwrap_or("-"),
            row.frontend,
            row.service_id,
            row.generation,
            affinity,
            backends
        );
    }
    out
}

#[derive(Serialize)]
pub struct AffinityRow {
    pub service_id: u32,
    /// `netns:<cookie>` for a pod or host process (socket LB), or the
    /// client's address for external traffic.
    pub client: String,
    pub backend: String,
    /// Seconds since the client's last new connection.
    pub idle_s: f64,
}

/// The sessionAffinity entries, newest first.
pub fn affinity_rows(layout: &PinLayout) -> Result<Vec<AffinityRow>> {
    let now_ns = maps::monotonic_now_ns();
    let mut rows = Vec::new();
    for (key, value) in maps::read_affinity(layout)? {
        rows.push(AffinityRow {
            service_id: key.service_id,
            client: if key.client_kind == AFFINITY_CLIENT_IPV4 {
                codec::ipv4_of_be(key.client as u32).to_string()
            } else {
                format!("netns:{}", key.client)
            },
            backend: codec::backend_of(&value.backend).to_string(),
            idle_s: now_ns.saturating_sub(value.last_seen_ns) as f64 / 1e9,
        });
    }
    rows.sort_by(|a, b| a.idle_s.total_cmp(&b.idle_s));
    Ok(rows)
}

pub fn affinity_table(rows: &[AffinityRow]) -> String {
    let mut out = format!(
        "{:>6} {:>20}  {:<22} {:>10}\n",
        "ID", "CLIENT", "BACKEND", "IDLE"
    );
    for row in rows {
        out += &format!(
            "{:>6} {:>20}  {:<22} {:>9.1}s\n",
            row.service_id, row.client, row.backend, row.idle_s
        );
    }
    out
}

#[derive(Serialize)]
pub struct ConntrackRow {
    pub protocol: String,
    /// The packet's addresses in this direction, as it arrives.
    pub flow: String,
    pub kind: &'static str,
    /// What the packet is rewritten to, or where it is tunnelled.
    pub translation: String,
    pub flags: Vec<&'static str>,
    pub idle_s: f64,
}

/// The CONNTRACK entries, newest first.
pub fn conntrack_rows(layout: &PinLayout) -> Result<Vec<ConntrackRow>> {
    let now_ns = maps::monotonic_now_ns();
    let endpoint = |ip_be: u32, port_be: u16| {
        format!("{}:{}", codec::ipv4_of_be(ip_be), u16::from_be(port_be))
    };
    let mut rows = Vec::new();
    for (key, value) in maps::read_conntrack(layout)? {
        let nat = endpoint(value.nat_ip_be, value.nat_port_be);
        let snat = endpoint(value.snat_ip_be, value.snat_port_be);
        let tunnel = codec::ipv4_of_be(value.tunnel_ip_be);
        let snat_on = value.flags & CT_FLAG_SNAT != 0;
        let (kind, translation) = match value.kind {
            CT_FORWARD if snat_on => ("forward", format!("{snat} -> {nat}")),
            CT_FORWARD if value.flags & CT_FLAG_REMOTE != 0 => {
                ("forward", format!("to {nat} via tunnel to {tunnel}"))
            }
            CT_FORWARD => ("forward", format!("to {nat}")),
            CT_REPLY if snat_on => ("reply", format!("{nat} -> {snat}")),
            CT_REPLY => ("reply", format!("from {nat}")),
            CT_TUNNEL_RETURN => ("tunnel-return", format!("via tunnel to {tunnel}")),
            _ => ("unknown", String::new()),
        };
        let flags = [
            (CT_FLAG_FIN_SEEN, "fin"),
            (CT_FLAG_RST_SEEN, "rst"),
            (CT_FLAG_REMOTE, "remote"),
            (CT_FLAG_SNAT, "snat"),
        ]
        .into_iter()
        .filter(|(flag, _)| value.flags & flag != 0)
        .map(|(_, name)| name)
        .collect();
        rows.push(ConntrackRow {
            protocol: Protocol::from_number(key.protocol)
                .map_or_else(|| key.protocol.to_string(), |p| p.to_string()),
            flow: format!(
                "{} -> {}",
                endpoint(key.src_be, key.src_port_be),
                endpoint(key.dst_be, key.dst_port_be)
            ),
            kind,
            translation,
            flags,
            idle_s: now_ns.saturating_sub(value.last_seen_ns) as f64 / 1e9,
        });
    }
    rows.sort_by(|a, b| a.idle_s.total_cmp(&b.idle_s));
    Ok(rows)
}

pub fn conntrack_table(rows: &[ConntrackRow]) -> String {
    let mut out = format!(
        "{:<5} {:<44} {:<13} {:<48} {:<12} {:>9}\n",
        "PROTO", "FLOW", "KIND", "TRANSLATION", "FLAGS", "IDLE"
    );
    for row in rows {
        out += &format!(
            "{:<5} {:<44} {:<13} {:<48} {:<12} {:>8.1}s\n",
            row.protocol,
            row.flow,
            row.kind,
            row.translation,
            row.flags.join(","),
            row.idle_s
        );
    }
    out
}

pub fn backends_table(rows: &[BackendRow]) -> String {
    let mut out = format!(
        "{:>6} {:>4} {:>5}  {:<22} {}\n",
        "ID", "GEN", "SLOT", "BACKEND", "STATE"
    );
    for row in rows {
        let state = if row.live { "live" } else { "retired" };
        out += &format!(
            "{:>6} {:>4} {:>5}  {:<22} {}\n",
            row.service_id, row.generation, row.index, row.backend, state
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_table_shows_affinity_and_refusal() {
        let rows = [
            ServiceRow {
                service: Some("shop/web:http".into()),
                frontend: "10.96.0.10:80/TCP".into(),
                service_id: 1,
                generation: 2,
                affinity_timeout_s: Some(10_800),
                backends: vec!["10.0.0.1:8080".into()],
            },
            ServiceRow {
                service: None,
                frontend: "10.96.0.11:80/TCP".into(),
                service_id: 2,
                generation: 0,
                affinity_timeout_s: None,
                backends: vec![],
            },
        ];
        let table = services_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].contains("10800s") && lines[1].ends_with("10.0.0.1:8080"),
            "{table}"
        );
        assert!(
            lines[2].contains(" - ") && lines[2].ends_with("(none: refused)"),
            "{table}"
        );
    }
}

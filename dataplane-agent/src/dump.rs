//! `dataplane-agent dump`: the pinned maps as operators want to read them.

use anyhow::Result;
use dataplane_common::SERVICE_FLAG_AFFINITY;
use serde::Serialize;

use crate::dataplane::{
    kernel,
    pins::PinLayout,
    state::{self, PinnedState},
};

#[derive(Serialize)]
pub struct ServiceRow {
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
    /// retired generation awaiting the sweep).
    pub live: bool,
}

pub fn service_rows(state: &PinnedState) -> Vec<ServiceRow> {
    state
        .services
        .iter()
        .map(|(key, value)| ServiceRow {
            frontend: state::frontend_of(key).map_or_else(|| format!("{key:?}"), |f| f.to_string()),
            service_id: value.service_id,
            generation: value.generation,
            affinity_timeout_s: (value.flags & SERVICE_FLAG_AFFINITY != 0)
                .then_some(value.affinity_timeout_s),
            backends: state
                .current_backends(value)
                .iter()
                .map(|b| state::backend_of(b).to_string())
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
            backend: state::backend_of(value).to_string(),
            live: !unreachable.contains(key),
        })
        .collect()
}

pub fn read(layout: &PinLayout) -> Result<PinnedState> {
    kernel::open_pinned_maps(layout)?.read()
}

pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut out = format!(
        "{:<24} {:>6} {:>4} {:>9}  {}\n",
        "FRONTEND", "ID", "GEN", "AFFINITY", "BACKENDS"
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
            "{:<24} {:>6} {:>4} {:>9}  {}\n",
            row.frontend, row.service_id, row.generation, affinity, backends
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
                frontend: "10.96.0.10:80/TCP".into(),
                service_id: 1,
                generation: 2,
                affinity_timeout_s: Some(10_800),
                backends: vec!["10.0.0.1:8080".into()],
            },
            ServiceRow {
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

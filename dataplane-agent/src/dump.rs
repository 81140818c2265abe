//! `dataplane-agent dump`: the pinned maps as operators want to read them.

use anyhow::Result;
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
        "{:<24} {:>6} {:>4}  {}\n",
        "FRONTEND", "ID", "GEN", "BACKENDS"
    );
    for row in rows {
        let backends = if row.backends.is_empty() {
            "(none: refused)".to_owned()
        } else {
            row.backends.join(", ")
        };
        out += &format!(
            "{:<24} {:>6} {:>4}  {}\n",
            row.frontend, row.service_id, row.generation, backends
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

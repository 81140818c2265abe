//! What the probe binary reports, and summaries tests and the demo share.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One connection attempt as `dataplane-probe connect` prints it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    pub ok: bool,
    /// The name of the server that answered.
    pub backend: Option<String>,
    /// The source address that server saw.
    pub source_seen: Option<String>,
    /// The client's own address.
    pub local: Option<String>,
    /// What `getpeername()` reported on the client.
    pub peer: Option<String>,
    /// `std::io::ErrorKind` of a failed attempt.
    pub error: Option<String>,
    pub errno: Option<i32>,
    pub micros: u64,
}

pub fn parse_attempts(stdout: &str) -> anyhow::Result<Vec<Attempt>> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("bad probe line {line:?}: {e}"))
        })
        .collect()
}

/// Per backend: how many connections it served and the sources it saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BackendTally {
    pub served: usize,
    pub sources: BTreeMap<String, usize>,
}

pub fn tally(attempts: &[Attempt]) -> BTreeMap<String, BackendTally> {
    let mut out: BTreeMap<String, BackendTally> = BTreeMap::new();
    for attempt in attempts.iter().filter(|a| a.ok) {
        let entry = out
            .entry(attempt.backend.clone().unwrap_or_default())
            .or_default();
        entry.served += 1;
        *entry
            .sources
            .entry(attempt.source_seen.clone().unwrap_or_default())
            .or_default() += 1;
    }
    out
}

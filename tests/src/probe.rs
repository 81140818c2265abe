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

/// Whether `line` is a whole greeting of `dataplane-probe serve`: the
/// server's name and the source address it saw, one space between, and
/// the newline. Anything else (an end of stream, half a line, another
/// server's banner) is not an answer.
pub fn is_greeting(line: &str) -> bool {
    let Some(body) = line.strip_suffix('\n') else {
        return false;
    };
    let Some((name, source)) = body.split_once(' ') else {
        return false;
    };
    !name.is_empty()
        && !name.contains(char::is_whitespace)
        && source.parse::<std::net::IpAddr>().is_ok()
}

/// The request line of the `n`-th keep-alive exchange: numbered, so an
/// echo of an earlier request (or another connection's) is not an answer.
pub fn keepalive_request(n: u64) -> String {
    format!("ping {n}\n")
}

/// One `dataplane-probe bench` run as it prints it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BenchRun {
    /// Verified exchanges (bytes for the bulk load).
    pub count: u64,
    /// Exchanges that failed or were answered wrongly.
    pub failures: u64,
    pub seconds: f64,
    /// Verified exchanges per second (bytes per second for bulk).
    pub rate: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_greeting_is_an_answer() {
        assert!(is_greeting("pod3 10.0.0.1\n"));
        assert!(is_greeting("pod3 fd00::1\n"));
        for wrong in [
            "",
            "\n",
            "pod3 10.0.0.1",
            "pod3\n",
            "pod3 10.0.0\n",
            " 10.0.0.1\n",
            "pod 3 10.0.0.1\n",
            "SSH-2.0-OpenSSH\r\n",
        ] {
            assert!(!is_greeting(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn keepalive_requests_are_numbered_lines() {
        assert_eq!(keepalive_request(7), "ping 7\n");
        assert_ne!(keepalive_request(1), keepalive_request(2));
    }
}

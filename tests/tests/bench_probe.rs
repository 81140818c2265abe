//! The benchmarks' load generator counts only verified answers: a server
//! that closes every connection at once is measured as 100% failures, a
//! real one as 0%, so a dataplane that loses or misroutes requests cannot
//! look faster than the floor.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dataplane_testbed::{Host, Testbed, probe::BenchRun};

fn bench(tb: &Testbed, client: &Host, to: &str, load: &str) -> anyhow::Result<BenchRun> {
    bench_parallel(tb, client, to, load, 1)
}

fn bench_parallel(
    tb: &Testbed,
    client: &Host,
    to: &str,
    load: &str,
    parallel: usize,
) -> anyhow::Result<BenchRun> {
    let parallel = parallel.to_string();
    let output = tb.probe(
        client,
        false,
        &[
            "bench",
            "--to",
            to,
            "--seconds",
            "0.5",
            "--load",
            load,
            "--parallel",
            &parallel,
        ],
    )?;
    Ok(serde_json::from_str(output.trim())?)
}

#[test]
fn bench_runs_count_only_verified_answers() {
    let mut tb = Testbed::new().unwrap();
    let client = tb.host("client").unwrap();
    let pods = [tb.host("pod1").unwrap(), tb.host("pod2").unwrap()];
    for pod in &pods {
        tb.serve(pod, 8080).unwrap();
    }
    tb.serve_with(&pods[0], &["serve-closing", "--listen", "0.0.0.0:8090"])
        .unwrap();
    tb.serve_with(&pods[1], &["serve-wrong-echo", "--listen", "0.0.0.0:8091"])
        .unwrap();
    let closing = format!("{}:8090", pods[0].ip);
    let wrong_echo = format!("{}:8091", pods[1].ip);
    // Both pods in turn, as the bench's floor dials a Service's pods.
    let answering = format!("{}:8080,{}:8080", pods[0].ip, pods[1].ip);

    for load in ["short", "keepalive"] {
        let run = bench(&tb, &client, &closing, load).unwrap();
        assert_eq!(run.count, 0, "{load} against a closing server: {run:?}");
        assert!(run.failures > 0, "{load} against a closing server: {run:?}");
        assert_eq!(run.rate, 0.0, "{load}: {run:?}");

        let run = bench(&tb, &client, &answering, load).unwrap();
        assert!(run.count > 0, "{load} against real servers: {run:?}");
        assert_eq!(run.failures, 0, "{load} against real servers: {run:?}");
    }
    // A greeting is not enough: every keep-alive answer must be the
    // request's own echo.
    let run = bench(&tb, &client, &wrong_echo, "keepalive").unwrap();
    assert_eq!(run.count, 0, "keep-alive against wrong echoes: {run:?}");
    assert!(run.failures > 0, "keep-alive against wrong echoes: {run:?}");
    // Parallel clients add up, each verified.
    for load in ["short", "keepalive"] {
        let run = bench_parallel(&tb, &client, &answering, load, 3).unwrap();
        assert!(run.count > 0, "{load} x3: {run:?}");
        assert_eq!(run.failures, 0, "{load} x3: {run:?}");
        let run = bench_parallel(&tb, &client, &wrong_echo, "keepalive", 3).unwrap();
        assert_eq!(run.count, 0, "keep-alive x3 against wrong echoes: {run:?}");
    }
    // Bulk needs the server to count every byte: a closing server is no
    // run at all.
    assert!(bench(&tb, &client, &closing, "bulk").is_err());
    let run = bench(&tb, &client, &answering, "bulk").unwrap();
    assert_eq!(run.failures, 0, "{run:?}");
    assert!(run.rate > 0.0, "{run:?}");
}

//! The in-kernel cost of the node-interface programs per packet, with
//! BPF_PROG_TEST_RUN: each case beside the no-op TC program, measured the
//! same way, so the difference is what our program adds.

use std::time::Duration;

use anyhow::{Context as _, Result};
use dataplane_testbed::{
    packets::{self, Endpoint, TCP_ACK, TCP_SYN},
    tc_harness::{Hook, TcHarness, standard::*},
};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct Cost {
    pub packet: Cow<'static, str>,
    pub program: Cow<'static, str>,
    /// How it was timed: the kernel's repeat loop over one packet (only for
    /// packets the program leaves unchanged: a repeat runs on the packet as
    /// the previous run left it), or single runs (their own timer overhead
    /// included, so the floor is timed the same way).
    pub method: Cow<'static, str>,
    pub ns_per_packet: f64,
    pub floor_ns_per_packet: f64,
}

/// Single runs per case that changes the packet; the median is reported.
const SINGLE_RUNS: u16 = 20_000;

/// Measures every case; `repeat` runs for the repeated case. Runs on its
/// own thread: the harness moves its thread into a namespace of its own.
pub(crate) fn measure(repeat: u32) -> Result<Vec<Cost>> {
    std::thread::spawn(move || measure_here(repeat))
        .join()
        .map_err(|_| anyhow::anyhow!("the program cost measurement panicked"))?
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn measure_here(repeat: u32) -> Result<Vec<Cost>> {
    let mut harness = TcHarness::standard().context("loading the programs for the cost run")?;
    let client = |port| Endpoint { ip: CLIENT, port };
    let node = Endpoint {
        ip: NODE,
        port: LOCAL_NODE_PORT,
    };
    let pod = Endpoint {
        ip: LOCAL_POD,
        port: POD_PORT,
    };
    let ns = |d: Duration| d.as_nanos() as f64;
    let mut costs = Vec::new();
    let mut report = |cost: Cost| {
        println!(
            "bench:   {:<66} {:>7.1} ns/packet (no-op: {:.1}, {})",
            cost.packet, cost.ns_per_packet, cost.floor_ns_per_packet, cost.method
        );
        costs.push(cost);
    };

    // A packet no Service wants is left as it is, so the kernel's repeat
    // loop measures it exactly.
    let stranger = packets::tcp(
        client(1001),
        Endpoint { ip: NODE, port: 22 },
        TCP_ACK,
        &[0u8; 64],
    );
    report(Cost {
        packet: "not a Service (node's own port 22)".into(),
        program: "tc_ingress".into(),
        method: "mean of in-kernel repeats".into(),
        ns_per_packet: ns(harness.time(Hook::Ingress, &stranger, repeat)?),
        floor_ns_per_packet: ns(harness.time(Hook::Noop, &stranger, repeat)?),
    });

    // Established flows: the same packet again and again, one run each.
    let established = packets::tcp(client(1000), node, TCP_ACK, &[0u8; 64]);
    harness.run(Hook::Ingress, &established)?;
    let reply = packets::tcp(pod, client(1000), TCP_ACK, &[0u8; 64]);
    // The tunnel's two ends: this node as the one a flow arrives at (its
    // only pod is remote: translate and wrap), and as the backend's node
    // (unwrap what the peer sent, wrap the pod's replies back to it).
    let remote = Endpoint {
        ip: NODE,
        port: REMOTE_NODE_PORT,
    };
    let to_remote = packets::tcp(client(1002), remote, TCP_ACK, &[0u8; 64]);
    harness.run(
        Hook::Ingress,
        &packets::tcp(client(1002), remote, TCP_SYN, b""),
    )?;
    let from_peer = packets::vxlan(
        PEER,
        NODE,
        TUNNEL_PORT,
        VNI,
        &packets::tcp(client(1003), pod, TCP_ACK, &[0u8; 64]),
    );
    harness.run(
        Hook::Ingress,
        &packets::vxlan(
            PEER,
            NODE,
            TUNNEL_PORT,
            VNI,
            &packets::tcp(client(1003), pod, TCP_SYN, b""),
        ),
    )?;
    let reply_into_tunnel = packets::tcp(pod, client(1003), TCP_ACK, &[0u8; 64]);
    for (name, hook, packet) in [
        (
            "established flow, client -> nodePort (DNAT)",
            Hook::Ingress,
            &established,
        ),
        (
            "established flow, pod's reply (reverse NAT)",
            Hook::Egress,
            &reply,
        ),
        (
            "established flow to a remote pod (DNAT, VXLAN wrap; no route in the harness: the FIB lookup fails)",
            Hook::Ingress,
            &to_remote,
        ),
        (
            "tunnelled packet at the pod's node (VXLAN unwrap)",
            Hook::Ingress,
            &from_peer,
        ),
        (
            "pod's reply at the pod's node (VXLAN wrap back to the peer)",
            Hook::Egress,
            &reply_into_tunnel,
        ),
    ] {
        let mut runs = Vec::with_capacity(usize::from(SINGLE_RUNS));
        let mut floor = Vec::with_capacity(usize::from(SINGLE_RUNS));
        for _ in 0..SINGLE_RUNS {
            runs.push(ns(harness.time(hook, packet, 1)?));
            floor.push(ns(harness.time(Hook::Noop, packet, 1)?));
        }
        report(Cost {
            packet: name.into(),
            program: if hook == Hook::Egress {
                "tc_egress"
            } else {
                "tc_ingress"
            }
            .into(),
            method: "median of single runs".into(),
            ns_per_packet: median(runs),
            floor_ns_per_packet: median(floor),
        });
    }

    // New flows: a fresh source port every time.
    let mut runs = Vec::with_capacity(usize::from(SINGLE_RUNS));
    let mut floor = Vec::with_capacity(usize::from(SINGLE_RUNS));
    for port in 0..SINGLE_RUNS {
        if port % 10_000 == 0 {
            harness.clear_conntrack()?;
        }
        let syn = packets::tcp(client(10_000 + port), node, TCP_SYN, b"");
        runs.push(ns(harness.time(Hook::Ingress, &syn, 1)?));
        floor.push(ns(harness.time(Hook::Noop, &syn, 1)?));
    }
    report(Cost {
        packet: "new flow, SYN -> nodePort (backend choice, conntrack pair, DNAT)".into(),
        program: "tc_ingress".into(),
        method: "median of single runs".into(),
        ns_per_packet: median(runs),
        floor_ns_per_packet: median(floor),
    });
    Ok(costs)
}

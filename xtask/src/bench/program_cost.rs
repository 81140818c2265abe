//! The in-kernel cost of the node-interface programs per packet, with
//! BPF_PROG_TEST_RUN: each case beside the no-op TC program, measured the
//! same way, so the difference is what our program adds.

use std::time::Duration;

use anyhow::{Context as _, Result};
use dataplane_testbed::{
    packets::{self, Endpoint, TCP_ACK, TCP_SYN},
    tc_harness::{Hook, TcHarness, standard::*},
};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Cost {
    pub packet: &'static str,
    pub program: &'static str,
    pub ns_per_packet: f64,
    pub floor_ns_per_packet: f64,
}

/// Single runs for the new-flow case (every packet must be a new flow, so
/// the kernel's repeat loop cannot be used); the median is reported.
const NEW_FLOWS: u16 = 20_000;

/// Measures every case; `repeat` runs per repeated case. Runs on its own
/// thread: the harness moves its thread into a namespace of its own.
pub fn measure(repeat: u32) -> Result<Vec<Cost>> {
    std::thread::spawn(move || measure_here(repeat))
        .join()
        .map_err(|_| anyhow::anyhow!("the program cost measurement panicked"))?
}

fn measure_here(repeat: u32) -> Result<Vec<Cost>> {
    let mut harness = TcHarness::standard().context("loading the programs for the cost run")?;
    let client = |port| Endpoint {
        ip: CLIENT,
        port,
    };
    let node = Endpoint {
        ip: NODE,
        port: LOCAL_NODE_PORT,
    };
    let pod = Endpoint {
        ip: LOCAL_POD,
        port: POD_PORT,
    };
    let per_packet = |d: Duration| d.as_nanos() as f64;
    let mut costs = Vec::new();

    // Repeated cases: the kernel runs the same packet `repeat` times and
    // reports the mean.
    let established = packets::tcp(client(1000), node, TCP_ACK, &[0u8; 64]);
    harness.run(Hook::Ingress, &established)?;
    let reply = packets::tcp(pod, client(1000), TCP_ACK, &[0u8; 64]);
    let stranger = packets::tcp(client(1001), Endpoint { ip: NODE, port: 22 }, TCP_ACK, &[0u8; 64]);
    for (name, hook, packet) in [
        ("established flow, client -> nodePort (DNAT)", Hook::Ingress, &established),
        ("established flow, reply (reverse NAT)", Hook::Egress, &reply),
        ("not a Service (node's own port 22)", Hook::Ingress, &stranger),
    ] {
        let ns = per_packet(harness.time(hook, packet, repeat)?);
        let floor = per_packet(harness.time(Hook::Noop, packet, repeat)?);
        println!("bench:   {name:<48} {ns:>7.1} ns/packet (no-op: {floor:.1})");
        costs.push(Cost {
            packet: name,
            program: if hook == Hook::Egress {
                "tc_egress"
            } else {
                "tc_ingress"
            },
            ns_per_packet: ns,
            floor_ns_per_packet: floor,
        });
    }

    // New flows: one run each (a fresh source port every time), the median
    // of single-run timings, beside the no-op measured the same way.
    let mut new_flow = Vec::with_capacity(usize::from(NEW_FLOWS));
    let mut floor = Vec::with_capacity(usize::from(NEW_FLOWS));
    for port in 0..NEW_FLOWS {
        if port % 10_000 == 0 {
            harness.clear_conntrack()?;
        }
        let syn = packets::tcp(client(10_000 + port), node, TCP_SYN, b"");
        new_flow.push(per_packet(harness.time(Hook::Ingress, &syn, 1)?));
        floor.push(per_packet(harness.time(Hook::Noop, &syn, 1)?));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ns, floor) = (median(new_flow), median(floor));
    let name = "new flow, SYN -> nodePort (backend choice, conntrack pair, DNAT)";
    println!("bench:   {name:<48} {ns:>7.1} ns/packet (no-op: {floor:.1}, single runs)");
    costs.push(Cost {
        packet: name,
        program: "tc_ingress",
        ns_per_packet: ns,
        floor_ns_per_packet: floor,
    });
    Ok(costs)
}

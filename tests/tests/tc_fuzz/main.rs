//! Packet fuzzing of the node-interface programs (issue #8): seeded streams
//! of generated and mutated packets through tc_ingress and tc_egress
//! (BPF_PROG_TEST_RUN, real maps, the harness' standard configuration), and
//! a fixed set of corner cases. Every outcome is checked against a model of
//! that configuration:
//!
//! 1. the verdict is pass, ok, drop or redirect;
//! 2. a packet that is none of ours (no frontend, no conntrack flow, not our
//!    tunnel, not an ICMP error about a translated flow) is passed
//!    untouched; fragments and malformed IPv4 headers are never changed;
//! 3. a new destination is a backend of the frontend the packet addressed
//!    (tunnelled: wrapped for that backend's node), never another
//!    Service's; only addresses, ports and checksums change;
//! 4. checksums that were right stay right; answers are always right.
//!
//! `DATAPLANE_FUZZ_PACKETS` (default [`DEFAULT_PACKETS`]) and
//! `DATAPLANE_FUZZ_SEED` (decimal or 0x-hex) choose the run; the seed and
//! per-category counts are printed at the end (`--nocapture`). The stream
//! is a function of the seed and of the backends the programs pick at
//! random (replies and ICMP errors quote the flows they translated).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod checker;
mod corners;
mod generate;
mod model;
mod rng;
mod run;

use std::ops::Range;

use dataplane_testbed::packets::ETH_HLEN;

/// Packets of the default run: about 10 s on a 2-core machine.
const DEFAULT_PACKETS: u64 = 600_000;
const DEFAULT_SEED: u64 = 0x0008_f022;
/// Frames BPF_PROG_TEST_RUN accepts: Ethernet + a 20-byte IPv4 header at
/// least, and well within a page.
const MIN_FRAME: usize = ETH_HLEN + 20;
const MAX_FRAME: usize = 1500;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet (tunnel.rs `OVERHEAD`); with
/// the outer Ethernet header in front, the inner Ethernet header of a
/// wrapped frame starts at the same offset.
const VXLAN_OVERHEAD: usize = 20 + 8 + 8 + ETH_HLEN;

/// Field offsets in an Ethernet/IPv4 frame.
const IP_TOT_LEN: Range<usize> = ETH_HLEN + 2..ETH_HLEN + 4;
const IP_FRAG: Range<usize> = ETH_HLEN + 6..ETH_HLEN + 8;
const IP_CSUM: Range<usize> = ETH_HLEN + 10..ETH_HLEN + 12;
const IP_SRC: Range<usize> = ETH_HLEN + 12..ETH_HLEN + 16;
const IP_DST: Range<usize> = ETH_HLEN + 16..ETH_HLEN + 20;
const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const VXLAN_FLAG_VNI: u8 = 0x08;

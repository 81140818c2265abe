//! Packets a random run may seldom build, each with the effect it must have,
//! and broken outcomes the checks must catch, so that a quiet run means something.

use std::net::Ipv4Addr;

use dataplane_testbed::{
    packets::{self, ETH_HLEN, Endpoint, IPPROTO_UDP, TCP_ACK, TCP_RST, TCP_SYN},
    tc_harness::{
        Hook, Outcome, TcHarness, VERDICT_DROP, VERDICT_PASS, VERDICT_REDIRECT, standard::*,
    },
};

use crate::{
    IP_CSUM, IP_FRAG, IP_TOT_LEN, MIN_FRAME, VXLAN_OVERHEAD,
    checker::{Checker, Effect},
    generate::OTHER_CLIENTS,
    model::{endpoint, l4_csum},
    run::{Failure, run},
};

/// Runs named packets in order through one harness, checking each against
/// the invariants and the effect expected.
struct Corners {
    harness: TcHarness,
    checker: Checker,
    failures: Vec<Failure>,
}

impl Corners {
    fn new() -> Self {
        let harness = TcHarness::standard().unwrap();
        let checker = Checker::new(&harness);
        Self {
            harness,
            checker,
            failures: Vec::new(),
        }
    }

    fn expect(&mut self, what: &str, hook: Hook, frame: &[u8], effects: &[Effect]) -> Outcome {
        let outcome = run(&mut self.harness, hook, frame)
            .unwrap_or_else(|| panic!("{what}: refused by BPF_PROG_TEST_RUN"));
        let detail = match self.checker.check(&self.harness, hook, frame, &outcome) {
            Ok(effect) if effects.contains(&effect) => None,
            Ok(effect) => Some(format!("{effect:?}, expected {effects:?}")),
            Err(violation) => Some(format!(
                "invariant {}: {}",
                violation.rule, violation.detail
            )),
        };
        if let Some(detail) = detail {
            self.failures.push(Failure {
                what: what.to_owned(),
                hook,
                input: frame.to_vec(),
                outcome: outcome.clone(),
                detail,
            });
        }
        outcome
    }
}

fn client(port: u16) -> Endpoint {
    endpoint(CLIENT, port)
}

fn node(port: u16) -> Endpoint {
    endpoint(NODE, port)
}

fn pod(ip: Ipv4Addr) -> Endpoint {
    endpoint(ip, POD_PORT)
}

#[test]
fn corner_cases_keep_the_invariants() {
    use Effect::*;
    let mut c = Corners::new();
    let ingress = Hook::Ingress;
    let egress = Hook::Egress;
    let router = Ipv4Addr::new(198, 18, 0, 1);

    // Frontends.
    let local_syn = packets::tcp(client(40000), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    c.expect("SYN to a local nodePort", ingress, &local_syn, &[Rewritten]);
    let local_reply = packets::tcp(pod(LOCAL_POD), client(40000), TCP_SYN | TCP_ACK, b"");
    c.expect("its reply from the pod", egress, &local_reply, &[Rewritten]);
    let local_ack = packets::tcp(client(40000), node(LOCAL_NODE_PORT), TCP_ACK, b"data");
    c.expect("the flow's next segment", ingress, &local_ack, &[Rewritten]);
    let remote_syn = packets::tcp(client(40001), node(REMOTE_NODE_PORT), TCP_SYN, b"");
    c.expect("SYN to a remote nodePort", ingress, &remote_syn, &[Wrapped]);
    let remote_reply = packets::tcp(pod(REMOTE_POD), client(40001), TCP_SYN | TCP_ACK, b"");
    c.expect(
        "the remote pod's reply through the tunnel",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &remote_reply),
        &[Unwrapped],
    );
    c.expect(
        "SYN to the nodePort without endpoints",
        ingress,
        &packets::tcp(client(40002), node(EMPTY_NODE_PORT), TCP_SYN, b""),
        &[Answered],
    );
    c.expect(
        "UDP to the nodePort without endpoints",
        ingress,
        &packets::udp(client(40003), node(EMPTY_NODE_PORT), b"x"),
        &[Answered],
    );
    c.expect(
        "RST to the nodePort without endpoints (never answered)",
        ingress,
        &packets::tcp(client(40004), node(EMPTY_NODE_PORT), TCP_RST, b""),
        &[Untouched],
    );
    c.expect(
        "SYN to the Local-policy nodePort without a local endpoint",
        ingress,
        &packets::tcp(client(40005), node(DROP_NODE_PORT), TCP_SYN, b""),
        &[Untouched],
    );
    let lb = endpoint(LB_IP, 80);
    c.expect(
        "LB IP from the admitted client",
        ingress,
        &packets::tcp(client(40006), lb, TCP_SYN, b""),
        &[Rewritten, Wrapped],
    );
    c.expect(
        "LB IP from another source",
        ingress,
        &packets::tcp(endpoint(OTHER_CLIENTS[0], 40007), lb, TCP_SYN, b""),
        &[Untouched],
    );
    c.expect(
        "externalIP, UDP",
        ingress,
        &packets::udp(client(40008), endpoint(EXTERNAL_IP, 80), b"q"),
        &[Rewritten],
    );
    c.expect(
        "ClusterIP from outside",
        ingress,
        &packets::tcp(client(40009), endpoint(CLUSTER_IP, 80), TCP_SYN, b""),
        &[Rewritten, Wrapped],
    );
    let mut no_checksum = packets::udp(client(40010), node(NODE_PORT), b"none");
    no_checksum[l4_csum(IPPROTO_UDP, ETH_HLEN + 20)].fill(0);
    let out = c.expect(
        "UDP without a checksum to a nodePort",
        ingress,
        &no_checksum,
        &[Rewritten, Wrapped],
    );
    let inner = if out.packet.len() == no_checksum.len() {
        &out.packet[..]
    } else {
        &out.packet[VXLAN_OVERHEAD..]
    };
    assert_eq!(
        inner[l4_csum(IPPROTO_UDP, ETH_HLEN + 20)],
        [0, 0],
        "no UDP checksum stays none"
    );

    // Not frontends.
    for (what, frame) in [
        (
            "UDP to a TCP-only nodePort",
            packets::udp(client(40011), node(LOCAL_NODE_PORT), b""),
        ),
        (
            "TCP to the UDP-only externalIP",
            packets::tcp(client(40012), endpoint(EXTERNAL_IP, 80), TCP_SYN, b""),
        ),
        (
            "port 0 on the node",
            packets::tcp(client(40013), node(0), TCP_SYN, b""),
        ),
        (
            "port 65535 on the node",
            packets::udp(client(40014), node(65535), b""),
        ),
        (
            "a nodePort on another address",
            packets::tcp(client(40015), endpoint(PEER, NODE_PORT), TCP_SYN, b""),
        ),
        (
            "port 81 of the LB IP",
            packets::tcp(client(40016), endpoint(LB_IP, 81), TCP_SYN, b""),
        ),
    ] {
        c.expect(what, ingress, &frame, &[Untouched]);
    }
    c.expect(
        "a pod's packet of no flow",
        egress,
        &packets::tcp(pod(LOCAL_POD), client(40017), TCP_ACK, b""),
        &[Untouched],
    );

    // ICMP errors.
    let sent_local = packets::tcp(node(LOCAL_NODE_PORT), client(40000), TCP_ACK, b"");
    let frag_needed = packets::icmp_error(router, NODE, 3, 4, 1400, &sent_local);
    c.expect(
        "frag needed about the local flow",
        ingress,
        &frag_needed,
        &[Rewritten],
    );
    let sent_remote = packets::tcp(node(REMOTE_NODE_PORT), client(40001), TCP_ACK, b"");
    c.expect(
        "time exceeded about the remote flow",
        ingress,
        &packets::icmp_error(router, NODE, 11, 0, 0, &sent_remote),
        &[Wrapped],
    );
    let sent_nowhere = packets::tcp(node(LOCAL_NODE_PORT), client(49999), TCP_ACK, b"");
    c.expect(
        "port unreachable about no flow",
        ingress,
        &packets::icmp_error(router, NODE, 3, 3, 0, &sent_nowhere),
        &[Untouched],
    );
    let mut icmp_fragment = frag_needed.clone();
    icmp_fragment[IP_FRAG].copy_from_slice(&0x2000u16.to_be_bytes());
    packets::refresh_ipv4_checksum(&mut icmp_fragment);
    c.expect(
        "first fragment of an error about the local flow",
        ingress,
        &icmp_fragment,
        &[Untouched],
    );
    let mut icmp_later = frag_needed.clone();
    icmp_later[IP_FRAG].copy_from_slice(&0x0010u16.to_be_bytes());
    packets::refresh_ipv4_checksum(&mut icmp_later);
    c.expect(
        "later fragment that reads like an error about the local flow",
        ingress,
        &icmp_later,
        &[Untouched],
    );

    // A client that turns from a translated UDP flow to the pod itself, on
    // the same tuple, ends the translated flow: the pod's answers to it
    // are neither rewritten nor tunnelled back.
    let to_pod = packets::udp(client(40030), pod(LOCAL_POD), b"q");
    let from_pod = packets::udp(pod(LOCAL_POD), client(40030), b"a");
    c.expect(
        "UDP to an externalIP with a local pod",
        ingress,
        &packets::udp(client(40030), endpoint(EXTERNAL_IP, 80), b"q"),
        &[Rewritten],
    );
    c.expect("the pod's answer", egress, &from_pod, &[Rewritten]);
    c.expect(
        "the same tuple straight to the pod",
        ingress,
        &to_pod,
        &[Untouched],
    );
    c.expect(
        "the pod's answer to the direct flow",
        egress,
        &from_pod,
        &[Untouched],
    );
    let to_pod = packets::udp(client(40031), pod(LOCAL_POD), b"q");
    let from_pod = packets::udp(pod(LOCAL_POD), client(40031), b"a");
    c.expect(
        "UDP tunnelled from the peer to a local pod",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &to_pod),
        &[Unwrapped],
    );
    c.expect(
        "the pod's answer into the tunnel",
        egress,
        &from_pod,
        &[Wrapped],
    );
    c.expect(
        "the same tuple straight to the pod, not tunnelled",
        ingress,
        &to_pod,
        &[Untouched],
    );
    c.expect(
        "the pod's answer to the direct flow, not tunnelled",
        egress,
        &from_pod,
        &[Untouched],
    );

    // The tunnel.
    let tunnelled = packets::tcp(client(40020), pod(LOCAL_POD), TCP_SYN, b"");
    c.expect(
        "VXLAN from the peer to a local pod",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &tunnelled),
        &[Unwrapped],
    );
    c.expect(
        "the local pod's reply into the tunnel",
        egress,
        &packets::tcp(pod(LOCAL_POD), client(40020), TCP_SYN | TCP_ACK, b""),
        &[Wrapped],
    );
    c.expect(
        "VXLAN from a stranger",
        ingress,
        &packets::vxlan(CLIENT, NODE, TUNNEL_PORT, VNI, &tunnelled),
        &[Untouched],
    );
    c.expect(
        "VXLAN with another VNI",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI + 1, &tunnelled),
        &[Untouched],
    );
    c.expect(
        "VXLAN with garbage inside",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &[0xa5; 40]),
        &[Unwrapped],
    );
    c.expect(
        "VXLAN with a truncated inner packet",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &tunnelled[..40]),
        &[Unwrapped],
    );
    let tunnelled_udp = packets::udp(client(40021), pod(LOCAL_POD), b"opt");
    // Our tunnel never sends outer IPv4 options: such a packet is not ours
    // and goes to the stack as it came.
    c.expect(
        "VXLAN with IPv4 options on the outer header",
        ingress,
        &packets::with_ipv4_options(
            &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &tunnelled_udp),
            &[1, 1, 1, 0],
        ),
        &[Untouched],
    );

    // Hairpin.
    let hairpin = packets::tcp(
        endpoint(LOCAL_POD, 40030),
        node(LOCAL_NODE_PORT),
        TCP_SYN,
        b"",
    );
    let out = c.expect(
        "a local pod through its own nodePort",
        ingress,
        &hairpin,
        &[Rewritten],
    );
    if let Some(snat) = packets::parse(&out.packet).and_then(|p| p.ports) {
        let reply = packets::tcp(pod(LOCAL_POD), node(snat.0), TCP_SYN | TCP_ACK, b"");
        c.expect("its SNATed reply", ingress, &reply, &[Rewritten]);
    }

    // IPv4 headers.
    let options = packets::with_ipv4_options(
        &packets::tcp(client(40040), node(LOCAL_NODE_PORT), TCP_SYN, b""),
        &[7, 7, 4, 0, 0, 0, 0, 0],
    );
    c.expect("SYN with IPv4 options", ingress, &options, &[Rewritten]);
    let longest = packets::with_ipv4_options(
        &packets::udp(client(40041), endpoint(EXTERNAL_IP, 80), b""),
        &[1; 40],
    );
    c.expect(
        "UDP with a 60-byte IPv4 header",
        ingress,
        &longest,
        &[Rewritten],
    );
    let base = packets::tcp(client(40042), node(LOCAL_NODE_PORT), TCP_SYN, b"abcdefgh");
    let mutated = |change: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = base.clone();
        change(&mut frame);
        packets::refresh_ipv4_checksum(&mut frame);
        frame
    };
    for (what, frame, effects) in [
        (
            "first fragment",
            mutated(&|f| f[IP_FRAG].copy_from_slice(&0x2000u16.to_be_bytes())),
            &[Untouched][..],
        ),
        (
            "later fragment",
            mutated(&|f| f[IP_FRAG].copy_from_slice(&0x0003u16.to_be_bytes())),
            &[Untouched],
        ),
        ("IHL 4", mutated(&|f| f[ETH_HLEN] = 0x44), &[Untouched]),
        ("IHL 0", mutated(&|f| f[ETH_HLEN] = 0x40), &[Untouched]),
        ("version 6", mutated(&|f| f[ETH_HLEN] = 0x65), &[Untouched]),
        (
            "total length below the header",
            mutated(&|f| f[IP_TOT_LEN].copy_from_slice(&19u16.to_be_bytes())),
            &[Untouched],
        ),
        (
            "total length below the TCP header",
            mutated(&|f| f[IP_TOT_LEN].copy_from_slice(&39u16.to_be_bytes())),
            &[Untouched],
        ),
        (
            "total length beyond the frame",
            mutated(&|f| f[IP_TOT_LEN].copy_from_slice(&1400u16.to_be_bytes())),
            &[Rewritten],
        ),
        (
            "total length short of the frame",
            mutated(&|f| f[IP_TOT_LEN].copy_from_slice(&40u16.to_be_bytes())),
            &[Rewritten],
        ),
        ("cut to 34 bytes", base[..MIN_FRAME].to_vec(), &[Untouched]),
        ("cut inside TCP", base[..50].to_vec(), &[Untouched]),
        (
            "padded after the packet",
            [&base[..], &[0u8; 18]].concat(),
            &[Rewritten],
        ),
        (
            "ARP ether type",
            mutated(&|f| f[12..14].copy_from_slice(&[0x08, 0x06])),
            &[Untouched],
        ),
        ("IPIP", mutated(&|f| f[ETH_HLEN + 9] = 4), &[Untouched]),
    ] {
        // Each a new flow: nothing remembered of the one before.
        c.harness.clear_conntrack().unwrap();
        c.checker.forget();
        c.expect(what, ingress, &frame, effects);
    }

    assert!(
        c.failures.is_empty(),
        "{} corner cases failed:\n{}",
        c.failures.len(),
        c.failures
            .iter()
            .map(ToString::to_string)
            .collect::<String>()
    );
}

/// The checks themselves: outcomes a broken program could produce are
/// caught, each by the rule it breaks (so a silent fuzz run means
/// something).
#[test]
fn the_checks_catch_broken_outcomes() {
    let harness = TcHarness::standard().unwrap();
    let mut checker = Checker::new(&harness);
    let outcome = |verdict, packet: &[u8]| Outcome {
        verdict,
        packet: packet.to_vec(),
    };
    let local_syn = packets::tcp(client(41000), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    let to_local = packets::tcp(client(41000), pod(LOCAL_POD), TCP_SYN, b"");
    let to_remote = packets::tcp(client(41000), pod(REMOTE_POD), TCP_SYN, b"");
    let mut bad_checksum = to_local.clone();
    bad_checksum[IP_CSUM.start] ^= 0x01;
    let mut more_changed = to_local.clone();
    more_changed[ETH_HLEN + 8] = 1; // TTL
    packets::refresh_ipv4_checksum(&mut more_changed);
    let stranger = packets::tcp(client(41001), node(81), TCP_SYN, b"");
    let stranger_translated = packets::tcp(client(41001), pod(LOCAL_POD), TCP_SYN, b"");
    let mut fragment = local_syn.clone();
    fragment[IP_FRAG].copy_from_slice(&0x2000u16.to_be_bytes());
    packets::refresh_ipv4_checksum(&mut fragment);
    let mut fragment_translated = to_local.clone();
    fragment_translated[IP_FRAG].copy_from_slice(&0x2000u16.to_be_bytes());
    packets::refresh_ipv4_checksum(&mut fragment_translated);
    let remote_syn = packets::tcp(client(41002), node(REMOTE_NODE_PORT), TCP_SYN, b"");
    let remote_inner = packets::tcp(client(41002), pod(REMOTE_POD), TCP_SYN, b"");
    let reply = packets::tcp(pod(LOCAL_POD), client(41003), TCP_ACK, b"");
    let reply_translated = packets::tcp(node(LOCAL_NODE_PORT), client(41003), TCP_ACK, b"");
    let cases: [(&str, Hook, &[u8], Outcome, &str); 9] = [
        (
            "an unknown verdict",
            Hook::Ingress,
            &local_syn,
            outcome(1, &to_local),
            "1:",
        ),
        (
            "another Service's backend",
            Hook::Ingress,
            &local_syn,
            outcome(VERDICT_PASS, &to_remote),
            "3: destination",
        ),
        (
            "a broken checksum",
            Hook::Ingress,
            &local_syn,
            outcome(VERDICT_PASS, &bad_checksum),
            "4:",
        ),
        (
            "a changed TTL",
            Hook::Ingress,
            &local_syn,
            outcome(VERDICT_PASS, &more_changed),
            "3: changed a byte",
        ),
        (
            "a stranger translated",
            Hook::Ingress,
            &stranger,
            outcome(VERDICT_PASS, &stranger_translated),
            "2: changed a packet",
        ),
        (
            "a stranger dropped",
            Hook::Ingress,
            &stranger,
            outcome(VERDICT_DROP, &stranger),
            "2: did not pass",
        ),
        (
            "a fragment translated",
            Hook::Ingress,
            &fragment,
            outcome(VERDICT_PASS, &fragment_translated),
            "2: changed a fragment",
        ),
        (
            "a remote backend's flow wrapped for a stranger",
            Hook::Ingress,
            &remote_syn,
            outcome(
                VERDICT_REDIRECT,
                &packets::vxlan(NODE, CLIENT, TUNNEL_PORT, VNI, &remote_inner),
            ),
            "3: backend reached the wrong way",
        ),
        (
            "a reply of no flow translated",
            Hook::Egress,
            &reply,
            outcome(VERDICT_PASS, &reply_translated),
            "2: changed a packet",
        ),
    ];
    for (what, hook, input, broken, rule) in cases {
        match checker.check(&harness, hook, input, &broken) {
            Err(violation) => assert!(
                violation.rule.starts_with(rule),
                "{what}: caught as {violation:?}, not {rule}"
            ),
            Ok(effect) => panic!("{what}: passed as {effect:?}"),
        }
    }
    // And the right outcomes pass.
    let right = checker.check(
        &harness,
        Hook::Ingress,
        &local_syn,
        &outcome(VERDICT_PASS, &to_local),
    );
    assert_eq!(right.unwrap(), Effect::Rewritten);
    let wrapped = packets::vxlan(NODE, PEER, TUNNEL_PORT, VNI, &remote_inner);
    let right = checker.check(
        &harness,
        Hook::Ingress,
        &remote_syn,
        &outcome(VERDICT_DROP, &wrapped),
    );
    assert_eq!(right.unwrap(), Effect::Wrapped);
}

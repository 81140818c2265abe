//! The node-interface programs on crafted packets (BPF_PROG_TEST_RUN), with
//! the real maps: exact rewrites, checksums, answers and drops.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dataplane_common::Stat;
use dataplane_testbed::{
    packets::{self, Endpoint, TCP_ACK, TCP_RST, TCP_SYN},
    tc_harness::{Hook, TcHarness, VERDICT_DROP, VERDICT_PASS, VERDICT_REDIRECT, standard::*},
};

fn client(port: u16) -> Endpoint {
    Endpoint { ip: CLIENT, port }
}

fn node(port: u16) -> Endpoint {
    Endpoint { ip: NODE, port }
}

fn assert_checksums(frame: &[u8]) {
    assert!(
        packets::ipv4_checksum_ok(frame),
        "IPv4 checksum: {frame:02x?}"
    );
    assert!(packets::l4_checksum_ok(frame), "L4 checksum: {frame:02x?}");
}

#[test]
fn a_syn_to_a_local_node_port_is_translated_and_its_reply_translated_back() {
    let mut harness = TcHarness::standard().unwrap();
    let syn = packets::tcp(client(40000), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    let out = harness.run(Hook::Ingress, &syn).unwrap();
    assert_eq!(out.verdict, VERDICT_PASS);
    let parsed = packets::parse(&out.packet).unwrap();
    assert_eq!((parsed.src, parsed.dst), (CLIENT, LOCAL_POD), "DNAT only");
    assert_eq!(parsed.ports, Some((40000, POD_PORT)));
    assert_checksums(&out.packet);

    let reply = packets::tcp(
        Endpoint {
            ip: LOCAL_POD,
            port: POD_PORT,
        },
        client(40000),
        TCP_SYN | TCP_ACK,
        b"",
    );
    let out = harness.run(Hook::Egress, &reply).unwrap();
    assert_eq!(out.verdict, VERDICT_PASS);
    let parsed = packets::parse(&out.packet).unwrap();
    assert_eq!((parsed.src, parsed.dst), (NODE, CLIENT));
    assert_eq!(parsed.ports, Some((LOCAL_NODE_PORT, 40000)));
    assert_checksums(&out.packet);
    assert_eq!(harness.conntrack().unwrap().len(), 2);
}

#[test]
fn a_flow_to_a_remote_pod_is_wrapped_for_the_pods_node() {
    let mut harness = TcHarness::standard().unwrap();
    let payload = [7u8; 100];
    let packet = packets::udp(client(40001), node(NODE_PORT), &payload);
    // Until the remote pod is chosen (the other half go to the local one).
    let out = (0..64)
        .map(|_| {
            harness.clear_conntrack().unwrap();
            harness.run(Hook::Ingress, &packet).unwrap()
        })
        .find(|out| packets::parse(&out.packet).unwrap().dst == PEER)
        .expect("the remote pod is chosen at least once in 64 tries");
    // No route in the harness' namespace: the program counts and drops
    // rather than send it anywhere wrong; the packet is already wrapped.
    assert!(matches!(out.verdict, VERDICT_DROP | VERDICT_REDIRECT));
    let outer = packets::parse(&out.packet).unwrap();
    assert_eq!((outer.src, outer.dst), (NODE, PEER));
    assert_eq!(outer.ports.map(|p| p.1), Some(TUNNEL_PORT));
    assert!(packets::ipv4_checksum_ok(&out.packet));
    let inner = packets::vxlan_inner(&out.packet).unwrap();
    let parsed = packets::parse(inner).unwrap();
    assert_eq!(
        (parsed.src, parsed.dst),
        (CLIENT, REMOTE_POD),
        "client kept"
    );
    assert_eq!(parsed.ports, Some((40001, POD_PORT)));
    assert_checksums(inner);
    assert_eq!(&inner[inner.len() - payload.len()..], &payload);
}

#[test]
fn a_syn_to_a_frontend_without_endpoints_is_answered_with_a_reset() {
    let mut harness = TcHarness::standard().unwrap();
    let syn = packets::tcp(client(40002), node(EMPTY_NODE_PORT), TCP_SYN, b"");
    let out = harness.run(Hook::Ingress, &syn).unwrap();
    assert_eq!(
        out.verdict, VERDICT_REDIRECT,
        "bounced out where it came in"
    );
    let parsed = packets::parse(&out.packet).unwrap();
    assert_eq!((parsed.src, parsed.dst), (NODE, CLIENT));
    assert_eq!(parsed.ports, Some((EMPTY_NODE_PORT, 40002)));
    assert_eq!(parsed.tcp_flags, Some(TCP_RST | TCP_ACK));
    assert_checksums(&out.packet);
    // The RST acknowledges the SYN (sequence 1000 + 1).
    let ack = u32::from_be_bytes(out.packet[14 + 20 + 8..14 + 20 + 12].try_into().unwrap());
    assert_eq!(ack, 1001);

    let datagram = packets::udp(client(40003), node(EMPTY_NODE_PORT), b"hello");
    let out = harness.run(Hook::Ingress, &datagram).unwrap();
    assert_eq!(out.verdict, VERDICT_REDIRECT);
    let parsed = packets::parse(&out.packet).unwrap();
    assert_eq!(parsed.protocol, packets::IPPROTO_ICMP);
    assert_eq!((parsed.src, parsed.dst), (NODE, CLIENT));
    assert_eq!(&out.packet[34..36], &[3, 3], "port unreachable");
    assert_eq!(
        &out.packet[42..42 + 20],
        &datagram[14..34],
        "quotes the header"
    );
    assert_checksums(&out.packet);
    assert_eq!(harness.stat(Stat::ExtRejected).unwrap(), 2);
}

#[test]
fn policy_and_source_range_drops_and_untouched_strangers() {
    let mut harness = TcHarness::standard().unwrap();
    let drop = packets::tcp(client(40004), node(DROP_NODE_PORT), TCP_SYN, b"");
    assert_eq!(
        harness.run(Hook::Ingress, &drop).unwrap().verdict,
        VERDICT_DROP
    );
    assert_eq!(harness.stat(Stat::ExtDropNoLocalEndpoint).unwrap(), 1);

    let stranger = Endpoint::new([192, 0, 2, 101], 40005);
    let lb = Endpoint {
        ip: LB_IP,
        port: 80,
    };
    let blocked = packets::tcp(stranger, lb, TCP_SYN, b"");
    assert_eq!(
        harness.run(Hook::Ingress, &blocked).unwrap().verdict,
        VERDICT_DROP
    );
    assert_eq!(harness.stat(Stat::ExtDropSourceRange).unwrap(), 1);
    let allowed = packets::tcp(client(40006), lb, TCP_SYN, b"");
    let out = harness.run(Hook::Ingress, &allowed).unwrap();
    // Translated: to the local pod, or wrapped for the peer (which the
    // harness' empty namespace has no route to, hence maybe a drop).
    let dst = packets::parse(&out.packet).unwrap().dst;
    assert!(dst == LOCAL_POD || dst == PEER, "{dst}");
    assert_eq!(harness.stat(Stat::ExtDropSourceRange).unwrap(), 1);

    // Not a frontend: untouched, whatever the port.
    for port in [80, LOCAL_NODE_PORT + 100, 0, 65535] {
        let other = packets::tcp(client(40007), node(port), TCP_SYN, b"");
        let out = harness.run(Hook::Ingress, &other).unwrap();
        assert_eq!(out.verdict, VERDICT_PASS);
        assert_eq!(out.packet, other);
    }
}

#[test]
fn vxlan_only_from_a_cluster_node_is_unwrapped() {
    let mut harness = TcHarness::standard().unwrap();
    let inner = packets::tcp(
        client(40008),
        Endpoint {
            ip: LOCAL_POD,
            port: POD_PORT,
        },
        TCP_SYN,
        b"",
    );
    let from_peer = packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &inner);
    let out = harness.run(Hook::Ingress, &from_peer).unwrap();
    assert_eq!(out.verdict, VERDICT_PASS);
    assert_eq!(
        &out.packet[14..],
        &inner[14..],
        "delivered as the peer sent it"
    );
    assert_eq!(harness.stat(Stat::ExtDecapsulated).unwrap(), 1);

    for wrong in [
        packets::vxlan(CLIENT, NODE, TUNNEL_PORT, VNI, &inner),
        packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI + 1, &inner),
    ] {
        let out = harness.run(Hook::Ingress, &wrong).unwrap();
        assert_eq!(out.verdict, VERDICT_PASS);
        assert_eq!(out.packet, wrong, "left to the stack untouched");
    }
}

#[test]
fn fragments_and_truncated_headers_are_never_translated() {
    let mut harness = TcHarness::standard().unwrap();
    let mut fragment = packets::tcp(client(40009), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    fragment[14 + 6] |= 0x20; // more fragments
    let out = harness.run(Hook::Ingress, &fragment).unwrap();
    assert_eq!((out.verdict, &out.packet), (VERDICT_PASS, &fragment));
    let syn = packets::tcp(client(40010), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than Ethernet +
    // 20 bytes; from there on, every cut is passed untouched.
    let mut long_header = syn.clone();
    long_header[14] = 0x4f; // IHL 15: 60 bytes of header the frame lacks
    for frame in [&syn[..34], &syn[..40], &syn[..53], &long_header[..]] {
        let out = harness.run(Hook::Ingress, frame).unwrap();
        assert_eq!(out.verdict, VERDICT_PASS, "{frame:02x?}");
        assert_eq!(out.packet, frame);
    }
    assert!(harness.conntrack().unwrap().is_empty());
}

#[test]
fn a_second_flow_that_would_take_over_a_live_flows_replies_is_refused() {
    let mut harness = TcHarness::standard().unwrap();
    let pod = Endpoint {
        ip: LOCAL_POD,
        port: POD_PORT,
    };
    // The same client address and port to two frontends; when the second
    // picks the same pod, its reply key is the first flow's.
    let clash_port = (41000..41064)
        .find(|port| {
            let first = packets::tcp(client(*port), node(LOCAL_NODE_PORT), TCP_SYN, b"");
            harness.run(Hook::Ingress, &first).unwrap();
            let cluster_ip = Endpoint {
                ip: CLUSTER_IP,
                port: 80,
            };
            let second = packets::tcp(client(*port), cluster_ip, TCP_SYN, b"");
            let out = harness.run(Hook::Ingress, &second).unwrap();
            let parsed = packets::parse(&out.packet).unwrap();
            // The remote pod was chosen: no clash, try another port.
            parsed.dst == LOCAL_POD || out.verdict == VERDICT_DROP && parsed.dst == CLUSTER_IP
        })
        .expect("the local pod is chosen at least once in 64 tries");
    assert_eq!(harness.stat(Stat::ExtConntrackClash).unwrap(), 1);
    // The first flow's replies still come from the address it dialled.
    let reply = packets::tcp(pod, client(clash_port), TCP_SYN | TCP_ACK, b"");
    let out = harness.run(Hook::Egress, &reply).unwrap();
    let parsed = packets::parse(&out.packet).unwrap();
    assert_eq!(
        (parsed.src, parsed.ports),
        (NODE, Some((LOCAL_NODE_PORT, clash_port)))
    );
}

#[test]
fn a_new_connection_on_the_tuple_of_an_ended_flow_is_not_translated() {
    let mut harness = TcHarness::standard().unwrap();
    let pod = Endpoint {
        ip: LOCAL_POD,
        port: POD_PORT,
    };
    let syn = packets::tcp(client(42000), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    harness.run(Hook::Ingress, &syn).unwrap();
    // The client ends it with a reset; later it reaches the pod directly
    // (a ClusterIP through socket LB, say) from the same port.
    let reset = packets::tcp(client(42000), node(LOCAL_NODE_PORT), TCP_RST | TCP_ACK, b"");
    harness.run(Hook::Ingress, &reset).unwrap();
    let syn_ack = packets::tcp(pod, client(42000), TCP_SYN | TCP_ACK, b"");
    let out = harness.run(Hook::Egress, &syn_ack).unwrap();
    assert_eq!((out.verdict, &out.packet), (VERDICT_PASS, &syn_ack));
    let data = packets::tcp(pod, client(42000), TCP_ACK, b"hello");
    let out = harness.run(Hook::Egress, &data).unwrap();
    assert_eq!((out.verdict, &out.packet), (VERDICT_PASS, &data));

    // While a flow is alive, its replies are translated as always.
    let syn = packets::tcp(client(42001), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    harness.run(Hook::Ingress, &syn).unwrap();
    let syn_ack = packets::tcp(pod, client(42001), TCP_SYN | TCP_ACK, b"");
    let out = harness.run(Hook::Egress, &syn_ack).unwrap();
    assert_eq!(packets::parse(&out.packet).unwrap().src, NODE);
}

#[test]
fn a_tunnelled_flow_never_takes_over_a_local_flows_tuple() {
    let mut harness = TcHarness::standard().unwrap();
    let pod = Endpoint {
        ip: LOCAL_POD,
        port: POD_PORT,
    };
    // The client reaches this node's nodePort from port 43000 ...
    let syn = packets::tcp(client(43000), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    harness.run(Hook::Ingress, &syn).unwrap();
    // ... and, from the same port, another node's nodePort, which picks
    // the same pod and tunnels the flow here.
    let inner = packets::tcp(client(43000), pod, TCP_SYN, b"");
    let tunnelled = packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &inner);
    let out = harness.run(Hook::Ingress, &tunnelled).unwrap();
    assert_eq!(out.verdict, VERDICT_DROP, "refused, not delivered");
    assert_eq!(harness.stat(Stat::ExtConntrackClash).unwrap(), 1);
    // The first flow's replies still leave from this node's nodePort.
    let reply = packets::tcp(pod, client(43000), TCP_SYN | TCP_ACK, b"");
    let out = harness.run(Hook::Egress, &reply).unwrap();
    let parsed = packets::parse(&out.packet).unwrap();
    assert_eq!((parsed.src, out.verdict), (NODE, VERDICT_PASS));
}

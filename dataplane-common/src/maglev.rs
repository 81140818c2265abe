//! The flow hash Maglev backend selection reads its lookup table with
//! (issue 15). The BPF programs and the agent's tests share it, and every
//! node must compute the same value for the same packet: a flow that an
//! external load balancer moves to another node then picks the same
//! backend there. So it is fixed arithmetic on the tuple, never a keyed or
//! per-boot hash, and changing it moves flows in a mixed-version cluster.

/// The 5-tuple of a flow as it reaches the node (addresses and ports in
/// network byte order, as the packet carries them; `protocol` an
/// IPPROTO_* number), hashed to 32 bits.
#[inline(always)]
pub fn maglev_flow_hash(
    source_be: u32,
    destination_be: u32,
    source_port_be: u16,
    destination_port_be: u16,
    protocol: u8,
) -> u32 {
    let addresses = (u64::from(source_be) << 32) | u64::from(destination_be);
    let ports = (u64::from(source_port_be) << 24)
        | (u64::from(destination_port_be) << 8)
        | u64::from(protocol);
    // Two rounds of a 64-bit finalizer (the mixing step of SplitMix64):
    // every input bit moves about half the output bits, so tuples that
    // differ in one port land in unrelated table positions.
    let mixed = maglev_mix64(maglev_mix64(addresses) ^ ports);
    (mixed ^ (mixed >> 32)) as u32
}

/// SplitMix64's finalizer: the mixing step of the flow hash here and of
/// the agent's backend-name hash, so both stay one fixed arithmetic.
#[inline(always)]
pub const fn maglev_mix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fixed_arithmetic_every_node_and_version_agrees_on() {
        // Pinned: a change here moves established flows between backends
        // during a rolling upgrade.
        assert_eq!(
            maglev_flow_hash(
                u32::from_be_bytes([192, 0, 2, 7]).to_be(),
                u32::from_be_bytes([10, 200, 1, 1]).to_be(),
                40_000u16.to_be(),
                30_080u16.to_be(),
                6
            ),
            2_351_513_323
        );
    }

    #[test]
    fn every_field_of_the_tuple_changes_the_hash() {
        let base = maglev_flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, maglev_flow_hash(9, 2, 3, 4, 6));
        assert_ne!(base, maglev_flow_hash(1, 9, 3, 4, 6));
        assert_ne!(base, maglev_flow_hash(1, 2, 9, 4, 6));
        assert_ne!(base, maglev_flow_hash(1, 2, 3, 9, 6));
        assert_ne!(base, maglev_flow_hash(1, 2, 3, 4, 17));
    }
}

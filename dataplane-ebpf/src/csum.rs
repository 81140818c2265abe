//! Headers built from scratch and their Internet checksums (RFC 1071). Rewrites of
//! existing packets use the kernel's incremental helpers instead (nat.rs).

use crate::packet::IPV4_MIN_HLEN;

/// The unfolded one's-complement sum of big-endian 16-bit words.
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Folds a 32-bit one's-complement sum to 16 bits and complements it.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The TTL of packets this node originates (tunnel, answers).
const TTL: u8 = 64;
/// IPv4 "don't fragment".
const IP_DF: u16 = 0x4000;

/// A 20-byte IPv4 header from this node, with its checksum: the tunnel's
/// outer header and the answers (RST, ICMP) the programs send.
#[inline(always)]
pub fn ipv4_header(
    src_be: u32,
    dst_be: u32,
    protocol: u8,
    total_len: u16,
    dont_fragment: bool,
) -> [u8; IPV4_MIN_HLEN] {
    let mut header = [0u8; IPV4_MIN_HLEN];
    header[0] = 0x45;
    header[2..4].copy_from_slice(&total_len.to_be_bytes());
    if dont_fragment {
        header[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    }
    header[8] = TTL;
    header[9] = protocol;
    header[12..16].copy_from_slice(&src_be.to_ne_bytes());
    header[16..20].copy_from_slice(&dst_be.to_ne_bytes());
    let checksum = fold(sum_words(&header));
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

/// The unfolded sum of the TCP/UDP pseudo header.
#[inline(always)]
pub fn pseudo_header(src_be: u32, dst_be: u32, protocol: u8, len: u16) -> u32 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src_be.to_ne_bytes());
    pseudo[4..8].copy_from_slice(&dst_be.to_ne_bytes());
    pseudo[9] = protocol;
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());
    sum_words(&pseudo)
}

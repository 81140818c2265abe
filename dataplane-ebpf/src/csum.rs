//! Internet checksums (RFC 1071) of headers built from scratch. Rewrites of
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

/// The checksum of a 20-byte IPv4 header whose checksum field is 0.
#[inline(always)]
pub fn ipv4_header(header: &[u8; IPV4_MIN_HLEN]) -> u16 {
    fold(sum_words(header))
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

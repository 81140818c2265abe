//! The randomness of a run, seeded so that a run is a function of its seed
//! and any packet of it can be built again.

use std::{net::Ipv4Addr, ops::RangeInclusive};

/// splitmix64: tiny, seedable, and good enough to choose packets.
pub(super) struct Rng(u64);

impl Rng {
    /// Packet `index`'s own generator, so every packet of a run follows
    /// from the seed and its number.
    pub(super) fn for_packet(seed: u64, index: u64) -> Self {
        let mut rng = Self(seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
        rng.next_u64();
        rng
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub(super) fn range(&mut self, range: RangeInclusive<usize>) -> usize {
        range.start() + self.below(range.end() - range.start() + 1)
    }

    pub(super) fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub(super) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    pub(super) fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub(super) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    pub(super) fn ip(&mut self) -> Ipv4Addr {
        Ipv4Addr::from(self.next_u64() as u32)
    }
}

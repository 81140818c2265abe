//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016, section 3.4): the
//! lookup table an external frontend's flows are read from, at position
//! `maglev_flow_hash(tuple) % size` (issue 15).
//!
//! Every node must build the same table from the same backends, so that a
//! flow an external load balancer moves to another node finds the same
//! backend there. The table therefore depends only on the backends' names
//! and the size: the backends are taken in name order whatever order they
//! come in, and the two hashes of a name are fixed arithmetic.

/// The default table size: prime, and above 100 x the backends the paper's
/// imbalance bound asks for, up to 163 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

/// Entries per backend the paper asks for (M > 100 N keeps the imbalance
/// between backends under 1%).
pub const ENTRIES_PER_BACKEND: u32 = 100;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("the Maglev table size {0} is not a prime number")]
    SizeNotPrime(u32),
    #[error(
        "a Maglev table of {size} entries is too small for {backends} backends (it needs more than {ENTRIES_PER_BACKEND} per backend)"
    )]
    TooManyBackends { size: u32, backends: usize },
}

/// The lookup table for `backends` (each named by bytes that identify it
/// on every node, such as its address and port): `size` entries, each the
/// index in `backends` of the backend that position selects. Empty when
/// there are no backends.
pub fn table<B: AsRef<[u8]>>(backends: &[B], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime(size));
    }
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    if u64::from(size) <= backends.len() as u64 * u64::from(ENTRIES_PER_BACKEND) {
        return Err(MaglevError::TooManyBackends {
            size,
            backends: backends.len(),
        });
    }
    // Canonical order: the fill's round-robin breaks ties by position, and
    // every node must break them alike.
    let mut by_name: Vec<u32> = (0..backends.len() as u32).collect();
    by_name.sort_by(|a, b| {
        backends[*a as usize]
            .as_ref()
            .cmp(backends[*b as usize].as_ref())
    });
    let mut walks: Vec<Permutation> = by_name
        .iter()
        .map(|index| Permutation::of(backends[*index as usize].as_ref(), size))
        .collect();

    const EMPTY: u32 = u32::MAX;
    let mut entries = vec![EMPTY; size as usize];
    let mut filled = 0u32;
    // Each backend in turn takes the next position of its permutation that
    // is still free, until every position is taken: backends end up with
    // floor(M/N) or ceil(M/N) positions each.
    'fill: loop {
        for (walk, &backend) in walks.iter_mut().zip(&by_name) {
            let mut position = walk.next_position();
            while entries[position as usize] != EMPTY {
                position = walk.next_position();
            }
            entries[position as usize] = backend;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    Ok(entries)
}

/// A backend's preference list over the table's positions: `offset`,
/// `offset + skip`, `offset + 2 skip`, ... (mod size). With a prime size
/// and 0 < skip < size it visits every position once.
struct Permutation {
    position: u64,
    skip: u64,
    size: u64,
    started: bool,
}

impl Permutation {
    fn of(name: &[u8], size: u32) -> Self {
        let size = u64::from(size);
        Self {
            position: name_hash(name, OFFSET_SEED) % size,
            skip: name_hash(name, SKIP_SEED) % (size - 1) + 1,
            size,
            started: false,
        }
    }

    fn next_position(&mut self) -> u32 {
        if self.started {
            self.position = (self.position + self.skip) % self.size;
        }
        self.started = true;
        // Below size, itself a u32.
        self.position as u32
    }
}

const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66;
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b;

/// FNV-1a over the name from `seed`, then SplitMix64's finalizer (the
/// flow hash's, from dataplane-common): fixed
/// arithmetic (never the standard library's hasher, which may change
/// between Rust releases), and two seeds give the two independent hashes
/// the paper's offset and skip need.
fn name_hash(name: &[u8], seed: u64) -> u64 {
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = seed;
    for byte in name {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    dataplane_common::maglev_mix64(hash)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, SocketAddrV4},
    };

    use dataplane_common::maglev_flow_hash;

    use super::*;

    fn backends(count: usize) -> Vec<String> {
        (0..count)
            .map(|i| {
                SocketAddrV4::new(
                    Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1),
                    8080,
                )
                .to_string()
            })
            .collect()
    }

    /// The table's positions per backend name.
    fn shares(names: &[String], table: &[u32]) -> BTreeMap<String, usize> {
        let mut shares = BTreeMap::new();
        for &index in table {
            *shares.entry(names[index as usize].clone()).or_insert(0) += 1;
        }
        shares
    }

    /// The backend each position selects, by name (so tables of different
    /// backend lists compare).
    fn owners(names: &[String], table: &[u32]) -> Vec<String> {
        table
            .iter()
            .map(|&index| names[index as usize].clone())
            .collect()
    }

    /// `count` synthetic external flows: clients of a /16 on ephemeral
    /// ports, to one nodePort.
    fn flows(count: u32) -> Vec<u32> {
        (0..count)
            .map(|i| {
                let client = Ipv4Addr::new(198, 51, (i >> 8) as u8, i as u8);
                let port = 32_768 + (i.wrapping_mul(7_919) % 28_000) as u16;
                maglev_flow_hash(
                    u32::from(client).to_be(),
                    u32::from(Ipv4Addr::new(10, 200, 1, 1)).to_be(),
                    port.to_be(),
                    30_080u16.to_be(),
                    6,
                )
            })
            .collect()
    }

    #[test]
    fn every_position_is_filled_and_backends_differ_by_at_most_one_position() {
        for count in [1, 2, 3, 10, 57, 163] {
            let names = backends(count);
            let table = table(&names, DEFAULT_TABLE_SIZE).unwrap();
            assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
            let shares = shares(&names, &table);
            assert_eq!(shares.len(), count, "every backend has positions");
            let least = shares.values().min().unwrap();
            let most = shares.values().max().unwrap();
            assert!(most - least <= 1, "{count} backends: {least}..{most}");
        }
    }

    #[test]
    fn the_table_depends_on_the_backends_not_on_their_order() {
        let names = backends(10);
        let mut reversed = names.clone();
        reversed.reverse();
        let mut rotated = names.clone();
        rotated.rotate_left(3);
        let expected = owners(&names, &table(&names, 1_009).unwrap());
        assert_eq!(
            owners(&reversed, &table(&reversed, 1_009).unwrap()),
            expected
        );
        assert_eq!(owners(&rotated, &table(&rotated, 1_009).unwrap()), expected);
    }

    #[test]
    fn the_table_is_fixed_arithmetic_every_node_and_version_agrees_on() {
        // Pinned: a change here moves established flows during a rolling
        // upgrade, when nodes of both versions serve one frontend.
        let names = ["10.244.1.5:8080", "10.244.2.7:8080", "10.244.3.9:8080"];
        assert_eq!(
            table(&names, 307).unwrap()[..12],
            PINNED_FIRST_POSITIONS,
            "{:?}",
            &table(&names, 307).unwrap()[..12]
        );
    }

    const PINNED_FIRST_POSITIONS: [u32; 12] = [2, 2, 0, 0, 2, 0, 2, 2, 0, 2, 2, 0];

    #[test]
    fn removing_a_backend_moves_its_flows_and_under_one_percent_of_the_others() {
        // Measured, for the worst of three removals: with the default size
        // 0.5% of the other flows move at 10 backends, 0.7% at 20, 1.2% at
        // 50 and 1.4% at 100; 100 backends need 32,771 entries (0.9%) or
        // 65,537 (0.6%) to stay under 1%.
        let flows = flows(100_000);
        for (count, size) in [
            (2, DEFAULT_TABLE_SIZE),
            (10, DEFAULT_TABLE_SIZE),
            (100, 65_537),
        ] {
            let names = backends(count);
            let before = owners(&names, &table(&names, size).unwrap());
            for removed in [0, count / 2, count - 1] {
                let mut remaining = names.clone();
                let gone = remaining.remove(removed);
                let after = owners(&remaining, &table(&remaining, size).unwrap());
                let mut others = 0u32;
                let mut others_moved = 0u32;
                for hash in &flows {
                    let position = (*hash % size) as usize;
                    if before[position] == gone {
                        assert_ne!(after[position], gone);
                        continue;
                    }
                    others += 1;
                    if after[position] != before[position] {
                        others_moved += 1;
                    }
                }
                let moved = f64::from(others_moved) / f64::from(others);
                assert!(
                    moved <= 0.01,
                    "{count} backends, {gone} removed: {:.3}% of the other flows moved",
                    moved * 100.0
                );
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_only_what_it_takes_plus_under_one_percent() {
        let flows = flows(100_000);
        let names = backends(11);
        let before = owners(
            &names[..10],
            &table(&names[..10], DEFAULT_TABLE_SIZE).unwrap(),
        );
        let after = owners(&names, &table(&names, DEFAULT_TABLE_SIZE).unwrap());
        let added = &names[10];
        let mut moved_elsewhere = 0u32;
        for hash in &flows {
            let position = (*hash % DEFAULT_TABLE_SIZE) as usize;
            if after[position] != before[position] && after[position] != *added {
                moved_elsewhere += 1;
            }
        }
        assert!(
            f64::from(moved_elsewhere) / 100_000.0 <= 0.01,
            "{moved_elsewhere} flows moved between backends that stayed"
        );
    }

    #[test]
    fn flows_spread_over_the_backends_evenly() {
        let names = backends(10);
        let table = table(&names, DEFAULT_TABLE_SIZE).unwrap();
        let mut per_backend = vec![0u32; names.len()];
        for hash in flows(100_000) {
            per_backend[table[(hash % DEFAULT_TABLE_SIZE) as usize] as usize] += 1;
        }
        // 10,000 each if the flow hash were perfect; a binomial's spread is
        // about 1% here, so 5% means the hash or the table is skewed.
        for (backend, flows) in per_backend.iter().enumerate() {
            assert!(
                (9_500..=10_500).contains(flows),
                "{}: {flows} of 100,000 flows",
                names[backend]
            );
        }
    }

    #[test]
    fn sizes_that_break_the_guarantees_are_refused() {
        let names = backends(3);
        assert_eq!(table(&names, 1_000), Err(MaglevError::SizeNotPrime(1_000)));
        assert_eq!(table(&names, 1), Err(MaglevError::SizeNotPrime(1)));
        assert_eq!(
            table(&names, 293),
            Err(MaglevError::TooManyBackends {
                size: 293,
                backends: 3
            })
        );
        assert_eq!(table(&names, 307).map(|t| t.len()), Ok(307));
        assert_eq!(table::<String>(&[], 307), Ok(Vec::new()));
    }

    #[test]
    fn primes_are_told_apart() {
        let primes: Vec<u32> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(65_537));
        assert!(!is_prime(65_535));
    }
}

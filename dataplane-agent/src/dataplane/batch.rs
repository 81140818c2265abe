//! Whole-map reads and writes in a few syscalls instead of two per entry:
//! `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_UPDATE_BATCH` (kernel >= 5.6 for
//! hash, LRU hash and array maps). aya 0.14 does not expose the batch
//! commands, hence the raw `bpf(2)` here. Where the kernel or the map type
//! has no batch ops the error says so ([`BatchError::needs_fallback`]) and
//! the caller walks the map entry by entry as before.
//!
//! Semantics: <https://docs.kernel.org/userspace-api/ebpf/syscall.html>
//! (`BPF_MAP_LOOKUP_BATCH`), the kernel's `include/uapi/linux/bpf.h`, and
//! its implementations `__htab_map_lookup_and_delete_batch` (hash maps)
//! and `generic_map_lookup_batch`/`generic_map_update_batch` (arrays, and
//! updates of every map type).

use std::{
    fmt, io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::{
    Pod,
    maps::{MapData, MapError, MapInfo, MapType},
};

/// `bpf(2)` commands from `enum bpf_cmd` (uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The kernel-internal `ENOTSUPP` (not in libc): what `bpf_map_do_batch`
/// returns for a map type without the batch op.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr`, the attribute of every
/// `BPF_MAP_*_BATCH` command. Its fields are all naturally aligned, so it
/// has no implicit padding and every byte the kernel reads is initialized.
/// We pass its own size: the kernel zero-extends an attribute shorter than
/// its `union bpf_attr` (and only checks that the tail of a *longer* one
/// is zero), so the fields after `flags` read as zero.
#[repr(C)]
#[derive(Debug, Default)]
struct BatchAttr {
    /// Where the walk resumes (the previous call's `out_batch`); 0 (NULL)
    /// starts at the beginning.
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: how many entries `keys`/`values` have room for (or hold).
    /// Out: how many were processed, also when the call fails with an
    /// error other than `EFAULT`.
    count: u32,
    map_fd: u32,
    /// Per-element flags; the kernel accepts only 0 or `BPF_F_LOCK` here.
    elem_flags: u64,
    /// Must be 0 for the hash maps' batch ops.
    flags: u64,
}
const _: () = assert!(size_of::<BatchAttr>() == 56);

/// The batch commands, for error messages and the syscall number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchCommand {
    Lookup,
    Update,
}

impl BatchCommand {
    const fn code(self) -> libc::c_long {
        match self {
            Self::Lookup => BPF_MAP_LOOKUP_BATCH,
            Self::Update => BPF_MAP_UPDATE_BATCH,
        }
    }
}

impl fmt::Display for BatchCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Lookup => "BPF_MAP_LOOKUP_BATCH",
            Self::Update => "BPF_MAP_UPDATE_BATCH",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The kernel has no such command (< 5.6: `EINVAL`) or the map type no
    /// batch op (`ENOTSUPP`).
    #[error(
        "{command} is not supported here (kernel < 5.6 or map type without batch ops): {source}"
    )]
    Unsupported {
        command: BatchCommand,
        #[source]
        source: io::Error,
    },
    /// Per-CPU (and other) maps lay their values out differently in a batch;
    /// this module only handles one value per entry.
    #[error("{command} is not implemented here for {map_type:?} maps")]
    UnsupportedMapType {
        command: BatchCommand,
        map_type: MapType,
    },
    /// The caller's key/value types do not match the map: the kernel would
    /// copy entries with the map's sizes into buffers laid out for the types.
    #[error(
        "{command}: the map has {key_size}-byte keys and {value_size}-byte values, the caller's types are {type_key_size} and {type_value_size} bytes"
    )]
    LayoutMismatch {
        command: BatchCommand,
        key_size: u32,
        value_size: u32,
        type_key_size: usize,
        type_value_size: usize,
    },
    #[error("{command}: reading the map's info: {source}")]
    MapInfo {
        command: BatchCommand,
        #[source]
        source: MapError,
    },
    /// The command failed after `processed` entries: for an update, the
    /// entries `entries[..processed]` are in the map (a full hash map
    /// fails with `E2BIG`).
    #[error("{command} failed after {processed} entries: {source}")]
    Failed {
        command: BatchCommand,
        processed: usize,
        #[source]
        source: io::Error,
    },
}

impl BatchError {
    /// Whether the caller should do the same work with per-entry calls.
    pub fn needs_fallback(&self) -> bool {
        matches!(
            self,
            Self::Unsupported { .. } | Self::UnsupportedMapType { .. }
        )
    }

    /// The errno the kernel returned, if the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Unsupported { source, .. } | Self::Failed { source, .. } => source.raw_os_error(),
            Self::UnsupportedMapType { .. }
            | Self::LayoutMismatch { .. }
            | Self::MapInfo { .. } => None,
        }
    }

    /// An error of `command` after `processed` entries: "unsupported" when
    /// the kernel refused the very first call outright with one of the
    /// errnos that mean "no such command or op" (a later `EINVAL` is a real
    /// failure).
    fn from_errno(command: BatchCommand, processed: usize, first_call: bool, errno: i32) -> Self {
        let source = io::Error::from_raw_os_error(errno);
        if first_call && processed == 0 && is_unsupported_errno(errno) {
            Self::Unsupported { command, source }
        } else {
            Self::Failed {
                command,
                processed,
                source,
            }
        }
    }
}

fn is_unsupported_errno(errno: i32) -> bool {
    matches!(errno, libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
}

/// Whether [`lookup_all`] and [`update_all`] work on this map, so callers
/// can pick the batched or the per-entry path once. Probes with a
/// zero-count lookup, which the kernel answers without touching any buffer.
pub fn supported(map_fd: BorrowedFd<'_>) -> bool {
    let Ok(info) = map_info(BatchCommand::Lookup, map_fd) else {
        return false;
    };
    has_flat_layout(&info) && probe(map_fd).is_ok()
}

/// Every entry of the map, `chunk` entries per syscall (grown when one
/// hash bucket holds more). An entry present for the whole walk is
/// returned once: a hash map is walked bucket by bucket, so unlike a
/// `get_next_key` walk a concurrent delete never restarts it from the
/// first key. Entries added or removed meanwhile may or may not be seen,
/// and a value a BPF program writes in place may be copied mid-write, as
/// with a per-entry lookup.
pub fn lookup_all<K: Pod, V: Pod>(
    map_fd: BorrowedFd<'_>,
    chunk: u32,
) -> Result<Vec<(K, V)>, BatchError> {
    const COMMAND: BatchCommand = BatchCommand::Lookup;
    check_layout::<K, V>(COMMAND, map_fd)?;
    let mut chunk = chunk.max(1);
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // Where the walk resumes. Hash maps keep a bucket index in the first 4
    // bytes; the generic implementation (arrays) the last key. bpf.h: "must
    // point to memory large enough to hold a key, except for maps of type
    // BPF_MAP_TYPE_{HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH}, for which
    // batch parameters must be at least 4 bytes wide regardless of key
    // size". u64 words keep it aligned for either.
    let mut token = vec![0u64; size_of::<K>().max(size_of::<u32>()).div_ceil(8)];
    let token_addr = token.as_mut_ptr() as u64;
    let mut started = false;
    let mut first_call = true;
    loop {
        keys.reserve(chunk as usize);
        values.reserve(chunk as usize);
        let mut attr = BatchAttr {
            // The kernel reads `in_batch` before it writes `out_batch`, so
            // one buffer serves as both.
            in_batch: if started { token_addr } else { 0 },
            out_batch: token_addr,
            keys: keys.spare_capacity_mut().as_mut_ptr() as u64,
            values: values.spare_capacity_mut().as_mut_ptr() as u64,
            count: chunk,
            map_fd: raw_fd(map_fd),
            ..BatchAttr::default()
        };
        // SAFETY: `keys` and `values` have spare room for `chunk` entries,
        // and check_layout ensured the map's key and value sizes are
        // `size_of::<K>()` and `size_of::<V>()` with one value per entry
        // (a map's sizes never change, and the borrow keeps `map_fd`
        // naming that map), so the kernel writes at most `chunk` elements
        // into each; `token` has room for the batch position as bpf.h
        // sizes it (above).
        let result = unsafe { bpf_batch(COMMAND, &mut attr) };
        // After EFAULT `count` is not to be trusted (bpf.h).
        let copied = if result == Err(libc::EFAULT) {
            0
        } else {
            attr.count
        };
        // A success copies at least one entry (else the walk would spin).
        if copied > chunk || (result.is_ok() && copied == 0) {
            return Err(BatchError::Failed {
                command: COMMAND,
                processed: keys.len(),
                source: io::Error::other(format!(
                    "the kernel reported {copied} entries for a chunk of {chunk}"
                )),
            });
        }
        let (keys_len, values_len) = (keys.len(), values.len());
        // SAFETY: the kernel initialized the first `copied` (at most
        // `chunk`, checked above) elements of the spare room with whole
        // keys/values, and any bytes are a valid K or V (`Pod`).
        unsafe {
            keys.set_len(keys_len + copied as usize);
            values.set_len(values_len + copied as usize);
        }
        match result {
            Ok(()) => started = true,
            // ENOENT ends the walk, with the entries of this last call
            // still counted in `count` (bpf.h).
            Err(libc::ENOENT) => break,
            // The next hash bucket alone holds more than `chunk` entries,
            // and nothing was copied: ask again with more room, from the
            // same position.
            Err(libc::ENOSPC) if copied == 0 => {
                chunk = chunk.checked_mul(2).ok_or_else(|| BatchError::Failed {
                    command: COMMAND,
                    processed: keys.len(),
                    source: io::Error::from_raw_os_error(libc::ENOSPC),
                })?;
            }
            Err(errno) => {
                return Err(BatchError::from_errno(
                    COMMAND,
                    keys.len(),
                    first_call,
                    errno,
                ));
            }
        }
        first_call = false;
    }
    Ok(keys.into_iter().zip(values).collect())
}

/// Writes `entries` (insert or replace, as `BPF_ANY`), `chunk` per
/// syscall, in order. On failure `entries[..processed]` are written (see
/// [`BatchError::Failed`]).
pub fn update_all<K: Pod, V: Pod>(
    map_fd: BorrowedFd<'_>,
    entries: &[(K, V)],
    chunk: usize,
) -> Result<(), BatchError> {
    check_layout::<K, V>(BatchCommand::Update, map_fd)?;
    update_all_checked(map_fd, entries, chunk)
}

/// Whether [`update_all_checked`] may write `(K, V)` entries into this map:
/// checked once rather than before every small batch.
pub fn updates_supported<K: Pod, V: Pod>(map_fd: BorrowedFd<'_>) -> bool {
    supported(map_fd) && check_layout::<K, V>(BatchCommand::Update, map_fd).is_ok()
}

/// [`update_all`] for a map [`updates_supported`] accepted.
pub fn update_all_checked<K: Pod, V: Pod>(
    map_fd: BorrowedFd<'_>,
    entries: &[(K, V)],
    chunk: usize,
) -> Result<(), BatchError> {
    const COMMAND: BatchCommand = BatchCommand::Update;
    let chunk = chunk.clamp(1, u32::MAX as usize);
    // The kernel takes keys and values as two arrays.
    let mut keys: Vec<K> = Vec::with_capacity(chunk.min(entries.len()));
    let mut values: Vec<V> = Vec::with_capacity(chunk.min(entries.len()));
    let mut written = 0;
    for (index, part) in entries.chunks(chunk).enumerate() {
        keys.clear();
        values.clear();
        keys.extend(part.iter().map(|(key, _)| *key));
        values.extend(part.iter().map(|(_, value)| *value));
        // `chunk` is clamped to u32, so the fallback never applies.
        let count = u32::try_from(part.len()).unwrap_or(u32::MAX);
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count,
            map_fd: raw_fd(map_fd),
            // BPF_ANY: insert or replace. The batch has no per-call
            // NOEXIST/EXIST; `elem_flags` only takes BPF_F_LOCK.
            elem_flags: 0,
            flags: 0,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` and `values` hold `count` initialized elements,
        // and check_layout ensured the map's key and value sizes are
        // `size_of::<K>()` and `size_of::<V>()` (fixed for the map's life,
        // as in lookup_all), so the kernel reads within them. It writes
        // back only `attr.count`.
        match unsafe { bpf_batch(COMMAND, &mut attr) } {
            Ok(()) => written += part.len(),
            Err(errno) => {
                // After EFAULT `count` is not to be trusted (bpf.h): report
                // only the chunks known to be written.
                if errno != libc::EFAULT {
                    written += (attr.count as usize).min(part.len());
                }
                return Err(BatchError::from_errno(COMMAND, written, index == 0, errno));
            }
        }
    }
    Ok(())
}

/// The zero-count lookup [`supported`] probes with.
fn probe(map_fd: BorrowedFd<'_>) -> Result<(), i32> {
    let mut attr = BatchAttr {
        map_fd: raw_fd(map_fd),
        ..BatchAttr::default()
    };
    // SAFETY: with `count` 0 the kernel returns before it reads or writes
    // any buffer (all NULL here); it touches only `attr` itself.
    unsafe { bpf_batch(BatchCommand::Lookup, &mut attr) }
}

/// The checks that make the buffer sizes of the batch calls right.
fn check_layout<K: Pod, V: Pod>(
    command: BatchCommand,
    map_fd: BorrowedFd<'_>,
) -> Result<(), BatchError> {
    let info = map_info(command, map_fd)?;
    if !has_flat_layout(&info) {
        let map_type = info
            .map_type()
            .map_err(|source| BatchError::MapInfo { command, source })?;
        return Err(BatchError::UnsupportedMapType { command, map_type });
    }
    if info.key_size() as usize != size_of::<K>() || info.value_size() as usize != size_of::<V>() {
        return Err(BatchError::LayoutMismatch {
            command,
            key_size: info.key_size(),
            value_size: info.value_size(),
            type_key_size: size_of::<K>(),
            type_value_size: size_of::<V>(),
        });
    }
    Ok(())
}

/// Map types whose batch buffers hold one `key_size` key and one
/// `value_size` value per entry (per-CPU maps hold a value per CPU,
/// rounded up to 8 bytes).
fn has_flat_layout(info: &MapInfo) -> bool {
    matches!(
        info.map_type(),
        Ok(MapType::Hash | MapType::LruHash | MapType::Array)
    )
}

/// aya reads the info of a map it owns; a duplicate of the caller's
/// descriptor is the public way there.
fn map_info(command: BatchCommand, map_fd: BorrowedFd<'_>) -> Result<MapInfo, BatchError> {
    let owned = map_fd
        .try_clone_to_owned()
        .map_err(|error| BatchError::MapInfo {
            command,
            source: MapError::IoError(error),
        })?;
    MapData::from_fd(owned)
        .and_then(|map| map.info())
        .map_err(|source| BatchError::MapInfo { command, source })
}

fn raw_fd(map_fd: BorrowedFd<'_>) -> u32 {
    // A BorrowedFd is never negative.
    map_fd.as_raw_fd().unsigned_abs()
}

/// Runs one batch command; the errno on failure. `attr.count` is updated
/// by the kernel either way.
///
/// # Safety
///
/// `attr.keys`, `attr.values`, `attr.in_batch` and `attr.out_batch` must
/// be NULL or point to memory the kernel may read or write for `command`
/// with `attr.count` entries of the map's sizes, and stay valid for the
/// call.
unsafe fn bpf_batch(command: BatchCommand, attr: &mut BatchAttr) -> Result<(), i32> {
    // SAFETY: `attr` is a live, writable `BatchAttr` of the size passed;
    // the memory its pointers name is the caller's to vouch for (above).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command.code(),
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Real maps in the running kernel: needs CAP_BPF (root, as `cargo
    //! xtask test` runs) and kernel >= 5.6 (batch ops on hash, LRU hash
    //! and array maps).

    use std::{
        collections::HashMap as StdHashMap,
        os::fd::{AsFd as _, FromRawFd as _, OwnedFd},
        time::{Duration, Instant},
    };

    use aya::maps::{Array, HashMap, IterableMap, Map, PerCpuHashMap};
    use dataplane_common::{CT_FORWARD, CtKey, CtValue, IPPROTO_TCP};

    use super::*;

    const FLOWS: u32 = 100_000;
    /// The agent's hash maps are created with BPF_F_NO_PREALLOC.
    const NO_PREALLOC: u32 = 1;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    const BPF_MAP_TYPE_QUEUE: u32 = 22;

    /// A distinct conntrack entry per `n` (n < 2^24): client
    /// 10.x.y.z:port -> 10.96.0.10:80, translated to a backend.
    fn flow(n: u32) -> (CtKey, CtValue) {
        let key = CtKey {
            src_be: (0x0a00_0000 | n).to_be(),
            dst_be: 0x0a60_000a_u32.to_be(),
            src_port_be: (32_768 + (n % 28_000) as u16).to_be(),
            dst_port_be: 80_u16.to_be(),
            protocol: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let value = CtValue {
            nat_ip_be: (0x0af4_0000 | (n % 4096)).to_be(),
            snat_ip_be: 0,
            tunnel_ip_be: 0,
            nat_port_be: 8080_u16.to_be(),
            snat_port_be: 0,
            kind: CT_FORWARD,
            flags: 0,
            _pad: 0,
            service_id: n % 1000,
            last_seen_ns: u64::from(n) * 1_000,
        };
        (key, value)
    }

    fn flows(count: u32) -> Vec<(CtKey, CtValue)> {
        (0..count).map(flow).collect()
    }

    fn fd_of<K: Pod, V>(map: &impl IterableMap<K, V>) -> BorrowedFd<'_> {
        map.map().fd().as_fd()
    }

    fn hash_map(max_entries: u32, flags: u32) -> HashMap<MapData, CtKey, CtValue> {
        HashMap::create(max_entries, flags).expect("creating a hash map (needs CAP_BPF)")
    }

    /// aya 0.14 creates standalone hash maps but not LRU ones.
    fn lru_map(max_entries: u32) -> HashMap<MapData, CtKey, CtValue> {
        let fd = create_map(
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            max_entries,
        );
        let map = Map::from_map_data(MapData::from_fd(fd).unwrap()).unwrap();
        HashMap::try_from(map).unwrap()
    }

    fn create_map(map_type: u32, key_size: usize, value_size: usize, max_entries: u32) -> OwnedFd {
        /// The head of `union bpf_attr` for BPF_MAP_CREATE; the kernel
        /// zero-extends the rest.
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let attr = CreateAttr {
            map_type,
            key_size: key_size.try_into().unwrap(),
            value_size: value_size.try_into().unwrap(),
            max_entries,
            map_flags: 0,
        };
        const BPF_MAP_CREATE: libc::c_long = 0;
        // SAFETY: `attr` is a live, fully initialized attribute of the size
        // passed, which the kernel only reads.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                std::ptr::from_ref(&attr),
                size_of::<CreateAttr>(),
            )
        };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: the kernel just returned this descriptor; nothing else
        // owns it.
        unsafe { OwnedFd::from_raw_fd(fd.try_into().unwrap()) }
    }

    fn as_table(entries: Vec<(CtKey, CtValue)>) -> StdHashMap<CtKey, CtValue> {
        let count = entries.len();
        let table: StdHashMap<_, _> = entries.into_iter().collect();
        assert_eq!(table.len(), count, "a key was returned twice");
        table
    }

    fn assert_round_trips(map: &HashMap<MapData, CtKey, CtValue>) {
        let written = flows(FLOWS);
        update_all(fd_of(map), &written, 4096).unwrap();
        let read = lookup_all::<CtKey, CtValue>(fd_of(map), 4096).unwrap();
        assert_eq!(as_table(read), as_table(written));
    }

    #[test]
    fn hash_map_of_100k_flows_round_trips_in_chunks() {
        assert_round_trips(&hash_map(131_072, NO_PREALLOC));
    }

    #[test]
    fn lru_conntrack_map_of_100k_flows_round_trips_in_chunks() {
        // Room to spare: an LRU map may evict before it is quite full.
        assert_round_trips(&lru_map(262_144));
    }

    #[test]
    fn empty_map_reads_as_empty() {
        for map in [hash_map(1024, NO_PREALLOC), lru_map(1024)] {
            assert_eq!(lookup_all::<CtKey, CtValue>(fd_of(&map), 64).unwrap(), []);
        }
    }

    #[test]
    fn a_bucket_larger_than_the_chunk_grows_the_chunk() {
        // 1000 keys in 1024 buckets: many buckets hold two or more, so a
        // chunk of one meets ENOSPC.
        let map = hash_map(1024, NO_PREALLOC);
        let written = flows(1000);
        update_all(fd_of(&map), &written, 1).unwrap();
        let read = lookup_all::<CtKey, CtValue>(fd_of(&map), 1).unwrap();
        assert_eq!(as_table(read), as_table(written));
    }

    #[test]
    fn update_into_a_full_hash_map_reports_how_many_were_written() {
        for flags in [0, NO_PREALLOC] {
            let map = hash_map(1000, flags);
            let entries = flows(1500);
            let error = update_all(fd_of(&map), &entries, 256).unwrap_err();
            assert!(
                matches!(
                    error,
                    BatchError::Failed {
                        command: BatchCommand::Update,
                        processed: 1000,
                        ..
                    }
                ),
                "flags {flags}: {error}"
            );
            assert_eq!(error.errno(), Some(libc::E2BIG), "flags {flags}: {error}");
            assert!(!error.needs_fallback());
            let read = lookup_all::<CtKey, CtValue>(fd_of(&map), 256).unwrap();
            assert_eq!(as_table(read), as_table(entries[..1000].to_vec()));
        }
    }

    #[test]
    fn full_lru_map_evicts_instead_of_failing() {
        let map = lru_map(1024);
        let entries = flows(4096);
        update_all(fd_of(&map), &entries, 512).unwrap();
        let read = lookup_all::<CtKey, CtValue>(fd_of(&map), 256).unwrap();
        assert!(
            !read.is_empty() && read.len() <= 1024,
            "{} entries",
            read.len()
        );
        let written = as_table(entries);
        for (key, value) in read {
            assert_eq!(written.get(&key), Some(&value));
        }
    }

    #[test]
    fn array_map_reads_every_slot_and_refuses_writes_past_its_end() {
        // Arrays go through the kernel's generic batch code, whose batch
        // position is a whole key.
        let map = Array::<MapData, CtValue>::create(64, 0).unwrap();
        let slots: Vec<(u32, CtValue)> = (0..64).map(|slot| (slot, flow(slot).1)).collect();
        update_all(fd_of(&map), &slots, 10).unwrap();
        assert_eq!(lookup_all::<u32, CtValue>(fd_of(&map), 10).unwrap(), slots);

        let past_end: Vec<(u32, CtValue)> = (60..70).map(|slot| (slot, flow(slot).1)).collect();
        let error = update_all(fd_of(&map), &past_end, 3).unwrap_err();
        assert!(
            matches!(error, BatchError::Failed { processed: 4, .. }),
            "{error}"
        );
        assert_eq!(error.errno(), Some(libc::E2BIG), "{error}");
    }

    #[test]
    fn maps_the_module_cannot_lay_out_are_refused_before_the_kernel_is_asked() {
        let per_cpu = PerCpuHashMap::<MapData, CtKey, CtValue>::create(16, 0).unwrap();
        let error = lookup_all::<CtKey, CtValue>(fd_of(&per_cpu), 16).unwrap_err();
        assert!(
            matches!(error, BatchError::UnsupportedMapType { .. }),
            "{error}"
        );
        assert!(error.needs_fallback());
        assert!(!supported(fd_of(&per_cpu)));

        let map = hash_map(16, NO_PREALLOC);
        let error = lookup_all::<u32, CtValue>(fd_of(&map), 16).unwrap_err();
        assert!(
            matches!(error, BatchError::LayoutMismatch { .. }),
            "{error}"
        );
        let error = update_all::<CtKey, u64>(fd_of(&map), &[(flow(0).0, 0)], 16).unwrap_err();
        assert!(
            matches!(error, BatchError::LayoutMismatch { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_map_type_without_batch_ops_is_unsupported() {
        let queue = create_map(BPF_MAP_TYPE_QUEUE, 0, size_of::<u32>(), 16);
        assert_eq!(probe(queue.as_fd()), Err(ENOTSUPP));
        assert!(!supported(queue.as_fd()));
        assert!(BatchError::from_errno(BatchCommand::Lookup, 0, true, ENOTSUPP).needs_fallback());

        assert!(supported(fd_of(&hash_map(16, NO_PREALLOC))));
        assert!(supported(fd_of(&lru_map(16))));
        assert!(supported(fd_of(
            &Array::<MapData, CtValue>::create(16, 0).unwrap()
        )));
    }

    /// Not a pass/fail test: prints what batching saves on a conntrack-sized
    /// read (`cargo test ... per_entry_and_batched -- --nocapture`).
    #[test]
    fn per_entry_and_batched_reads_of_100k_flows_compared() {
        fn timed<T>(work: impl FnOnce() -> T) -> (T, Duration) {
            let start = Instant::now();
            let result = work();
            (result, start.elapsed())
        }
        let entries = flows(FLOWS);

        let mut per_entry_map = hash_map(131_072, NO_PREALLOC);
        let ((), insert) = timed(|| {
            for (key, value) in &entries {
                per_entry_map.insert(key, value, 0).unwrap();
            }
        });
        let batched_map = hash_map(131_072, NO_PREALLOC);
        let ((), update) = timed(|| update_all(fd_of(&batched_map), &entries, 4096).unwrap());

        let (iterated, iter) =
            timed(|| per_entry_map.iter().collect::<Result<Vec<_>, _>>().unwrap());
        let (looked_up, lookup) =
            timed(|| lookup_all::<CtKey, CtValue>(fd_of(&per_entry_map), 4096).unwrap());
        assert_eq!(iterated.len(), looked_up.len());

        let gain = |slow: Duration, fast: Duration| slow.as_secs_f64() / fast.as_secs_f64();
        println!(
            "batch: read {FLOWS} flows: per-entry (aya iter) {iter:?}, lookup_all/4096 {lookup:?} ({:.1}x)",
            gain(iter, lookup)
        );
        println!(
            "batch: write {FLOWS} flows: per-entry (aya insert) {insert:?}, update_all/4096 {update:?} ({:.1}x)",
            gain(insert, update)
        );
    }
}

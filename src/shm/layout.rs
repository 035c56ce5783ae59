//! The layout of a shared heap's file: a header, two chunk bitmaps and the arena table in
//! the first chunks ("meta"), then the chunks the arenas carve.
//!
//! ```text
//! 0            header (ShmHeader), then the bitmaps `used` and `heads`, one bit per chunk
//! arenas_off   narenas x Arena (each 128-byte aligned)
//! meta         chunk 0 ... chunk nchunks-1        (meta is a multiple of CHUNK)
//! ```
//!
//! Every offset is relative to the start of the file, which every process maps
//! `CHUNK`-aligned, so a chunk's header is found by masking an address in any process.
//! Nothing here holds an absolute address except `fixed_addr`, the address all processes map
//! a fixed-address heap at.

use core::sync::atomic::{AtomicU32, AtomicU64};

use super::source::ShmSource;
use crate::arena::Arena;
use crate::chunk::{ChunkHeader, PageDesc};
use crate::front::HugeCounters;
use crate::lock::RobustLock;
use crate::size_class::{CHUNK, PAGE};

/// "chshheap" in ASCII. The first 16 bytes (magic, version) keep this layout in every
/// version, so that any version can tell a heap of another version.
pub const SHM_MAGIC: u64 = u64::from_le_bytes(*b"chshheap");
/// The format version; a heap of another version is refused, not converted. 5: size
/// classes finer than powers of two, huge spans marked busy in transit, huge counters in
/// the header. 6: size classes up to 256 KiB (52 bins per arena). 7: a dirty bit per page
/// in chunk headers, free runs merged whatever their state.
pub const SHM_VERSION: u32 = 7;

/// An arena as a shared heap's file holds it: locked with the robust lock its page source
/// chooses.
pub type ShmArena = Arena<ShmSource>;

/// A fingerprint of everything that shapes a shared heap's file here: sizes and field
/// offsets of the arena and of what it holds ([`Arena::LAYOUT`]; the types are not
/// `repr(C)`, so two builds may order fields differently), of the page descriptors, chunk
/// headers and the lock, the link encoding, and the geometry: page, chunk and header sizes,
/// the small and large limits, every class's block size and run length, and the class
/// table (a run's class number means nothing to a build with other classes, such as one
/// with `pow2-classes`). A heap written by a build with another fingerprint is refused.
pub const LAYOUT_HASH: u64 = {
    use crate::size_class::{
        class_size, run_pages, CLASS_TABLE, LARGE_MAX, NUM_CLASSES, SMALL_MAX, SMALL_MIN,
    };
    use core::mem::size_of;
    const fn mix(h: u64, part: usize) -> u64 {
        (h ^ part as u64).wrapping_mul(0x0100_0000_01b3)
    }
    let arena = ShmArena::LAYOUT;
    let rest = [
        size_of::<PageDesc>(),
        size_of::<ChunkHeader>(),
        size_of::<RobustLock>(),
        cfg!(feature = "unhardened") as usize,
        PAGE,
        CHUNK,
        crate::chunk::HEADER_PAGES,
        SMALL_MIN,
        SMALL_MAX,
        crate::size_class::TABLE_MAX,
        LARGE_MAX,
        crate::arena::LARGE_ALIGN_MAX,
        NUM_CLASSES,
    ];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < arena.len() {
        h = mix(h, arena[i]);
        i += 1;
    }
    i = 0;
    while i < rest.len() {
        h = mix(h, rest[i]);
        i += 1;
    }
    i = 0;
    while i < NUM_CLASSES {
        h = mix(mix(h, class_size(i)), run_pages(i));
        i += 1;
    }
    i = 0;
    while i < CLASS_TABLE.len() {
        h = mix(h, CLASS_TABLE[i] as usize);
        i += 1;
    }
    h
};

/// `state`: 0 while the file is being created (the header may be incomplete); then
/// created; the creator's `init` is running.
pub const STATE_INIT: u32 = 1;
/// `state`: ready for every process.
pub const STATE_READY: u32 = 2;

/// `flags`: every process maps the heap at `fixed_addr`.
pub const FLAG_FIXED: u32 = 1;

/// Largest heap: 2^40 bytes (the bitmaps then take 2 x 32 KiB).
pub const MAX_SIZE: u64 = 1 << 40;
/// Largest arena table.
pub const MAX_ARENAS: u32 = 4096;

/// The header at offset 0 of a shared heap.
///
/// Invariants once `state == STATE_READY`: `magic`, `version` and every field up to `mark`
/// are fixed; `meta + nchunks * CHUNK == size`, the file is `size` bytes long; the bitmaps
/// and the arena table lie inside `[0, meta)`; `chunk_lock` guards the bitmaps' writes.
#[repr(C)]
pub struct ShmHeader {
    pub magic: u64,
    pub version: u32,
    pub state: AtomicU32,
    /// Layout fingerprint: a build with other constants or another `Arena` cannot share.
    pub chunk: u64,
    pub page: u64,
    pub arena_size: u64,
    /// [`LAYOUT_HASH`]: field offsets of the structures in the file, and the link
    /// encoding (`unhardened`).
    pub layout: u64,
    pub size: u64,
    pub meta: u64,
    pub nchunks: u64,
    pub narenas: u32,
    pub flags: u32,
    pub fixed_addr: u64,
    /// Process id of the creator (to notice that it died before the heap was ready).
    pub creator: AtomicU32,
    pub _pad: u32,
    /// The double-free mark written into freed blocks (random, odd), shared by all
    /// processes.
    pub mark: u64,
    pub used_off: u64,
    pub heads_off: u64,
    pub arenas_off: u64,
    /// The root: an offset (0 = null) that every process can read and set.
    pub root: AtomicU64,
    /// `COREHEAP_SHM`: the process that publishes through this heap (0: none yet).
    pub publisher: AtomicU32,
    pub _pad2: u32,
    /// Counters of huge blocks (spans of whole chunks).
    pub huge: HugeCounters,
    /// Guards the bitmaps' writes (chunk allocation); taken under an arena lock, never the
    /// other way round.
    pub chunk_lock: RobustLock,
}

/// Where everything of a heap of `size` bytes with `narenas` arenas goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub size: u64,
    pub meta: u64,
    pub nchunks: u64,
    pub used_off: u64,
    pub heads_off: u64,
    pub arenas_off: u64,
}

impl Plan {
    /// The layout for `size` bytes (rounded down to whole chunks) and `narenas` arenas, or
    /// `None` if no chunk would be left for the arenas.
    pub fn new(size: u64, narenas: u32) -> Option<Plan> {
        let size = size.min(MAX_SIZE) & !(CHUNK as u64 - 1);
        let total_chunks = size / CHUNK as u64;
        let words = total_chunks.div_ceil(64);
        let used_off = (core::mem::size_of::<ShmHeader>() as u64).next_multiple_of(64);
        let heads_off = used_off + words * 8;
        let arenas_off = (heads_off + words * 8).next_multiple_of(PAGE as u64);
        let arena_bytes = core::mem::size_of::<ShmArena>() as u64 * narenas as u64;
        let meta = (arenas_off + arena_bytes).next_multiple_of(CHUNK as u64);
        if meta >= size {
            return None;
        }
        Some(Plan {
            size,
            meta,
            nchunks: (size - meta) / CHUNK as u64,
            used_off,
            heads_off,
            arenas_off,
        })
    }
}

const _: () = assert!(core::mem::align_of::<ShmArena>() <= PAGE);
const _: () = assert!(core::mem::size_of::<ShmHeader>() <= PAGE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_fit_and_round() {
        let p = Plan::new(64 << 20, 2).unwrap();
        assert_eq!(p.meta, CHUNK as u64);
        assert_eq!(p.meta + p.nchunks * CHUNK as u64, p.size);
        assert!(p.arenas_off + 2 * core::mem::size_of::<ShmArena>() as u64 <= p.meta);
        // Too small: the meta chunk alone.
        assert!(Plan::new(CHUNK as u64, 2).is_none());
        // Not a multiple of CHUNK: rounded down.
        assert_eq!(Plan::new((16 << 20) + 5, 1).unwrap().size, 16 << 20);
        // Many arenas take more meta chunks.
        let big = Plan::new(1 << 30, 1024).unwrap();
        assert!(big.meta > CHUNK as u64);
    }
}

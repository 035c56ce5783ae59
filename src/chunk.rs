//! Chunks and their headers: how any pointer coreheap returned finds, in O(1), the header of
//! its page run.
//!
//! Every block coreheap hands out lies in a [`CHUNK`]-aligned region whose first bytes are a
//! [`ChunkHeader`]. The header of the block at `p` is at `(p - 1) & !(CHUNK - 1)`: blocks in an
//! arena chunk start after the header pages, and a huge mapping puts its header in the chunk
//! just below the block (see `heap.rs`). Subtracting one byte lets a huge block aligned to a
//! whole chunk keep its header in the chunk before it.
//!
//! An arena chunk has one [`PageDesc`] per page. Invariants (checked by
//! `Arena::check`):
//! - the header pages have kind [`Kind::Header`];
//! - the first page of every run has kind `Free`, `Small` or `Large` and `npages` its length;
//!   that of a small run has its `class` and `lead` 0;
//! - the last page of a free run of two or more pages has kind `FreeTail` and `lead` the
//!   distance back to the first page;
//! - every other page of a small run has kind `SmallInterior`, `lead` the distance back and
//!   the run's `class` (so a block's class is known from its own page), except, in a run of
//!   a class above 8 KiB, a page where no block starts (`size_class::run_page_marked`),
//!   which is `Interior`;
//! - every other page has kind `Interior`.
//!
//! So the left neighbour of a run is found from the page before it, the right neighbour from
//! the page after it, and an interior pointer into a large run is recognised as invalid.
//!
//! Nothing here stores an address. The links kept in headers, descriptors and free blocks
//! are [`Rel`]s, offsets from the page source's base (`PageSource::base`), so that a heap
//! in a file mapping reads the same through every process's view of it; encoded block links
//! ([`encode_link`]) hold offsets too. With the process heap's base of 0 an offset is the
//! address itself, and a stored word is what it would be without any of this.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::size_class::{CHUNK, CHUNK_PAGES, PAGE, PAGE_SHIFT};

/// "coreheap" in ASCII: marks a header written by this allocator.
pub const MAGIC: u64 = 0x7061_6568_6572_6f63;

/// What a chunk is: `kind`, a 32-bit tag in ASCII, unlikely in memory that is not a chunk
/// header, so that a check of a pointer coreheap handed out (`Heap::free_sized`) can test it
/// alone, without `magic` beside it.
pub const CHUNK_ARENA: u32 = u32::from_le_bytes(*b"aren");
pub const CHUNK_HUGE: u32 = u32::from_le_bytes(*b"huge");

/// What a page of an arena chunk is (see the module invariants).
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Interior = 0,
    Header = 1,
    Free = 2,
    FreeTail = 3,
    Small = 4,
    SmallInterior = 5,
    Large = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Kind {
        match v {
            1 => Kind::Header,
            2 => Kind::Free,
            3 => Kind::FreeTail,
            4 => Kind::Small,
            5 => Kind::SmallInterior,
            6 => Kind::Large,
            _ => Kind::Interior,
        }
    }
}

/// Address `a` (0 for null) as stored: relative to the page source's `base`. Null stays 0;
/// any other address lies above the base (the `PageSource` contract), so it is never 0.
/// Branch-free, and the identity when `base` is 0.
#[inline(always)]
pub fn to_rel(a: usize, base: usize) -> usize {
    a.wrapping_sub(base & ((a != 0) as usize).wrapping_neg())
}

/// The inverse of [`to_rel`]: the address (0 for null) of stored value `v`.
#[inline(always)]
pub fn from_rel(v: usize, base: usize) -> usize {
    v.wrapping_add(base & ((v != 0) as usize).wrapping_neg())
}

/// A pointer to a `T` as the engine stores it: relative to the page source's base
/// (`PageSource::base`), 0 for null. The base is per process and never stored with it, so
/// the same `Rel` means the same object in every process that maps the heap. All-zero
/// memory is a null `Rel`.
#[repr(transparent)]
pub struct Rel<T>(usize, PhantomData<*mut T>);

impl<T> Clone for Rel<T> {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Rel<T> {}

impl<T> PartialEq for Rel<T> {
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl<T> Eq for Rel<T> {}

impl<T> core::fmt::Debug for Rel<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Rel({:#x})", self.0)
    }
}

impl<T> Rel<T> {
    pub const NULL: Self = Self(0, PhantomData);

    /// `p` (a pointer of this process, or null) stored relative to `base`.
    #[inline(always)]
    pub fn new(p: *mut T, base: usize) -> Self {
        Self(to_rel(p as usize, base), PhantomData)
    }

    /// The pointer in this process, whose source's base is `base`.
    #[inline(always)]
    pub fn get(self, base: usize) -> *mut T {
        from_rel(self.0, base) as *mut T
    }

    #[inline(always)]
    pub fn is_null(self) -> bool {
        self.0 == 0
    }

    /// The stored value: the offset from the base (0 for null).
    #[inline(always)]
    pub fn bits(self) -> usize {
        self.0
    }
}

/// A free block on a list: the link, and a word that marks the block as freed.
///
/// On a run's free list, a pending stack and a CPU cache the link is stored encoded
/// ([`encode_link`]) with the secret key of the list's arena, so that a write into a freed
/// block (an overflow from its neighbour, a write after free) turns the link into noise that
/// the next reader rejects, never into an address of the writer's choosing.
#[repr(C)]
pub struct Block {
    /// The encoded link to the rest of the list: [`encode_link`] of a value relative to the
    /// page source's base (a [`to_rel`] address, or a packed head of one). Not a pointer.
    pub link: usize,
    pub mark: usize,
}

/// Encodes link value `v` to be stored in the block whose stored (base-relative, see
/// [`to_rel`]) address is `at`: its bytes reversed, then XORed with the arena's secret `key`
/// and with `at`. The XORs make the same value stored in two blocks look different, so a
/// guess learned from one block does not carry over; the byte swap puts the bits every
/// reader checks (an address's high bits, a packed count) in the low bytes, which an
/// overflow or a stray write reaches first. Both `v` and `at` are relative to the base, so
/// every process that maps the block decodes the same link; with base 0 (the process heap,
/// and the CPU caches' code in `cpucache/`, which uses absolute addresses) they are
/// addresses. With the `unhardened` feature (for measuring what this costs) links are
/// stored plain.
#[inline(always)]
pub fn encode_link(v: usize, at: usize, key: usize) -> usize {
    if cfg!(feature = "unhardened") {
        v
    } else {
        v.swap_bytes() ^ key ^ at
    }
}

/// The inverse of [`encode_link`].
#[inline(always)]
pub fn decode_link(stored: usize, at: usize, key: usize) -> usize {
    if cfg!(feature = "unhardened") {
        stored
    } else {
        (stored ^ key ^ at).swap_bytes()
    }
}

/// The descriptor of one page of an arena chunk. Only the descriptor of a run's first page
/// describes the run; see the module invariants for the others.
///
/// `kind_class` and `lead` are atomics because `free` reads them without the owner's lock
/// to validate a pointer; for a live block they cannot change until it is freed. They, like
/// all other fields, are written only under the owning arena's lock (or before the chunk is
/// published), so a read-modify-write of `kind_class` by its writer is never lost.
#[repr(C)]
pub struct PageDesc {
    /// The page's [`Kind`] in the high byte; small runs: the size class in the low byte. One
    /// word, so that a validator checks both with one load (and, the class being the low
    /// byte, with one XOR against the class it expects).
    kind_class: AtomicU16,
    /// Free runs: some page's dirty bit ([`ChunkHeader::dirty`]) is set. Small runs: the uncarved blocks
    /// (from `bump` on) are known to read zero.
    pub dirty: bool,
    /// Small runs: linked in its bin's list of runs with blocks to give.
    pub in_bin: bool,
    /// Run head: length in pages.
    pub npages: u32,
    /// Tails and the pages of small runs: distance in pages back to the head (0 on a small
    /// run's head).
    lead: AtomicU32,
    /// Small runs: blocks handed out and not yet returned (pending frees count as used).
    /// Invariant: `used + len(free) == bump <= capacity`. Free runs: how many of its pages
    /// are dirty ([`ChunkHeader::dirty`]).
    pub used: u32,
    /// Small runs: blocks carved so far; blocks at index `bump..capacity` were never used.
    pub bump: u32,
    /// Small runs: the run-local free list.
    pub free: Rel<Block>,
    /// Links: the bin's run list (small) or the arena's free list for this length (free).
    pub next: Rel<PageDesc>,
    pub prev: Rel<PageDesc>,
}

impl PageDesc {
    #[inline]
    pub fn kind(&self) -> Kind {
        Kind::from_u8((self.kind_class.load(Ordering::Relaxed) >> 8) as u8)
    }
    /// Release: a reader that sees the new kind with [`PageDesc::is_small_of`] sees the
    /// fields written before it.
    #[inline]
    pub fn set_kind(&self, k: Kind) {
        let v = self.kind_class.load(Ordering::Relaxed);
        self.kind_class
            .store((v & 0xff) | (k as u16) << 8, Ordering::Release)
    }
    /// Whether this page belongs to a small run of class `class` (as its first page or
    /// another): one load, for validating a block without the owner's lock.
    #[inline]
    pub fn is_small_of(&self, class: usize) -> bool {
        const _: () = assert!(Kind::Small as u16 | 1 == Kind::SmallInterior as u16);
        let want = (Kind::SmallInterior as u32) << 8 | class as u32;
        (self.kind_class.load(Ordering::Acquire) as u32 ^ want) & !(1 << 8) == 0
    }
    /// The class, if this page belongs to a small run (its first page or another).
    #[inline]
    pub fn small_class(&self) -> Option<usize> {
        let v = self.kind_class.load(Ordering::Acquire);
        ((v >> 8) as u8 | 1 == Kind::SmallInterior as u8).then_some((v & 0xff) as usize)
    }
    #[inline]
    pub fn class(&self) -> usize {
        (self.kind_class.load(Ordering::Relaxed) & 0xff) as usize
    }
    #[inline]
    pub fn set_class(&self, c: usize) {
        let v = self.kind_class.load(Ordering::Relaxed);
        self.kind_class
            .store((v & 0xff00) | c as u16, Ordering::Relaxed)
    }
    #[inline]
    pub fn lead(&self) -> usize {
        self.lead.load(Ordering::Relaxed) as usize
    }
    #[inline]
    pub fn set_lead(&self, l: usize) {
        self.lead.store(l as u32, Ordering::Relaxed)
    }
}

/// The header at the start of every chunk.
///
/// Invariant: `magic == MAGIC` for as long as the chunk is mapped and registered; `kind` and
/// `arena` never change while it is.
#[repr(C)]
pub struct ChunkHeader {
    pub magic: u64,
    pub kind: u32,
    /// Arena chunks: the owning arena's index.
    pub arena: u32,
    /// Huge: start and length of the whole mapping, and the block's address, relative to
    /// the source's base like every stored address (`to_rel`): plain addresses in the process
    /// heap, which maps huge blocks directly; offsets in a shared heap (spans of chunks).
    pub map_base: usize,
    pub map_len: usize,
    pub huge_ptr: usize,
    /// Huge: the size the caller asked for (statistics).
    pub huge_size: usize,
    /// Arena chunks: the arena's list of chunks.
    pub next: Rel<ChunkHeader>,
    pub prev: Rel<ChunkHeader>,
    /// Arena chunks: pages of this chunk in free runs.
    pub free_pages: usize,
    /// Arena chunks: bit `i` (of word `i / 64`) is set iff page `i` lies in a free run and
    /// may hold data or be resident (*dirty*); clear for every page in use and for free
    /// pages that read zero (purged, or never touched since the chunk was mapped). The page
    /// heap's (`large/`) to keep.
    pub dirty: [u64; CHUNK_PAGES / 64],
    pub pages: [PageDesc; CHUNK_PAGES],
}

/// Pages at the start of an arena chunk taken by its header.
pub const HEADER_PAGES: usize = core::mem::size_of::<ChunkHeader>().div_ceil(PAGE);
/// Pages of an arena chunk that runs can use.
pub const USABLE_PAGES: usize = CHUNK_PAGES - HEADER_PAGES;
const _: () = assert!(USABLE_PAGES * PAGE > crate::size_class::LARGE_MAX + 64 * 1024);

/// The chunk whose header describes the block at `p`.
#[inline]
pub fn chunk_of(p: *const u8) -> usize {
    (p as usize).wrapping_sub(1) & !(CHUNK - 1)
}

/// The index of the page holding `p` in its chunk.
#[inline]
pub fn page_index(p: *const u8) -> usize {
    ((p as usize) & (CHUNK - 1)) >> PAGE_SHIFT
}

impl ChunkHeader {
    /// The owning arena's index, read atomically: a shared heap's recovery may rewrite it
    /// (to `arena::ORPHAN`) while other processes look blocks up.
    #[inline]
    pub fn arena_index(&self) -> u32 {
        // SAFETY: `arena` is an aligned u32 that lives as long as `self`; all concurrent
        // writers use `set_arena_index`, also atomic.
        unsafe { (*(core::ptr::addr_of!(self.arena) as *const AtomicU32)).load(Ordering::Relaxed) }
    }

    /// The magic, read with Acquire (see [`ChunkHeader::set_magic`]).
    #[inline]
    pub fn magic(&self) -> u64 {
        // SAFETY: `magic` is an aligned u64 that lives as long as `self`.
        unsafe { (*(core::ptr::addr_of!(self.magic) as *const AtomicU64)).load(Ordering::Acquire) }
    }

    /// Writes the magic with Release: everything written into the header before is seen
    /// by a reader that sees the magic.
    pub fn set_magic(&self, m: u64) {
        // SAFETY: as in `magic`.
        unsafe {
            (*(core::ptr::addr_of!(self.magic) as *const AtomicU64)).store(m, Ordering::Release)
        }
    }

    /// Rewrites the owning arena's index (a shared heap's recovery).
    pub fn set_arena_index(&self, i: u32) {
        // SAFETY: as in `arena_index`.
        unsafe {
            (*(core::ptr::addr_of!(self.arena) as *const AtomicU32)).store(i, Ordering::Relaxed)
        }
    }

    /// The address of page `i` of this chunk.
    #[inline]
    pub fn page_addr(&self, i: usize) -> *mut u8 {
        (self as *const Self as usize + (i << PAGE_SHIFT)) as *mut u8
    }

    /// The index of descriptor `d`, which lies in this chunk's header.
    #[inline]
    pub fn desc_index(&self, d: *const PageDesc) -> usize {
        (d as usize - self.pages.as_ptr() as usize) / core::mem::size_of::<PageDesc>()
    }
}

/// The chunk header holding descriptor `d`.
#[inline]
pub fn header_of_desc(d: *const PageDesc) -> *mut ChunkHeader {
    ((d as usize) & !(CHUNK - 1)) as *mut ChunkHeader
}

/// The first page of the run described by `d`.
#[inline]
pub fn run_addr(d: *const PageDesc) -> *mut u8 {
    let h = header_of_desc(d);
    // SAFETY: `d` lies in the header of the mapped chunk `h`, which is therefore readable;
    // `desc_index` only computes with addresses.
    let i = unsafe { (*h).desc_index(d) };
    (h as usize + (i << PAGE_SHIFT)) as *mut u8
}

/// Writes the header of a fresh arena chunk: header pages, then one free run over the rest.
/// Returns the descriptor of that free run.
///
/// # Safety
/// `chunk` is a fresh, zeroed, writable, `CHUNK`-aligned region of `CHUNK` bytes that nothing
/// else uses.
pub unsafe fn init_arena_chunk(chunk: *mut u8, arena: u32) -> *mut PageDesc {
    let h = chunk.cast::<ChunkHeader>();
    // SAFETY: by the contract the region is ours and large enough for a header; zeroed memory
    // is a valid header (null links, zero counts, kind Interior).
    unsafe {
        (*h).kind = CHUNK_ARENA;
        (*h).arena = arena;
        (*h).next = Rel::NULL;
        (*h).prev = Rel::NULL;
        (*h).free_pages = USABLE_PAGES;
        (*h).dirty = [0; CHUNK_PAGES / 64];
        for i in 0..HEADER_PAGES {
            (*h).pages[i].set_kind(Kind::Header);
        }
        let d = &mut (*h).pages[HEADER_PAGES] as *mut PageDesc;
        (*d).set_kind(Kind::Free);
        (*d).npages = USABLE_PAGES as u32;
        (*d).dirty = false;
        let t = &(*h).pages[CHUNK_PAGES - 1];
        t.set_kind(Kind::FreeTail);
        t.set_lead(USABLE_PAGES - 1);
        // Last, with Release: a shared heap's recovery in another process that sees the
        // magic sees the arena index and kind written before it.
        (*h).set_magic(MAGIC);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fits_and_lookup_masks() {
        const { assert!(HEADER_PAGES >= 1 && HEADER_PAGES < 32) };
        let base = 0x7f00_0000_0000usize;
        assert_eq!(chunk_of((base + HEADER_PAGES * PAGE) as *const u8), base);
        assert_eq!(chunk_of((base + CHUNK - 16) as *const u8), base);
        // A block aligned to a whole chunk finds its header in the chunk before it.
        assert_eq!(chunk_of((base + CHUNK) as *const u8), base);
        assert_eq!(page_index((base + 5 * PAGE + 17) as *const u8), 5);
    }

    #[test]
    fn rel_round_trips_and_keeps_null() {
        let base = 0x7f12_3440_0000usize;
        let p = (base + CHUNK + 0x1230) as *mut Block;
        for b in [0, base] {
            let r = Rel::new(p, b);
            assert!(!r.is_null());
            assert_eq!(r.get(b), p);
            assert_eq!(from_rel(to_rel(p as usize, b), b), p as usize);
            assert!(Rel::<Block>::new(core::ptr::null_mut(), b).is_null());
            assert!(Rel::<Block>::NULL.get(b).is_null());
        }
        assert_eq!(to_rel(p as usize, 0), p as usize, "base 0 stores addresses");
        assert_eq!(to_rel(p as usize, base), CHUNK + 0x1230);
        // SAFETY: all-zero bytes are a valid `Rel` (a `usize`).
        let z: Rel<Block> = unsafe { core::mem::zeroed() };
        assert_eq!(z, Rel::NULL);
    }
}

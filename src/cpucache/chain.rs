//! The cache side's list format outside the caches: packed chains ([`Chain`], walked with
//! [`for_each_block`]), and the batches that move between an arena and a CPU cache
//! ([`take_batch`], [`return_chain`], [`return_blocks`]): the arena hands out and takes back
//! blocks by address (`Arena::alloc_batch`, `Arena::free_blocks`, which update each run once
//! per batch), and the chains are built and walked here.

use super::{BATCH_MAX, PTR_BITS, PTR_MASK};
use crate::arena::{Arena, ArenaLock};
use crate::chunk::{decode_link, encode_link, Block};
use crate::diag::invalid_pointer;
use crate::source::PageSource;

/// Builds packed chains for [`Caches::install`]: push blocks one by one.
///
/// Invariant: `head` is 0 or the packed head of a chain whose count is its length, each
/// block's link encoded with `key` as a CPU cache list's is (see the module documentation);
/// for a chain built on a list ([`Chain::over_list`]), its length with that list's.
/// A copy names the same blocks: only one copy may be used to push, install or return.
#[derive(Clone, Copy)]
pub struct Chain {
    head: usize,
    /// The link secret of the arena the blocks belong to.
    key: usize,
}

impl Chain {
    pub const fn new(key: usize) -> Self {
        Self { head: 0, key }
    }

    /// The chain whose packed head is `head` (0 for none), to push more blocks in front of.
    ///
    /// # Safety
    /// `head` is 0 or the packed head of a well-formed chain of the caller's, its links
    /// encoded with `key` (the rest of a chain as [`split_chain`] returns it, for example).
    pub unsafe fn from_head(head: usize, key: usize) -> Self {
        Self { head, key }
    }

    /// A chain to build in front of `base`, the head of a CPU's list that the caller read
    /// but does not own ([`Caches::head_of`](super::Caches::head_of)): pushes link the
    /// first block to it, reading nothing of the list, and the whole is then installed as
    /// that list by [`Caches::top_up`](super::Caches::top_up) if the list is still `base`.
    ///
    /// # Safety
    /// The chain is only pushed onto, then given to `top_up` with the same `base`; if that
    /// fails, only the blocks pushed may be taken off its front ([`split_chain`] with their
    /// number); it is never walked down into `base`'s blocks, returned or parked whole.
    pub unsafe fn over_list(base: usize, key: usize) -> Self {
        Self { head: base, key }
    }

    /// Adds `b` in front.
    ///
    /// # Safety
    /// `b` is a free block of at least 16 bytes that the caller owns, on no list.
    #[inline]
    pub unsafe fn push(&mut self, b: *mut Block) {
        // SAFETY: by the contract the block is ours to write.
        unsafe { (*b).link = encode_link(self.head, b as usize, self.key) };
        self.head = b as usize | (((self.head >> PTR_BITS) + 1) << PTR_BITS);
    }

    /// The packed head (0 when empty).
    pub fn head(&self) -> usize {
        self.head
    }
}

/// Walks a packed chain taken off a cache or built with [`Chain`], calling `f` on each
/// block (after reading its link, so `f` may reuse the block's words). Returns the first
/// block whose link breaks the chain's shape (each link's count one less than the one
/// before it, ending at 0 with a null address), which only a write into a free block (or a
/// double free that put a block on two lists) can cause: the caller reports it.
///
/// # Safety
/// `head` is a packed chain of blocks of the arena whose link secret is `key`, which the
/// caller owns whole, as long as its shape holds.
pub unsafe fn for_each_block(
    head: usize,
    key: usize,
    mut f: impl FnMut(*mut Block),
) -> Result<(), *mut Block> {
    let mut h = head;
    while h & PTR_MASK != 0 {
        let b = (h & PTR_MASK) as *mut Block;
        // SAFETY: by the contract every block of the chain is ours and links the rest.
        let next = decode_link(unsafe { (*b).link }, b as usize, key);
        let n = h >> PTR_BITS;
        if n == 0 || next >> PTR_BITS != n - 1 || (next >> PTR_BITS == 0) != (next == 0) {
            return Err(b);
        }
        f(b);
        h = next;
    }
    Ok(())
}

/// Takes up to `out.len()` blocks off the front of the packed chain `head`, in order, into
/// `out`; returns how many, and the packed rest of the chain (0 when none is left), whose
/// counts stay consistent (each link already holds the packed head of what follows it).
/// `Err` with the first block whose link breaks the chain's shape (see [`for_each_block`]).
///
/// # Safety
/// As for [`for_each_block`].
pub unsafe fn split_chain(
    head: usize,
    key: usize,
    out: &mut [usize],
) -> Result<(usize, usize), *mut Block> {
    let mut h = head;
    let mut k = 0;
    while k < out.len() && h & PTR_MASK != 0 {
        let b = (h & PTR_MASK) as *mut Block;
        // SAFETY: by the contract every block of the chain is ours and links the rest.
        let next = decode_link(unsafe { (*b).link }, b as usize, key);
        let n = h >> PTR_BITS;
        if n == 0 || next >> PTR_BITS != n - 1 || (next >> PTR_BITS == 0) != (next == 0) {
            return Err(b);
        }
        out[k] = b as usize;
        k += 1;
        h = next;
    }
    Ok((k, h))
}

/// Takes a batch of up to `n` (at most [`BATCH_MAX`]) blocks of class `class` from arena
/// `a` under one lock round: returns the first (and whether it reads zero) and a chain of
/// the others, each marked with `mark`, whose pops go on in address order (the arena hands
/// blocks out in ascending order within a run; the chain is built from the last one back),
/// so that objects allocated one after another stay neighbours, as on the locked path.
/// The first block is null, and the chain empty, when memory is exhausted.
///
/// Only for a source with base 0: a chain links plain addresses.
#[inline]
pub fn take_batch<S: PageSource<Lock: ArenaLock>>(
    a: &Arena<S>,
    src: &S,
    class: usize,
    n: usize,
    mark: usize,
) -> ((*mut u8, bool), Chain) {
    let mut got = [core::ptr::null_mut::<u8>(); BATCH_MAX];
    let mut k = 0;
    let first = a.alloc_batch(src, class, n.min(BATCH_MAX), mark, |b| {
        debug_assert!(k < BATCH_MAX);
        // SAFETY: `alloc_batch` calls this at most `n.min(BATCH_MAX) - 1` times (its
        // contract), so `k < BATCH_MAX`.
        unsafe { *got.get_unchecked_mut(k) = b };
        k += 1;
    });
    let mut chain = Chain::new(a.key());
    // `k < BATCH_MAX` (above).
    for &b in got.get(..k).unwrap_or(&[]).iter().rev() {
        // SAFETY: the arena handed the block over: a free block of ours, on no list.
        unsafe { chain.push(b.cast()) };
    }
    (first, chain)
}

/// Returns the blocks at the addresses `blocks` (for example taken off a chain by
/// [`split_chain`]) to arena `a`, under one lock round. Aborts, naming the block, on one that
/// is not a small block of `a`.
///
/// # Safety
/// The blocks are the caller's: free small blocks of `a`, each counted in use by its run, on
/// no list, each named once. The source's base is 0.
#[inline]
pub unsafe fn return_blocks<S: PageSource<Lock: ArenaLock>>(
    a: &Arena<S>,
    src: &S,
    blocks: &[usize],
) {
    // SAFETY: the blocks are the caller's, free small blocks of `a` (contract).
    unsafe {
        a.free_blocks(src, |bins| {
            for &b in blocks {
                if !bins.free_small(b as *mut u8) {
                    invalid_pointer(b"coreheap: corrupted cpu cache", b as *mut u8);
                }
            }
        })
    };
}

/// Returns every block of a packed chain (taken off a CPU cache, or built by
/// [`take_batch`]) to arena `a`, under one lock round. Aborts, naming the block, on a
/// block that is not a small block of `a` or on a link that breaks the chain.
///
/// # Safety
/// The chain is the caller's, its links encoded with `a`'s key, and its blocks are free
/// small blocks of `a`, each counted in use by its run. The source's base is 0 (chains link
/// plain addresses).
#[inline]
pub unsafe fn return_chain<S: PageSource<Lock: ArenaLock>>(a: &Arena<S>, src: &S, chain: usize) {
    let key = a.key();
    // SAFETY: the blocks are the caller's, free small blocks of `a` (contract).
    unsafe {
        a.free_blocks(src, |bins| {
            let r = for_each_block(chain, key, |b| {
                if !bins.free_small(b.cast()) {
                    invalid_pointer(b"coreheap: corrupted cpu cache", b.cast());
                }
            });
            if let Err(b) = r {
                invalid_pointer(
                    b"coreheap: free list link overwritten (write after free or double free)",
                    b.cast(),
                );
            }
        })
    };
}

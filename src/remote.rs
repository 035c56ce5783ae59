//! Frees on their way back to the owning arena.
//!
//! `free` never takes the owner's lock on its common path: it pushes the block onto the
//! owner's [`Pending`] stack with one compare-and-swap, whichever CPU it runs on. The owner
//! takes the whole stack with one swap when it next needs memory (its slow path) and returns
//! each block to its run. When a stack grows past [`Pending::FLUSH`] blocks, the thread that
//! pushed the last one drains it itself if the owner's lock is free: McKenney and Slingwine's
//! "interlock only when a list runs empty or overflows".
//!
//! The head packs a pointer (low 48 bits) and a saturating count (high 16 bits) into one word.
//! Pushes and take-all swaps have no ABA problem: nobody pops a single block. The pointer,
//! and each block's encoded link, are stored relative to the page source's base
//! (`chunk::to_rel`), like every link the engine keeps; a [`Batch`] is built with plain
//! addresses and so serves only the process heap, whose base is 0.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::chunk::{decode_link, encode_link, from_rel, to_rel, Block};

const PTR_BITS: u32 = 48;
const PTR_MASK: usize = (1 << PTR_BITS) - 1;
const COUNT_MAX: usize = 0xffff;

/// A lock-free stack of freed blocks.
///
/// Invariant: the pointer bits of `head` are 0 or a block's address relative to the source's
/// base, and that block's `link` word links the rest of the stack (encoded relative values,
/// as in `chunk::encode_link`); every block on it belongs to the arena that owns this stack.
pub struct Pending {
    head: AtomicUsize,
}

impl Pending {
    /// Blocks on the stack past which the pushing thread tries to drain it.
    pub const FLUSH: usize = 64;

    pub const fn new() -> Self {
        Self {
            head: AtomicUsize::new(0),
        }
    }

    /// The block after `b` on a stack taken with [`Pending::take_all`], decoded with the
    /// arena's link secret `key` (the caller validates it before use); `base` is the page
    /// source's. Both are passed in, not kept here: this line is the one remote CPUs write,
    /// and the base differs between processes.
    ///
    /// # Safety
    /// `b` came off this stack.
    #[inline]
    pub unsafe fn next_of(b: *mut Block, key: usize, base: usize) -> *mut Block {
        // SAFETY: by the contract `b`'s first word is its link.
        let stored = unsafe { (*b).link };
        from_rel(decode_link(stored, to_rel(b as usize, base), key), base) as *mut Block
    }

    /// Pushes `b`, its link encoded with the arena's secret `key`, and returns how many
    /// blocks the stack holds now (saturating at 65535). `base` is the page source's.
    ///
    /// # Safety
    /// `b` is a freed block of at least 16 bytes, owned by this stack's arena, that no one
    /// else will touch until it is taken off again.
    #[inline]
    pub unsafe fn push(&self, b: *mut Block, key: usize, base: usize) -> usize {
        let rb = to_rel(b as usize, base);
        debug_assert!(rb & !PTR_MASK == 0);
        let mut old = self.head.load(Ordering::Relaxed);
        loop {
            let count = ((old >> PTR_BITS) + 1).min(COUNT_MAX);
            // SAFETY: by the contract `b` is ours to write until pushed.
            unsafe { (*b).link = encode_link(old & PTR_MASK, rb, key) };
            let new = rb | (count << PTR_BITS);
            // Release: the taker must see `b.link` (and the freed block's marks).
            match self
                .head
                .compare_exchange_weak(old, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return count,
                Err(cur) => old = cur,
            }
        }
    }

    /// Pushes every block of `batch` with one compare-and-swap; returns how many blocks the
    /// stack holds now (saturating).
    ///
    /// # Safety
    /// The batch's blocks are freed blocks of this stack's arena, built with that arena's
    /// key, which no one else will touch until they are taken off again. The arena's page
    /// source has base 0 (a batch links plain addresses; only the process heap, whose
    /// CPU caches fill outboxes, builds batches).
    pub unsafe fn push_batch(&self, batch: &Batch) -> usize {
        if batch.first.is_null() {
            return 0;
        }
        let mut old = self.head.load(Ordering::Relaxed);
        loop {
            let count = ((old >> PTR_BITS) + batch.n).min(COUNT_MAX);
            // SAFETY: by the contract the batch's last block is ours to write until pushed.
            unsafe {
                (*batch.last).link = encode_link(old & PTR_MASK, batch.last as usize, batch.key)
            };
            let new = batch.first as usize | (count << PTR_BITS);
            // Release: as in `push`.
            match self
                .head
                .compare_exchange_weak(old, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return count,
                Err(cur) => old = cur,
            }
        }
    }

    /// Takes every block off the stack; returns the first (its `link` leads to the others,
    /// see [`Pending::next_of`]). `base` is the page source's.
    #[inline]
    pub fn take_all(&self, base: usize) -> *mut Block {
        if self.head.load(Ordering::Relaxed) == 0 {
            return core::ptr::null_mut();
        }
        // Acquire: pairs with the Release of `push`, so the links are visible.
        from_rel(self.head.swap(0, Ordering::Acquire) & PTR_MASK, base) as *mut Block
    }

    /// Blocks on the stack now (approximate while others push).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.head.load(Ordering::Relaxed) >> PTR_BITS
    }
}

/// Blocks gathered for one [`Pending::push_batch`] onto the stack of one arena.
///
/// Invariant: `first` is null (and `n` 0) or the first of `n` blocks linked from `first` to
/// `last` with links encoded with `key`, as on a pending stack of a source with base 0
/// (plain addresses); `last`'s link is written by the push that publishes the batch.
#[derive(Clone, Copy)]
pub struct Batch {
    first: *mut Block,
    last: *mut Block,
    n: usize,
    key: usize,
}

impl Batch {
    /// An empty batch for the arena whose link secret is `key`.
    pub const fn new(key: usize) -> Self {
        Self {
            first: core::ptr::null_mut(),
            last: core::ptr::null_mut(),
            n: 0,
            key,
        }
    }

    /// Adds `b` in front.
    ///
    /// # Safety
    /// `b` is a freed block of at least 16 bytes that the caller owns, on no list.
    pub unsafe fn add(&mut self, b: *mut Block) {
        // SAFETY: by the contract `b` is ours to write.
        unsafe { (*b).link = encode_link(self.first as usize, b as usize, self.key) };
        if self.first.is_null() {
            self.last = b;
        }
        self.first = b;
        self.n += 1;
    }
}

impl Default for Pending {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn push_take_all_from_many_threads_loses_nothing() {
        let stack = Arc::new(Pending::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let stack = stack.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000usize {
                        let b = Box::into_raw(Box::new(Block {
                            link: 0,
                            mark: t * 1_000_000 + i,
                        }));
                        // SAFETY: `b` is a fresh block nobody else uses.
                        unsafe { stack.push(b, 0, 0) };
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        let mut collect = |mut b: *mut Block| {
            while !b.is_null() {
                // SAFETY: the blocks came from Box::into_raw and were taken off the stack.
                let (boxed, next) = unsafe { (Box::from_raw(b), Pending::next_of(b, 0, 0)) };
                seen.push(boxed.mark);
                b = next;
            }
        };
        for t in threads {
            collect(stack.take_all(0));
            t.join().unwrap();
        }
        collect(stack.take_all(0));
        seen.sort_unstable();
        let mut want: Vec<usize> = (0..4)
            .flat_map(|t| (0..10_000).map(move |i| t * 1_000_000 + i))
            .collect();
        want.sort_unstable();
        assert_eq!(seen, want);
        assert_eq!(stack.len(), 0);
    }

    #[test]
    fn count_tracks_pushes_and_saturates() {
        let stack = Pending::new();
        let mut blocks: Vec<Block> = (0..70_000).map(|_| Block { link: 0, mark: 0 }).collect();
        for (i, b) in blocks.iter_mut().enumerate() {
            // SAFETY: each block lives in `blocks`, which outlives the stack's use of it.
            let n = unsafe { stack.push(b, 0, 0) };
            assert_eq!(n, (i + 1).min(COUNT_MAX));
        }
        assert!(!stack.take_all(0).is_null());
        assert_eq!(stack.len(), 0);
        assert!(stack.take_all(0).is_null());
    }
}

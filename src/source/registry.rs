//! The registry of the chunks this process mapped from the OS: the cheap test, behind
//! [`OsSource`](super::OsSource)`::owns_chunk`, that tells a pointer coreheap returned from
//! one it never did. Only the OS source and the process heap's huge blocks (mapped outside
//! the arenas) write it; the engine reaches it only through `PageSource::owns_chunk`.

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use crate::os;
use crate::size_class::CHUNK_SHIFT;

/// The set of chunks this process has mapped, one bit per possible chunk address below
/// [`END`]: the cheap test that tells a pointer coreheap returned from one it never did.
///
/// The 48-bit space is two halves of 2^47 bytes, each 2^25 bits = 4 MiB of bits. The half
/// where this architecture's kernel maps memory by default (`STATIC_HALF`: the lower one on
/// x86_64, whose user space is 47 bits; the upper one on arm64, whose 48-bit user space is
/// filled from the top) is zeroed static memory, looked up with one bound check, one load
/// and one bit test; the other half's bits are mapped on the first insert there
/// (`other`, null until then: a process that never maps there spends no address space on it,
/// which matters under `ulimit -v`), and its lookup loads that pointer first. Either way only
/// the pages for chunks in use are ever touched.
///
/// Invariant: `other` is null or a zeroed-at-creation mapping of `HALF_WORDS` words that
/// lives as long as the process; it changes once, from null.
pub struct Registry<const H: usize = STATIC_HALF> {
    bits: [AtomicU64; HALF_WORDS],
    other: AtomicPtr<AtomicU64>,
}

/// The bits of the addresses the registry records.
///
/// 48 covers every address Linux hands out without an address hint above it: x86_64's
/// user space (47 bits, also with 5-level paging) and arm64's (48 bits, also with 52-bit
/// addresses). It is also what the packed words of the engine hold: a pending stack's head
/// and a CPU list's head keep a block's address in their low 48 bits beside a 16-bit count
/// (`remote.rs`, `cpucache/`). So a wider registry (a lazily mapped second level for 57
/// bits) would not let a chunk lie higher; instead [`OsSource`](super::OsSource) maps
/// chunks and huge spans below [`END`] (`os::map_aligned_below`), and one the kernel put
/// above is unmapped and asked for again below, never refused while memory is available.
const ADDRESS_BITS: usize = 48;
/// The bits of an address within one half.
const HALF_BITS: usize = ADDRESS_BITS - 1;
const HALF_WORDS: usize = (1 << (HALF_BITS - CHUNK_SHIFT)) / 64;
const HALF_BYTES: usize = HALF_WORDS * 8;

/// The half kept in static memory (0 lower, 1 upper): where the kernel maps by default.
const STATIC_HALF: usize = if cfg!(target_arch = "aarch64") { 1 } else { 0 };

/// The first address the registry cannot record: every chunk of the process heap lies
/// below it.
pub const END: usize = 1 << ADDRESS_BITS;

impl<const H: usize> Registry<H> {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: AtomicU64 = AtomicU64::new(0);
        Self {
            bits: [ZERO; HALF_WORDS],
            other: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// The address with the static half's bit cleared: below 2^47 for the static half,
    /// in [2^47, 2^48) for the other one, 2^48 or more above the cover.
    #[inline(always)]
    fn fold(a: usize) -> usize {
        a ^ (H << HALF_BITS)
    }

    /// The word and bit of the chunk at offset `off` in its half.
    #[inline(always)]
    fn slot(off: usize) -> (usize, u64) {
        let n = off >> CHUNK_SHIFT;
        (n / 64, 1 << (n % 64))
    }

    /// The word for `chunk`, with its bit; `None` above the cover, or in the other half
    /// while its bits do not exist (with `map`: when the kernel refuses them).
    #[inline]
    fn word(&self, chunk: usize, map: bool) -> Option<(&AtomicU64, u64)> {
        let a = Self::fold(chunk);
        if a >> HALF_BITS == 0 {
            let (w, b) = Self::slot(a);
            return Some((&self.bits[w], b));
        }
        self.other_word(a, map)
    }

    /// [`Self::word`] in the other half (`a` folded).
    #[inline]
    fn other_word(&self, a: usize, map: bool) -> Option<(&AtomicU64, u64)> {
        if a >> HALF_BITS != 1 {
            return None;
        }
        // Acquire: pairs with the Release of the install below (the mapping is zeroed by
        // the kernel, so there is nothing else to see, but the pointer must be whole).
        let mut t = self.other.load(Ordering::Acquire);
        if t.is_null() {
            if !map {
                return None;
            }
            t = self.map_other()?;
        }
        let (w, b) = Self::slot(a & ((1 << HALF_BITS) - 1));
        // SAFETY: `t` is a mapping of HALF_WORDS words for the life of the process (the
        // type's invariant) and `w < HALF_WORDS` because the offset is below 2^47.
        Some((unsafe { &*t.add(w) }, b))
    }

    /// Maps the other half's bits and installs them, or takes those another thread
    /// installed first. `None` if the kernel refuses the mapping.
    #[cold]
    fn map_other(&self) -> Option<*mut AtomicU64> {
        let m = os::map_anon(HALF_BYTES).cast::<AtomicU64>();
        if m.is_null() {
            return None;
        }
        match self.other.compare_exchange(
            core::ptr::null_mut(),
            m,
            Ordering::Release,
            Ordering::Acquire,
        ) {
            Ok(_) => Some(m),
            Err(first) => {
                os::unmap(m.cast(), HALF_BYTES);
                Some(first)
            }
        }
    }

    /// Whether `chunk` is a chunk of ours that is mapped now.
    #[inline]
    pub fn contains(&self, chunk: usize) -> bool {
        let a = Self::fold(chunk);
        if a >> HALF_BITS == 0 {
            let (w, b) = Self::slot(a);
            // Acquire: pairs with the Release in `insert`, so a reader that sees the bit
            // also sees the header written before it.
            return self.bits[w].load(Ordering::Acquire) & b != 0;
        }
        self.contains_other(a)
    }

    /// [`Self::contains`] in the static half; false for every other address: the fast
    /// paths' test, the same instructions as a registry of that half alone.
    #[inline(always)]
    pub fn contains_static(&self, chunk: usize) -> bool {
        let a = Self::fold(chunk);
        if a >> HALF_BITS != 0 {
            return false;
        }
        let (w, b) = Self::slot(a);
        // Acquire: as in `contains`.
        self.bits[w].load(Ordering::Acquire) & b != 0
    }

    /// [`Self::contains`] outside the static half (`a` folded).
    #[cold]
    #[inline(never)]
    fn contains_other(&self, a: usize) -> bool {
        match self.other_word(a, false) {
            // Acquire: as in `contains`.
            Some((w, b)) => w.load(Ordering::Acquire) & b != 0,
            None => false,
        }
    }

    /// Whether the chunk holding address `a` can be recorded: it lies below [`END`] and
    /// the registry's bits for it exist (mapped now if need be). After true, `insert` of
    /// that chunk succeeds.
    pub fn prepare(&self, a: usize) -> bool {
        self.word(a, true).is_some()
    }

    /// Records `chunk` as ours. Returns false if its address cannot be recorded (above
    /// [`END`], or the kernel refused the memory for the other half's bits).
    pub fn insert(&self, chunk: usize) -> bool {
        match self.word(chunk, true) {
            Some((w, b)) => {
                // Release: publishes the header written before registration.
                w.fetch_or(b, Ordering::Release);
                true
            }
            None => false,
        }
    }

    pub fn remove(&self, chunk: usize) {
        if let Some((w, b)) = self.word(chunk, false) {
            w.fetch_and(!b, Ordering::Relaxed);
        }
    }

    /// Whether the other half's bits have been mapped.
    #[cfg(test)]
    fn other_mapped(&self) -> bool {
        !self.other.load(Ordering::Relaxed).is_null()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// The registry of chunks mapped by this process.
pub static REGISTRY: Registry = Registry::new();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::size_class::CHUNK;

    #[test]
    fn registry_insert_contains_remove() {
        static R: Registry = Registry::new();
        let r = &R;
        let c = 0x5555_0000_0000usize;
        assert!(!r.contains(c));
        assert!(r.insert(c));
        assert!(r.contains(c));
        assert!(!r.contains(c + CHUNK));
        r.remove(c);
        assert!(!r.contains(c));
        assert!(!r.insert(1 << 60));
        assert!(!r.contains(1 << 60));
    }

    /// Both halves of the 48-bit cover, with either half static (x86_64's choice and
    /// arm64's, both tested here): addresses arm64 hands out by default (its user space is
    /// 48 bits wide, filled from the top) and x86_64's; and the first ones above the cover,
    /// which 5-level paging or 52-bit addresses give to a hint, refused without touching
    /// any recorded bit.
    fn covers_48_bits<const H: usize>(r: &Registry<H>) {
        let other = if H == 0 { 1usize << 47 } else { 0 };
        assert!(!r.other_mapped());
        assert!(!r.contains(other + CHUNK), "a lookup maps nothing");
        r.remove(other + CHUNK);
        assert!(!r.other_mapped());
        let chunks = [
            CHUNK,
            0x5555_0000_0000,
            (1 << 47) - CHUNK,
            1 << 47,
            0xaaaa_bbc0_0000,
            0xffff_8000_0000,
            END - CHUNK,
        ];
        for &c in &chunks {
            assert!(r.prepare(c) && r.prepare(c + CHUNK - 1), "{c:#x}");
            assert!(!r.contains(c), "{c:#x}");
            assert!(r.insert(c), "{c:#x}");
        }
        assert!(r.other_mapped());
        for &c in &chunks {
            assert!(r.contains(c), "{c:#x}");
            assert_eq!(r.contains_static(c), (c >> 47) == H, "{c:#x}");
            let below = c - CHUNK;
            assert_eq!(r.contains(below), chunks.contains(&below), "{below:#x}");
        }
        // Above the cover: 2^48 (52-bit arm64, 5-level x86_64) up to 2^57 and beyond; the
        // same bit positions modulo the cover must not alias the chunks recorded above.
        for c in [
            END,
            END + (1 << 47),
            END + 0x5555_0000_0000,
            1 << 52,
            (1 << 56) - CHUNK,
            1 << 57,
            usize::MAX & !(CHUNK - 1),
        ] {
            assert!(!r.prepare(c), "{c:#x}");
            assert!(!r.insert(c), "{c:#x}");
            assert!(!r.contains(c), "{c:#x}");
            assert!(!r.contains_static(c), "{c:#x}");
            // Removing above the cover is a no-op, not a wrap-around.
            r.remove(c);
        }
        for &c in &chunks {
            assert!(r.contains(c), "{c:#x}");
            r.remove(c);
            assert!(!r.contains(c), "{c:#x}");
        }
    }

    #[test]
    fn registry_covers_48_bits_and_refuses_above() {
        static LOW: Registry<0> = Registry::new();
        static HIGH: Registry<1> = Registry::new();
        covers_48_bits(&LOW);
        covers_48_bits(&HIGH);
    }

    /// Threads inserting into the other half at once map its bits once: every insert
    /// lands in the one installed table.
    #[test]
    fn the_other_half_is_installed_once() {
        static R: Registry<0> = Registry::new();
        std::thread::scope(|s| {
            for t in 0..4usize {
                s.spawn(move || {
                    for i in 0..64usize {
                        assert!(R.insert((1 << 47) + (t * 64 + i) * CHUNK));
                    }
                });
            }
        });
        for n in 0..256usize {
            assert!(R.contains((1 << 47) + n * CHUNK), "{n}");
        }
        assert!(!R.contains((1 << 47) + 256 * CHUNK));
    }
}

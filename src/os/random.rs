//! Randomness from the kernel, without a system call: the `AT_RANDOM` bytes of the auxiliary
//! vector.

/// Word `half` (0 or 1) of the kernel's 16 `AT_RANDOM` bytes, or `fallback` without them.
fn at_random(half: usize, fallback: u64) -> u64 {
    debug_assert!(half < 2);
    // SAFETY: getauxval has no preconditions; AT_RANDOM points to 16 random bytes that live
    // as long as the process, and `half < 2` keeps the read inside them.
    unsafe {
        let p = libc::getauxval(libc::AT_RANDOM) as *const u8;
        if p.is_null() {
            return fallback;
        }
        core::ptr::read_unaligned(p.add(8 * half).cast::<u64>())
    }
}

/// A random word from the kernel (`AT_RANDOM`), fixed for the life of the process.
pub fn random_word() -> usize {
    at_random(0, 0x9e37_79b9_7f4a_7c15) as usize
}

/// A secret for arena `i`: the second half of the kernel's `AT_RANDOM` bytes, mixed with
/// `i` (splitmix64), so every arena's free-list key differs and none equals the free mark.
pub fn secret_key(i: usize) -> usize {
    let seed = at_random(1, 0x2545_f491_4f6c_dd1d);
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as usize
}

//! A chunk's dirty bits (`ChunkHeader::dirty`, one per page): ranges set, cleared, counted
//! and searched, a word at a time.

/// Calls `f(word, mask)` for each word of the bit set that pages `first..first + n` touch,
/// `mask` being their bits in it.
#[inline]
fn for_words(first: usize, n: usize, mut f: impl FnMut(usize, u64)) {
    let end = first + n;
    let mut i = first;
    while i < end {
        let w = i / 64;
        let lo = i % 64;
        let hi = (end - w * 64).min(64);
        f(w, (!0u64 >> (64 - (hi - lo))) << lo);
        i = w * 64 + hi;
    }
}

/// Sets the bits of pages `first..first + n`; returns how many were clear.
#[inline]
pub(super) fn set(bits: &mut [u64], first: usize, n: usize) -> usize {
    let mut added = 0;
    for_words(first, n, |w, m| {
        added += (m & !bits[w]).count_ones() as usize;
        bits[w] |= m;
    });
    added
}

/// Clears the bits of pages `first..first + n`; returns how many were set.
#[inline]
pub(super) fn clear(bits: &mut [u64], first: usize, n: usize) -> usize {
    let mut removed = 0;
    for_words(first, n, |w, m| {
        removed += (m & bits[w]).count_ones() as usize;
        bits[w] &= !m;
    });
    removed
}

/// How many of the bits of pages `first..first + n` are set.
#[inline]
pub(super) fn count(bits: &[u64], first: usize, n: usize) -> usize {
    let mut c = 0;
    for_words(first, n, |w, m| c += (m & bits[w]).count_ones() as usize);
    c
}

/// Whether any bit of pages `first..first + n` is set.
#[inline]
pub(super) fn any(bits: &[u64], first: usize, n: usize) -> bool {
    let mut a = false;
    for_words(first, n, |w, m| a |= m & bits[w] != 0);
    a
}

/// The first page in `from..end` whose bit is `value`, or `end`.
fn find(bits: &[u64], from: usize, end: usize, value: bool) -> usize {
    let mut i = from;
    while i < end {
        let w = i / 64;
        let word = if value { bits[w] } else { !bits[w] };
        let word = word & (!0u64 << (i % 64));
        if word != 0 {
            return (w * 64 + word.trailing_zeros() as usize).min(end);
        }
        i = (w + 1) * 64;
    }
    end
}

/// The first run of set bits in `from..end`, as (first page, length).
pub(super) fn next_span(bits: &[u64], from: usize, end: usize) -> Option<(usize, usize)> {
    let start = find(bits, from, end, true);
    (start < end).then(|| (start, find(bits, start, end, false) - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_agree_with_a_bit_by_bit_model() {
        let mut bits = [0u64; 4];
        let mut model = [false; 256];
        let mut rng = crate::test_support::Rng(0x0123_4567_89ab_cdef);
        for _ in 0..2000 {
            let first = rng.below(256);
            let n = 1 + rng.below(256 - first);
            let before = model[first..first + n].iter().filter(|&&b| b).count();
            assert_eq!(count(&bits, first, n), before);
            assert_eq!(any(&bits, first, n), before > 0);
            if rng.below(2) == 0 {
                assert_eq!(set(&mut bits, first, n), n - before);
                model[first..first + n].fill(true);
            } else {
                assert_eq!(clear(&mut bits, first, n), before);
                model[first..first + n].fill(false);
            }
            // The spans, walked as purging walks them, are the model's.
            let (lo, hi) = (rng.below(256), 256);
            let mut spans = Vec::new();
            let mut i = lo;
            while let Some((s, len)) = next_span(&bits, i, hi) {
                spans.push((s, len));
                i = s + len;
            }
            let mut want = Vec::new();
            let mut j = lo;
            while j < hi {
                if model[j] {
                    let s = j;
                    while j < hi && model[j] {
                        j += 1;
                    }
                    want.push((s, j - s));
                } else {
                    j += 1;
                }
            }
            assert_eq!(spans, want);
        }
    }
}

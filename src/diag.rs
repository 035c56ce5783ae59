//! Messages that must not allocate: a fixed buffer, numbers formatted by hand, `write(2)`.

use crate::os;

/// Writes `v` in decimal at the end of `tmp` (20 digits hold any `u64`) and returns the
/// digits. Used by [`Line::num`] and for paths such as `/proc/<pid>/stat`.
pub fn decimal(mut v: u64, tmp: &mut [u8; 20]) -> &[u8] {
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &tmp[i..]
}

/// A line being built in a fixed buffer; what does not fit is cut off.
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    pub fn str(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    /// Appends `v` in decimal.
    pub fn num(&mut self, v: u64) -> &mut Self {
        let mut tmp = [0u8; 20];
        self.str(decimal(v, &mut tmp))
    }

    /// Appends `v` in decimal, right-aligned in `width` columns.
    pub fn num_w(&mut self, v: u64, width: usize) -> &mut Self {
        let digits = if v == 0 { 1 } else { v.ilog10() as usize + 1 };
        for _ in digits..width {
            self.str(b" ");
        }
        self.num(v)
    }

    /// Appends `v` as `0x` and lower-case hex.
    pub fn hex(&mut self, v: usize) -> &mut Self {
        self.str(b"0x");
        let mut started = false;
        for shift in (0..usize::BITS / 4).rev() {
            let d = (v >> (shift * 4)) & 0xf;
            if d != 0 || started || shift == 0 {
                started = true;
                self.str(&[b"0123456789abcdef"[d]]);
            }
        }
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Writes the line to `fd`.
    pub fn write(&self, fd: i32) {
        os::write_all(fd, self.as_bytes());
    }
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

/// Aborts with `what: 0x<pointer>`, the way glibc reports `free(): invalid pointer`.
#[cold]
pub fn invalid_pointer(what: &[u8], p: *mut u8) -> ! {
    let mut l = Line::new();
    l.str(what).str(b": ").hex(p as usize).str(b"\n");
    os::fatal(l.as_bytes())
}

/// Aborts with `what: 0x<pointer> (arena N, S-byte block)`: a misuse of a block coreheap
/// knows, named with the call, the pointer, its arena (if it has one) and its size.
#[cold]
pub fn block_error(what: &[u8], p: *mut u8, arena: Option<u32>, size: usize) -> ! {
    let mut l = Line::new();
    l.str(what).str(b": ").hex(p as usize).str(b" (");
    if let Some(a) = arena {
        l.str(b"arena ").num(a as u64).str(b", ");
    }
    l.num(size as u64).str(b"-byte block)\n");
    os::fatal(l.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers() {
        let mut l = Line::new();
        l.num(0)
            .str(b" ")
            .num(12345)
            .str(b" ")
            .hex(0xdead0)
            .str(b" ")
            .num_w(42, 5);
        assert_eq!(l.as_bytes(), b"0 12345 0xdead0    42");
        let mut l = Line::new();
        l.hex(0);
        assert_eq!(l.as_bytes(), b"0x0");
    }
}

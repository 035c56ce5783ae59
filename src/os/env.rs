//! The environment, read without allocating. Which variables coreheap reads, and how it
//! parses them, is `crate::settings`' business: this module only fetches the bytes.

use core::ffi::CStr;

/// Calls `f` with the value of the environment variable `name` (its bytes, without the
/// NUL), or `None` if it is unset, and returns what `f` returns. The value is only borrowed
/// for the call: `setenv` may free it afterwards. Thread-safe as `getenv` is (while no thread
/// changes the environment).
pub fn with_var<R>(name: &CStr, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    // SAFETY: `name` is NUL-terminated by its type; getenv returns null or a NUL-terminated
    // string that stays valid while nobody calls setenv, and `f` reads it before we return.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return f(None);
    }
    // SAFETY: as above: a NUL-terminated string.
    f(Some(unsafe { CStr::from_ptr(p) }.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_variables() {
        with_var(c"PATH", |v| assert!(v.is_some()));
        with_var(c"COREHEAP_SURELY_UNSET_VARIABLE", |v| assert!(v.is_none()));
    }
}

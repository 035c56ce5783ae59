//! What a Rust program chose through [`CoreHeap`](crate::CoreHeap)'s builder, in a module
//! of its own because the builder exists on every target, `settings` only where coreheap
//! has its backend (`build.rs`).

/// What a Rust program chose through [`CoreHeap`](crate::CoreHeap)'s builder: `None` for
/// every setting it left alone. Values are clamped to the ranges of the variables when
/// merged (`settings::resolve`); without the backend they are kept and never read.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(not(coreheap_backend), allow(dead_code))]
pub(crate) struct Overrides {
    pub(crate) arenas: Option<usize>,
    pub(crate) purge_ms: Option<u32>,
    pub(crate) dirty_max: Option<u64>,
    pub(crate) debug: Option<bool>,
    pub(crate) rseq: Option<bool>,
    pub(crate) stats: Option<bool>,
}

impl Overrides {
    /// Nothing chosen: the environment, then the defaults.
    pub(crate) const NONE: Overrides = Overrides {
        arenas: None,
        purge_ms: None,
        dirty_max: None,
        debug: None,
        rseq: None,
        stats: None,
    };
}

//! Paths of the handler guests from `plugins/`, built for `wasm32-wasip2` by this crate's
//! build script from the current source. For tests only.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The Python handler example's component; panics with the reason when the build could
/// not make it (componentize-py missing): a test that needs it fails, it never skips.
pub fn python_example() -> &'static str {
    assert!(
        !PYTHON_EXAMPLE.is_empty(),
        "the Python handler example was not built: {PYTHON_EXAMPLE_MISSING}"
    );
    PYTHON_EXAMPLE
}

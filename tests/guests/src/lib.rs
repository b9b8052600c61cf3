//! Paths of the handler guests from `plugins/`, built for `wasm32-wasip2` by this crate's
//! build script from the current source. For tests only.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

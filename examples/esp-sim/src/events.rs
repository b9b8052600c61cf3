//! Machine-readable events on stdout, one JSON object per line (tests and the bench read
//! them; people can too).

use std::io::Write;

pub(crate) fn emit(event: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

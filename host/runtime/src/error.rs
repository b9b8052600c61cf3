use std::time::Duration;

/// The runtime could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime refused the engine configuration, or a thread could not start.
    #[error("cannot set up the handler runtime: {0}")]
    Engine(String),
    /// The host imports could not be linked.
    #[error("cannot link the handler imports: {0}")]
    Linker(String),
}

/// A handler component was refused when loaded. Nothing was installed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not WebAssembly at all.
    #[error("not a WebAssembly file")]
    NotWasm,
    /// A core module, not a component: it was not built for `wasm32-wasip2`.
    #[error(
        "a core WebAssembly module, not a component: build the handler for the wasm32-wasip2 target"
    )]
    CoreModule,
    /// The component is malformed or uses features the gateway leaves off.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports something the gateway does not provide (a WIT version it does
    /// not offer, an interface outside the handler world).
    #[error("the component needs an import the gateway does not provide: {0}")]
    UnsupportedImport(String),
    /// The component does not export the handler interface of a WIT version the gateway runs.
    #[error("the component does not export outpost:handler/handler@0.1.0: {0}")]
    WrongExports(String),
    /// The compiler (a child process, see [`crate::Compiler`]) failed for a reason other
    /// than the component: it crashed, ran out of time or could not write its output.
    #[error("the handler compiler failed: {0}")]
    Compiler(String),
    /// The runtime itself could not be set up (see [`crate::Runtime::deferred`]).
    #[error(transparent)]
    Setup(#[from] RuntimeError),
}

/// Why a call into a handler failed. The gateway carries on either way; the store the
/// call ran in is dropped.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest trapped.
    #[error("handler trapped ({kind}): {message}")]
    Trap {
        /// What kind of trap.
        kind: TrapKind,
        /// wasmtime's description, with the guest backtrace when there is one.
        message: String,
        /// What the guest wrote to stderr (a panic message lands here).
        stderr: String,
    },
    /// The call did not finish within its wall-clock limit (time parked in host calls
    /// counts too).
    #[error("handler call exceeded its wall-clock limit of {limit:?}")]
    WallClock {
        /// The limit.
        limit: Duration,
        /// What the guest wrote to stderr until then.
        stderr: String,
    },
    /// A host import failed in a way that must not be hidden from the guest's caller
    /// (the state backend failed).
    #[error("handler call failed in the host: {0}")]
    Host(String),
}

impl CallError {
    /// The guest's captured stderr, if the error carries it.
    pub fn stderr(&self) -> &str {
        match self {
            Self::Trap { stderr, .. } | Self::WallClock { stderr, .. } => stderr,
            Self::Host(_) => "",
        }
    }

    /// A short account for people and the cloud, at most [`SUMMARY_MAX`] bytes: the
    /// reason and the first line of the guest's own message (a Rust panic message, a
    /// Python exception line), never a backtrace. The full error belongs in the log.
    pub fn summary(&self) -> String {
        let (reason, message) = match self {
            Self::Trap {
                kind,
                message,
                stderr,
            } => (
                format!("handler trapped ({kind})"),
                guest_message(stderr)
                    .or_else(|| first_line(message))
                    .unwrap_or_default(),
            ),
            Self::WallClock { limit, stderr } => (
                format!("handler call exceeded its wall-clock limit of {limit:?}"),
                guest_message(stderr).unwrap_or_default(),
            ),
            Self::Host(text) => (
                "handler call failed in the host".to_owned(),
                first_line(text).unwrap_or_default(),
            ),
        };
        let text = if message.is_empty() {
            reason
        } else {
            format!("{reason}: {message}")
        };
        truncate(&text, SUMMARY_MAX)
    }

    /// The trap kind, if the guest trapped.
    pub fn trap_kind(&self) -> Option<&TrapKind> {
        match self {
            Self::Trap { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

/// The longest [`CallError::summary`], in bytes.
pub const SUMMARY_MAX: usize = 200;

fn first_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).find(|l| !l.is_empty())
}

/// The guest's own message in what it wrote to stderr: the line after Rust's
/// `panicked at <file>:<line>:<col>:`, the exception line that ends a Python traceback,
/// or else the first line.
fn guest_message(stderr: &str) -> Option<&str> {
    let lines: Vec<&str> = stderr.lines().collect();
    if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
        let line = lines[at];
        // Before Rust 1.73: `panicked at 'message', src/lib.rs:1:2`.
        if let Some(rest) = line.split_once("panicked at '").map(|(_, r)| r) {
            return Some(rest.rsplit_once("', ").map_or(rest, |(m, _)| m));
        }
        return lines[at + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.is_empty())
            .or(Some(line.trim()));
    }
    if let Some(at) = lines
        .iter()
        .position(|l| l.starts_with("Traceback (most recent call last)"))
    {
        return lines[at + 1..]
            .iter()
            .rev()
            .find(|l| !l.is_empty() && !l.starts_with(char::is_whitespace))
            .map(|l| l.trim());
    }
    first_line(stderr)
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Why a guest was stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrapKind {
    /// It used up its CPU time.
    CpuDeadline,
    /// It tried to grow its memory past the limit.
    MemoryLimit,
    /// It overflowed its stack (runaway recursion).
    StackOverflow,
    /// It panicked (Rust guests abort with an `unreachable` after printing the message).
    Panic,
    /// Any other trap, by wasmtime's name.
    Other(String),
}

impl std::fmt::Display for TrapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CpuDeadline => f.write_str("CPU time limit"),
            Self::MemoryLimit => f.write_str("memory limit"),
            Self::StackOverflow => f.write_str("stack overflow"),
            Self::Panic => f.write_str("panic"),
            Self::Other(name) => f.write_str(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trap(stderr: &str) -> CallError {
        CallError::Trap {
            kind: TrapKind::Panic,
            message: "error while executing at wasm backtrace:\n    0: 0x1a2b - hostile!rust_panic\n    1: 0x1c3d - hostile!is_installed".into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn a_summary_keeps_the_guests_own_line_and_drops_the_backtrace() {
        let rust = trap(
            "thread '<unnamed>' panicked at src/lib.rs:42:23:\nhostile handler panicked on purpose\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n",
        );
        assert_eq!(
            rust.summary(),
            "handler trapped (panic): hostile handler panicked on purpose"
        );
        let old_rust = trap("thread 'main' panicked at 'index out of bounds', src/lib.rs:1:2\n");
        assert_eq!(
            old_rust.summary(),
            "handler trapped (panic): index out of bounds"
        );
        let python = trap(
            "Traceback (most recent call last):\n  File \"app.py\", line 12, in is_installed\n    raise ValueError(\"no such partition\")\nValueError: no such partition\n",
        );
        assert_eq!(
            python.summary(),
            "handler trapped (panic): ValueError: no such partition"
        );
        // No stderr: the first line of wasmtime's text, not its backtrace.
        let silent = trap("");
        assert_eq!(
            silent.summary(),
            "handler trapped (panic): error while executing at wasm backtrace:"
        );
        let long = trap(&"é".repeat(400));
        let summary = long.summary();
        assert!(summary.len() <= SUMMARY_MAX, "{}", summary.len());
        assert!(summary.ends_with('…'));
    }
}

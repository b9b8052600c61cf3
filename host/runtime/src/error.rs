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

    /// The trap kind, if the guest trapped.
    pub fn trap_kind(&self) -> Option<&TrapKind> {
        match self {
            Self::Trap { kind, .. } => Some(kind),
            _ => None,
        }
    }
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

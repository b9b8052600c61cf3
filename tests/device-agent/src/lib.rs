//! The C device agent (`devices/esp-idf/components/outpost_agent`) built for Linux by
//! `build.rs`: its POSIX port with AddressSanitizer and UndefinedBehaviorSanitizer, so
//! every test that runs it also checks its memory use.

/// The path of `outpost-agent-posix` (see `port/posix/main.c` for its options).
pub const AGENT: &str = env!("OUTPOST_AGENT_POSIX");

/// What a sanitizer prints when it finds something; a test that ran the agent fails
/// when its stderr contains one of these.
pub const SANITIZER_REPORTS: &[&str] = &[
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
];

/// The sanitizer settings the tests run the agent with: leaks are reported at exit,
/// and the first finding aborts with a distinct exit code.
pub const SANITIZER_ENV: &[(&str, &str)] = &[
    (
        "ASAN_OPTIONS",
        "detect_leaks=1:abort_on_error=0:exitcode=86",
    ),
    (
        "UBSAN_OPTIONS",
        "print_stacktrace=1:halt_on_error=1:exitcode=87",
    ),
];

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use outpost_test_support::DEADLINE;
use outpost_test_support::EventLog;

/// A running `outpost-agent-posix` and the events it printed (one JSON object per line
/// on stdout). Its stderr is kept, echoed with its name, and checked for sanitizer
/// reports. Killed when dropped.
pub struct Agent {
    /// A name for messages (the device's).
    pub name: String,
    child: Child,
    events: EventLog,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts the agent with `args` under the sanitizer settings of [`SANITIZER_ENV`].
    pub fn start<S: AsRef<OsStr>>(name: &str, args: &[S]) -> Self {
        let mut child = Command::new(AGENT)
            .args(args)
            .envs(SANITIZER_ENV.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("outpost-agent-posix starts");
        let events = EventLog::read(child.stdout.take().expect("piped"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let kept = Arc::clone(&stderr);
        let mut pipe = child.stderr.take().expect("piped");
        let label = name.to_owned();
        let stderr_reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            let mut pending = String::new();
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&chunk[..n]);
                kept.lock().expect("stderr lock").push_str(&text);
                pending.push_str(&text);
                while let Some(end) = pending.find('\n') {
                    eprintln!("[{label}] {}", &pending[..end]);
                    pending.drain(..=end);
                }
            }
        });
        Self {
            name: name.to_owned(),
            child,
            events,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// Waits for an event `event` that `pred` accepts (one seen earlier counts); panics
    /// with what was seen after [`DEADLINE`].
    pub fn wait_for(
        &mut self,
        event: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        match self.events.wait_for(event, pred) {
            Some(found) => found,
            None => panic!(
                "agent {}: no {event} event; saw {:?}; stderr:\n{}",
                self.name,
                self.events.seen(),
                self.stderr()
            ),
        }
    }

    /// Every event printed so far.
    pub fn events(&mut self) -> &[serde_json::Value] {
        self.events.drain()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Waits for the agent to exit by itself (at most [`DEADLINE`]) and returns how it
    /// ended; panics if a sanitizer reported anything.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let end = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < end,
                "agent {} did not exit; stderr:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The stderr reader ends with the pipe: then every line is in.
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        self.assert_clean();
        status
    }

    /// Panics when a sanitizer reported anything so far.
    pub fn assert_clean(&self) {
        let stderr = self.stderr();
        for report in SANITIZER_REPORTS {
            assert!(
                !stderr.contains(report),
                "agent {}: a sanitizer found something ({report}):\n{stderr}",
                self.name
            );
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

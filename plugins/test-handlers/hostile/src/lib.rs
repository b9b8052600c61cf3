//! A handler that misbehaves on request. `is-installed` picks what to do from the
//! device id, so one component exercises every limit of the sandbox:
//!
//! | device id | behaviour |
//! |---|---|
//! | `loop` | spins forever (CPU deadline) |
//! | `memory-bomb` | allocates 1 MiB blocks until stopped (memory limit) |
//! | `recursion` | recurses without end (stack limit) |
//! | `panic` | panics (a trap, with the message on stderr) |
//! | `log-flood` | writes 20,000 log lines and 20,000 stderr lines, then answers |
//! | `wait-forever` | asks the device and waits as long as the host lets it (wall-clock limit) |
//! | `state:<n>` | stores `n` bytes in its state store and reports what happened |
//! | `artifact` | reads the update's first file to the end and reports its size and a checksum |
//! | `echo` | returns the device and update it was given, in `details` |
//! | `current-…` | answers 900 "installed" (the rollout skips it) |
//! | anything else | answers 901 "not installed" |
//!
//! Every other step keeps the SDK's default (nothing to download, install or apply).
//! Reports: `done` with the update's version finishes the update (700), `done` with
//! another version or `failed` fails it; other kinds are ignored. That makes it the
//! rollout engine's stand-in device handler in tests.

use std::hint::black_box;

use outpost_handler_sdk::{
    Device, DeviceReport, Handler, HandlerInfo, Limits, Outcome, ReportVerdict, Update, artifacts,
    device_channel, log, state,
};

struct Hostile;

impl Handler for Hostile {
    fn describe() -> HandlerInfo {
        HandlerInfo {
            name: "hostile".into(),
            version: "0.1.0".into(),
            device_types: vec!["hostile-device".into()],
            requested_limits: Limits {
                memory_mib: 64,
                cpu_ms: 1000,
            },
        }
    }

    fn is_installed(device: Device, update: Update) -> Outcome {
        match device.id.as_str() {
            "loop" => spin(),
            "memory-bomb" => memory_bomb(),
            "recursion" => Outcome::success(900, format!("depth {}", recurse(0))),
            "panic" => panic!("hostile handler panicked on purpose"),
            "log-flood" => log_flood(),
            "wait-forever" => wait_forever(),
            "artifact" => read_artifact(&update),
            "echo" => Outcome::success(
                901,
                format!(
                    "{} {} {:?} {:?} {}@{} files={} props={}",
                    device.id,
                    device.device_type,
                    device.properties,
                    device.firmware_version,
                    update.name,
                    update.version,
                    update.files.len(),
                    update.handler_properties
                ),
            ),
            id if id.starts_with("current-") => Outcome::success(900, "installed"),
            id => match id.strip_prefix("state:") {
                Some(size) => store_state(size),
                None => Outcome::success(901, "not installed"),
            },
        }
    }

    fn interpret_report(_device: Device, update: Update, report: DeviceReport) -> ReportVerdict {
        let text = String::from_utf8_lossy(&report.payload).trim().to_owned();
        match report.kind.as_str() {
            "done" if text == update.version => {
                ReportVerdict::Finished(Outcome::success(700, format!("device runs {text}")))
            }
            "done" => ReportVerdict::Finished(Outcome::failure(
                1,
                format!("device runs {text}, expected {}", update.version),
            )),
            "failed" => {
                ReportVerdict::Finished(Outcome::failure(2, format!("device failed: {text}")))
            }
            _ => ReportVerdict::Ignored,
        }
    }
}

fn spin() -> Outcome {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn memory_bomb() -> Outcome {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        blocks.push(vec![0xA5; 1 << 20]);
        black_box(&blocks);
    }
}

/// Small frames, so the wasm call stack (not Rust's shadow stack in linear memory) is
/// what runs out.
fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    recurse(black_box(depth + 1)).wrapping_add(1)
}

/// Twenty times the default log budget, and several times the output limit.
const FLOOD_LINES: u32 = 20_000;

fn log_flood() -> Outcome {
    for n in 0..FLOOD_LINES {
        log::write(log::Level::Info, "flood", &[("n".into(), n.to_string())]);
    }
    for n in 0..FLOOD_LINES {
        eprintln!("stderr flood line {n}");
    }
    Outcome::success(901, "survived the flood")
}

fn wait_forever() -> Outcome {
    match device_channel::request("hang", &[], u32::MAX) {
        Ok(_) => Outcome::success(900, "the device answered"),
        Err(err) => Outcome::failure(1, format!("{err:?}")),
    }
}

fn store_state(size: &str) -> Outcome {
    let Ok(size) = size.parse::<usize>() else {
        return Outcome::failure(2, "state:<n> needs a number");
    };
    let before = state::get("blob").map_or(0, |v| v.len());
    match state::set("blob", &vec![7u8; size]) {
        Ok(()) => Outcome::success(901, format!("stored {size} (had {before})")),
        Err(err) => Outcome::failure(3, format!("{err:?} (had {before})")),
    }
}

fn read_artifact(update: &Update) -> Outcome {
    let Some(file) = update.files.first() else {
        return Outcome::failure(4, "no files");
    };
    let (mut offset, mut sum) = (0u64, 0u64);
    loop {
        match artifacts::read(&file.file_id, offset, 1 << 20) {
            Ok(chunk) if chunk.is_empty() => break,
            Ok(chunk) => {
                sum = chunk
                    .iter()
                    .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
                offset += chunk.len() as u64;
            }
            Err(err) => return Outcome::failure(5, format!("{err:?} at {offset}")),
        }
    }
    Outcome::success(901, format!("read {offset} bytes, sum {sum}"))
}

outpost_handler_sdk::register!(Hostile);

//! The least a Rust handler can be: `no_std`, with no WASI imports at all.
//!
//! A handler built on the standard library imports some fifteen WASI interfaces (stdio,
//! environment, exit, terminals, streams) even when it never prints, and the gateway
//! wires each of them into every fresh instance. This one imports nothing but the
//! handler world's types and allocates from a bump allocator (each call runs in a new
//! instance whose memory is reset afterwards, so nothing needs freeing). handler-bench
//! measures instantiate + `is-installed` on it against its target, and the std-based
//! hostile guest beside it.
//!
//! It is a working handler for device type `small-device`: 900/901 by comparing the
//! device's firmware version with the update's, every other step a success code, and a
//! report `done` with the update's version finishes the update.

#![no_std]

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use core::alloc::{GlobalAlloc, Layout};

wit_bindgen::generate!({
    path: "../../../wit/outpost-handler-0.1.0",
    world: "update-handler",
});

use exports::outpost::handler::handler::Guest;
use outpost::handler::types::{
    Device, DeviceReport, HandlerInfo, Limits, Outcome, ReportVerdict, Update,
};

struct Small;

fn outcome(result_code: i32, details: &str) -> Outcome {
    Outcome {
        result_code,
        extended_code: 0,
        details: String::from(details),
    }
}

impl Guest for Small {
    fn describe() -> HandlerInfo {
        HandlerInfo {
            name: "small".into(),
            version: "0.1.0".into(),
            device_types: vec!["small-device".into()],
            requested_limits: Limits {
                memory_mib: 2,
                cpu_ms: 50,
            },
        }
    }

    fn is_installed(device: Device, update: Update) -> Outcome {
        if device.firmware_version.as_deref() == Some(update.version.as_str()) {
            outcome(900, "installed")
        } else {
            outcome(901, "not installed")
        }
    }

    fn download(_device: Device, _update: Update) -> Outcome {
        outcome(500, "nothing to download")
    }

    fn install(_device: Device, _update: Update) -> Outcome {
        outcome(600, "nothing to install")
    }

    fn apply(_device: Device, update: Update) -> Outcome {
        let mut details = String::from("applied ");
        details.push_str(&update.version);
        outcome(700, &details)
    }

    fn cancel(_device: Device, _update: Update) -> Outcome {
        outcome(800, "cancelled")
    }

    fn rollback(_device: Device, _update: Update) -> Outcome {
        outcome(1100, "rolled back")
    }

    fn interpret_report(_device: Device, update: Update, report: DeviceReport) -> ReportVerdict {
        match report.kind.as_str() {
            "done" if report.payload == update.version.as_bytes() => {
                ReportVerdict::Finished(outcome(700, "the device runs the update"))
            }
            "done" | "failed" => ReportVerdict::Finished(outcome(0, "the update failed")),
            _ => ReportVerdict::Ignored,
        }
    }
}

export!(Small);

/// Hands out memory upwards from the end of the static data and never takes it back:
/// an instance lives for one call, and the gateway resets its memory afterwards.
struct Bump;

/// The next free byte; 0 until the first allocation.
static mut NEXT: usize = 0;

unsafe extern "C" {
    /// Where the linker put the end of the static data (and the start of the heap).
    static __heap_base: u8;
}

const PAGE: usize = 65_536;

// SAFETY: a wasm instance runs one thread, so the unsynchronised `NEXT` is never raced;
// every block is aligned as asked and lies within memory grown to hold it, or null.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded (see above); `__heap_base` is only taken by address.
        unsafe {
            if NEXT == 0 {
                NEXT = &raw const __heap_base as usize;
            }
            let start = (NEXT + layout.align() - 1) & !(layout.align() - 1);
            let Some(end) = start.checked_add(layout.size()) else {
                return core::ptr::null_mut();
            };
            let have = core::arch::wasm32::memory_size(0) * PAGE;
            if end > have
                && core::arch::wasm32::memory_grow(0, (end - have).div_ceil(PAGE)) == usize::MAX
            {
                return core::ptr::null_mut();
            }
            NEXT = end;
            start as *mut u8
        }
    }

    unsafe fn dealloc(&self, _block: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOCATOR: Bump = Bump;

/// The canonical ABI's allocator export, through which the gateway copies arguments
/// in. wasi-libc has one built on `malloc`, but nothing here pulls it in.
///
/// # Safety
/// Called by the host as the component model specifies: `old` is null or a block of
/// `old_len` bytes from this allocator, `align` a power of two.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    if new_len == 0 {
        return align as *mut u8;
    }
    // SAFETY: `align` is a power of two (the caller's promise) and `new_len` is not 0.
    let new = unsafe { ALLOCATOR.alloc(Layout::from_size_align_unchecked(new_len, align)) };
    if new.is_null() {
        core::arch::wasm32::unreachable();
    }
    if !old.is_null() {
        // SAFETY: `old` holds `old_len` bytes; `new` is a fresh block past it.
        unsafe { core::ptr::copy_nonoverlapping(old, new, old_len.min(new_len)) };
    }
    new
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

// `memcmp` and friends come from wasi-libc, which imports nothing for them.
#[link(name = "c")]
unsafe extern "C" {}

//! Keeping the gateway's resident memory to what it uses.
//!
//! Most of an idle gateway's resident set is not its data but the pages of its own
//! executable (36 MB of code: wasmtime, SQLite, rustls, hyper…). On each page fault in a
//! file mapping the kernel also maps the neighbouring pages already in the page cache
//! ("fault-around", 64 KiB by default), so code touched once at start pulls in far more
//! than it runs. Advising the executable's mappings `MADV_RANDOM` turns fault-around (and
//! read-ahead) off for them: a page becomes resident when it runs. Measured with
//! `cargo xtask bench-fleet` (peak RSS per gateway, docs/fleet-scale.md).

/// Advises the mappings of the running executable `MADV_RANDOM`. Best effort: without
/// `/proc` or on an error nothing changes but the resident size.
pub(crate) fn random_access_for_own_code() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let exe = exe.to_string_lossy();
    for line in maps.lines() {
        // "start-end perms offset dev inode path"
        let mut fields = line.split_whitespace();
        let (Some(range), Some(_perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if fields.nth(3) != Some(exe.as_ref()) {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        #[allow(unsafe_code)]
        // SAFETY: madvise(2) with MADV_RANDOM only changes how the kernel pages this
        // mapping in (no read-ahead, no fault-around); the range is one whole mapping of
        // this process as /proc/self/maps lists it, and its contents are not touched.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_RANDOM);
        }
    }
}

//! glibc's per-thread cache of freed blocks, sized for the daemon's bursts.
//!
//! glibc keeps up to 7 freed blocks of each small size per thread (its `tcache`); the
//! rest go to shared free lists that it sorts and merges (`malloc_consolidate`,
//! `unlink_chunk`). A gateway answering a hundred devices at once frees hundreds of blocks
//! of the same few sizes in one burst, often on another worker thread than the one that
//! took them, so with the default most frees take the slow path. With room for
//! [`TCACHE_COUNT`] blocks per size the daemon spent 8–12% less CPU per telemetry record
//! (bench-uplink) for +0.3 MB of peak RSS (bench-fleet); see the README.
//!
//! glibc reads this setting only from the `GLIBC_TUNABLES` environment variable at
//! process start (there is no `mallopt` for it), so `outpost run` re-executes itself
//! once with the tunable added, before it starts any thread. An operator who sets
//! `glibc.malloc.tcache_count` in `GLIBC_TUNABLES` keeps their own value.

/// Freed blocks glibc keeps per size and thread for `outpost run` (glibc's default: 7).
pub(crate) const TCACHE_COUNT: u32 = 1000;

const TUNABLE: &str = "glibc.malloc.tcache_count";

/// Set in the re-executed process (and left in its environment) so it never re-executes
/// again, whatever glibc does with `GLIBC_TUNABLES` (it drops tunables for set-user-ID
/// programs, for one).
const MARKER: &str = "OUTPOST_MALLOC_TUNED";

/// The `GLIBC_TUNABLES` value to re-execute with, or `None` to run as we are: the
/// operator set the tunable, or the value is not text we can extend.
pub(crate) fn tunables(current: Option<&std::ffi::OsStr>) -> Option<String> {
    let ours = format!("{TUNABLE}={TCACHE_COUNT}");
    match current.map(std::ffi::OsStr::to_str) {
        None => Some(ours),
        Some(None) => None,
        Some(Some(current)) if current.split(':').any(|t| t.starts_with(TUNABLE)) => None,
        Some(Some("")) => Some(ours),
        Some(Some(current)) => Some(format!("{current}:{ours}")),
    }
}

/// Re-executes this program with the tunable set, once; returns if that is not needed
/// or not possible (then the daemon runs with glibc's default, which only costs CPU).
///
/// Call before any thread is started: `exec` replaces the whole process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn tune() {
    use std::ffi::{CString, OsString};
    use std::os::unix::ffi::OsStringExt;

    if std::env::var_os(MARKER).is_some() {
        return;
    }
    let Some(value) = tunables(std::env::var_os("GLIBC_TUNABLES").as_deref()) else {
        return;
    };
    // The program's own path rather than /proc/self/exe, whose name ("exe") would become
    // the process name that ps, top and pgrep show. A binary replaced or removed since it
    // started (an upgrade in progress) is not re-executed.
    let program = match std::env::current_exe() {
        Ok(path) if path.is_file() => path,
        _ => return,
    };
    let c = |text: OsString| CString::new(text.into_vec()).ok();
    let Some(program) = c(program.into_os_string()) else {
        return;
    };
    let Some(args) = std::env::args_os().map(c).collect::<Option<Vec<_>>>() else {
        return;
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(key, _)| key != "GLIBC_TUNABLES")
        .filter_map(|(mut key, value)| {
            key.push("=");
            key.push(value);
            c(key)
        })
        .collect();
    env.extend(c(format!("GLIBC_TUNABLES={value}").into()));
    env.extend(c(format!("{MARKER}=1").into()));
    // execve itself, not execvp (what std's Command uses): a program the kernel cannot
    // run (an arm64 build under qemu-user without binfmt) must fail here, not be retried
    // as a shell script.
    let Err(error) = nix::unistd::execve(&program, &args, &env);
    eprintln!(
        "note: running with glibc's default malloc cache: re-executing with {TUNABLE} failed: {error}"
    );
}

/// Other platforms and C libraries keep their allocator's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn tune() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn the_tunable_is_added_unless_the_operator_set_it() {
        let ours = format!("{TUNABLE}={TCACHE_COUNT}");
        assert_eq!(tunables(None).as_deref(), Some(ours.as_str()));
        assert_eq!(
            tunables(Some(OsStr::new(""))).as_deref(),
            Some(ours.as_str())
        );
        assert_eq!(
            tunables(Some(OsStr::new("glibc.malloc.mxfast=0"))),
            Some(format!("glibc.malloc.mxfast=0:{ours}"))
        );
        for operator in [
            "glibc.malloc.tcache_count=7",
            "glibc.malloc.mxfast=0:glibc.malloc.tcache_count=0",
        ] {
            assert_eq!(tunables(Some(OsStr::new(operator))), None, "{operator}");
        }
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(tunables(Some(OsStr::from_bytes(b"\xff"))), None);
    }
}

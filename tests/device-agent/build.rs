//! Compiles the C device agent's POSIX build, as CI requires of device-side C: C11,
//! `-Wall -Wextra -Werror`, AddressSanitizer and UndefinedBehaviorSanitizer. It links
//! Debian's libcurl (libcurl4-openssl-dev), cJSON (libcjson-dev, the parser ESP-IDF ships
//! as its `json` component) and OpenSSL's libcrypto (libssl-dev); `cargo xtask test`
//! installs them. A missing header fails the build with the package to install.
//!
//! The compiler is `$CC`, else `cc`. No pkg-config: the headers are where Debian puts
//! them (cJSON in /usr/include/cjson).

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGES: &str = "libcurl4-openssl-dev libcjson-dev libssl-dev";

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let component = manifest_dir
        .join("../../devices/esp-idf/components/outpost_agent")
        .canonicalize()
        .expect("devices/esp-idf/components/outpost_agent");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-changed={}", component.display());
    println!("cargo:rerun-if-env-changed=CC");

    for (header, package) in [
        ("/usr/include/cjson/cJSON.h", "libcjson-dev"),
        ("/usr/include/openssl/evp.h", "libssl-dev"),
    ] {
        if !Path::new(header).exists() {
            panic!(
                "{header} is missing: the C device agent's test build needs {package} \
                 (apt-get install {PACKAGES}; `cargo xtask test` installs them)"
            );
        }
    }

    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let binary = out_dir.join("outpost-agent-posix");
    let mut command = Command::new(&cc);
    command
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer",
            // The POSIX build counts cJSON's allocations too (nothing else there uses
            // cJSON): the heap figure in docs/device-agent.md.
            "-DOUTPOST_AGENT_COUNT_CJSON",
        ])
        .arg("-I")
        .arg(component.join("include"))
        .arg("-I")
        .arg(component.join("port/posix"))
        .args(["-I", "/usr/include/cjson"])
        .arg(component.join("src/agent.c"))
        .arg(component.join("port/posix/port_posix.c"))
        .arg(component.join("port/posix/main.c"))
        .args(["-lcurl", "-lcjson", "-lcrypto", "-o"])
        .arg(&binary);
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run the C compiler {cc:?}: {err}"));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("curl/curl.h") || stderr.contains("-lcurl") {
            format!(" (libcurl is missing: apt-get install {PACKAGES})")
        } else {
            String::new()
        };
        panic!("compiling the C device agent failed{hint}:\n{stderr}");
    }
    println!("cargo:rustc-env=OUTPOST_AGENT_POSIX={}", binary.display());
}

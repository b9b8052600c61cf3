//! Signed handler packages and the installed-handler registry: every refusal leaves the
//! installed set and its files untouched; installs survive restarts; upgrades do not
//! disturb calls in flight.

use std::io::Read;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use outpost_runtime::package::{Manifest, Package, PackageError, RequestedLimits, TrustedVendor};
use outpost_runtime::{
    CacheOutcome, Device, HandlerRegistry, InstallError, LoadError, Runtime, RuntimeConfig, Step,
    Update,
};

use crate::support::{hostile_wasm, services};

fn acme_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn stranger_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

fn trusted() -> Vec<TrustedVendor> {
    vec![TrustedVendor {
        name: "acme".into(),
        key: acme_key().verifying_key(),
        device_types: vec!["hostile-device".into(), "hostile-spare".into()],
    }]
}

fn manifest(name: &str, version: &str) -> Manifest {
    Manifest {
        format: 1,
        name: name.into(),
        version: version.into(),
        vendor: "acme".into(),
        device_types: vec!["hostile-device".into()],
        wit: "outpost:handler@0.1.0".into(),
        limits: RequestedLimits {
            memory_mib: 64,
            cpu_ms: 1000,
        },
        component: "handler.wasm".into(),
        files: Default::default(),
    }
}

fn signed(manifest: Manifest, wasm: &[u8], key: &SigningKey) -> Vec<u8> {
    let mut package = Package::build(manifest, wasm.to_vec()).unwrap();
    package.sign(key);
    package.to_tar()
}

fn good_package(version: &str) -> Vec<u8> {
    signed(manifest("hostile", version), hostile_wasm(), &acme_key())
}

/// The entries of an archive, in order.
fn entries_of(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut tar = tar::Archive::new(archive);
    tar.entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            (name, bytes)
        })
        .collect()
}

/// Appends one entry with whatever name, type and declared size, bypassing the tar
/// crate's own checks, as a hostile packer would.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: tar::EntryType, data: &[u8], declared: u64) {
    let mut header = tar::Header::new_ustar();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_mode(0o644);
    header.set_size(declared);
    header.set_entry_type(kind);
    header.set_mtime(0);
    if kind == tar::EntryType::Symlink || kind == tar::EntryType::Link {
        header.as_old_mut().linkname[..11].copy_from_slice(b"/etc/passwd");
    }
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

fn raw_tar(entries: &[(String, Vec<u8>)], extra: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, bytes) in entries {
        raw_entry(
            &mut out,
            name.as_bytes(),
            tar::EntryType::Regular,
            bytes,
            bytes.len() as u64,
        );
    }
    extra(&mut out);
    out.extend_from_slice(&[0; 1024]);
    out
}

/// The good package with one more (hostile) entry appended.
fn good_plus(kind: tar::EntryType, name: &[u8], data: &[u8], declared: u64) -> Vec<u8> {
    raw_tar(&entries_of(&good_package("0.1.0")), |out| {
        raw_entry(out, name, kind, data, declared);
    })
}

async fn registry_in(dir: &std::path::Path) -> HandlerRegistry {
    let runtime = Arc::new(Runtime::new(RuntimeConfig::default()).unwrap());
    let (registry, warnings) = HandlerRegistry::open(dir, runtime, trusted())
        .await
        .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    registry
}

fn device(id: &str) -> Device {
    Device {
        id: id.into(),
        device_type: "hostile-device".into(),
        properties: vec![],
        firmware_version: None,
    }
}

fn no_update() -> Update {
    Update {
        provider: "acme".into(),
        name: "fw".into(),
        version: "1".into(),
        files: vec![],
        handler_properties: "{}".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_survives_a_restart_and_reuses_compiled_code() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_in(dir.path()).await;
    let (installed, outcome) = registry.install(&good_package("0.1.0")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    assert_eq!(
        (
            installed.manifest.version.as_str(),
            installed.vendor.as_str()
        ),
        ("0.1.0", "acme")
    );
    assert_eq!(installed.info.name, "hostile");
    drop(registry);

    let registry = registry_in(dir.path()).await;
    let handler = registry
        .for_device_type("hostile-device")
        .expect("lost on restart");
    let outcome = registry
        .runtime()
        .step(
            &handler.handler,
            &services(),
            Step::IsInstalled,
            &device("ok"),
            &no_update(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.result_code, 901);
    // Same component again: served from the compile cache.
    let (_, outcome) = registry.install(&good_package("0.1.1")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_compile_cache_entry_is_recompiled_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_in(dir.path()).await;
    registry.install(&good_package("0.1.0")).await.unwrap();
    let cached: Vec<_> = walk(&dir.path().join(".compiled"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let mut bytes = std::fs::read(&cached[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&cached[0], &bytes).unwrap();

    let (_, outcome) = registry.install(&good_package("0.1.0")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Recompiled);
    let (_, outcome) = registry.install(&good_package("0.1.0")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_code_no_installed_handler_uses_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_in(dir.path()).await;
    registry.install(&good_package("0.1.0")).await.unwrap();
    let compiled = dir.path().join(".compiled");
    let cwasm = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        walk(dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect()
    };
    let kept = cwasm(&compiled);
    assert_eq!(kept.len(), 1, "{kept:?}");
    // Code of an older gateway's engine, and of a component no longer installed.
    let stale_engine = compiled.join("0000000000000000");
    std::fs::create_dir_all(&stale_engine).unwrap();
    std::fs::write(
        stale_engine.join(format!("{}.cwasm", "a".repeat(64))),
        b"old",
    )
    .unwrap();
    let stale_component = kept[0].with_file_name(format!("{}.cwasm", "b".repeat(64)));
    std::fs::write(&stale_component, b"gone").unwrap();
    drop(registry);

    // A start keeps the installed handler's entry and drops the rest.
    let registry = registry_in(dir.path()).await;
    assert_eq!(cwasm(&compiled), kept);
    assert!(!stale_engine.exists());
    // Removing the handler drops its entry too.
    registry.remove("hostile").unwrap();
    assert!(cwasm(&compiled).is_empty());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Whether a refusal is the expected one.
type Expected = fn(&InstallError) -> bool;

fn not_a_regular_file(e: &InstallError) -> bool {
    matches!(
        e,
        InstallError::Package(PackageError::NotARegularFile { .. })
    )
}

fn unsafe_path(e: &InstallError) -> bool {
    matches!(e, InstallError::Package(PackageError::UnsafePath(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_package_is_refused_and_the_installed_handler_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_in(dir.path()).await;
    registry.install(&good_package("0.1.0")).await.unwrap();
    let stored = dir.path().join("hostile/package.tar");
    let before = std::fs::read(&stored).unwrap();

    let good_entries = entries_of(&good_package("0.1.0"));
    let tampered_manifest = {
        // Same files and signature, but a manifest that says another version.
        let mut entries = good_entries.clone();
        let manifest = entries
            .iter_mut()
            .find(|(n, _)| n == "outpost-handler.json")
            .unwrap();
        manifest.1 = String::from_utf8(manifest.1.clone())
            .unwrap()
            .replace("\"0.1.0\"", "\"9.9.9\"")
            .into_bytes();
        raw_tar(&entries, |_| {})
    };
    let swapped_component = {
        let mut entries = good_entries.clone();
        let component = entries
            .iter_mut()
            .find(|(n, _)| n == "handler.wasm")
            .unwrap();
        component.1[100] ^= 1;
        raw_tar(&entries, |_| {})
    };
    let other_vendor = {
        let mut m = manifest("hostile", "0.1.0");
        m.vendor = "globex".into();
        signed(m, hostile_wasm(), &acme_key())
    };
    let other_device_type = {
        let mut m = manifest("hostile", "0.1.0");
        m.device_types = vec!["thermostat".into()];
        signed(m, hostile_wasm(), &acme_key())
    };
    let future_wit = {
        let mut m = manifest("hostile", "0.1.0");
        m.wit = "outpost:handler@0.9.0".into();
        signed(m, hostile_wasm(), &acme_key())
    };
    let undeclared_device_type = {
        let mut m = manifest("hostile", "0.1.0");
        m.device_types.push("hostile-spare".into());
        signed(m, hostile_wasm(), &acme_key())
    };
    let foreign_import = wat::parse_str(
        r#"(component (import "outpost:handler/firmware-flasher@0.1.0" (instance (export "flash" (func)))))"#,
    )
    .unwrap();
    let core_module = wat::parse_str("(module)").unwrap();
    let many_entries = raw_tar(&good_entries, |out| {
        for n in 0..16 {
            raw_entry(
                out,
                format!("extra{n}").as_bytes(),
                tar::EntryType::Regular,
                b"x",
                1,
            );
        }
    });

    let cases: Vec<(&str, Vec<u8>, Expected)> = vec![
        ("not a tar", b"\x7fELF not a tar".repeat(100), |e| {
            matches!(
                e,
                InstallError::Package(PackageError::NotATar(_) | PackageError::MissingManifest)
            )
        }),
        (
            "unsigned",
            Package::build(manifest("hostile", "0.1.0"), hostile_wasm().to_vec())
                .unwrap()
                .to_tar(),
            |e| matches!(e, InstallError::Package(PackageError::Unsigned)),
        ),
        (
            "unknown key",
            signed(
                manifest("hostile", "0.1.0"),
                hostile_wasm(),
                &stranger_key(),
            ),
            |e| matches!(e, InstallError::Package(PackageError::UnknownKey(_))),
        ),
        ("bad signature", tampered_manifest, |e| {
            matches!(e, InstallError::Package(PackageError::BadSignature))
        }),
        ("vendor mismatch", other_vendor, |e| {
            matches!(
                e,
                InstallError::Package(PackageError::VendorMismatch { .. })
            )
        }),
        ("device type not allowed", other_device_type, |e| {
            matches!(
                e,
                InstallError::Package(PackageError::DeviceTypeNotAllowed { .. })
            )
        }),
        (
            "file not covered",
            good_plus(tar::EntryType::Regular, b"extra.bin", b"payload", 7),
            |e| matches!(e, InstallError::Package(PackageError::NotCovered(_))),
        ),
        ("changed component", swapped_component, |e| {
            matches!(e, InstallError::Package(PackageError::HashMismatch(_)))
        }),
        (
            "path traversal",
            good_plus(tar::EntryType::Regular, b"../../etc/cron.d/x", b"x", 1),
            unsafe_path,
        ),
        (
            "absolute path",
            good_plus(tar::EntryType::Regular, b"/etc/passwd", b"x", 1),
            unsafe_path,
        ),
        (
            "directory in a name",
            good_plus(tar::EntryType::Regular, b"lib/evil.so", b"x", 1),
            unsafe_path,
        ),
        (
            "symlink",
            good_plus(tar::EntryType::Symlink, b"link", b"", 0),
            not_a_regular_file,
        ),
        (
            "hard link",
            good_plus(tar::EntryType::Link, b"hard", b"", 0),
            not_a_regular_file,
        ),
        (
            "device file",
            good_plus(tar::EntryType::Char, b"null", b"", 0),
            not_a_regular_file,
        ),
        (
            "directory",
            good_plus(tar::EntryType::Directory, b"dir", b"", 0),
            not_a_regular_file,
        ),
        (
            "oversized entry",
            good_plus(tar::EntryType::Regular, b"huge.bin", b"", 33 << 20),
            |e| matches!(e, InstallError::Package(PackageError::EntryTooLarge { .. })),
        ),
        ("too many entries", many_entries, |e| {
            matches!(e, InstallError::Package(PackageError::TooManyEntries))
        }),
        ("WIT version not offered", future_wit, |e| {
            matches!(
                e,
                InstallError::Package(PackageError::UnsupportedWit { .. })
            )
        }),
        (
            "import the host does not provide",
            signed(manifest("hostile", "0.1.0"), &foreign_import, &acme_key()),
            |e| matches!(e, InstallError::Load(LoadError::UnsupportedImport(_))),
        ),
        (
            "core module",
            signed(manifest("hostile", "0.1.0"), &core_module, &acme_key()),
            |e| matches!(e, InstallError::Load(LoadError::CoreModule)),
        ),
        (
            "describe contradicts the manifest",
            undeclared_device_type,
            |e| matches!(e, InstallError::DescribeMismatch(_)),
        ),
        (
            "device type taken by another handler",
            signed(
                manifest("hostile-two", "0.1.0"),
                hostile_wasm(),
                &acme_key(),
            ),
            |e| matches!(e, InstallError::Conflict { .. }),
        ),
    ];

    for (case, archive, expected) in cases {
        let err = match registry.install(&archive).await {
            Ok(_) => panic!("{case}: accepted"),
            Err(err) => err,
        };
        assert!(expected(&err), "{case}: wrong refusal: {err}");
        assert!(!err.to_string().is_empty());
        let names: Vec<_> = registry
            .list()
            .iter()
            .map(|h| h.manifest.version.clone())
            .collect();
        assert_eq!(names, ["0.1.0"], "{case}: the installed set changed");
        assert_eq!(
            std::fs::read(&stored).unwrap(),
            before,
            "{case}: the stored package changed"
        );
    }
    let dirs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        dirs.len(),
        2,
        "refused packages left files behind: {dirs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_do_not_disturb_calls_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(registry_in(dir.path()).await);
    registry.install(&good_package("0.1.0")).await.unwrap();
    let old = registry.get("hostile").unwrap();

    let callers: Vec<_> = (0..4)
        .map(|_| {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let mut versions = Vec::new();
                for _ in 0..40 {
                    let handler = registry
                        .for_device_type("hostile-device")
                        .expect("no handler mid-upgrade");
                    let outcome = registry
                        .runtime()
                        .step(
                            &handler.handler,
                            &services(),
                            Step::IsInstalled,
                            &device("ok"),
                            &no_update(),
                        )
                        .await
                        .expect("a call failed during an upgrade");
                    assert_eq!(outcome.result_code, 901);
                    versions.push(handler.manifest.version.clone());
                }
                versions
            })
        })
        .collect();
    for version in ["0.2.0", "0.3.0", "0.4.0"] {
        registry.install(&good_package(version)).await.unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for caller in callers {
        seen.extend(caller.await.unwrap());
    }
    assert!(seen.contains("0.1.0") || seen.contains("0.4.0"), "{seen:?}");
    assert_eq!(registry.get("hostile").unwrap().manifest.version, "0.4.0");

    // A caller that still holds the old version can finish with it.
    let outcome = registry
        .runtime()
        .step(
            &old.handler,
            &services(),
            Step::IsInstalled,
            &device("ok"),
            &no_update(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.result_code, 901);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_forgets_the_handler_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_in(dir.path()).await;
    registry.install(&good_package("0.1.0")).await.unwrap();
    registry.remove("hostile").unwrap();
    assert!(registry.list().is_empty());
    assert!(matches!(
        registry.remove("hostile"),
        Err(InstallError::NotInstalled(_))
    ));
    drop(registry);
    assert!(registry_in(dir.path()).await.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_vendor_key_skips_the_handler_with_a_warning_and_keeps_its_file() {
    let dir = with_hostile_installed().await;
    let runtime = Arc::new(Runtime::new(RuntimeConfig::default()).unwrap());
    let (registry, warnings) = HandlerRegistry::open(dir.path(), runtime, vec![])
        .await
        .unwrap();
    assert!(registry.list().is_empty());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("unknown key"), "{warnings:?}");
    assert!(dir.path().join("hostile/package.tar").exists());
}

/// Installs the hostile guest with the limits its describe asks for.
async fn install_hostile(
    registry: &HandlerRegistry,
) -> (Arc<outpost_runtime::InstalledHandler>, CacheOutcome) {
    registry
        .install(&signed(
            manifest("hostile", "0.1.0"),
            hostile_wasm(),
            &acme_key(),
        ))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_runs_under_the_limits_it_asks_for_capped_by_the_gateway() {
    // The hostile guest asks for 64 MiB and 1000 ms (describe and manifest alike); this
    // gateway allows at most 16 MiB and 200 ms, so its calls run under those.
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(
        Runtime::new(RuntimeConfig {
            memory_limit: 16 << 20,
            cpu_time: std::time::Duration::from_millis(200),
            ..RuntimeConfig::default()
        })
        .unwrap(),
    );
    let (registry, _) = HandlerRegistry::open(dir.path(), runtime, trusted())
        .await
        .unwrap();
    let (installed, _) = install_hostile(&registry).await;
    let limits = installed.handler.limits();
    assert_eq!(limits.memory, 16 << 20);
    assert_eq!(limits.cpu_time, std::time::Duration::from_millis(200));

    let call = |id: &'static str| {
        let (registry, handler) = (&registry, installed.handler.clone());
        async move {
            registry
                .runtime()
                .step(
                    &handler,
                    &services(),
                    Step::IsInstalled,
                    &device(id),
                    &no_update(),
                )
                .await
        }
    };
    let err = call("memory-bomb").await.unwrap_err();
    assert!(err.to_string().contains("memory limit of 16 MiB"), "{err}");
    let started = std::time::Instant::now();
    let err = call("loop").await.unwrap_err();
    assert_eq!(
        err.trap_kind(),
        Some(&outpost_runtime::TrapKind::CpuDeadline)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // On a gateway that allows more, it gets what it asks for, not more.
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_in(dir.path()).await;
    let (installed, _) = install_hostile(&registry).await;
    assert_eq!(installed.handler.limits().memory, 64 << 20);
    assert_eq!(
        installed.handler.limits().cpu_time,
        std::time::Duration::from_millis(1000)
    );
}

/// A handler's limits come from one place: a signed manifest that contradicts `describe`
/// is refused whole, naming both; nothing is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_whose_limits_contradict_describe_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_in(dir.path()).await;
    let mut greedy = manifest("hostile", "0.1.0");
    greedy.limits = RequestedLimits {
        memory_mib: 4096,
        cpu_ms: 600_000,
    };
    let err = registry
        .install(&signed(greedy, hostile_wasm(), &acme_key()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "describe asks for 64 MiB and 1000 ms, the signed manifest for 4096 MiB and 600000 ms"
        ),
        "{err}"
    );
    assert!(registry.list().is_empty());
    assert!(!dir.path().join("hostile").exists());
}

fn runtime_with(compiler: outpost_runtime::Compiler) -> Arc<Runtime> {
    Arc::new(
        Runtime::new(RuntimeConfig {
            compiler,
            ..RuntimeConfig::default()
        })
        .unwrap(),
    )
}

/// A state directory with the hostile handler installed.
async fn with_hostile_installed() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    registry_in(dir.path())
        .await
        .install(&good_package("0.1.0"))
        .await
        .unwrap();
    dir
}

/// A registry started (not loaded) on a directory with the hostile handler installed and
/// no compiled code, compiling with `compiler`.
async fn started_uncompiled(
    compiler: outpost_runtime::Compiler,
) -> (tempfile::TempDir, Arc<HandlerRegistry>) {
    let dir = with_hostile_installed().await;
    std::fs::remove_dir_all(dir.path().join(".compiled")).unwrap();
    let (registry, warnings) =
        HandlerRegistry::start(dir.path(), runtime_with(compiler), trusted()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    (dir, Arc::new(registry))
}

/// A gateway starts before its handlers compile: `start` lists them as compiling, a
/// rollout's wait for one ends when `load_pending` has loaded it, and a wait for a
/// device type no handler serves ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_found_at_start_are_listed_as_compiling_until_loaded() {
    let (_dir, registry) = started_uncompiled(outpost_runtime::Compiler::InProcess).await;
    let listed = registry.summaries();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, outpost_runtime::HandlerState::Compiling);
    assert!(registry.is_compiling("hostile-device"));
    assert_eq!(
        registry.handler_name_for("hostile-device").as_deref(),
        Some("hostile")
    );
    assert!(registry.for_device_type("hostile-device").is_none());
    assert!(
        registry
            .ready_for_device_type("other-device")
            .await
            .is_none()
    );

    // join polls the wait first: it is waiting when the load begins.
    let (ready, warnings) = tokio::join!(
        registry.ready_for_device_type("hostile-device"),
        registry.load_pending()
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let ready = ready.expect("the waiter gets the handler");
    assert_eq!(ready.manifest.version, "0.1.0");
    assert_eq!(
        registry.summaries()[0].state,
        outpost_runtime::HandlerState::Ready
    );
    assert!(!registry.is_compiling("hostile-device"));
}

/// A handler that fails to load at start is given up: its waiters hear there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_a_handler_whose_compile_fails_ends_with_none() {
    // A compiler that crashes.
    let (dir, registry) = started_uncompiled(outpost_runtime::Compiler::Child {
        program: "sh".into(),
        args: vec!["-c".into(), "kill -9 $$".into(), "sh".into()],
    })
    .await;
    let (ready, warnings) = tokio::join!(
        registry.ready_for_device_type("hostile-device"),
        registry.load_pending()
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("the handler compiler failed") && warnings[0].contains("signal: 9"),
        "{warnings:?}"
    );
    assert!(ready.is_none());
    assert!(registry.summaries().is_empty());
    // The package stays on disk for the next start.
    assert!(dir.path().join("hostile/package.tar").is_file());
}

/// The compiler child's refusal reaches the installer as the component's error; a
/// compiler that cannot be started at all is replaced by a compile in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiler_child_refusal_is_the_install_error_and_a_missing_one_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let refusing = runtime_with(outpost_runtime::Compiler::Child {
        program: "sh".into(),
        args: vec![
            "-c".into(),
            format!(
                "cat >/dev/null; echo 'unknown import: acme:magic' >&2; exit {}",
                outpost_runtime::COMPILE_REFUSED
            ),
            "sh".into(),
        ],
    });
    let (registry, _) = HandlerRegistry::open(dir.path(), refusing, trusted())
        .await
        .unwrap();
    let err = registry.install(&good_package("0.1.0")).await.unwrap_err();
    assert!(
        matches!(&err, InstallError::Load(LoadError::Invalid(why)) if why == "unknown import: acme:magic"),
        "{err:?}"
    );
    assert!(registry.summaries().is_empty());
    assert!(!dir.path().join("hostile").exists());

    let missing = runtime_with(outpost_runtime::Compiler::Child {
        program: dir.path().join("no-such-compiler"),
        args: vec![],
    });
    let (registry, _) = HandlerRegistry::open(dir.path(), missing, trusted())
        .await
        .unwrap();
    let (installed, outcome) = registry.install(&good_package("0.1.0")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    assert_eq!(installed.info.name, "hostile");
}

/// An install whose caller stops waiting (an HTTP client that hung up) leaves nothing
/// behind: not listed as compiling, no files, its compiler child stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_dropped_mid_compile_is_no_longer_listed() {
    let dir = tempfile::tempdir().unwrap();
    // A compiler that never finishes.
    let slow = runtime_with(outpost_runtime::Compiler::Child {
        program: "sh".into(),
        args: vec![
            "-c".into(),
            "cat >/dev/null; exec sleep 600".into(),
            "sh".into(),
        ],
    });
    let (registry, _) = HandlerRegistry::open(dir.path(), slow, trusted())
        .await
        .unwrap();
    let package = good_package("0.1.0");
    let mut install = Box::pin(registry.install(&package));
    // Poll the install until it is listed as compiling.
    while registry.summaries().is_empty() {
        tokio::select! {
            biased;
            result = &mut install => panic!("the install ended: {:?}", result.map(|_| ())),
            () = tokio::task::yield_now() => {}
        }
    }
    assert_eq!(
        registry.summaries()[0].state,
        outpost_runtime::HandlerState::Compiling
    );
    assert!(registry.is_compiling("hostile-device"));
    drop(install);
    assert!(registry.summaries().is_empty());
    assert!(
        registry
            .ready_for_device_type("hostile-device")
            .await
            .is_none()
    );
    assert!(!dir.path().join("hostile").exists());
}

/// While a handler found at start is compiling, another handler cannot take its device
/// type, and it cannot be removed until it is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiling_handler_keeps_its_device_types_and_cannot_be_removed_yet() {
    let (_dir, registry) = started_uncompiled(outpost_runtime::Compiler::InProcess).await;
    let mut rival = manifest("rival", "1.0.0");
    rival.device_types = vec!["hostile-device".into()];
    let err = registry
        .install(&signed(rival, hostile_wasm(), &acme_key()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InstallError::Conflict { other, .. } if other == "hostile"),
        "{err:?}"
    );
    assert!(matches!(
        registry.remove("hostile"),
        Err(InstallError::Compiling(_))
    ));
    assert!(registry.load_pending().await.is_empty());
    registry.remove("hostile").unwrap();
}

/// A version installed while the one found at start waits its turn replaces it; if the
/// install fails, the version found at start loads as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_supersedes_the_version_found_at_start_or_gives_it_back() {
    let (_dir, registry) = started_uncompiled(outpost_runtime::Compiler::InProcess).await;
    let mut greedy = manifest("hostile", "0.2.0");
    greedy.limits = RequestedLimits {
        memory_mib: 4096,
        cpu_ms: 600_000,
    };
    registry
        .install(&signed(greedy, hostile_wasm(), &acme_key()))
        .await
        .unwrap_err();
    assert_eq!(registry.summaries()[0].version, "0.1.0");
    assert!(registry.is_compiling("hostile-device"));
    registry.install(&good_package("0.3.0")).await.unwrap();
    assert!(registry.load_pending().await.is_empty());
    assert_eq!(registry.get("hostile").unwrap().manifest.version, "0.3.0");
}

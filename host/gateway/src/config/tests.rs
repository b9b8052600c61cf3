use std::path::{Path, PathBuf};

use super::{Config, ConfigError, LogFormat};

const MINIMAL: &str = "[gateway]\nid = \"gw-1\"\n";

fn parse_in(dir: &Path, text: &str) -> Result<Config, ConfigError> {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path)
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    parse_in(dir.path(), text)
}

/// Asserts the error points at `line:column` of the file and mentions `needle`.
fn assert_at(err: &ConfigError, line: usize, column: usize, needle: &str) {
    let message = err.to_string();
    match err {
        ConfigError::At {
            line: l, column: c, ..
        } => assert_eq!((*l, *c), (line, column), "wrong place in: {message}"),
        other => panic!("expected a located error, got {other:?}"),
    }
    assert!(
        message.contains(&format!("outpost.toml:{line}:{column}:")),
        "no file:line:column in: {message}"
    );
    assert!(message.contains(needle), "{needle:?} not in: {message}");
}

fn shipped_config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../gateway-config/outpost.toml")
}

#[test]
fn the_shipped_config_loads_offline_with_defaults() {
    let config = Config::load(&shipped_config_path()).unwrap();
    assert_eq!(config.gateway.id.as_str(), "site-gateway-1");
    assert_eq!(config.api.bind.to_string(), "127.0.0.1:8080");
    assert!(
        config.uplink.is_none(),
        "the shipped config must run offline"
    );
    assert!(config.api.admin_token.is_none());
    assert!(config.gateway.state_dir.is_absolute());
    assert!(config.gateway.state_dir.ends_with("gateway-config/state"));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn defaults_fill_every_section_but_the_gateway_id() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.gateway.name, "Outpost gateway");
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.log.level.as_str(), "info");
    assert!(config.ble.enabled);
    assert_eq!(config.handlers.memory_limit_mib.get(), 64);
    assert_eq!(config.handlers.cpu_time_ms.get(), 1000);
    assert_eq!(config.handlers.wall_time_secs, 30);
    assert_eq!(
        config.handlers.runtime_config().wall_time,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(config.cache.max_size_mib.get(), 2048);
}

#[test]
fn the_handler_wall_clock_limit_is_configurable() {
    let config = parse("[gateway]\nid = \"gw\"\n[handlers]\nwall_time_secs = 120\n").unwrap();
    assert_eq!(
        config.handlers.runtime_config().wall_time,
        std::time::Duration::from_secs(120)
    );
}

#[test]
fn unknown_key_names_file_line_and_column() {
    let err =
        parse("[gateway]\nid = \"gw-1\"\n\n[api]\nbind = \"127.0.0.1:9\"\nbnid = 1\n").unwrap_err();
    assert_at(&err, 6, 1, "unknown field `bnid`");
}

#[test]
fn unknown_section_is_an_error() {
    let err = parse("[gateway]\nid = \"gw-1\"\n[uplnik]\nbroker = \"mqtt://x\"\n").unwrap_err();
    assert_at(&err, 3, 2, "unknown field `uplnik`");
}

#[test]
fn wrong_type_names_the_line() {
    let err = parse("[gateway]\nid = \"gw-1\"\n[api]\nbind = 8080\n").unwrap_err();
    assert_at(&err, 4, 8, "invalid type");
}

#[test]
fn syntax_error_names_the_line() {
    let err = parse("[gateway]\nid = \"gw-1\n").unwrap_err();
    assert!(matches!(err, ConfigError::At { line: 2, .. }), "{err}");
}

#[test]
fn missing_gateway_id_is_an_error() {
    let err = parse("[gateway]\nname = \"x\"\n").unwrap_err();
    assert!(err.to_string().contains("missing field `id`"), "{err}");
    assert!(err.to_string().contains("outpost.toml"), "{err}");
}

#[test]
fn missing_file_names_the_path() {
    let err = Config::load(Path::new("/nonexistent/outpost.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("/nonexistent/outpost.toml"), "{message}");
    assert!(message.contains("No such file"), "{message}");
}

#[test]
fn invalid_values_are_located() {
    let cases = [
        ("[gateway]\nid = \"gw/1\"\n", 2, "invalid gateway id"),
        (
            "[gateway]\nid = \"gw\"\n[log]\nlevel = \"info,[[[\"\n",
            4,
            "invalid log level",
        ),
        (
            "[gateway]\nid = \"gw\"\n[uplink]\nbroker = \"http://x\"\n",
            4,
            "must start with mqtt:// or mqtts://",
        ),
        (
            "[gateway]\nid = \"gw\"\n[uplink]\nbroker = \"mqtts://h:70000\"\n",
            4,
            "port must be a number",
        ),
        (
            "[gateway]\nid = \"gw\"\n[handlers]\ncpu_time_ms = 0\n",
            4,
            "nonzero",
        ),
        (
            "[gateway]\nid = \"gw\"\n[handlers]\nmemory_limit_mib = 8192\n",
            4,
            "memory_limit_mib 8192: use 1 to 4096",
        ),
        (
            "[gateway]\nid = \"gw\"\n[handlers]\nwall_time_secs = 5\n",
            4,
            "wall_time_secs 5: use 11 to 3600",
        ),
        (
            "[gateway]\nid = \"gw\"\n[log]\nformat = \"xml\"\n",
            4,
            "unknown variant",
        ),
    ];
    for (text, line, needle) in cases {
        let err = parse(text).unwrap_err();
        assert!(
            matches!(err, ConfigError::At { line: l, .. } if l == line),
            "expected line {line} for {text:?}, got: {err}"
        );
        assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
    }
}

#[test]
fn secret_from_a_relative_file_is_resolved_and_never_shown() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    let secret_path = dir.path().join("secrets/token");
    std::fs::write(&secret_path, "s3cr3t-admin-token-value\n").unwrap();
    std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    let config = parse_in(
        dir.path(),
        "[gateway]\nid = \"gw\"\n[api]\nadmin_token = { file = \"secrets/token\" }\n",
    )
    .unwrap();
    let token = config.api.admin_token.as_ref().unwrap();
    assert_eq!(token.expose(), "s3cr3t-admin-token-value");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    let shown = format!("{config:?}\n{}", config.to_redacted_toml());
    assert!(!shown.contains("s3cr3t"), "secret leaked: {shown}");
    assert!(shown.contains("<redacted: from file"), "{shown}");
}

#[test]
fn a_secret_file_others_can_read_is_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret_path = dir.path().join("pw");
    std::fs::write(&secret_path, "pw-value").unwrap();
    std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = "[gateway]\nid = \"gw\"\n[uplink]\nbroker = \"mqtt://127.0.0.1\"\npassword = { file = \"pw\" }\n";
    let err = parse_in(dir.path(), text).unwrap_err();
    assert_at(
        &err,
        5,
        12,
        "can be read by other users (mode 644); run: chmod 600",
    );
    assert!(err.to_string().contains("allow_insecure_secrets"), "{err}");

    let allowed = text.replace(
        "id = \"gw\"\n",
        "id = \"gw\"\nallow_insecure_secrets = true\n",
    );
    let config = parse_in(dir.path(), &allowed).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(
        config.warnings[0].contains("chmod 600"),
        "{:?}",
        config.warnings
    );
}

#[test]
fn what_run_refuses_the_check_refuses_too() {
    // An admin token too short to be one, at its line.
    let err = parse("[gateway]\nid = \"gw\"\n[api]\nadmin_token = \"short\"\n").unwrap_err();
    assert_at(&err, 4, 15, "use at least 16");
    // A state directory that is a file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state"), "not a directory").unwrap();
    let err = parse_in(
        dir.path(),
        "[gateway]\nid = \"gw\"\nstate_dir = \"state\"\n",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("exists and is not a directory"),
        "{err}"
    );
}

#[test]
fn inline_secret_is_redacted_and_warns() {
    let config =
        parse("[gateway]\nid = \"gw\"\n[api]\nadmin_token = \"inline-token-0123456789\"\n")
            .unwrap();
    assert!(!config.to_redacted_toml().contains("inline-token"));
    assert_eq!(config.warnings.len(), 1);
}

#[test]
fn unresolvable_secrets_point_at_their_line() {
    let err = parse(
        "[gateway]\nid = \"gw\"\n[api]\nadmin_token = { env = \"OUTPOST_TEST_SURELY_UNSET_VAR\" }\n",
    )
    .unwrap_err();
    assert_at(&err, 4, 15, "OUTPOST_TEST_SURELY_UNSET_VAR is not set");

    let err =
        parse("[gateway]\nid = \"gw\"\n[api]\nadmin_token = { file = \"nope\" }\n").unwrap_err();
    assert_at(&err, 4, 15, "cannot read secret file");

    let err = parse("[gateway]\nid = \"gw\"\n[api]\nadmin_token = { env = \"A\", file = \"b\" }\n")
        .unwrap_err();
    assert_at(&err, 4, 15, "exactly one of");

    let err =
        parse("[gateway]\nid = \"gw\"\n[api]\nadmin_token = { vault = \"x\" }\n").unwrap_err();
    assert!(err.to_string().contains("unknown field `vault`"), "{err}");
}

#[test]
fn relative_paths_follow_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = parse_in(
        dir.path(),
        "[gateway]\nid = \"gw\"\nstate_dir = \"var/state\"\n[uplink]\nbroker = \"mqtts://b\"\nca_file = \"ca.pem\"\n",
    )
    .unwrap();
    assert_eq!(config.gateway.state_dir, dir.path().join("var/state"));
    assert_eq!(
        config.uplink.unwrap().ca_file.unwrap(),
        dir.path().join("ca.pem")
    );
}

#[test]
fn redacted_toml_reparses_to_the_same_effective_config() {
    let config = parse(MINIMAL).unwrap();
    let text = config.to_redacted_toml();
    let dir = tempfile::tempdir().unwrap();
    let again = parse_in(dir.path(), &text).unwrap();
    assert_eq!(again.gateway.state_dir, config.gateway.state_dir);
    assert_eq!(again.api.bind, config.api.bind);
    assert!(text.contains("runs offline"), "{text}");
}

#[test]
fn several_brokers_are_taken_in_order_and_what_is_wrong_is_said() {
    let config = parse(
        "[gateway]\nid = \"gw\"\n[uplink]\nbrokers = [\"mqtts://a.example\", \"mqtt://b.example:1884\"]\n",
    )
    .unwrap();
    let settings = super::engines::settings(&config, config.uplink.as_ref().unwrap());
    let outpost_uplink::Endpoint::Fixed { brokers, .. } = settings.endpoint else {
        panic!("not a fixed endpoint")
    };
    let brokers: Vec<String> = brokers.iter().map(ToString::to_string).collect();
    assert_eq!(brokers, ["mqtts://a.example:8883", "mqtt://b.example:1884"]);
    let base = "[gateway]\nid = \"gw\"\n[uplink]\n";
    let seventeen = format!(
        "brokers = [{}]\n",
        (1..=17)
            .map(|n| format!("\"mqtt://node-{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (uplink, needle) in [
        (
            "broker = \"mqtt://a\"\nbrokers = [\"mqtt://b\"]\n",
            "give broker or brokers, not both",
        ),
        (
            "brokers = [\"mqtt://a\", \"mqtt://a:1883\"]\n",
            "mqtt://a:1883 is listed twice",
        ),
        (
            "brokers = [\"mqtt://a\"]\n[uplink.registration]\nbroker = \"mqtt://r\"\nscope = \"s\"\nkey = \"a2V5\"\n",
            "exclude each other",
        ),
        ("brokers = [\"http://a\"]\n", "must start with mqtt://"),
        (
            "brokers = [\"mqtt://A:1883\", \"mqtts://a:1883\"]\n",
            "is listed twice",
        ),
        (
            "broker = \"mqtt://a\"\nkeepalive_secs = 2\n",
            "keepalive_secs = 2: give 5 to 65535",
        ),
        (
            "broker = \"mqtt://a\"\n[uplink.registration]\nbroker = \"mqtt://r\"\nscope = \"s\"\nkey = \"a2V5\"\n",
            "exclude each other",
        ),
        (
            "broker = \"mqtt://a\"\nprotocol = \"4\"\n",
            "unknown variant",
        ),
        (
            "brokers = []\n",
            "needs a broker, or an [uplink.registration]",
        ),
        (seventeen.as_str(), "brokers: at most 16"),
    ] {
        let err = parse(&format!("{base}{uplink}")).unwrap_err();
        assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
    }
}

#[test]
fn the_azure_iot_profile_takes_dps_or_a_hub_and_says_what_is_wrong() {
    const KEY: &str = "a2V5IGZvciB0aGUgYXp1cmUgY29uZmlnIHRlc3Q=";
    let dps = parse(&format!(
        "[gateway]\nid = \"gw\"\n[uplink]\nprofile = \"azure-iot\"\n[uplink.azure]\n\
         id_scope = \"0ne0001\"\ngroup_key = \"{KEY}\"\n"
    ))
    .unwrap();
    let azure = dps.uplink.as_ref().unwrap().azure.as_ref().unwrap();
    assert_eq!(azure.dps_host, "global.azure-devices-provisioning.net");
    assert_eq!((azure.port, azure.token_ttl_secs.get()), (8883, 3600));
    let shown = dps.to_redacted_toml();
    assert!(!shown.contains(KEY), "the group key leaked: {shown}");
    parse(&format!(
        "[gateway]\nid = \"gw\"\n[uplink]\nprofile = \"azure-iot\"\n[uplink.azure]\n\
         hub = \"site.azure-devices.net\"\ndevice_id = \"gw-1\"\nsymmetric_key = \"{KEY}\"\n"
    ))
    .unwrap();
    // X.509: no key, the gateway's certificate instead.
    let x509 = parse(
        "[gateway]\nid = \"gw\"\n[uplink]\nprofile = \"azure-iot\"\nclient_cert = \"gw.pem\"\n\
         client_key = \"-----BEGIN PRIVATE KEY-----\"\n[uplink.azure]\nid_scope = \"0ne0001\"\n",
    )
    .unwrap();
    let settings = super::engines::settings(&x509, x509.uplink.as_ref().unwrap());
    let outpost_uplink::Endpoint::Azure(azure) = settings.endpoint else {
        panic!("not the azure profile")
    };
    assert!(
        matches!(
            azure.identity,
            outpost_uplink::AzureIdentity::Dps {
                attestation: outpost_azure::provision::Attestation::X509,
                ..
            }
        ),
        "{:?}",
        azure.identity
    );
    // Devices with their own hub identity: a key each, or derived from the group's; their
    // keys are secrets like the gateway's, and they have lanes of their own in the outbox.
    let own = parse(&format!(
        "[gateway]\nid = \"gw\"\n[uplink]\nprofile = \"azure-iot\"\n[uplink.azure]\n\
         id_scope = \"0ne0001\"\ngroup_key = \"{KEY}\"\n[[uplink.azure.devices]]\n\
         device = \"esp-1\"\ndevice_id = \"site-esp-1\"\nsymmetric_key = \"a2V5IG9mIGVzcC0x\"\n\
         [[uplink.azure.devices]]\ndevice = \"esp-2\"\n"
    ))
    .unwrap();
    assert!(!own.to_redacted_toml().contains("a2V5IG9mIGVzcC0x"));
    assert_eq!(
        super::outbox_lanes(&own).into_iter().collect::<Vec<_>>(),
        ["esp-1", "esp-2"]
    );
    let settings = super::engines::settings(&own, own.uplink.as_ref().unwrap());
    let outpost_uplink::Endpoint::Azure(azure) = settings.endpoint else {
        panic!("not the azure profile")
    };
    assert_eq!(azure.devices.len(), 2);
    assert_eq!(azure.devices[0].hub_device_id, "site-esp-1");
    assert!(
        matches!(&azure.devices[0].key, outpost_uplink::OwnKey::Hub(key) if key == "a2V5IG9mIGVzcC0x")
    );
    assert_eq!(azure.devices[1].hub_device_id, "esp-2");
    assert!(matches!(
        azure.devices[1].key,
        outpost_uplink::OwnKey::Group
    ));
    let base = "[gateway]\nid = \"gw\"\n[uplink]\n";
    for (uplink, needle) in [
        ("profile = \"azure-iot\"\n", "needs [uplink.azure]"),
        (
            "profile = \"azure-iot\"\nbroker = \"mqtt://h\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n",
            "remove uplink.broker",
        ),
        (
            "profile = \"azure-iot\"\npassword = \"x\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n",
            "signs its own SAS tokens",
        ),
        (
            "profile = \"azure-iot\"\nprotocol = \"5\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n",
            "IoT Hub speaks MQTT 3.1.1",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nsymmetric_key = \"a2V5\"\n",
            "needs id_scope (through DPS) or hub",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nid_scope = \"s\"\nsymmetric_key = \"a2V5\"\n",
            "not both",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\ngroup_key = \"a2V5\"\n",
            "a group_key needs DPS",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nid_scope = \"s\"\n",
            "needs symmetric_key",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nid_scope = \"s\"\nsymmetric_key = \"a2V5\"\ngroup_key = \"a2V5\"\n",
            "not both",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nid_scope = \"s\"\nsymmetric_key = \"not base64!\"\n",
            "not base64",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nid_scope = \"s\"\ndevice_id = \"d\"\nsymmetric_key = \"a2V5\"\n",
            "DPS assigns the device id",
        ),
        (
            "broker = \"mqtt://h\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n",
            "is for uplink.profile = \"azure-iot\"",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"mqtts://h:8883\"\nsymmetric_key = \"a2V5\"\n",
            "host name only",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\ndevice_id = \"a/b\"\nsymmetric_key = \"a2V5\"\n",
            "device_id \"a/b\"",
        ),
        (
            "profile = \"aws\"\nbroker = \"mqtt://h\"\n",
            "unknown variant",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [uplink.azure.device_update]\nmanufacturer = \"Acme\"\nmodel = \"gw\"\n",
            "needs the Device Update root keys",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [uplink.azure.device_update]\nmanufacturer = \"\"\nmodel = \"gw\"\n",
            "manufacturer \"\": give 1-64",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"esp-1\"\n",
            "has no symmetric_key: give its key at the hub, or register the gateway through a \
             DPS enrollment group",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"esp-1\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"esp-1\"\nsymmetric_key = \"a2V5\"\n",
            "\"esp-1\" is listed twice",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"esp-1\"\ndevice_id = \"x\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"esp-2\"\ndevice_id = \"x\"\nsymmetric_key = \"a2V5\"\n",
            "two devices have the hub id \"x\"",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"esp-1\"\ndevice_id = \"gw\"\nsymmetric_key = \"a2V5\"\n",
            "\"gw\" is the gateway's own id at the hub",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"gateway\"\ndevice_id = \"g\"\nsymmetric_key = \"a2V5\"\n",
            "a device cannot take it",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"esp/1\"\nsymmetric_key = \"a2V5\"\n",
            "[[uplink.azure.devices]] device \"esp/1\"",
        ),
        (
            "profile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
             [[uplink.azure.devices]]\ndevice = \"esp-1\"\nsymmetric_key = \"not base64!\"\n",
            "[[uplink.azure.devices]]: ",
        ),
    ] {
        let err = parse(&format!("{base}{uplink}")).unwrap_err();
        assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
    }
}

/// Device Update: the agent's identity and the operator's root keys, checked as read.
#[test]
fn device_update_takes_root_keys_as_device_update_publishes_them() {
    // A 2048-bit modulus of 0xFF bytes stands in for a root's (only its form is read here).
    let n = outpost_cache::adu::AduRootKey {
        kid: String::new(),
        n: vec![0xFF; 256],
        e: Vec::new(),
    }
    .to_base64()
    .0;
    let config = parse(&format!(
        "[gateway]\nid = \"gw\"\n[[cache.adu_roots]]\nkid = \"ADU.200702.R\"\nn = \"{n}\"\n\
         [uplink]\nprofile = \"azure-iot\"\n[uplink.azure]\nhub = \"h\"\nsymmetric_key = \"a2V5\"\n\
         [uplink.azure.device_update]\nmanufacturer = \"Acme\"\nmodel = \"site-gateway\"\n"
    ))
    .unwrap();
    let roots = config.cache.cache_config(Path::new("/x")).adu_roots;
    assert_eq!(roots[0].kid, "ADU.200702.R");
    assert_eq!(roots[0].e, [1, 0, 1], "e defaults to AQAB (65537)");
    assert_eq!(roots[0].n.len(), 256);
    let settings = super::engines::settings(&config, config.uplink.as_ref().unwrap());
    let outpost_uplink::Endpoint::Azure(azure) = settings.endpoint else {
        panic!("not the azure profile")
    };
    assert_eq!(azure.device_update.unwrap().model, "site-gateway");
    for (root, needle) in [
        ("kid = \"r\"\nn = \"AQAB\"\n", "2048-8192 bits"),
        ("kid = \"r\"\nn = \"not base64!\"\n", "n: not base64"),
        ("kid = \"r\"\n", "missing field `n`"),
    ] {
        let err = parse(&format!(
            "[gateway]\nid = \"gw\"\n[[cache.adu_roots]]\n{root}"
        ))
        .unwrap_err();
        assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
    }
}

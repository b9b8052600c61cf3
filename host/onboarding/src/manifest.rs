//! The device manifest an operator imports. Four forms, told apart by their first
//! characters:
//! - JSON: `{"devices": [...]}`, a bare array, or one object;
//! - JSON Lines: one object per line;
//! - the QR codes Espressif's provisioning examples print, as a QR scanner returns them
//!   (`{"ver":"v1","name":"PROV_…","pop":"…","transport":"ble"}`, one per line) or as the
//!   URL their console shows (`https://…/qrcode.html?data={…}`), in any mix with JSON
//!   lines;
//! - CSV with a header line (RFC 4180 quoting).
//!
//! Every entry names a device (BLE name or MAC, or any name for SoftAP), its security and
//! credentials, and its device type; what an entry leaves out comes from the
//! [`ImportDefaults`] given with the import (a QR code carries no device type).

use std::collections::HashMap;
use std::net::SocketAddr;

use outpost_store::{OnboardingTarget, Transport};
use serde::Deserialize;

/// An entry with where it stood ("entry 3", "line 4"), or why it did not parse.
type Placed = (String, Result<Entry, String>);

/// What an import fills in where an entry is silent. Espressif's QR codes carry no device
/// type, and a Security 2 code may leave the username to the site's convention.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportDefaults {
    /// The device type of entries without one.
    pub device_type: Option<String>,
    /// The security version of entries without one. For a QR code with a PoP and no
    /// username: 2 reads the PoP as the Security 2 password.
    pub security: Option<u8>,
    /// The Security 2 username of entries without one (`wifiprov` in ESP-IDF's examples).
    pub username: Option<String>,
    /// The `host:port` of SoftAP entries without one (default [`SOFTAP_ADDRESS`]).
    pub address: Option<String>,
}

impl ImportDefaults {
    /// Reads the defaults from a query string (`device_type=light&security=2`); an unknown
    /// or repeated key, or a security that is not a number, is an error naming it.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut defaults = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "device_type" => &mut defaults.device_type,
                "username" => &mut defaults.username,
                "address" => &mut defaults.address,
                "security" => {
                    let number = value
                        .parse::<u8>()
                        .map_err(|_| format!("security {value:?} is not a number (0, 1 or 2)"))?;
                    if defaults.security.replace(number).is_some() {
                        return Err("security is given twice".into());
                    }
                    continue;
                }
                other => {
                    return Err(format!(
                        "unknown import setting {other:?} (known: device_type, security, \
                         username, address)"
                    ));
                }
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(format!("{key} is given twice"));
            }
        }
        Ok(defaults)
    }

    /// The query string [`ImportDefaults::from_query`] reads back.
    pub fn to_query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(v) = &self.device_type {
            query.append_pair("device_type", v);
        }
        if let Some(v) = self.security {
            query.append_pair("security", &v.to_string());
        }
        if let Some(v) = &self.username {
            query.append_pair("username", v);
        }
        if let Some(v) = &self.address {
            query.append_pair("address", v);
        }
        query.finish()
    }
}

/// Where an ESP device in SoftAP provisioning mode serves protocomm, unless told otherwise:
/// ESP-IDF's default SoftAP address and its httpd port.
pub const SOFTAP_ADDRESS: &str = "192.168.4.1:80";

/// One manifest entry as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    mac: Option<String>,
    #[serde(default)]
    transport: Option<String>,
    address: Option<String>,
    security: Option<u8>,
    pop: Option<String>,
    username: Option<String>,
    password: Option<String>,
    device_type: Option<String>,
    /// From a QR code: its PoP is the Security 2 password when the entry ends up at 2.
    #[serde(skip)]
    from_qr: bool,
}

/// The payload of the QR code Espressif's provisioning examples print (`ver` "v1").
/// Further keys some firmware adds are ignored, but for `mac`, which is read.
#[derive(Debug, Deserialize)]
struct QrPayload {
    ver: String,
    name: String,
    username: Option<String>,
    pop: Option<String>,
    transport: Option<String>,
    /// network_provisioning's codes say which network; only Wi-Fi is provisioned here.
    network: Option<String>,
    mac: Option<String>,
}

impl TryFrom<QrPayload> for Entry {
    type Error = String;

    fn try_from(qr: QrPayload) -> Result<Self, String> {
        if qr.ver != "v1" {
            return Err(format!(
                "QR code version {:?} is not v1, the one Espressif's provisioning prints",
                qr.ver
            ));
        }
        if let Some(network) = qr.network.as_deref().filter(|n| *n != "wifi") {
            return Err(format!(
                "QR code for a {network:?} network: only Wi-Fi provisioning is supported"
            ));
        }
        // A code with a username is Security 2, and its `pop` is the SRP password.
        let security = qr.username.as_ref().map(|_| 2);
        Ok(Self {
            name: Some(qr.name),
            mac: qr.mac,
            transport: qr.transport,
            security,
            pop: qr.pop,
            username: qr.username,
            from_qr: true,
            ..Self::default()
        })
    }
}

/// One JSON value of a manifest: a QR payload when it has `ver`, else an entry.
fn entry_of(value: serde_json::Value) -> Result<Entry, String> {
    if value.get("ver").is_some() {
        let qr: QrPayload = serde_json::from_value(value).map_err(|e| format!("QR code: {e}"))?;
        Entry::try_from(qr)
    } else {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }
}

/// Parses and validates a manifest; every problem names its entry or line.
pub fn parse(bytes: &[u8], defaults: &ImportDefaults) -> Result<Vec<OnboardingTarget>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the manifest is not UTF-8 text")?;
    // A spreadsheet's or an editor's byte-order mark is not part of the manifest.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // The form is told by the first line that is not blank or a `#` comment.
    let (first_line, first) = text
        .lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .find(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or((1, ""));
    let neither = "neither a JSON object nor a QR URL";
    let entries: Vec<Placed> = if first.starts_with('{') || first.starts_with('[') {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(document) => json_entries(document)?,
            // Not one document: one object (or QR URL) per line, if every line is one.
            Err(whole) => match parse_lines(text) {
                Ok(entries) => entries,
                Err((line, _)) if line == first_line => {
                    return Err(format!("the manifest is not valid JSON: {whole}"));
                }
                Err((line, err)) => {
                    return Err(format!(
                        "line {line}: {}",
                        err.as_deref().unwrap_or(neither)
                    ));
                }
            },
        }
    } else if first.starts_with("http://") || first.starts_with("https://") {
        parse_lines(text)
            .map_err(|(line, err)| format!("line {line}: {}", err.as_deref().unwrap_or(neither)))?
    } else {
        parse_csv(text)?
    };
    if entries.is_empty() {
        return Err("the manifest lists no devices".into());
    }
    let mut targets = Vec::with_capacity(entries.len());
    let mut names: HashMap<String, String> = HashMap::new();
    let mut macs: HashMap<String, String> = HashMap::new();
    for (place, entry) in entries {
        let entry = entry.map_err(|e| format!("{place}: {e}"))?;
        let target = validate(entry, defaults).map_err(|e| format!("{place}: {e}"))?;
        if let Some(first) = names.insert(target.name.clone(), place.clone()) {
            return Err(format!(
                "{place}: duplicate device name {:?} (also {first})",
                target.name
            ));
        }
        if let Some(mac) = &target.mac
            && let Some(first) = macs.insert(mac.to_ascii_uppercase(), place.clone())
        {
            return Err(format!(
                "{place}: duplicate MAC address {mac} (also {first})"
            ));
        }
        targets.push(target);
    }
    Ok(targets)
}

/// The entries of one JSON document: `{"devices": [...]}`, an array, or a single object
/// (one device, or one QR payload as a scanner returns it).
fn json_entries(document: serde_json::Value) -> Result<Vec<Placed>, String> {
    let values = match document {
        serde_json::Value::Array(values) => values,
        serde_json::Value::Object(mut object) if object.contains_key("devices") => {
            match object.remove("devices") {
                Some(serde_json::Value::Array(values)) if object.is_empty() => values,
                Some(serde_json::Value::Array(_)) => {
                    let extra = object.keys().next().cloned().unwrap_or_default();
                    return Err(format!(
                        "unknown top-level field {extra:?} beside \"devices\""
                    ));
                }
                _ => return Err("\"devices\" must be an array of entries".into()),
            }
        }
        object @ serde_json::Value::Object(_) => vec![object],
        _ => return Err("the manifest must be a JSON object or array".into()),
    };
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("entry {}", i + 1), entry_of(v)))
        .collect())
}

/// One device per line: a JSON object, or the QR URL Espressif's examples log
/// (`…?data={…}`, raw or percent-encoded). Blank lines and `#` comments are skipped. The
/// error is the 1-based line and what was wrong (`None`: not even the line's shape).
fn parse_lines(text: &str) -> Result<Vec<Placed>, (usize, Option<String>)> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let place = format!("line {}", n + 1);
        let json = if line.starts_with('{') {
            line.to_owned()
        } else if line.starts_with("http://") || line.starts_with("https://") {
            qr_url_data(line).map_err(|e| (n + 1, Some(e)))?
        } else {
            return Err((n + 1, None));
        };
        let value: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| (n + 1, Some(format!("not valid JSON: {e}"))))?;
        entries.push((place, entry_of(value)));
    }
    Ok(entries)
}

/// The `data` of a QR URL: the console prints the JSON raw after `data=`; a browser or a
/// QR app may hand it back percent-encoded.
fn qr_url_data(url: &str) -> Result<String, String> {
    let missing = || "a URL without ?data=".to_owned();
    let query = url.split_once('?').map(|(_, q)| q).ok_or_else(missing)?;
    // `data` may be any parameter. Raw JSON runs to its last brace (it may hold `&` or
    // `+`); anything else is percent-decoded as a URI component (no `+` for space, which
    // would change a PoP holding a plus).
    let start = if let Some(rest) = query.strip_prefix("data=") {
        query.len() - rest.len()
    } else {
        query
            .find("&data=")
            .map(|at| at + "&data=".len())
            .ok_or_else(missing)?
    };
    let value = &query[start..];
    if value.starts_with('{') {
        let end = value.rfind('}').map_or(value.len(), |at| at + 1);
        return Ok(value[..end].to_owned());
    }
    let value = value.split('&').next().unwrap_or_default();
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| "the QR URL's data is not UTF-8 once decoded".into())
}

fn validate(entry: Entry, defaults: &ImportDefaults) -> Result<OnboardingTarget, String> {
    let name = match (entry.name, &entry.mac) {
        (Some(name), _) if !name.trim().is_empty() => name,
        (_, Some(mac)) => mac.clone(),
        _ => return Err("needs a name (BLE name) or a MAC address".into()),
    };
    if let Some(mac) = &entry.mac {
        let parts: Vec<&str> = mac.split(':').collect();
        if parts.len() != 6
            || parts
                .iter()
                .any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err())
        {
            return Err(format!(
                "MAC address {mac:?} is not six hex pairs (AA:BB:CC:DD:EE:FF)"
            ));
        }
    }
    let transport = match entry.transport.as_deref() {
        None => Transport::Ble,
        Some(text) => text
            .parse::<Transport>()
            .map_err(|_| format!("transport {text:?} is not ble or softap"))?,
    };
    let address = match transport {
        Transport::Ble => entry.address,
        Transport::Softap => {
            let address = match (entry.address, &defaults.address) {
                (Some(address), _) => address,
                (None, Some(address)) => address.clone(),
                // A QR code's device is at ESP-IDF's SoftAP address once one joins its AP.
                (None, None) if entry.from_qr => SOFTAP_ADDRESS.to_owned(),
                (None, None) => {
                    return Err(
                        "transport softap needs an address (host:port, e.g. 192.168.4.1:80)".into(),
                    );
                }
            };
            address
                .parse::<SocketAddr>()
                .map_err(|_| format!("address {address:?} is not host:port"))?;
            Some(address)
        }
    };
    let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    // A QR code with a PoP and no username is Security 1, unless the import says 2.
    let security = match (entry.security, defaults.security) {
        (Some(security), _) | (None, Some(security)) => security,
        (None, None) if entry.from_qr && entry.pop.is_some() => 1,
        (None, None) if entry.from_qr => 0,
        (None, None) => {
            return Err("needs a security version (0, 1 or 2), or a default for the import".into());
        }
    };
    let (pop, username, password) = match security {
        0 => (None, None, None),
        1 => (non_empty(entry.pop), None, None),
        2 => {
            let username = non_empty(entry.username)
                .or_else(|| non_empty(defaults.username.clone()))
                .ok_or("security 2 needs a username")?;
            let password = if entry.from_qr {
                non_empty(entry.pop)
            } else {
                non_empty(entry.password)
            }
            .ok_or("security 2 needs a password")?;
            (None, Some(username), Some(password))
        }
        other => return Err(format!("security {other} does not exist (0, 1 or 2)")),
    };
    let device_type = non_empty(entry.device_type.map(|t| t.trim().to_owned()))
        .or_else(|| non_empty(defaults.device_type.clone()))
        .ok_or(if entry.from_qr {
            "a QR code names no device type: give one for the import (--device-type)"
        } else {
            "needs a device_type"
        })?;
    Ok(OnboardingTarget {
        name,
        device_type,
        transport,
        mac: entry.mac,
        address,
        security,
        pop,
        username,
        password,
        last_attempt_at: None,
        last_error: None,
    })
}

/// The 1-based line of the record that starts at or after byte `at` of `text`: the csv
/// crate places a record where the one before it ended, so the rest of that line (a
/// CRLF's newline), blank lines and `#` comments are stepped over.
fn line_at(text: &str, at: u64) -> u64 {
    let at = usize::try_from(at).unwrap_or(usize::MAX).min(text.len());
    let mut line = text.as_bytes()[..at]
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64
        + 1;
    let mut rest = &text[at..];
    // The end of the line `at` falls in, when only a line break is left of it.
    if let Some(end) = rest.find('\n')
        && rest[..end].trim().is_empty()
    {
        line += 1;
        rest = &rest[end + 1..];
    }
    for next in rest.lines() {
        let next = next.trim();
        if !next.is_empty() && !next.starts_with('#') {
            break;
        }
        line += 1;
    }
    line
}

/// The columns a CSV manifest may have, in any order.
const CSV_COLUMNS: [&str; 9] = [
    "name",
    "mac",
    "transport",
    "address",
    "security",
    "pop",
    "username",
    "password",
    "device_type",
];

/// CSV: a header line naming the columns (any order), then one device per line; RFC 4180
/// quoting (a value with a comma or a quote is quoted), `#` lines are comments.
fn parse_csv(text: &str) -> Result<Vec<Placed>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let columns: Vec<String> = reader
        .headers()
        .map_err(|e| format!("line 1: {e}"))?
        .iter()
        .map(str::to_owned)
        .collect();
    if columns.iter().all(String::is_empty) {
        return Err("the manifest is empty".into());
    }
    if let Some(unknown) = columns.iter().find(|c| !CSV_COLUMNS.contains(&c.as_str())) {
        return Err(format!(
            "line 1: unknown column {unknown:?} (known: {})",
            CSV_COLUMNS.join(", ")
        ));
    }
    let mut entries = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(record) => record,
            Err(err) => {
                let line = err.position().map_or(0, |p| line_at(text, p.byte()));
                let why = match err.kind() {
                    csv::ErrorKind::UnequalLengths {
                        len, expected_len, ..
                    } => {
                        format!("{len} values for {expected_len} columns")
                    }
                    _ => err.to_string(),
                };
                return Err(format!("line {line}: {why}"));
            }
        };
        let line = record.position().map_or(0, |p| line_at(text, p.byte()));
        let mut object = serde_json::Map::new();
        let mut error = None;
        for (column, value) in columns.iter().zip(record.iter()) {
            if value.is_empty() {
                continue;
            }
            let value = if column == "security" {
                match value.parse::<u8>() {
                    Ok(n) => serde_json::Value::from(n),
                    Err(_) => {
                        error = Some(format!("security {value:?} is not a number"));
                        break;
                    }
                }
            } else {
                serde_json::Value::from(value)
            };
            object.insert(column.clone(), value);
        }
        let entry = match error {
            Some(error) => Err(error),
            None => {
                serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| e.to_string())
            }
        };
        entries.push((format!("line {line}"), entry));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> ImportDefaults {
        ImportDefaults::default()
    }

    #[test]
    fn json_and_csv_manifests_parse_to_the_same_targets() {
        let json = br#"{"devices": [
            {"name": "PROV_A1", "security": 2, "username": "wifiprov", "password": "pw", "device_type": "light"},
            {"name": "lab", "transport": "softap", "address": "127.0.0.1:8080", "security": 1, "pop": "abcd", "device_type": "plug", "mac": "24:0a:c4:00:00:01"}
        ]}"#;
        let csv = b"name,transport,address,security,pop,username,password,device_type,mac\n\
            PROV_A1,ble,,2,,wifiprov,pw,light,\n\
            # a comment\n\
            lab,softap,127.0.0.1:8080,1,abcd,,,plug,24:0a:c4:00:00:01\n";
        let a = parse(json, &none()).unwrap();
        let b = parse(csv, &none()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].transport, Transport::Ble);
        assert_eq!(a[1].pop.as_deref(), Some("abcd"));
    }

    #[test]
    fn bad_manifests_are_refused_naming_the_entry() {
        let cases: [(&[u8], &str); 9] = [
            (b"[]", "no devices"),
            (br#"[{"name":"a","security":2,"device_type":"t","username":"u"}]"#, "entry 1: security 2 needs a password"),
            (br#"[{"name":"a","security":3,"device_type":"t"}]"#, "security 3"),
            (br#"[{"name":"a","security":0,"device_type":"t","transport":"softap"}]"#, "needs an address"),
            (br#"[{"name":"a","security":0,"device_type":"t","colour":"red"}]"#, "unknown field"),
            (br#"[{"name":"a","security":0,"device_type":"t"},{"name":"a","security":0,"device_type":"t"}]"#, "entry 2: duplicate device name \"a\" (also entry 1)"),
            (br#"[{"name":"a","mac":"11:22:33:44:55:66","security":0,"device_type":"t"},{"name":"b","mac":"11:22:33:44:55:66","security":0,"device_type":"t"}]"#, "duplicate MAC"),
            (b"name,security,device_type,colour\na,0,t,red\n", "unknown column"),
            (b"name,security,device_type\na,zero,t\n", "line 2: security \"zero\""),
        ];
        for (input, expected) in cases {
            let err = parse(input, &none()).unwrap_err();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
        assert!(parse(&[0xff, 0xfe], &none()).unwrap_err().contains("UTF-8"));
        assert!(parse(b"{not json", &none()).unwrap_err().contains("JSON"));
    }

    /// The QR payloads ESP-IDF's provisioning examples print, Security 1 and 2, as a
    /// scanner returns them and as the console's URL (raw and percent-encoded).
    #[test]
    fn espressif_qr_codes_import_with_the_defaults_they_lack() {
        let codes = concat!(
            r#"{"ver":"v1","name":"PROV_5E0001","pop":"abcd1234","transport":"ble"}"#,
            "\n# a comment, then the Security 2 form\n",
            r#"{"ver":"v1","name":"PROV_5E0002","username":"wifiprov","pop":"s3cret","transport":"ble"}"#,
            "\n",
            r#"https://espressif.github.io/esp-jumpstart/qrcode.html?data={"ver":"v1","name":"PROV_5E0003","transport":"ble"}"#,
            "\n",
            "https://espressif.github.io/esp-jumpstart/qrcode.html?data=%7B%22ver%22%3A%22v1%22%2C%22name%22%3A%22lab%22%2C%22pop%22%3A%22a%2Bb%22%2C%22transport%22%3A%22softap%22%2C%22network%22%3A%22wifi%22%7D\n",
        );
        let defaults = ImportDefaults {
            device_type: Some("esp32-app".into()),
            ..ImportDefaults::default()
        };
        let targets = parse(codes.as_bytes(), &defaults).unwrap();
        let summary: Vec<_> = targets
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    t.security,
                    t.pop.as_deref(),
                    t.username.as_deref(),
                    t.password.as_deref(),
                    t.transport,
                    t.address.as_deref(),
                    t.device_type.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "PROV_5E0001",
                    1,
                    Some("abcd1234"),
                    None,
                    None,
                    Transport::Ble,
                    None,
                    "esp32-app"
                ),
                (
                    "PROV_5E0002",
                    2,
                    None,
                    Some("wifiprov"),
                    Some("s3cret"),
                    Transport::Ble,
                    None,
                    "esp32-app"
                ),
                (
                    "PROV_5E0003",
                    0,
                    None,
                    None,
                    None,
                    Transport::Ble,
                    None,
                    "esp32-app"
                ),
                (
                    "lab",
                    1,
                    Some("a+b"),
                    None,
                    None,
                    Transport::Softap,
                    Some(SOFTAP_ADDRESS),
                    "esp32-app"
                ),
            ]
        );

        // `--security 2 --username wifiprov`: a code with only a PoP is Security 2, its
        // PoP the password; an entry's own values win over the defaults.
        let defaults = ImportDefaults::from_query(
            "device_type=light&security=2&username=wifiprov&address=10.0.0.9%3A80",
        )
        .unwrap();
        assert_eq!(
            ImportDefaults::from_query(&defaults.to_query()).unwrap(),
            defaults
        );
        let targets = parse(
            concat!(
                r#"{"ver":"v1","name":"PROV_A","pop":"abcd1234","transport":"ble"}"#,
                "\n",
                r#"{"ver":"v1","name":"PROV_B","username":"admin","pop":"pw","transport":"softap"}"#,
                "\n",
                r#"{"name":"PROV_C","security":1,"pop":"x","device_type":"plug"}"#,
            )
            .as_bytes(),
            &defaults,
        )
        .unwrap();
        assert_eq!(
            (
                targets[0].security,
                targets[0].username.as_deref(),
                targets[0].password.as_deref()
            ),
            (2, Some("wifiprov"), Some("abcd1234"))
        );
        assert_eq!(targets[1].username.as_deref(), Some("admin"));
        assert_eq!(targets[1].address.as_deref(), Some("10.0.0.9:80"));
        assert_eq!(
            (targets[2].security, targets[2].device_type.as_str()),
            (1, "plug")
        );
    }

    #[test]
    fn bad_qr_codes_and_defaults_are_refused_naming_the_line() {
        let device_type = ImportDefaults {
            device_type: Some("t".into()),
            ..ImportDefaults::default()
        };
        let cases: [(&str, &ImportDefaults, &str); 7] = [
            (
                r#"{"ver":"v1","name":"PROV_A","pop":"p","transport":"ble"}"#,
                &ImportDefaults::default(),
                "entry 1: a QR code names no device type: give one for the import (--device-type)",
            ),
            (
                r#"{"ver":"v2","name":"PROV_A","transport":"ble"}"#,
                &device_type,
                "QR code version \"v2\" is not v1",
            ),
            (
                concat!(
                    r#"{"ver":"v1","name":"PROV_A","transport":"ble"}"#,
                    "\n",
                    r#"{"ver":"v1","name":"PROV_B","transport":"ble","network":"thread"}"#
                ),
                &device_type,
                "line 2: QR code for a \"thread\" network",
            ),
            (
                concat!(
                    r#"{"ver":"v1","name":"PROV_A","transport":"ble"}"#,
                    "\n",
                    "PROV_B"
                ),
                &device_type,
                "line 2: neither a JSON object nor a QR URL",
            ),
            (
                concat!(
                    r#"{"ver":"v1","name":"PROV_A","transport":"ble"}"#,
                    "\n",
                    r#"{"ver":"v1","transport":"ble"}"#
                ),
                &device_type,
                "line 2: QR code: missing field `name`",
            ),
            (
                "https://espressif.github.io/esp-jumpstart/qrcode.html?name=PROV_A",
                &device_type,
                "line 1: a URL without ?data=",
            ),
            (
                r#"{"ver":"v1","name":"PROV_A","pop":"p","transport":"ble"}"#,
                &ImportDefaults {
                    security: Some(2),
                    ..device_type.clone()
                },
                "entry 1: security 2 needs a username",
            ),
        ];
        for (input, defaults, expected) in cases {
            let err = parse(input.as_bytes(), defaults).unwrap_err();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
        for (query, expected) in [
            ("colour=red", "unknown import setting \"colour\""),
            ("security=two", "security \"two\" is not a number"),
            ("device_type=a&device_type=b", "device_type is given twice"),
        ] {
            let err = ImportDefaults::from_query(query).unwrap_err();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }

    /// What spreadsheets, editors and consoles hand over: CRLF line ends, a byte-order
    /// mark, comments before the first entry, `data` that is not the URL's first parameter.
    #[test]
    fn crlf_comments_a_bom_and_odd_urls_keep_their_lines_and_secrets() {
        // CRLF with comments and blank lines: the bad row is named by its own line.
        let csv = "# fleet\r\nname,security,device_type\r\n# first\r\nPROV_A,0,t\r\n\r\n# next\r\nPROV_B,0\r\n";
        let err = parse(csv.as_bytes(), &none()).unwrap_err();
        assert!(err.starts_with("line 7: 2 values for 3 columns"), "{err}");
        let csv = "name,security,device_type\r\n# a comment\r\nPROV_A,zero,t\r\n";
        let err = parse(csv.as_bytes(), &none()).unwrap_err();
        assert!(err.starts_with("line 3: security \"zero\""), "{err}");

        // QR codes after a comment line, behind a byte-order mark.
        let codes = concat!(
            "\u{feff}# scanned at the warehouse\n",
            r#"{"ver":"v1","name":"PROV_A","pop":"p","transport":"ble"}"#,
            "\n",
            r#"https://espressif.github.io/esp-jumpstart/qrcode.html?lang=en&data={"ver":"v1","name":"PROV_B","pop":"a+b&c","transport":"ble"}"#,
            "\n",
            "https://espressif.github.io/esp-jumpstart/qrcode.html?lang=en&data=%7B%22ver%22%3A%22v1%22%2C%22name%22%3A%22PROV_C%22%2C%22pop%22%3A%22x%2By%22%2C%22transport%22%3A%22ble%22%7D&v=2\n",
        );
        let defaults = ImportDefaults {
            device_type: Some("t".into()),
            ..ImportDefaults::default()
        };
        let targets = parse(codes.as_bytes(), &defaults).unwrap();
        let pops: Vec<_> = targets.iter().map(|t| t.pop.as_deref()).collect();
        assert_eq!(pops, [Some("p"), Some("a+b&c"), Some("x+y")]);
        // A bad line after a comment is named by its line; a first line that is no
        // JSON is a JSON error.
        let err = parse(
            concat!(
                "# codes\n",
                r#"{"ver":"v1","name":"PROV_A","transport":"ble"}"#,
                "\nnot a code\n"
            )
            .as_bytes(),
            &defaults,
        )
        .unwrap_err();
        assert_eq!(err, "line 3: neither a JSON object nor a QR URL");
        let json = "\u{feff}{\"devices\": [{\"name\": \"PROV_A\", \"security\": 0, \"device_type\": \"t\"}]}";
        assert_eq!(parse(json.as_bytes(), &none()).unwrap()[0].name, "PROV_A");
    }

    #[test]
    fn csv_values_may_be_quoted_and_a_short_line_is_named() {
        let csv = concat!(
            "name,security,pop,device_type\n",
            "\"PROV, quoted\",1,\"a,\"\"b\"\"\",light\n",
        );
        let targets = parse(csv.as_bytes(), &none()).unwrap();
        assert_eq!(targets[0].name, "PROV, quoted");
        assert_eq!(targets[0].pop.as_deref(), Some("a,\"b\""));
        let err = parse(
            b"name,security,device_type\nPROV_A,0,t\nPROV_B,0\n",
            &none(),
        )
        .unwrap_err();
        assert!(err.contains("line 3: 2 values for 3 columns"), "{err}");
        let err = parse(b"name,device_type\nPROV_A,t\n", &none()).unwrap_err();
        assert!(err.contains("line 2: needs a security version"), "{err}");
        let defaults = ImportDefaults {
            security: Some(0),
            ..ImportDefaults::default()
        };
        assert_eq!(
            parse(b"name,device_type\nPROV_A,t\n", &defaults).unwrap()[0].security,
            0
        );
    }
}

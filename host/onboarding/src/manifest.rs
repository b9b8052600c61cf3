//! The device manifest an operator imports: JSON (`{"devices": [...]}` or a bare array)
//! or CSV with a header line. Every entry names a device (BLE name or MAC, or any name
//! for SoftAP), its security and credentials, and its device type.

use std::collections::HashMap;
use std::net::SocketAddr;

use outpost_store::{OnboardingTarget, Transport};
use serde::Deserialize;

/// An entry with where it stood ("entry 3", "line 4"), or why it did not parse.
type Placed = (String, Result<Entry, String>);

/// One manifest entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    mac: Option<String>,
    #[serde(default)]
    transport: Option<String>,
    address: Option<String>,
    security: u8,
    pop: Option<String>,
    username: Option<String>,
    password: Option<String>,
    device_type: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonManifest {
    Wrapped { devices: Vec<serde_json::Value> },
    Bare(Vec<serde_json::Value>),
}

/// Parses and validates a manifest; every problem names its entry.
pub fn parse(bytes: &[u8]) -> Result<Vec<OnboardingTarget>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the manifest is not UTF-8 text")?;
    let trimmed = text.trim_start();
    let entries: Vec<Placed> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let manifest: JsonManifest = serde_json::from_str(text)
            .map_err(|e| format!("the manifest is not valid JSON: {e}"))?;
        let values = match manifest {
            JsonManifest::Wrapped { devices } | JsonManifest::Bare(devices) => devices,
        };
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    format!("entry {}", i + 1),
                    serde_json::from_value(v).map_err(|e| e.to_string()),
                )
            })
            .collect()
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
        let target = validate(entry).map_err(|e| format!("{place}: {e}"))?;
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

fn validate(entry: Entry) -> Result<OnboardingTarget, String> {
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
    match transport {
        Transport::Ble => {}
        Transport::Softap => {
            let address = entry
                .address
                .as_deref()
                .ok_or("transport softap needs an address (host:port, e.g. 192.168.4.1:80)")?;
            address
                .parse::<SocketAddr>()
                .map_err(|_| format!("address {address:?} is not host:port"))?;
        }
    }
    let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let (pop, username, password) = match entry.security {
        0 => (None, None, None),
        1 => (non_empty(entry.pop), None, None),
        2 => {
            let username = non_empty(entry.username).ok_or("security 2 needs a username")?;
            let password = non_empty(entry.password).ok_or("security 2 needs a password")?;
            (None, Some(username), Some(password))
        }
        other => return Err(format!("security {other} does not exist (0, 1 or 2)")),
    };
    if entry.device_type.trim().is_empty() {
        return Err("needs a device_type".into());
    }
    Ok(OnboardingTarget {
        name,
        device_type: entry.device_type,
        transport,
        mac: entry.mac,
        address: entry.address,
        security: entry.security,
        pop,
        username,
        password,
        last_attempt_at: None,
        last_error: None,
    })
}

/// CSV: a header line naming the columns (any order), then one device per line. No
/// quoting: values may not contain commas.
fn parse_csv(text: &str) -> Result<Vec<Placed>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (_, header) = lines.next().ok_or("the manifest is empty")?;
    let columns: Vec<String> = header.split(',').map(|c| c.trim().to_owned()).collect();
    const KNOWN: [&str; 9] = [
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
    if let Some(unknown) = columns.iter().find(|c| !KNOWN.contains(&c.as_str())) {
        return Err(format!(
            "line 1: unknown column {unknown:?} (known: {})",
            KNOWN.join(", ")
        ));
    }
    Ok(lines
        .map(|(n, line)| {
            let place = format!("line {}", n + 1);
            let values: Vec<&str> = line.split(',').map(str::trim).collect();
            if values.len() != columns.len() {
                return (
                    place,
                    Err(format!(
                        "{} values for {} columns",
                        values.len(),
                        columns.len()
                    )),
                );
            }
            let mut object = serde_json::Map::new();
            for (column, value) in columns.iter().zip(values) {
                if value.is_empty() {
                    continue;
                }
                let value = if column == "security" {
                    match value.parse::<u8>() {
                        Ok(n) => serde_json::Value::from(n),
                        Err(_) => {
                            return (place, Err(format!("security {value:?} is not a number")));
                        }
                    }
                } else {
                    serde_json::Value::from(value)
                };
                object.insert(column.clone(), value);
            }
            (
                place,
                serde_json::from_value(serde_json::Value::Object(object))
                    .map_err(|e| e.to_string()),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let a = parse(json).unwrap();
        let b = parse(csv).unwrap();
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
            let err = parse(input).unwrap_err();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
        assert!(parse(&[0xff, 0xfe]).unwrap_err().contains("UTF-8"));
        assert!(parse(b"{not json").unwrap_err().contains("JSON"));
    }
}

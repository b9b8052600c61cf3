//! Device telemetry into outbox messages: what the local device API hands the uplink.
//!
//! A body is one JSON object or an array of 1 to [`MAX_RECORDS`] objects ([`messages`]),
//! or newline-delimited JSON, one object per line ([`ndjson_messages`]). Each record
//! becomes its own message with its own id, the record relayed exactly as posted
//! (validated as JSON, never parsed into a tree and serialised again).

use serde_json::value::RawValue;

use crate::contract::{self, MAX_TELEMETRY_BODY, schema, topics};
use crate::outbox::{Message, Priority};

/// One request carries at most this many records.
pub const MAX_RECORDS: usize = 100;

/// Why a telemetry body was refused; nothing of it was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    /// Not a JSON object or an array of objects (the text says where).
    #[error("{0}")]
    Malformed(String),
    /// A record is larger than the contract allows.
    #[error("{0}")]
    TooLarge(String),
}

/// The messages for a telemetry `body` from `device_id` behind `gateway`, received at
/// `now` (unix milliseconds), in the order posted.
pub fn messages(
    gateway: &str,
    device_id: &str,
    body: &[u8],
    now: i64,
) -> Result<Vec<Message>, TelemetryError> {
    let malformed = |err: serde_json::Error| {
        TelemetryError::Malformed(format!(
            "telemetry must be a JSON object or an array of objects: {err}"
        ))
    };
    // Relayed as it came, so nothing downstream may be handed nesting its parser
    // recurses on without end.
    outpost_serve::json::check_depth(body, outpost_serve::json::MAX_JSON_DEPTH)
        .map_err(|err| TelemetryError::Malformed(err.to_string()))?;
    let raw: &RawValue = serde_json::from_slice(body).map_err(malformed)?;
    let records: Vec<&RawValue> = match raw.get().as_bytes().first() {
        Some(b'{') => vec![raw],
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(malformed)?;
            if items.is_empty() || items.len() > MAX_RECORDS {
                return Err(TelemetryError::Malformed(format!(
                    "an array carries 1 to {MAX_RECORDS} records, not {}",
                    items.len()
                )));
            }
            items
        }
        _ => {
            return Err(TelemetryError::Malformed(
                "telemetry must be a JSON object or an array of objects".into(),
            ));
        }
    };
    let records: Vec<(At, &RawValue)> = records
        .into_iter()
        .enumerate()
        .map(|(index, record)| (At::Record(index), record))
        .collect();
    to_messages(gateway, device_id, records, now)
}

/// As [`messages`], for newline-delimited JSON (`application/x-ndjson`): one object per
/// line, 1 to [`MAX_RECORDS`] of them; blank lines (and a `\r` before each newline) are
/// ignored. An error names the line (from 1).
pub fn ndjson_messages(
    gateway: &str,
    device_id: &str,
    body: &[u8],
    now: i64,
) -> Result<Vec<Message>, TelemetryError> {
    let text = std::str::from_utf8(body).map_err(|err| {
        TelemetryError::Malformed(format!("NDJSON telemetry is not UTF-8: {err}"))
    })?;
    // A byte-order mark some writers put first is not part of line 1.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    for (index, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let at = At::Line(index + 1);
        outpost_serve::json::check_depth(line.as_bytes(), outpost_serve::json::MAX_JSON_DEPTH)
            .map_err(|err| TelemetryError::Malformed(format!("{at}: {err}")))?;
        let record: &RawValue = serde_json::from_str(line).map_err(|err| {
            TelemetryError::Malformed(format!("{at} is not a JSON object: {err}"))
        })?;
        records.push((at, record));
        if records.len() > MAX_RECORDS {
            return Err(TelemetryError::Malformed(format!(
                "NDJSON carries 1 to {MAX_RECORDS} records, not more"
            )));
        }
    }
    if records.is_empty() {
        return Err(TelemetryError::Malformed(
            "NDJSON telemetry carries no record".into(),
        ));
    }
    to_messages(gateway, device_id, records, now)
}

/// Where a record is in its body, for errors: `record 3` (from 0), `line 4` (from 1).
#[derive(Clone, Copy)]
enum At {
    Record(usize),
    Line(usize),
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Record(index) => write!(f, "record {index}"),
            Self::Line(number) => write!(f, "line {number}"),
        }
    }
}

/// The envelope's fixed part, in bytes, short of the ids (reserved with the record so
/// that serialising does not grow the payload).
const ENVELOPE: usize = 160;

/// One message per record.
fn to_messages(
    gateway: &str,
    device_id: &str,
    records: Vec<(At, &RawValue)>,
    now: i64,
) -> Result<Vec<Message>, TelemetryError> {
    let topic = topics::telemetry(gateway, device_id);
    let mut messages = Vec::with_capacity(records.len());
    for (at, record) in records {
        if !record.get().starts_with('{') {
            return Err(TelemetryError::Malformed(format!(
                "{at} is not a JSON object"
            )));
        }
        let size = record.get().len();
        if size > MAX_TELEMETRY_BODY {
            return Err(TelemetryError::TooLarge(format!(
                "{at} is {size} bytes; a record may be at most {MAX_TELEMETRY_BODY}"
            )));
        }
        let id = contract::message_id();
        let mut payload = Vec::with_capacity(ENVELOPE + id.len() + device_id.len() + size);
        serde_json::to_writer(
            &mut payload,
            &contract::Telemetry::<_, &str> {
                schema: schema::TELEMETRY,
                message_id: &id,
                device_id,
                received_at: now,
                body: record,
            },
        )
        .expect("serialisable");
        messages.push(Message {
            message_id: id,
            topic: topic.clone(),
            payload,
            priority: Priority::Telemetry,
            retain: false,
            ttl: None,
        });
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_is_one_record_per_line_and_a_bad_line_is_named() {
        let body = b"\xef\xbb\xbf{\"t\":1}\r\n\n{\"t\": 2, \"s\": \"a b\"}\n";
        let messages = ndjson_messages("gw", "esp-1", body, 7).unwrap();
        assert_eq!(messages.len(), 2);
        let second: serde_json::Value = serde_json::from_slice(&messages[1].payload).unwrap();
        assert_eq!(second["body"], serde_json::json!({"t": 2, "s": "a b"}));
        assert!(second.to_string().contains("\"messageId\""));
        for (body, says) in [
            (&b"{\"t\":1}\n[1]\n"[..], "line 2 is not a JSON object"),
            (b"{\"t\":1}\n{oops\n", "line 2 is not a JSON object"),
            (b"\n\n", "carries no record"),
            (b"\xff\n", "not UTF-8"),
        ] {
            let err = ndjson_messages("gw", "d", body, 0).unwrap_err();
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
        let too_many = "{}\n".repeat(MAX_RECORDS + 1);
        assert!(ndjson_messages("gw", "d", too_many.as_bytes(), 0).is_err());
        let big = format!("{{\"blob\":\"{}\"}}\n", "x".repeat(MAX_TELEMETRY_BODY));
        assert!(matches!(
            ndjson_messages("gw", "d", big.as_bytes(), 0),
            Err(TelemetryError::TooLarge(_))
        ));
    }

    #[test]
    fn each_record_is_its_own_message_with_the_id_inside() {
        let messages = messages("gw", "esp-1", br#"[{"t":1}, {"t":2}]"#, 7).unwrap();
        assert_eq!(messages.len(), 2);
        for (m, t) in messages.iter().zip([1, 2]) {
            let json: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(json["messageId"], m.message_id.as_str());
            assert_eq!(json["body"]["t"], t);
            assert_eq!(json["receivedAt"], 7);
        }
        assert_ne!(messages[0].message_id, messages[1].message_id);
        let too_many = format!("[{}]", vec!["{}"; MAX_RECORDS + 1].join(","));
        assert!(matches!(
            super::messages("gw", "d", too_many.as_bytes(), 0),
            Err(TelemetryError::Malformed(_))
        ));
    }

    #[test]
    fn telemetry_nested_past_64_levels_is_refused_and_64_is_relayed() {
        let nested = |levels: usize| {
            format!(
                r#"{{"v":{}1{}}}"#,
                "[".repeat(levels - 1),
                "]".repeat(levels - 1)
            )
        };
        let ok = messages("gw", "d", nested(64).as_bytes(), 0).unwrap();
        assert_eq!(ok.len(), 1);
        match messages("gw", "d", nested(65).as_bytes(), 0) {
            Err(TelemetryError::Malformed(text)) => {
                assert!(text.contains("at most 64 deep"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }
}

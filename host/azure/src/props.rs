//! Property bags: the `key=value&key=value` that IoT Hub and DPS topics end with.
//!
//! Keys and values are URL-encoded; a `+` is a plus, not a space. A `/` is encoded too:
//! Microsoft's Python SDK finds a cloud-to-device message's bag as the fifth level of its
//! topic, so a bare `/` in a value would cut it (the C SDK encodes it the same way). Request ids (`$rid`), versions
//! (`$version`), retry hints (`retry-after`) and message system properties (`$.ct`,
//! `$.ce`, `$.mid`, …) travel this way.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What a property key or value keeps unencoded: the unreserved characters and `$` (in
/// every system property's name, which the SDKs send bare).
const PROPERTY_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'$');

/// The most properties a bag may hold (IoT Hub allows 81 application properties per
/// message and a topic of 64 KiB; anything beyond is refused, not truncated).
pub const MAX_PROPERTIES: usize = 128;

/// Why a property bag cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropsError {
    /// A key or value is not UTF-8 once decoded.
    #[error("a property is not UTF-8 once URL-decoded")]
    NotUtf8,
    /// Too many properties.
    #[error("more than {MAX_PROPERTIES} properties")]
    TooMany,
    /// An empty key.
    #[error("a property with an empty name")]
    EmptyKey,
}

/// An ordered list of properties (order kept: Azure's SDKs sort application properties
/// but put system properties first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props(pub Vec<(String, String)>);

impl Props {
    /// Reads `text` (without the leading `?`). A key without `=` has an empty value.
    pub fn parse(text: &str) -> Result<Self, PropsError> {
        let mut props = Vec::new();
        for pair in text.split('&').filter(|pair| !pair.is_empty()) {
            if props.len() == MAX_PROPERTIES {
                return Err(PropsError::TooMany);
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |part: &str| {
                percent_decode_str(part)
                    .decode_utf8()
                    .map(|text| text.into_owned())
                    .map_err(|_| PropsError::NotUtf8)
            };
            let key = decode(key)?;
            if key.is_empty() {
                return Err(PropsError::EmptyKey);
            }
            props.push((key, decode(value)?));
        }
        Ok(Self(props))
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    /// Adds `key=value`.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.0.push((key.into(), value.into()));
        self
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Props {
    /// The encoded bag, without a leading `?`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, (key, value)) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("&")?;
            }
            write!(
                f,
                "{}={}",
                utf8_percent_encode(key, PROPERTY_SAFE),
                utf8_percent_encode(value, PROPERTY_SAFE)
            )?;
        }
        Ok(())
    }
}

/// Splits `topic` at its property bag: `("$iothub/twin/res/200/", "$rid=1")` for
/// `$iothub/twin/res/200/?$rid=1`; the bag is empty when there is no `?`.
pub fn split(topic: &str) -> (&str, &str) {
    topic.split_once('?').unwrap_or((topic, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bag_round_trips_with_azure_encoding() {
        let mut props = Props::default();
        props
            .push("$.ct", "application/json")
            .push("$.ce", "utf-8")
            .push("device", "esp 1+2&3=4");
        let text = props.to_string();
        assert_eq!(
            text,
            "$.ct=application%2Fjson&$.ce=utf-8&device=esp%201%2B2%263%3D4"
        );
        assert_eq!(Props::parse(&text).unwrap(), props);
        assert_eq!(
            Props::parse(&text).unwrap().get("device"),
            Some("esp 1+2&3=4")
        );
    }

    #[test]
    fn topics_split_at_the_question_mark() {
        assert_eq!(
            split("$iothub/twin/res/204/?$rid=9&$version=3"),
            ("$iothub/twin/res/204/", "$rid=9&$version=3")
        );
        let props = Props::parse(split("$iothub/twin/res/204/?$rid=9&$version=3").1).unwrap();
        assert_eq!(props.get("$version"), Some("3"));
        assert_eq!(
            split("devices/d/messages/events/"),
            ("devices/d/messages/events/", "")
        );
        // A plus stays a plus (the SDKs encode a space as %20).
        assert_eq!(Props::parse("a=1+1").unwrap().get("a"), Some("1+1"));
    }

    #[test]
    fn bad_bags_are_refused() {
        assert_eq!(Props::parse("=1"), Err(PropsError::EmptyKey));
        assert_eq!(Props::parse("a=%FF"), Err(PropsError::NotUtf8));
        let many = vec!["k=v"; MAX_PROPERTIES + 1].join("&");
        assert_eq!(Props::parse(&many), Err(PropsError::TooMany));
        assert!(Props::parse("flag&x=").unwrap().get("flag") == Some(""));
    }
}

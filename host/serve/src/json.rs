//! A nesting limit for JSON from devices, checked before any parser sees the bytes.
//!
//! serde_json refuses only past 128 levels, and a relayed document is not parsed whole
//! at all (`RawValue`). A device could otherwise push deeply nested JSON through the
//! gateway to every consumer downstream, whose parsers may recurse on it.

/// The deepest nesting of arrays and objects accepted from a device.
pub const MAX_JSON_DEPTH: usize = 64;

/// JSON nested deeper than allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON may nest arrays and objects at most {max} deep; this goes deeper at byte {offset}")]
pub struct DepthError {
    /// The limit.
    pub max: usize,
    /// Where the first bracket past the limit is.
    pub offset: usize,
}

/// Checks that `bytes` nest arrays and objects at most `max` deep. Brackets inside
/// strings do not count. Anything else about the JSON is left to its parser.
pub fn check_depth(bytes: &[u8], max: usize) -> Result<(), DepthError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (offset, &byte) in bytes.iter().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(DepthError { max, offset });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn the_limit_itself_passes_and_one_more_level_fails() {
        assert_eq!(check_depth(nested(64).as_bytes(), MAX_JSON_DEPTH), Ok(()));
        let err = check_depth(nested(65).as_bytes(), MAX_JSON_DEPTH).unwrap_err();
        assert_eq!(
            err,
            DepthError {
                max: 64,
                offset: 64
            }
        );
    }

    #[test]
    fn brackets_in_strings_and_escapes_do_not_count() {
        let text = format!(r#"{{"a":"{}\"[[","b":[{{}}]}}"#, "[".repeat(200));
        assert_eq!(check_depth(text.as_bytes(), 3), Ok(()));
        assert!(check_depth(br#"{"a":[{"b":[]}]}"#, 3).is_err());
    }

    #[test]
    fn siblings_do_not_add_up() {
        let text = format!("[{}]", vec![nested(10); 100].join(","));
        assert_eq!(check_depth(text.as_bytes(), 11), Ok(()));
    }
}

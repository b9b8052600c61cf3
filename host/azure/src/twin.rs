//! Device twins: the desired and reported sections, their `$version`s, patches and the
//! limits IoT Hub enforces.
//!
//! A twin GET answers `{"desired": {…, "$version": n}, "reported": {…, "$version": m}}`.
//! A patch is a JSON merge patch: a `null` removes a property. IoT Hub refuses a section
//! larger than 32 KiB, nesting deeper than 10 objects, and property names with `.`, `$`
//! or spaces (`$` begins only the names IoT Hub itself writes: `$version`, `$metadata`).

use serde_json::{Map, Value};

/// The largest a section (desired or reported) may be, serialised.
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// The deepest a section's objects may nest.
pub const MAX_DEPTH: usize = 10;
/// The longest a property name may be (IoT Hub: 1 KiB).
pub const MAX_NAME_BYTES: usize = 1024;

/// Why a patch or section is refused (IoT Hub answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    /// Not a JSON object.
    #[error("a twin patch must be a JSON object")]
    NotAnObject,
    /// Too large.
    #[error("the section would be {0} bytes, over IoT Hub's 32 KiB")]
    TooLarge(usize),
    /// Too deep.
    #[error("objects nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A name IoT Hub does not allow.
    #[error("the property name {0:?} is not allowed (no `.`, `$`, spaces, or over 1 KiB)")]
    BadName(String),
}

/// One section of a twin: its properties and version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Section {
    /// The properties, without `$version`.
    pub properties: Map<String, Value>,
    /// Starts at 1 and grows by one with every patch.
    pub version: u64,
}

impl Section {
    /// An empty section at version 1, as IoT Hub creates it.
    pub fn new() -> Self {
        Self {
            properties: Map::new(),
            version: 1,
        }
    }

    /// The section as a twin GET shows it (`$version` inside).
    pub fn to_json(&self) -> Value {
        let mut object = self.properties.clone();
        object.insert("$version".into(), Value::from(self.version));
        Value::Object(object)
    }

    /// Applies `patch` (a merge patch), checking the limits before anything changes;
    /// returns the new version.
    pub fn apply(&mut self, patch: &Value) -> Result<u64, TwinError> {
        let patch = patch.as_object().ok_or(TwinError::NotAnObject)?;
        check_names(patch, 1)?;
        let mut next = self.properties.clone();
        merge(&mut next, patch);
        let size = serde_json::to_string(&next).map(|s| s.len()).unwrap_or(0);
        if size > MAX_SECTION_BYTES {
            return Err(TwinError::TooLarge(size));
        }
        self.properties = next;
        self.version += 1;
        Ok(self.version)
    }
}

/// Whether a property name is one a device or service may write.
fn name_allowed(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.contains(['.', '$', ' '])
        && !name.chars().any(char::is_control)
}

fn check_names(object: &Map<String, Value>, depth: usize) -> Result<(), TwinError> {
    if depth > MAX_DEPTH {
        return Err(TwinError::TooDeep);
    }
    for (name, value) in object {
        if !name_allowed(name) {
            return Err(TwinError::BadName(name.clone()));
        }
        if let Value::Object(inner) = value {
            check_names(inner, depth + 1)?;
        }
    }
    Ok(())
}

/// RFC 7396 merge: objects merge, `null` removes, anything else replaces.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (name, value) in patch {
        match value {
            Value::Null => {
                target.remove(name);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(name.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(existing) = slot {
                    merge(existing, inner);
                }
            }
            other => {
                target.insert(name.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patches_merge_and_count_versions() {
        let mut section = Section::new();
        assert_eq!(
            section
                .apply(&json!({"a": 1, "b": {"c": 2, "d": 3}}))
                .unwrap(),
            2
        );
        assert_eq!(
            section.apply(&json!({"b": {"c": null}, "a": "x"})).unwrap(),
            3
        );
        assert_eq!(
            section.to_json(),
            json!({"a": "x", "b": {"d": 3}, "$version": 3})
        );
    }

    #[test]
    fn iot_hub_limits_are_kept_and_nothing_changes_on_refusal() {
        let mut section = Section::new();
        section.apply(&json!({"keep": true})).unwrap();
        let before = section.clone();
        assert_eq!(section.apply(&json!([1])), Err(TwinError::NotAnObject));
        assert_eq!(
            section.apply(&json!({"$version": 9})),
            Err(TwinError::BadName("$version".into()))
        );
        assert_eq!(
            section.apply(&json!({"a.b": 1})),
            Err(TwinError::BadName("a.b".into()))
        );
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!({ "n": deep });
        }
        assert_eq!(section.apply(&deep), Err(TwinError::TooDeep));
        let big = json!({"blob": "x".repeat(MAX_SECTION_BYTES)});
        assert!(matches!(section.apply(&big), Err(TwinError::TooLarge(_))));
        assert_eq!(section, before);
    }
}

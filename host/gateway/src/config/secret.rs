//! Secrets in the config: inline, from an environment variable, or from a file.
//!
//! ```toml
//! admin_token = { env = "OUTPOST_ADMIN_TOKEN" }
//! password = { file = "secrets/mqtt-password" }   # relative to the config file
//! password = "inline values work but are discouraged"
//! ```
//!
//! A [`Secret`] never shows its value through `Debug`, `Display` or serialisation: those
//! print where it came from instead, so `outpost config check` and logs stay clean.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Where a secret's value comes from.
#[derive(Clone, PartialEq, Eq)]
enum Source {
    Inline,
    Env(String),
    File(PathBuf),
}

/// A secret value from the config, resolved when the config is loaded.
#[derive(Clone)]
pub(crate) struct Secret {
    source: Source,
    /// Byte range in the config text, for errors that point at the line.
    span: Range<usize>,
    value: String,
}

impl Secret {
    /// The value. Pass it only to what needs it; never log it.
    pub(crate) fn expose(&self) -> &str {
        &self.value
    }

    pub(crate) fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// Reads the value from its environment variable or file. Relative file paths are
    /// taken from `base` (the config file's directory). Returns a warning to show the
    /// operator, if any. A secret file other users can read is refused, unless
    /// `allow_insecure` (then it is a warning).
    pub(crate) fn resolve(
        &mut self,
        base: &Path,
        allow_insecure: bool,
    ) -> Result<Option<String>, String> {
        let mut warning = None;
        match &mut self.source {
            Source::Inline => {
                warning = Some(
                    "a secret is written inline in the config file; prefer \
                     { env = \"VAR\" } or { file = \"path\" }"
                        .to_owned(),
                );
            }
            Source::Env(var) => {
                self.value = std::env::var(&*var).map_err(|err| match err {
                    std::env::VarError::NotPresent => {
                        format!("environment variable {var} is not set")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("environment variable {var} is not valid UTF-8")
                    }
                })?;
            }
            Source::File(path) => {
                *path = base.join(&*path);
                let text = std::fs::read_to_string(&*path)
                    .map_err(|err| format!("cannot read secret file {}: {err}", path.display()))?;
                self.value = text.trim_end_matches(['\n', '\r']).to_owned();
                warning = loose_permissions(path);
                if let Some(loose) = warning.take_if(|_| !allow_insecure) {
                    return Err(format!(
                        "{loose} (or set gateway.allow_insecure_secrets = true)"
                    ));
                }
            }
        }
        if self.value.is_empty() {
            return Err(format!("the secret from {} is empty", self.origin()));
        }
        Ok(warning)
    }

    fn origin(&self) -> String {
        match &self.source {
            Source::Inline => "the config file".to_owned(),
            Source::Env(var) => format!("env {var}"),
            Source::File(path) => format!("file {}", path.display()),
        }
    }
}

fn loose_permissions(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "secret file {} can be read by other users (mode {:o}); run: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted, from {}>)", self.origin())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("<redacted: from {}>", self.origin()))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<SecretSpec>::deserialize(deserializer)?;
        let span = spanned.span();
        let SecretSpec { source, value } = spanned.into_inner();
        Ok(Self {
            source,
            span,
            value,
        })
    }
}

/// The parsed form before resolution.
struct SecretSpec {
    source: Source,
    value: String,
}

impl<'de> Deserialize<'de> for SecretSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SpecVisitor)
    }
}

struct SpecVisitor;

impl<'de> Visitor<'de> for SpecVisitor {
    type Value = SecretSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a string, { env = "VAR" } or { file = "path" }"#)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<SecretSpec, E> {
        Ok(SecretSpec {
            source: Source::Inline,
            value: value.to_owned(),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSpec, A::Error> {
        let mut source = None;
        while let Some(key) = map.next_key::<String>()? {
            let next = match key.as_str() {
                "env" => Source::Env(map.next_value()?),
                "file" => Source::File(map.next_value()?),
                other => {
                    return Err(de::Error::unknown_field(other, &["env", "file"]));
                }
            };
            if source.replace(next).is_some() {
                return Err(de::Error::custom(
                    "a secret takes exactly one of `env` or `file`",
                ));
            }
        }
        let source = source.ok_or_else(|| de::Error::missing_field("env` or `file"))?;
        Ok(SecretSpec {
            source,
            value: String::new(),
        })
    }
}

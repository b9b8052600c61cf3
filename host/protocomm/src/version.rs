//! The `proto-ver` JSON: provisioning version, security scheme and capabilities.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, SecurityVersion};

/// The document a device returns from `proto-ver`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtoVersion {
    /// The provisioning manager's entry.
    pub prov: ProvInfo,
    /// Application entries such as RainMaker's `rmaker` (`cap: ["claim"]`).
    #[serde(flatten)]
    pub apps: BTreeMap<String, AppInfo>,
}

/// The `prov` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvInfo {
    /// `v1.1` (wifi_provisioning) or `netprov-v1.2` (network_provisioning).
    pub ver: String,
    /// 0, 1 or 2; absent before IDF v5.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sec_ver: Option<u8>,
    /// 1: Security 2 with the GCM IV counter. Absent means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sec_patch_ver: Option<u32>,
    /// `no_sec`, `no_pop`, `wifi_scan`, `wifi_prov`, …
    #[serde(default)]
    pub cap: Vec<String>,
}

/// An application entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppInfo {
    /// Its version string.
    pub ver: String,
    /// Its capabilities.
    #[serde(default)]
    pub cap: Vec<String>,
}

impl ProtoVersion {
    /// Parses the bytes a device returned (cJSON's tab-indented form or compact).
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| Error::Version("not UTF-8 text".into()))?
            .trim_end_matches('\0');
        serde_json::from_str(text).map_err(|err| Error::Version(err.to_string()))
    }

    /// The JSON a device sends.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }

    /// The scheme the device runs: `sec_ver` when present, else what esp_prov infers
    /// (Security 0 if it says `no_sec`, else Security 1).
    pub fn security(&self) -> Result<SecurityVersion, Error> {
        match self.prov.sec_ver {
            Some(number) => SecurityVersion::try_from(number).map_err(Error::Version),
            None if self.has_prov_cap("no_sec") => Ok(SecurityVersion::Sec0),
            None => Ok(SecurityVersion::Sec1),
        }
    }

    /// `sec_patch_ver`, 0 when absent.
    pub fn patch_ver(&self) -> u32 {
        self.prov.sec_patch_ver.unwrap_or(0)
    }

    /// Whether `prov.cap` lists `cap`.
    pub fn has_prov_cap(&self, cap: &str) -> bool {
        self.prov.cap.iter().any(|c| c == cap)
    }

    /// Whether the device offers RainMaker assisted claiming (`rmaker.cap` has `claim`).
    pub fn can_claim(&self) -> bool {
        self.apps
            .get("rmaker")
            .is_some_and(|app| app.cap.iter().any(|c| c == "claim"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cjson_form_with_rainmaker() {
        let text = "{\n\t\"rmaker\":\t{\n\t\t\"ver\":\t\"1.0\",\n\t\t\"cap\":\t[\"claim\"]\n\t},\n\t\"prov\":\t{\n\t\t\"ver\":\t\"v1.1\",\n\t\t\"sec_ver\":\t2,\n\t\t\"sec_patch_ver\":\t1,\n\t\t\"cap\":\t[\"wifi_scan\"]\n\t}\n}";
        let version = ProtoVersion::parse(text.as_bytes()).unwrap();
        assert_eq!(version.security().unwrap(), SecurityVersion::Sec2);
        assert_eq!(version.patch_ver(), 1);
        assert!(version.can_claim());
        assert!(version.has_prov_cap("wifi_scan"));
        assert_eq!(
            ProtoVersion::parse(version.to_json().as_bytes()).unwrap(),
            version
        );
    }

    #[test]
    fn infers_the_scheme_like_esp_prov_and_rejects_garbage() {
        let old = ProtoVersion::parse(br#"{"prov":{"ver":"v1.1","cap":["no_sec"]}}"#).unwrap();
        assert_eq!(old.security().unwrap(), SecurityVersion::Sec0);
        assert_eq!(old.patch_ver(), 0);
        assert!(!old.can_claim());
        let sec1 = ProtoVersion::parse(br#"{"prov":{"ver":"v1.1","cap":[]}}"#).unwrap();
        assert_eq!(sec1.security().unwrap(), SecurityVersion::Sec1);
        assert!(matches!(
            ProtoVersion::parse(b"v1.0"),
            Err(Error::Version(_))
        ));
        assert!(matches!(
            ProtoVersion::parse(&[0xff, 0xfe]),
            Err(Error::Version(_))
        ));
        let bad = ProtoVersion::parse(br#"{"prov":{"ver":"v1.1","sec_ver":7}}"#).unwrap();
        assert!(bad.security().is_err());
    }
}

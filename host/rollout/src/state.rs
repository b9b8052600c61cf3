//! The states a rollout and its devices go through, as the store, the API, the CLI and
//! the cloud contract spell them.

use serde::{Deserialize, Serialize};

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Waits for its start time.
    Scheduled,
    /// Devices of the current wave are started.
    Running,
    /// Stopped for the operator (by hand, or a wave below its success threshold).
    Paused,
    /// Stopped for good by the error threshold.
    Stopped,
    /// Every wave is done.
    Finished,
    /// Cancelled by the operator.
    Cancelled,
    /// A deployment that never became a rollout (only ever sent to the cloud).
    Refused,
}

impl RolloutState {
    /// Every state, in lifecycle order.
    pub const ALL: [Self; 7] = [
        Self::Scheduled,
        Self::Running,
        Self::Paused,
        Self::Stopped,
        Self::Finished,
        Self::Cancelled,
        Self::Refused,
    ];

    /// The name the store, API and contract use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Finished => "finished",
            Self::Cancelled => "cancelled",
            Self::Refused => "refused",
        }
    }

    /// Whether the rollout has ended (nothing will start again without a retry).
    pub const fn has_ended(self) -> bool {
        matches!(
            self,
            Self::Stopped | Self::Finished | Self::Cancelled | Self::Refused
        )
    }
}

/// Where one targeted device stands in a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// Not started yet.
    Pending,
    /// Its update is in flight.
    Running,
    /// Updated (and back with the new version).
    Succeeded,
    /// The update failed.
    Failed,
    /// Cancelled with the rollout.
    Cancelled,
    /// Already had the update.
    Skipped,
}

impl DeviceStatus {
    /// Every status.
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Skipped,
    ];

    /// The name the store, API and contract use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }

    /// Still to run or running.
    pub const fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Running)
    }

    /// Counts as a success for thresholds and the installed version.
    pub const fn is_success(self) -> bool {
        matches!(self, Self::Succeeded | Self::Skipped)
    }
}

macro_rules! text_forms {
    ($ty:ty, $what:literal) => {
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!("unknown {} {s:?}", $what))
            }
        }

        impl outpost_store::rusqlite::types::ToSql for $ty {
            fn to_sql(
                &self,
            ) -> outpost_store::rusqlite::Result<outpost_store::rusqlite::types::ToSqlOutput<'_>>
            {
                Ok(self.as_str().into())
            }
        }

        impl outpost_store::rusqlite::types::FromSql for $ty {
            fn column_result(
                value: outpost_store::rusqlite::types::ValueRef<'_>,
            ) -> outpost_store::rusqlite::types::FromSqlResult<Self> {
                value.as_str()?.parse().map_err(|e: String| {
                    outpost_store::rusqlite::types::FromSqlError::Other(e.into())
                })
            }
        }
    };
}

text_forms!(RolloutState, "rollout state");
text_forms!(DeviceStatus, "device status");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialise_to_the_names_the_store_and_contract_use() {
        for state in RolloutState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(state.as_str().parse::<RolloutState>().unwrap(), state);
        }
        for status in DeviceStatus::ALL {
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
            assert_eq!(status.as_str().parse::<DeviceStatus>().unwrap(), status);
        }
        assert!("bogus".parse::<RolloutState>().is_err());
    }
}

//! The inbox of cloud deployments: what the uplink received on `deployments/{id}`, kept
//! durably until the rollout engine has taken it.
//!
//! The uplink session [receives](DeploymentInbox::receive) a deployment it has parsed and
//! checked, stores it and wakes whoever waits; the rollout engine reads the
//! [pending](DeploymentInbox::pending) ones as typed [`InboundDeployment`]s and
//! [settles](DeploymentInbox::settle) each with its outcome. Nobody else reads or writes
//! the inbox's table. A deployment received again with the same id replaces the waiting
//! one, and one already settled stays settled (the broker redelivers at least once).

use std::sync::Arc;

use outpost_store::rusqlite::params;
use outpost_store::{Store, StoreError, now_millis};
use tokio::sync::Notify;

use crate::contract::Deployment;

/// A deployment waiting for the rollout engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundDeployment {
    /// The deployment id (from the topic, equal to the payload's).
    pub id: String,
    /// The deployment as the cloud sent it; `Err` when the stored copy can no longer be
    /// read (it is then settled as refused, with this reason).
    pub deployment: Result<Deployment, String>,
    /// When it arrived (unix milliseconds).
    pub received_at: i64,
}

/// The durable hand-off of deployments from the uplink to the rollout engine. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct DeploymentInbox {
    store: Store,
    arrived: Arc<Notify>,
}

impl DeploymentInbox {
    /// The inbox kept in `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            arrived: Arc::new(Notify::new()),
        }
    }

    /// Stores a deployment from the cloud (replacing a waiting one with the same id)
    /// and wakes the reader.
    pub async fn receive(&self, deployment: &Deployment) -> Result<(), StoreError> {
        let id = deployment.deployment_id.clone();
        let body = serde_json::to_string(deployment).map_err(|err| StoreError::InvalidInput {
            what: "deployment",
            reason: err.to_string(),
        })?;
        self.store
            .call(move |conn| {
                conn.execute(
                    "INSERT INTO inbound_deployments (id, body, received_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (id) DO UPDATE SET body = excluded.body, \
                     received_at = excluded.received_at",
                    params![id, body, now_millis()],
                )?;
                Ok(())
            })
            .await?;
        self.arrived.notify_one();
        Ok(())
    }

    /// Whether a deployment with this id was received (waiting or settled).
    pub async fn contains(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.store
            .call(move |conn| {
                Ok(conn
                    .prepare_cached("SELECT 1 FROM inbound_deployments WHERE id = ?1")?
                    .exists([id])?)
            })
            .await
    }

    /// Resolves when a deployment arrived since the last call (at once if one arrived
    /// while nobody waited).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    /// The deployments not yet settled, oldest first.
    pub async fn pending(&self) -> Result<Vec<InboundDeployment>, StoreError> {
        self.store
            .call(|conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, body, received_at FROM inbound_deployments \
                     WHERE outcome IS NULL ORDER BY received_at, id",
                )?;
                let rows = stmt
                    .query_map([], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, i64>(2)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows
                    .into_iter()
                    .map(|(id, body, received_at)| InboundDeployment {
                        deployment: serde_json::from_str(&body)
                            .map_err(|err| format!("malformed deployment: {err}")),
                        id,
                        received_at,
                    })
                    .collect())
            })
            .await
    }

    /// Records what became of a deployment: accepted as a rollout, or refused with the
    /// reason. A settled deployment is not handed out again.
    pub async fn settle(&self, id: &str, outcome: Result<(), String>) -> Result<(), StoreError> {
        let recorded = match outcome {
            Ok(()) => "accepted".to_owned(),
            Err(reason) => format!("refused: {reason}"),
        };
        let id = id.to_owned();
        self.store
            .call(move |conn| {
                conn.execute(
                    "UPDATE inbound_deployments SET outcome = ?2 WHERE id = ?1",
                    params![id, recorded],
                )?;
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::schema;

    fn deployment(id: &str) -> Deployment {
        Deployment {
            schema: schema::DEPLOYMENT.into(),
            deployment_id: id.into(),
            manifest: "a.b.c".into(),
            rollout: serde_json::json!({"waves": [{"percent": 100}]}),
        }
    }

    #[tokio::test]
    async fn received_deployments_wake_the_reader_and_stay_until_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.db")).await.unwrap();
        let inbox = DeploymentInbox::new(store.clone());
        inbox.receive(&deployment("d-1")).await.unwrap();
        // The notification waits for the reader that comes later.
        tokio::time::timeout(std::time::Duration::from_secs(5), inbox.arrived())
            .await
            .expect("woken");
        inbox.receive(&deployment("d-2")).await.unwrap();
        assert!(inbox.contains("d-2").await.unwrap());
        assert!(!inbox.contains("d-3").await.unwrap());
        let pending = inbox.pending().await.unwrap();
        assert_eq!(
            pending.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["d-1", "d-2"]
        );
        assert_eq!(pending[0].deployment.as_ref().unwrap(), &deployment("d-1"));
        inbox.settle("d-1", Ok(())).await.unwrap();
        inbox
            .settle("d-2", Err("no device matches".into()))
            .await
            .unwrap();
        assert!(inbox.pending().await.unwrap().is_empty());
        // A redelivery of a settled id is not handed out again (the broker delivers at
        // least once; the rollout it became must not be refused as a duplicate).
        inbox.receive(&deployment("d-2")).await.unwrap();
        assert!(inbox.pending().await.unwrap().is_empty());
        // The outcome is recorded for the operator.
        let outcome: String = store
            .call(|c| {
                Ok(c.query_row(
                    "SELECT outcome FROM inbound_deployments WHERE id = 'd-1'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(outcome, "accepted");
    }

    #[tokio::test]
    async fn a_stored_body_that_no_longer_parses_is_handed_out_as_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s.db")).await.unwrap();
        store
            .call(|c| {
                c.execute(
                    "INSERT INTO inbound_deployments (id, body, received_at) VALUES ('bad', '{', 1)",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let pending = DeploymentInbox::new(store).pending().await.unwrap();
        assert!(
            pending[0]
                .deployment
                .as_ref()
                .unwrap_err()
                .contains("malformed deployment")
        );
    }
}

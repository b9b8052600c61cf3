//! Device groups: named sets of devices that rollouts target.

use rusqlite::{ErrorCode, params};
use serde::Serialize;

use crate::devices::validate_name;
use crate::{Store, StoreError, Timestamp};

/// A named set of devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Group {
    /// Stable id.
    pub id: String,
    /// Shown to operators.
    pub name: String,
    /// Free text.
    pub description: String,
    /// When it was created.
    pub created_at: Timestamp,
    /// Ids of its devices, ordered.
    pub members: Vec<String>,
}

impl Store {
    /// Creates an empty group. Fails with [`StoreError::InvalidInput`] if the id is taken.
    pub async fn create_group(
        &self,
        id: &str,
        name: &str,
        description: &str,
    ) -> Result<Group, StoreError> {
        validate_name("group id", id)?;
        let group = Group {
            id: id.to_owned(),
            name: name.to_owned(),
            description: description.to_owned(),
            created_at: Timestamp::now(),
            members: Vec::new(),
        };
        let row = group.clone();
        self.call(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO groups (id, name, description, created_at) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![row.id, row.name, row.description, row.created_at.unix_millis()]);
            match inserted {
                Err(err) if err.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
                    Err(StoreError::InvalidInput {
                        what: "group id",
                        reason: format!("a group {:?} already exists", row.id),
                    })
                }
                other => other.map(drop).map_err(StoreError::from),
            }
        })
        .await?;
        Ok(group)
    }

    /// Adds a device to a group; adding a member twice is not an error.
    pub async fn add_group_member(
        &self,
        group_id: &str,
        device_id: &str,
    ) -> Result<(), StoreError> {
        let (group_id, device_id) = (group_id.to_owned(), device_id.to_owned());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            for (what, table, id) in [("group", "groups", &group_id), ("device", "devices", &device_id)] {
                let exists: bool = tx.query_row(
                    &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE id = ?1)"),
                    [id],
                    |row| row.get(0),
                )?;
                if !exists {
                    return Err(StoreError::NotFound { what, id: id.clone() });
                }
            }
            tx.execute(
                "INSERT OR IGNORE INTO group_members (group_id, device_id, added_at) VALUES (?1, ?2, ?3)",
                params![group_id, device_id, Timestamp::now().unix_millis()],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Every group with its members, ordered by id.
    pub async fn list_groups(&self) -> Result<Vec<Group>, StoreError> {
        self.call(|conn| {
            let mut groups = Vec::new();
            let mut stmt = conn.prepare_cached(
                "SELECT id, name, description, created_at FROM groups ORDER BY id",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                groups.push(Group {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    description: row.get(2)?,
                    created_at: Timestamp::from_unix_millis(row.get(3)?),
                    members: Vec::new(),
                });
            }
            let mut members = conn.prepare_cached(
                "SELECT device_id FROM group_members WHERE group_id = ?1 ORDER BY device_id",
            )?;
            for group in &mut groups {
                group.members = members
                    .query_map([&group.id], |row| row.get(0))?
                    .collect::<Result<_, _>>()?;
            }
            Ok(groups)
        })
        .await
    }
}

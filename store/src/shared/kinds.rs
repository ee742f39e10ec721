//! Kinds and their schemas: declared by admins, learned from records (`records.rs`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::Utc;

use scholia_events::schema::{FieldType, KindSchema};
use scholia_events::store::{KindInfo, Kinds};
use scholia_events::{NewEvent, Result};

use super::{Backend, Db};
use crate::error::{Ctx, corrupt};
use crate::time::Timestamp;

fn info((kind, fields, updated_at): (String, String, Timestamp)) -> Result<KindInfo> {
    let schema: KindSchema = serde_json::from_str(&fields)
        .map_err(|e| corrupt("reading a kind's schema", format!("{kind}: {e}")))?;
    Ok(KindInfo {
        kind,
        schema,
        updated_at: updated_at.into(),
    })
}

#[async_trait]
impl Kinds for Backend {
    async fn list(&self) -> Result<Vec<KindInfo>> {
        let rows: Vec<(String, String, Timestamp)> =
            sqlx::query_as::<Db, _>("SELECT kind, fields, updated_at FROM kinds ORDER BY kind")
                .fetch_all(&self.pool)
                .await
                .ctx("listing kinds")?;
        rows.into_iter().map(info).collect()
    }

    async fn get(&self, kind: &str) -> Result<Option<KindInfo>> {
        let row: Option<(String, String, Timestamp)> =
            sqlx::query_as::<Db, _>("SELECT kind, fields, updated_at FROM kinds WHERE kind = $1")
                .bind(kind)
                .fetch_optional(&self.pool)
                .await
                .ctx("reading a kind")?;
        row.map(info).transpose()
    }

    async fn declare(
        &self,
        kind: &str,
        fields: &BTreeMap<String, FieldType>,
        actor: &str,
    ) -> Result<KindInfo> {
        let mut tx = self.write().await?;
        let stored: Option<String> =
            sqlx::query_scalar::<Db, String>("SELECT fields FROM kinds WHERE kind = $1")
                .bind(kind)
                .fetch_optional(tx.conn())
                .await
                .ctx("reading a kind")?;
        let mut schema: KindSchema = match stored {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| corrupt("reading a kind's schema", format!("{kind}: {e}")))?,
            None => KindSchema::default(),
        };
        schema.declare(fields);
        let now = Utc::now();
        sqlx::query::<Db>(
            "INSERT INTO kinds (kind, fields, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (kind) DO UPDATE SET fields = excluded.fields, updated_at = excluded.updated_at",
        )
        .bind(kind)
        .bind(serde_json::to_string(&schema).expect("schemas serialize"))
        .bind(Timestamp(now))
        .execute(tx.conn())
        .await
        .ctx("declaring a kind")?;
        super::log::commit_audited(
            tx,
            NewEvent::admin(actor, "kind.declared", kind, serde_json::json!(fields)),
        )
        .await?;
        Ok(KindInfo {
            kind: kind.to_string(),
            schema,
            updated_at: now,
        })
    }
}

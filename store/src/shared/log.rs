//! The append-only event log. `seq` is gap-free and in commit order because appends
//! happen under the log lock, held by the appending transaction until it commits.

use async_trait::async_trait;
use chrono::Utc;
use sqlx::QueryBuilder;
use sqlx::types::Json;

use scholia_events::store::{EventLog, Leadership, Watch};
use scholia_events::{EventBody, LoggedEvent, NewEvent, Result};

use super::{Backend, Db, MAX_BINDS, WriteTx};
use crate::error::Ctx;
use crate::time::Timestamp;

/// Append `events` inside `tx`, which must hold the log lock; they become visible, in
/// order, when it commits.
pub(crate) async fn append(tx: &mut WriteTx, events: Vec<NewEvent>) -> Result<Vec<LoggedEvent>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let at = Utc::now();
    let next: i64 =
        sqlx::query_scalar::<Db, i64>("SELECT COALESCE(MAX(seq), 0) + 1 FROM event_log")
            .fetch_one(tx.conn())
            .await
            .ctx("reading the log head")?;
    let logged: Vec<LoggedEvent> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| LoggedEvent {
            seq: next + i as i64,
            at,
            actor: event.actor,
            body: event.body,
        })
        .collect();
    for chunk in logged.chunks(MAX_BINDS / 5) {
        let mut q =
            QueryBuilder::<Db>::new("INSERT INTO event_log (seq, type, at, actor, payload) ");
        q.push_values(chunk, |mut row, event| {
            row.push_bind(event.seq)
                .push_bind(event.body.event_type().as_str())
                .push_bind(Timestamp(event.at))
                .push_bind(event.actor.as_str())
                .push_bind(Json(&event.body));
        });
        q.build()
            .execute(tx.conn())
            .await
            .ctx("appending to the event log")?;
    }
    tx.announce_log().await?;
    Ok(logged)
}

/// Log one admin action in `tx` and commit it: what the action changed and its audit event
/// land together, or neither does.
pub(crate) async fn commit_audited(mut tx: WriteTx, action: NewEvent) -> Result<()> {
    append(&mut tx, vec![action]).await?;
    tx.commit().await
}

type LogRow = (i64, Timestamp, String, Json<EventBody>);

#[async_trait]
impl EventLog for Backend {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<LoggedEvent>> {
        let mut tx = self.write().await?;
        let logged = append(&mut tx, events).await?;
        tx.commit().await?;
        Ok(logged)
    }

    async fn read_after(&self, after: i64, limit: usize) -> Result<Vec<LoggedEvent>> {
        let rows: Vec<LogRow> = sqlx::query_as::<Db, LogRow>(
            "SELECT seq, at, actor, payload FROM event_log WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .ctx("reading the event log")?;
        Ok(rows
            .into_iter()
            .map(|(seq, at, actor, Json(body))| LoggedEvent {
                seq,
                at: at.into(),
                actor,
                body,
            })
            .collect())
    }

    async fn head(&self) -> Result<i64> {
        sqlx::query_scalar::<Db, i64>("SELECT COALESCE(MAX(seq), 0) FROM event_log")
            .fetch_one(&self.pool)
            .await
            .ctx("reading the log head")
    }

    async fn watch(&self) -> Result<Box<dyn Watch>> {
        self.log_watch().await
    }

    async fn lead_relay(&self) -> Result<Option<Box<dyn Leadership>>> {
        Backend::lead_relay(self).await
    }

    async fn relay_cursor(&self, name: &str) -> Result<Option<i64>> {
        sqlx::query_scalar::<Db, i64>("SELECT seq FROM relay_cursor WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .ctx("reading the relay cursor")
    }

    async fn save_relay_cursor(&self, name: &str, seq: i64) -> Result<()> {
        sqlx::query::<Db>(
            "INSERT INTO relay_cursor (name, seq) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
        )
        .bind(name)
        .bind(seq)
        .execute(&self.pool)
        .await
        .ctx("saving the relay cursor")?;
        Ok(())
    }
}

//! The append-only event log in SQL. `seq` is gap-free and in commit order because
//! appends happen under the log lock held by [`WriteTx`].

use chrono::{DateTime, Utc};

use crate::db::{Database, LOG_CHANNEL, WriteTx};
use crate::error::{DbContext, Error, Result};
use crate::event::{EventBody, LoggedEvent, NewEvent};

/// Append events inside `tx`; they become visible, in order, when it commits.
pub async fn append(tx: &mut WriteTx, events: Vec<NewEvent>) -> Result<Vec<LoggedEvent>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let at = Utc::now();
    let next: i64 = match tx {
        WriteTx::Sqlite { tx, .. } => {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM event_log")
                .fetch_one(&mut **tx)
                .await
                .context("reading the log head")?
        }
        WriteTx::Postgres { tx, .. } => {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM event_log")
                .fetch_one(&mut **tx)
                .await
                .context("reading the log head")?
        }
    };
    let mut logged = Vec::with_capacity(events.len());
    for (i, event) in events.into_iter().enumerate() {
        let seq = next + i as i64;
        let payload = serde_json::to_string(&event.body).map_err(|e| Error::Decode {
            what: "an event",
            detail: e.to_string(),
        })?;
        let sql =
            "INSERT INTO event_log (seq, type, at, actor, payload) VALUES ($1, $2, $3, $4, $5)";
        let ty = event.body.type_name();
        match tx {
            WriteTx::Sqlite { tx, .. } => {
                sqlx::query(sql)
                    .bind(seq)
                    .bind(ty)
                    .bind(at)
                    .bind(&event.actor)
                    .bind(&payload)
                    .execute(&mut **tx)
                    .await
                    .map(|_| ())
            }
            WriteTx::Postgres { tx, .. } => {
                sqlx::query("INSERT INTO event_log (seq, type, at, actor, payload) VALUES ($1, $2, $3, $4, $5::jsonb)")
                    .bind(seq)
                    .bind(ty)
                    .bind(at)
                    .bind(&event.actor)
                    .bind(&payload)
                    .execute(&mut **tx)
                    .await
                    .map(|_| ())
            }
        }
        .context("appending to the event log")?;
        logged.push(LoggedEvent {
            seq,
            at,
            actor: event.actor,
            body: event.body,
        });
    }
    if let WriteTx::Postgres { tx, .. } = tx {
        // Delivered at commit, and only then, to relays listening in other processes.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(LOG_CHANNEL)
            .execute(&mut **tx)
            .await
            .context("announcing new log events")?;
    }
    Ok(logged)
}

/// Append events in a transaction of their own.
pub async fn append_now(db: &Database, events: Vec<NewEvent>) -> Result<Vec<LoggedEvent>> {
    let mut tx = db.begin_write().await?;
    let logged = append(&mut tx, events).await?;
    tx.commit().await?;
    Ok(logged)
}

/// Events with `seq > after`, oldest first, at most `limit`.
pub async fn read_after(db: &Database, after: i64, limit: i64) -> Result<Vec<LoggedEvent>> {
    type Row = (i64, String, DateTime<Utc>, String, String);
    let rows: Vec<Row> = match db {
        Database::Sqlite(db) => {
            sqlx::query_as::<_, Row>(
                "SELECT seq, type, at, actor, payload FROM event_log WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(&db.pool)
            .await
        }
        Database::Postgres(pg) => {
            sqlx::query_as::<_, Row>(
                "SELECT seq, type, at, actor, payload::text FROM event_log WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(&pg.pool)
            .await
        }
    }
    .context("reading the event log")?;
    rows.into_iter()
        .map(|(seq, _ty, at, actor, payload)| {
            let body: EventBody = serde_json::from_str(&payload).map_err(|e| Error::Decode {
                what: "a logged event",
                detail: format!("seq {seq}: {e}"),
            })?;
            Ok(LoggedEvent {
                seq,
                at,
                actor,
                body,
            })
        })
        .collect()
}

/// The highest committed `seq`, or 0 for an empty log.
pub async fn head(db: &Database) -> Result<i64> {
    let sql = "SELECT COALESCE(MAX(seq), 0) FROM event_log";
    match db {
        Database::Sqlite(db) => sqlx::query_scalar(sql).fetch_one(&db.pool).await,
        Database::Postgres(pg) => sqlx::query_scalar(sql).fetch_one(&pg.pool).await,
    }
    .context("reading the log head")
}

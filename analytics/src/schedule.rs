//! Schedules of preemptive rebuilds: a five-field cron (UTC) and a window (an ISO 8601
//! duration ending at the firing time). Each firing invalidates the window eagerly and
//! is logged as `schedule.fired`. A firing happens once however many processes run the
//! scheduler: each claims the firing time with a conditional update, and one wins.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use scholia_events::envelope::format_time;
use scholia_events::error::DbContext;
use scholia_events::{Database, EventBody, NewEvent, log};

use crate::queue::on_db;
use crate::registry::Registry;
use crate::{Error, Result, invalidation};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDefinition {
    pub analysis: String,
    pub cron: String,
    pub window: String,
    /// Accepted for files that list schedules with their names.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    pub name: String,
    pub analysis: String,
    pub cron: String,
    pub window: String,
    pub last_fired: Option<String>,
    pub next_firing: Option<String>,
}

/// Parse a five-field cron expression (minute hour day-of-month month day-of-week).
pub fn parse_cron(expr: &str) -> Result<croner::Cron> {
    if expr.split_whitespace().count() != 5 {
        return Err(Error::Invalid(format!(
            "cron {expr:?} must have five fields (minute hour day-of-month month day-of-week), e.g. \"0 1 * * *\""
        )));
    }
    croner::Cron::new(expr)
        .parse()
        .map_err(|e| Error::Invalid(format!("cron {expr:?} is not valid: {e}")))
}

/// Parse an ISO 8601 duration such as `P7D`, `PT6H`, `P1DT12H`, `P2W` or `PT30M`.
pub fn parse_window(text: &str) -> Result<chrono::Duration> {
    let bad = || {
        Error::Invalid(format!(
            "window {text:?} is not an ISO 8601 duration such as P7D, PT6H or P1DT12H"
        ))
    };
    let rest = text.strip_prefix('P').ok_or_else(bad)?;
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let mut total = chrono::Duration::zero();
    let mut parse_part = |part: &str, units: &[(char, i64)]| -> Result<()> {
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
            } else {
                let seconds = units
                    .iter()
                    .find(|(u, _)| *u == c)
                    .map(|(_, s)| *s)
                    .ok_or_else(bad)?;
                let n: i64 = number.parse().map_err(|_| bad())?;
                total += chrono::Duration::seconds(n * seconds);
                number.clear();
            }
        }
        if number.is_empty() {
            Ok(())
        } else {
            Err(bad())
        }
    };
    parse_part(date, &[('W', 7 * 86_400), ('D', 86_400)])?;
    if let Some(time) = time {
        parse_part(time, &[('H', 3_600), ('M', 60), ('S', 1)])?;
    }
    if total <= chrono::Duration::zero() {
        return Err(bad());
    }
    Ok(total)
}

type ScheduleRow = (
    String,
    String,
    String,
    String,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
);

fn next_after(cron: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    parse_cron(cron)
        .ok()?
        .find_next_occurrence(&after, false)
        .ok()
}

pub async fn put(
    db: &Database,
    registry: &Registry,
    name: &str,
    def: ScheduleDefinition,
    actor: &str,
) -> Result<Schedule> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::Invalid(format!(
            "schedule name {name:?} must be 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    registry.find(&def.analysis).await?;
    parse_cron(&def.cron)?;
    parse_window(&def.window)?;
    let now = Utc::now();
    let mut tx = db.begin_write().await?;
    let sql = "INSERT INTO schedules (name, analysis, cron, window_spec, last_fired, updated_at, updated_by) \
               VALUES ($1, $2, $3, $4, NULL, $5, $6) ON CONFLICT (name) DO UPDATE SET analysis = excluded.analysis, \
               cron = excluded.cron, window_spec = excluded.window_spec, updated_at = excluded.updated_at, updated_by = excluded.updated_by";
    crate::queue::on_tx!(&mut tx, |c| sqlx::query(sql)
        .bind(name)
        .bind(&def.analysis)
        .bind(&def.cron)
        .bind(&def.window)
        .bind(now)
        .bind(actor)
        .execute(&mut **c)
        .await
        .map(|r| r.rows_affected())
        .context("storing a schedule")?);
    log::append(
        &mut tx,
        vec![NewEvent::new(
            actor,
            EventBody::AdminAction {
                action: "schedule.updated".into(),
                target: name.to_string(),
                detail: serde_json::json!({"analysis": def.analysis, "cron": def.cron, "window": def.window}),
            },
        )],
    )
    .await?;
    tx.commit().await?;
    get(db, name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("schedule {name} vanished")))
}

fn to_schedule((name, analysis, cron, window, last_fired, updated_at): ScheduleRow) -> Schedule {
    let next = next_after(
        &cron,
        last_fired
            .unwrap_or(updated_at)
            .max(Utc::now() - chrono::Duration::seconds(1)),
    );
    Schedule {
        name,
        analysis,
        cron,
        window,
        last_fired: last_fired.map(format_time),
        next_firing: next.map(format_time),
    }
}

pub async fn get(db: &Database, name: &str) -> Result<Option<Schedule>> {
    let sql = "SELECT name, analysis, cron, window_spec, last_fired, updated_at FROM schedules WHERE name = $1";
    let row: Option<ScheduleRow> = on_db!(db, |p| sqlx::query_as(sql)
        .bind(name)
        .fetch_optional(p)
        .await
        .context("reading a schedule")?);
    Ok(row.map(to_schedule))
}

pub async fn list(db: &Database) -> Result<Vec<Schedule>> {
    let sql = "SELECT name, analysis, cron, window_spec, last_fired, updated_at FROM schedules ORDER BY name";
    let rows: Vec<ScheduleRow> = on_db!(db, |p| sqlx::query_as(sql)
        .fetch_all(p)
        .await
        .context("listing schedules")?);
    Ok(rows.into_iter().map(to_schedule).collect())
}

/// Fire due schedules until shut down.
pub async fn run(db: Database, registry: Registry, shutdown: CancellationToken) -> Result<()> {
    loop {
        if let Err(error) = fire_due(&db, &registry).await {
            tracing::warn!(error = %error, "Checking schedules failed; will retry");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn fire_due(db: &Database, registry: &Registry) -> Result<()> {
    let sql = "SELECT name, analysis, cron, window_spec, last_fired, updated_at FROM schedules";
    let rows: Vec<ScheduleRow> = on_db!(db, |p| sqlx::query_as(sql)
        .fetch_all(p)
        .await
        .context("reading schedules")?);
    let now = Utc::now();
    for (name, analysis, cron, window, last_fired, updated_at) in rows {
        let Some(due) = next_after(&cron, last_fired.unwrap_or(updated_at)) else {
            continue;
        };
        if due > now {
            continue;
        }
        // Skip firings missed while nothing ran: fire once, for the latest due time.
        let mut slot = due;
        while let Some(next) = next_after(&cron, slot) {
            if next > now {
                break;
            }
            slot = next;
        }
        let claim = "UPDATE schedules SET last_fired = $2 WHERE name = $1 AND (last_fired IS NULL OR last_fired < $2)";
        let won = on_db!(db, |p| sqlx::query(claim)
            .bind(&name)
            .bind(slot)
            .execute(p)
            .await
            .map(|r| r.rows_affected())
            .context("claiming a schedule firing")?)
            == 1;
        if !won {
            continue;
        }
        let Ok(window) = parse_window(&window) else {
            continue;
        };
        let (from, to) = (slot - window, slot);
        let actor = format!("schedule:{name}");
        match invalidation::create(
            db,
            registry,
            &analysis,
            from,
            to,
            &format!("schedule {name}"),
            true,
            &actor,
        )
        .await
        {
            Ok(id) => {
                log::append_now(
                    db,
                    vec![NewEvent::new(
                        &actor,
                        EventBody::ScheduleFired {
                            schedule: name.clone(),
                            analysis,
                            from,
                            to,
                        },
                    )],
                )
                .await?;
                tracing::info!(schedule = %name, invalidation = %id, "Schedule fired");
            }
            Err(error) => {
                tracing::warn!(schedule = %name, error = %error, "Schedule could not fire")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_iso_8601_durations() {
        assert_eq!(parse_window("P7D").unwrap(), chrono::Duration::days(7));
        assert_eq!(parse_window("PT6H").unwrap(), chrono::Duration::hours(6));
        assert_eq!(
            parse_window("P1DT12H").unwrap(),
            chrono::Duration::hours(36)
        );
        assert_eq!(parse_window("P2W").unwrap(), chrono::Duration::days(14));
        assert!(parse_window("7 days").is_err());
        assert!(parse_window("P").is_err());
    }

    #[test]
    fn cron_needs_five_fields() {
        assert!(parse_cron("0 1 * * *").is_ok());
        assert!(parse_cron("* * * * * *").is_err());
        assert!(parse_cron("61 * * * *").is_err());
    }
}

//! Schedules of preemptive rebuilds: a five-field cron (UTC) and a window (an ISO 8601
//! duration ending at the firing time). Each firing invalidates the window eagerly and is
//! logged as `schedule.fired`. A firing happens once however many processes run the
//! scheduler: each claims the slot with a conditional update, and one wins.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use scholia_annotation_cache::AnnotationCache;
use scholia_events::duration::parse_duration;
use scholia_events::envelope::format_time;
use scholia_events::status::Rebuild;
use scholia_events::store::ScheduleRecord;
use scholia_events::{Error, EventBody, NewEvent, Result};

use crate::invalidation;
use crate::registry::Registry;

/// The longest window a schedule may rebuild: a year.
pub const MAX_WINDOW_DAYS: i64 = 366;

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

/// Parse a window: an ISO 8601 duration of at most a year.
pub fn parse_window(text: &str) -> Result<chrono::Duration> {
    parse_duration(text, "window", chrono::Duration::days(MAX_WINDOW_DAYS)).map_err(Error::Invalid)
}

fn next_after(cron: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    parse_cron(cron)
        .ok()?
        .find_next_occurrence(&after, false)
        .ok()
}

fn view(record: ScheduleRecord) -> Schedule {
    let next = next_after(
        &record.cron,
        record
            .last_fired
            .unwrap_or(record.updated_at)
            .max(Utc::now() - chrono::Duration::seconds(1)),
    );
    Schedule {
        name: record.name,
        analysis: record.analysis,
        cron: record.cron,
        window: record.window,
        last_fired: record.last_fired.map(format_time),
        next_firing: next.map(format_time),
    }
}

/// Create or change a schedule.
pub async fn put(
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
    registry.catalog().find(&def.analysis).await?;
    parse_cron(&def.cron)?;
    parse_window(&def.window)?;
    let record = ScheduleRecord {
        name: name.to_string(),
        analysis: def.analysis,
        cron: def.cron,
        window: def.window,
        last_fired: None,
        updated_at: Utc::now(),
    };
    registry.store().schedules.put(&record, actor).await?;
    get(registry, name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("schedule {name} vanished")))
}

pub async fn get(registry: &Registry, name: &str) -> Result<Option<Schedule>> {
    Ok(registry.store().schedules.get(name).await?.map(view))
}

pub async fn list(registry: &Registry) -> Result<Vec<Schedule>> {
    Ok(registry
        .store()
        .schedules
        .list()
        .await?
        .into_iter()
        .map(view)
        .collect())
}

/// Fire due schedules until shut down.
pub async fn run(
    cache: &AnnotationCache,
    registry: &Registry,
    shutdown: CancellationToken,
) -> Result<()> {
    loop {
        if let Err(error) = fire_due(cache, registry).await {
            tracing::warn!(error = %error, "Checking schedules failed; will retry");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn fire_due(cache: &AnnotationCache, registry: &Registry) -> Result<()> {
    let store = registry.store();
    let now = Utc::now();
    for schedule in store.schedules.list().await? {
        let Some(due) = next_after(
            &schedule.cron,
            schedule.last_fired.unwrap_or(schedule.updated_at),
        ) else {
            continue;
        };
        if due > now {
            continue;
        }
        // Skip firings missed while nothing ran: fire once, for the latest due time.
        let mut slot = due;
        while let Some(next) = next_after(&schedule.cron, slot) {
            if next > now {
                break;
            }
            slot = next;
        }
        if !store.schedules.claim_firing(&schedule.name, slot).await? {
            continue;
        }
        let window = match parse_window(&schedule.window) {
            Ok(window) => window,
            Err(error) => {
                tracing::warn!(schedule = %schedule.name, error = %error, "Schedule has a bad window; skipped");
                continue;
            }
        };
        let (from, to) = (slot - window, slot);
        let actor = format!("schedule:{}", schedule.name);
        let request = invalidation::Request {
            analysis: schedule.analysis.clone(),
            from,
            to,
            reason: format!("schedule {}", schedule.name),
            rebuild: Rebuild::Eager,
            cascade: true,
            actor: actor.clone(),
        };
        match invalidation::create(store, cache.catalog(), &request).await {
            Ok(id) => {
                store
                    .log
                    .append(vec![NewEvent::new(
                        &actor,
                        EventBody::ScheduleFired {
                            schedule: schedule.name.clone(),
                            analysis: schedule.analysis.clone(),
                            from,
                            to,
                        },
                    )])
                    .await?;
                tracing::info!(schedule = %schedule.name, invalidation = %id, "Schedule fired");
            }
            Err(error) => {
                tracing::warn!(schedule = %schedule.name, error = %error, "Schedule could not fire")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_iso_8601_durations_of_at_most_a_year() {
        assert_eq!(parse_window("P7D").unwrap(), chrono::Duration::days(7));
        assert_eq!(parse_window("PT6H").unwrap(), chrono::Duration::hours(6));
        assert_eq!(
            parse_window("P1DT12H").unwrap(),
            chrono::Duration::hours(36)
        );
        assert_eq!(parse_window("P2W").unwrap(), chrono::Duration::days(14));
        assert!(parse_window("7 days").is_err());
        assert!(parse_window("P").is_err());
        assert!(parse_window("P100000000D").is_err());
        assert!(parse_window("P99999999999999D").is_err());
    }

    #[test]
    fn cron_needs_five_fields() {
        assert!(parse_cron("0 1 * * *").is_ok());
        assert!(parse_cron("* * * * * *").is_err());
        assert!(parse_cron("61 * * * *").is_err());
    }
}

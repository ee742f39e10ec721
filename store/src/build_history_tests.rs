//! The build history's retention, on both backends: of each partition of an analysis the
//! newest `BUILDS_KEPT_PER_PARTITION` builds, and of the analysis nothing older than
//! `BUILDS_KEPT_DAYS`, both enforced as builds are recorded.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::scratch::Scratch;
use scholia_events::PartitionKey;
use scholia_events::status::{PRIORITY_BULK, Want};
use scholia_events::store::{
    BUILDS_KEPT_DAYS, BUILDS_KEPT_PER_PARTITION, BuildRecord, BuildRequest, Store,
};

/// Where the test can write what a store never would: a build's finishing time.
enum Raw {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Raw {
    /// Make `build` look as if it finished at `at`.
    async fn backdate(&self, build: Uuid, at: DateTime<Utc>) {
        let updated = match self {
            Raw::Postgres(pool) => sqlx::query(
                "UPDATE builds SET finished_at = $1, started_at = $1 WHERE build_id = $2",
            )
            .bind(at)
            .bind(build)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()),
            // SQLite keeps times as integer microseconds.
            Raw::Sqlite(pool) => sqlx::query(
                "UPDATE builds SET finished_at = $1, started_at = $1 WHERE build_id = $2",
            )
            .bind(at.timestamp_micros())
            .bind(build)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()),
        }
        .expect("backdating a build");
        assert_eq!(updated, 1, "no build {build} to backdate");
    }
}

fn day(text: &str) -> PartitionKey {
    PartitionKey::parse(text).expect("a day")
}

/// Queue `partition` of `analysis`, take it, and record its build as failed: a retry
/// (queued again at once) when `again`, else for good. Returns the build's id.
async fn one_build(store: &Store, analysis: &str, partition: PartitionKey, again: bool) -> Uuid {
    store
        .queue
        .request(BuildRequest {
            analysis: analysis.to_string(),
            version: 1,
            partitions: vec![partition],
            priority: PRIORITY_BULK,
            want: Want::Rebuild,
            not_before: Utc::now(),
            actor: "test".into(),
            log: false,
        })
        .await
        .expect("queueing a build");
    let claim = store
        .queue
        .claim("test-1#0", Duration::from_secs(60), 1_000)
        .await
        .expect("claiming")
        .expect("a build to claim");
    assert_eq!(
        (claim.analysis.as_str(), claim.partition),
        (analysis, partition)
    );
    let retry = again.then_some(Duration::ZERO);
    let recorded = store
        .queue
        .fail(&claim, 1, "the test fails every build", retry)
        .await
        .expect("recording a failed build");
    assert_eq!(recorded, Some(!again), "the lease was held");
    claim.build
}

async fn history(
    store: &Store,
    analysis: &str,
    partition: Option<PartitionKey>,
) -> Vec<BuildRecord> {
    store
        .annotations
        .builds(analysis, partition.as_ref(), 1_000)
        .await
        .expect("reading the build history")
}

fn ids(builds: &[BuildRecord]) -> Vec<Uuid> {
    builds.iter().map(|b| b.id).collect()
}

async fn the_history_keeps_the_newest_builds_of_a_partition_and_none_older_than_its_days(
    store: Store,
    raw: Raw,
) {
    let kept = BUILDS_KEPT_PER_PARTITION as usize;
    let busy = day("2024-04-01");
    // Three more builds of one partition than are kept; the last one gives up.
    let mut built = Vec::new();
    for i in 0..kept + 3 {
        built.push(one_build(&store, "a", busy, i + 1 < kept + 3).await);
    }
    let builds = history(&store, "a", Some(busy)).await;
    assert_eq!(builds.len(), kept, "the newest {kept} builds are kept");
    let newest_first: Vec<Uuid> = built.iter().rev().take(kept).copied().collect();
    assert_eq!(ids(&builds), newest_first, "the oldest three are gone");
    assert_eq!(builds[0].outcome, "failed");
    assert!(builds[1..].iter().all(|b| b.outcome == "retrying"));

    // Builds of other partitions, and of another analysis, made old.
    let month = chrono::Duration::days(BUILDS_KEPT_DAYS);
    let too_old = one_build(&store, "a", day("2024-04-02"), false).await;
    let old_enough = one_build(&store, "a", day("2024-04-03"), false).await;
    let other_analysis = one_build(&store, "b", day("2024-04-02"), false).await;
    raw.backdate(too_old, Utc::now() - month - chrono::Duration::hours(1))
        .await;
    raw.backdate(old_enough, Utc::now() - month + chrono::Duration::hours(1))
        .await;
    raw.backdate(
        other_analysis,
        Utc::now() - month - chrono::Duration::days(10),
    )
    .await;
    // Backdating recorded nothing, so nothing was pruned yet.
    assert_eq!(history(&store, "a", None).await.len(), kept + 2);

    // The next build of the analysis, of any partition, prunes what is too old.
    let latest = one_build(&store, "a", busy, false).await;
    let of_a = ids(&history(&store, "a", None).await);
    assert!(
        !of_a.contains(&too_old),
        "a build older than {BUILDS_KEPT_DAYS} days is deleted"
    );
    assert!(
        of_a.contains(&old_enough),
        "a build just younger than that is kept"
    );
    assert_eq!(
        of_a.len(),
        kept + 1,
        "{kept} of the busy partition and one other"
    );
    // The busy partition still holds its newest builds, the latest first.
    let busy_builds = ids(&history(&store, "a", Some(busy)).await);
    assert_eq!(busy_builds.len(), kept);
    assert_eq!(busy_builds[0], latest);
    assert_eq!(busy_builds[1..], newest_first[..kept - 1]);
    // Another analysis' history is pruned by its own builds only.
    assert_eq!(ids(&history(&store, "b", None).await), [other_analysis]);
    one_build(&store, "b", day("2024-04-05"), false).await;
    assert!(!ids(&history(&store, "b", None).await).contains(&other_analysis));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_history_keeps_the_newest_builds_of_a_partition_and_none_older_than_its_days()
{
    let scratch = Scratch::sqlite();
    let store = crate::connect(Some(&scratch.url)).await.expect("opening");
    let raw = sqlx::SqlitePool::connect(&scratch.url)
        .await
        .expect("a second connection");
    the_history_keeps_the_newest_builds_of_a_partition_and_none_older_than_its_days(
        store,
        Raw::Sqlite(raw.clone()),
    )
    .await;
    raw.close().await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_the_history_keeps_the_newest_builds_of_a_partition_and_none_older_than_its_days()
 {
    let Some(scratch) = Scratch::postgres().await else {
        return;
    };
    let store = crate::connect(Some(&scratch.url))
        .await
        .expect("connecting the store");
    let raw = sqlx::PgPool::connect(&scratch.url)
        .await
        .expect("a second connection");
    the_history_keeps_the_newest_builds_of_a_partition_and_none_older_than_its_days(
        store,
        Raw::Postgres(raw.clone()),
    )
    .await;
    raw.close().await;
    scratch.remove().await;
}

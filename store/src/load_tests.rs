//! The extend path's one snapshot, on both backends: a load reads the span's summary and
//! its records in one snapshot, so a batch spanning two hours is wholly in a load or
//! wholly out, and the summary counts exactly the records a frame then holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use scholia_events::envelope::Envelope;
use scholia_events::schema::KindSchema;
use scholia_events::store::{Batch, NewRecord, RecordRow, RecordSink, Records};

use crate::scratch::Scratch;

/// Records per batch: half in the last second of 10:00, half in the first of 11:00.
const BATCH: usize = 4;
/// How long the writer and the reader race, at least.
const RACE: Duration = Duration::from_secs(3);
/// Batches committed during the race, at least.
const MIN_BATCHES: u64 = 40;

/// Each row's batch number (from its `data`) and id.
#[derive(Default)]
struct Seen(Vec<(u64, Uuid)>);

impl RecordSink for Seen {
    fn push(&mut self, row: RecordRow<'_>) {
        let data: serde_json::Value = serde_json::from_str(row.data).expect("data is JSON");
        let batch = data["batch"]
            .as_u64()
            .expect("every record names its batch");
        self.0.push((batch, row.data_id));
    }
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("a time")
}

/// Batch `n` through the store's ingest write path: records on both sides of 11:00.
fn batch(n: u64) -> Batch {
    let mut schema = KindSchema::default();
    let records = (0..BATCH)
        .map(|i| {
            let created = if i % 2 == 0 {
                at("2024-06-01T10:59:59.999Z")
            } else {
                at("2024-06-01T11:00:00Z")
            };
            let data = json!({"batch": n, "v": i})
                .as_object()
                .expect("an object")
                .clone();
            schema.learn(&data);
            let envelope = Envelope {
                data_id: Uuid::now_v7(),
                kind: "tick".into(),
                source: "race".into(),
                created,
                data,
            };
            let data_json = envelope.data_json();
            let digest = envelope.digest_with(&data_json, true);
            NewRecord {
                line: i + 1,
                envelope,
                data_json,
                digest,
            }
        })
        .collect();
    Batch {
        records,
        rejected: Vec::new(),
        actor: "test".into(),
        received_at: Utc::now(),
        schemas: BTreeMap::from([("tick".to_string(), schema)]),
    }
}

/// What a frame of the day holds: every record read so far, and the highest `seq`.
#[derive(Default)]
struct Frame {
    ids: HashSet<Uuid>,
    after: i64,
    loads: usize,
    /// Loads that found new records.
    extended: usize,
}

impl Frame {
    /// Extend the frame with one load after its highest `seq`, checking what it read:
    /// whole batches, none read before, and a summary that counts the frame's records.
    async fn extend(&mut self, records: &dyn Records) {
        let (from, to) = (at("2024-06-01T00:00:00Z"), at("2024-06-02T00:00:00Z"));
        let mut seen = Seen::default();
        let summary = records
            .load("tick", from, to, self.after, &mut seen)
            .await
            .expect("loading the day");
        self.loads += 1;
        let load = self.loads;
        let mut per_batch: HashMap<u64, usize> = HashMap::new();
        for (n, id) in &seen.0 {
            *per_batch.entry(*n).or_default() += 1;
            assert!(
                self.ids.insert(*id),
                "load {load} read record {id} of batch {n} again"
            );
        }
        for (n, count) in &per_batch {
            assert_eq!(
                *count, BATCH,
                "load {load} holds {count} of the {BATCH} records of batch {n}"
            );
        }
        assert_eq!(
            summary.rows,
            self.ids.len() as i64,
            "load {load}: the summary counts other records than the frame holds"
        );
        assert!(
            summary.max_seq >= self.after,
            "load {load}: the seq went back"
        );
        if !seen.0.is_empty() {
            self.extended += 1;
        }
        self.after = summary.max_seq;
    }
}

/// One task commits two-hour batches while another extends a frame of the day with
/// loads after the highest `seq` it holds: no load may hold part of a batch, and each
/// load's summary must count exactly the records the frame then holds.
async fn loads_never_split_a_batch(records: Arc<dyn Records>) {
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (records, stop, committed) = (records.clone(), stop.clone(), committed.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let written = records.write(batch(n)).await.expect("writing a batch");
                assert_eq!(written.accepted, BATCH as u64, "{:?}", written.quarantined);
                n += 1;
                committed.store(n, Ordering::Relaxed);
            }
            n
        })
    };
    let mut frame = Frame::default();
    let started = Instant::now();
    // At least RACE, and at least MIN_BATCHES commits (a slow disk commits few a second).
    while started.elapsed() < RACE
        || (committed.load(Ordering::Relaxed) < MIN_BATCHES
            && started.elapsed() < Duration::from_secs(60))
    {
        frame.extend(&*records).await;
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    let batches = writer.await.expect("the writer");
    // After the writer stopped, one more load finds every record.
    frame.extend(&*records).await;
    assert_eq!(frame.ids.len(), batches as usize * BATCH, "the last load");
    assert!(
        batches >= MIN_BATCHES,
        "only {batches} batches were written in a minute: too few to race"
    );
    assert!(
        frame.loads >= 100,
        "only {} loads: too few to race",
        frame.loads
    );
    assert!(
        frame.extended >= 10,
        "only {} loads found new records: too few to race",
        frame.extended
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_load_holds_every_record_of_a_batch_or_none() {
    let scratch = Scratch::sqlite();
    let store = crate::connect(Some(&scratch.url)).await.expect("opening");
    loads_never_split_a_batch(store.records.clone()).await;
    drop(store);
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_a_load_holds_every_record_of_a_batch_or_none() {
    let Some(scratch) = Scratch::postgres().await else {
        return;
    };
    let store = crate::connect(Some(&scratch.url))
        .await
        .expect("connecting the store");
    loads_never_split_a_batch(store.records.clone()).await;
    drop(store);
    scratch.remove().await;
}

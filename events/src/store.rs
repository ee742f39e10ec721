//! The stores: what Scholia keeps in SQL, one trait per aggregate. `scholia-store`
//! implements each for PostgreSQL and for SQLite; a deployment chooses one backend once,
//! from its database URL, and every component talks to these traits only.
//!
//! Each method that changes state is one transaction, and an admin action commits
//! together with its audit event. Writers that append to the event log hold the
//! deployment's log lock until they commit, so `seq` order is commit order: the relay,
//! replay, frame reuse and the reconciler all rely on it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::analysis::{AnalysisMeta, ColumnSpec, InputSource};
use crate::envelope::{Envelope, StoredEnvelope};
use crate::error::Result;
use crate::event::{LoggedEvent, NewEvent};
use crate::partition::PartitionKey;
use crate::schema::{FieldType, KindSchema};
use crate::status::{BuildState, InvalidationState, Rebuild, Want};
use crate::token::{Scope, Token};

/// Every store of one deployment, backed by one database.
#[derive(Clone)]
pub struct Store {
    pub database: Arc<dyn Database>,
    pub log: Arc<dyn EventLog>,
    pub records: Arc<dyn Records>,
    pub kinds: Arc<dyn Kinds>,
    pub tokens: Arc<dyn Tokens>,
    pub quarantine: Arc<dyn Quarantine>,
    pub analyses: Arc<dyn Analyses>,
    pub queue: Arc<dyn BuildQueue>,
    pub annotations: Arc<dyn Annotations>,
    pub invalidations: Arc<dyn Invalidations>,
    pub schedules: Arc<dyn Schedules>,
}

/// The database itself.
#[async_trait]
pub trait Database: Send + Sync {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<()>;
    /// An id made once, with the database: what is kept outside the database (a worker's
    /// frame files) is filed under it, so it is never taken for another database's.
    async fn installation(&self) -> Result<Uuid>;
    async fn close(&self);
}

/// Resolves when something may have changed (new log events, new work); callers then
/// look in SQL. Spurious wake-ups are allowed, missed ones are not once it is created.
#[async_trait]
pub trait Watch: Send {
    async fn changed(&mut self);
}

/// Held by the one relay of a deployment; dropping it lets another process lead.
#[async_trait]
pub trait Leadership: Send {
    /// Whether this process still leads (its lock's connection is alive).
    async fn holds(&mut self) -> bool;
}

/// The append-only event log, and the relay's bookkeeping.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Append events in a transaction of their own.
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<LoggedEvent>>;
    /// Events with `seq > after`, oldest first, at most `limit`.
    async fn read_after(&self, after: i64, limit: usize) -> Result<Vec<LoggedEvent>>;
    /// The highest committed `seq`, or 0 for an empty log.
    async fn head(&self) -> Result<i64>;
    /// Woken after commits that appended to the log, in this process or another.
    async fn watch(&self) -> Result<Box<dyn Watch>>;
    /// Become the deployment's relay, or `None` while another process is.
    async fn lead_relay(&self) -> Result<Option<Box<dyn Leadership>>>;
    async fn relay_cursor(&self, name: &str) -> Result<Option<i64>>;
    async fn save_relay_cursor(&self, name: &str, seq: i64) -> Result<()>;
}

/// One item of a batch that cannot be accepted, kept in the quarantine.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// 1-based: the line of an NDJSON body, or the position in a JSON array.
    pub line: usize,
    pub raw: String,
    pub error: String,
    pub kind: Option<String>,
    pub source: Option<String>,
    pub data_id: Option<Uuid>,
}

/// A record ready to store: its digest and `data` as JSON are computed before any lock.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub line: usize,
    pub envelope: Envelope,
    pub data_json: String,
    pub digest: [u8; 32],
}

/// A batch as ingest hands it over.
#[derive(Debug, Clone)]
pub struct Batch {
    pub records: Vec<NewRecord>,
    /// Lines refused before the store saw them.
    pub rejected: Vec<Rejected>,
    pub actor: String,
    pub received_at: DateTime<Utc>,
    /// The schema of each kind the records were checked against (and what they would add
    /// to it). The store checks again, under the lock, those kinds whose stored schema
    /// moved meanwhile.
    pub schemas: BTreeMap<String, KindSchema>,
}

/// What writing a batch did.
#[derive(Debug, Default)]
pub struct Written {
    pub accepted: u64,
    pub duplicates: u64,
    /// Everything quarantined, in line order: the batch's rejected lines, conflicting
    /// ids, and records that did not fit their kind's schema.
    pub quarantined: Vec<Rejected>,
    pub events: Vec<LoggedEvent>,
    /// The schema of each kind of the batch after it (what it learned included).
    pub schemas: BTreeMap<String, KindSchema>,
}

/// One stored record as a scan hands it out, borrowed from the scan's buffer.
#[derive(Debug, Clone, Copy)]
pub struct RecordRow<'a> {
    pub data_id: Uuid,
    pub source: &'a str,
    /// Microseconds since the Unix epoch, UTC.
    pub created: i64,
    pub received_at: i64,
    /// `data` as JSON text.
    pub data: &'a str,
}

/// Receives the rows of a scan, one at a time, without owning them.
pub trait RecordSink: Send {
    /// About how many rows are coming, before the first.
    fn reserve(&mut self, _rows: usize) {}
    fn push(&mut self, row: RecordRow<'_>);
}

/// What the per-hour summary (`record_hours`) says of a span: records and the highest
/// `seq` among them. Both only grow, so an unchanged summary means unchanged records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub rows: i64,
    pub max_seq: i64,
}

/// An hour of a kind that gained records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedHour {
    pub kind: String,
    pub hour: PartitionKey,
    pub max_seq: i64,
}

/// Source records: immutable, never updated or deleted.
#[async_trait]
pub trait Records: Send + Sync {
    /// Write a batch durably, with its `source.ingested` events and quarantined lines, in
    /// one transaction. Returns only after the commit.
    async fn write(&self, batch: Batch) -> Result<Written>;
    async fn get(&self, data_id: Uuid) -> Result<Option<StoredEnvelope>>;
    /// Read, in one snapshot, the records of `kind` created in the whole hours
    /// `[from, to)` whose `seq` is above `after`, in no particular order, and return the
    /// span's summary in that same snapshot: what a frame holding the records up to
    /// `after` and those read now holds.
    async fn load(
        &self,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after: i64,
        sink: &mut dyn RecordSink,
    ) -> Result<Summary>;
    /// The summary of `kind`'s records in the whole hours `[from, to)`.
    async fn summary(&self, kind: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Summary>;
    /// Hours whose records moved after `seq` (at most `limit`, lowest `max_seq` first).
    async fn hours_changed_after(&self, seq: i64, limit: usize) -> Result<Vec<ChangedHour>>;
}

/// A kind and its schema.
#[derive(Debug, Clone, PartialEq)]
pub struct KindInfo {
    pub kind: String,
    pub schema: KindSchema,
    pub updated_at: DateTime<Utc>,
}

#[async_trait]
pub trait Kinds: Send + Sync {
    async fn list(&self) -> Result<Vec<KindInfo>>;
    async fn get(&self, kind: &str) -> Result<Option<KindInfo>>;
    /// Declare field types (replacing what was learned of them), with the audit event.
    async fn declare(
        &self,
        kind: &str,
        fields: &BTreeMap<String, FieldType>,
        actor: &str,
    ) -> Result<KindInfo>;
}

/// What became of a configured bootstrap secret.
#[derive(Debug, Clone, PartialEq)]
pub enum Bootstrap {
    Created(Token),
    Existing(Token),
    /// An admin revoked it; it stays revoked and is not accepted.
    Revoked,
}

#[async_trait]
pub trait Tokens: Send + Sync {
    /// Store a token for `secret_hash`, with the audit event (`actor` is who created it;
    /// `None` for the service itself).
    async fn create(
        &self,
        scope: Scope,
        sources: Vec<String>,
        name: &str,
        secret_hash: &str,
        actor: Option<&str>,
    ) -> Result<Token>;
    /// Make sure a token exists for a secret configured elsewhere.
    async fn bootstrap(&self, scope: Scope, name: &str, secret_hash: &str) -> Result<Bootstrap>;
    /// The live token with this secret hash.
    async fn lookup(&self, secret_hash: &str) -> Result<Option<Token>>;
    async fn list(&self) -> Result<Vec<Token>>;
    /// Revoke, with the audit event; false when there is no live token with that id.
    async fn revoke(&self, id: Uuid, actor: &str) -> Result<bool>;
    async fn count(&self) -> Result<i64>;
}

/// A quarantined line.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Quarantined {
    pub id: i64,
    #[schema(value_type = String, format = DateTime)]
    pub received_at: DateTime<Utc>,
    pub kind: Option<String>,
    pub source: Option<String>,
    pub data_id: Option<Uuid>,
    pub line: i32,
    pub raw: String,
    pub error: String,
    pub actor: String,
}

#[async_trait]
pub trait Quarantine: Send + Sync {
    /// Newest first, with `id < before` when given.
    async fn list(&self, before: Option<i64>, limit: usize) -> Result<Vec<Quarantined>>;
    /// Oldest first, with `id > after`.
    async fn list_after(&self, after: i64, limit: usize) -> Result<Vec<Quarantined>>;
    /// Delete what is older than `older_than`, and the oldest beyond `keep` rows.
    async fn prune(&self, older_than: DateTime<Utc>, keep: u64) -> Result<u64>;
}

/// An analysis as stored: its definition and the fingerprint that decides its version.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisRecord {
    pub meta: AnalysisMeta,
    pub fingerprint: String,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

/// What a candidate's name ends with. A candidate of `daily_avg` is stored as an analysis of
/// its own, `daily_avg@candidate`, so that it builds through the same queue and workers and
/// its annotations live under that name; `@` cannot appear in an analysis' name, so the two
/// never collide, and every place users list or read analyses leaves candidates out.
pub const CANDIDATE_SUFFIX: &str = "@candidate";

/// The stored name of `analysis`' candidate.
pub fn candidate_name(analysis: &str) -> String {
    format!("{analysis}{CANDIDATE_SUFFIX}")
}

/// The live analysis whose candidate `name` is, when it is one.
pub fn candidate_of(name: &str) -> Option<&str> {
    name.strip_suffix(CANDIDATE_SUFFIX)
}

/// A candidate as lists show it: its version and how many partitions that version built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateSummary {
    /// The live analysis it is a candidate of.
    pub analysis: String,
    pub version: i64,
    pub built: i64,
}

/// Making a candidate live: the live analysis' new definition (the candidate's, with the
/// next live version), the downstream analyses whose version follows it, and the candidate
/// whose annotations of `candidate_version` become the live ones.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The candidate's stored name (`daily_avg@candidate`).
    pub candidate: String,
    pub candidate_version: i64,
    pub live: AnalysisMeta,
    pub fingerprint: String,
    pub downstream: Vec<(AnalysisMeta, String)>,
    pub actor: String,
}

/// What discarding a candidate removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discarded {
    pub version: i64,
    /// Its annotations, deleted.
    pub partitions: i64,
    /// Its builds that were queued or running, dropped.
    pub queued: i64,
}

#[async_trait]
pub trait Analyses: Send + Sync {
    async fn list(&self) -> Result<Vec<AnalysisRecord>>;
    async fn get(&self, name: &str) -> Result<Option<AnalysisRecord>>;
    /// Store definitions (an analysis, and downstream analyses whose version follows it)
    /// and log `analysis.registered` for each, in one transaction.
    async fn put(&self, analyses: Vec<(AnalysisMeta, String)>, actor: &str) -> Result<()>;
    /// Every candidate, with the partitions its version built.
    async fn candidates(&self) -> Result<Vec<CandidateSummary>>;
    /// Make a candidate live, in one transaction: store the live definitions and log
    /// `analysis.registered` for each; move the candidate's annotations of its version (and
    /// what their builds read) to the live analysis, with the live version and the live
    /// partition's next generation, logging `analysis.completed` for each so that caches
    /// and charts take them; drop the candidate, its other annotations and its queued
    /// builds; log `admin.action` `candidate.promoted`. Returns the promoted partitions.
    /// A candidate that is gone or changed meanwhile is a conflict.
    async fn promote(&self, promotion: Promotion) -> Result<Vec<PartitionKey>>;
    /// Delete a candidate (`name` is its stored name), its annotations, what their builds
    /// read, its queued builds and its build history, and log `admin.action`
    /// `candidate.discarded`, in one transaction. Not found when there is none.
    async fn discard(&self, name: &str, actor: &str) -> Result<Discarded>;
}

/// A request for builds.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub analysis: String,
    pub version: i64,
    pub partitions: Vec<PartitionKey>,
    pub priority: i32,
    pub want: Want,
    /// Debounce: the build starts no earlier.
    pub not_before: DateTime<Utc>,
    pub actor: String,
    /// Log `analysis.requested` (the planner does; readers do not, so that reading never
    /// takes the log lock).
    pub log: bool,
}

/// A partition this worker holds the lease of.
#[derive(Debug, Clone)]
pub struct Claim {
    pub analysis: String,
    pub partition: PartitionKey,
    /// The request counter the build started from.
    pub claimed: i64,
    /// Builds started for this request, this one included.
    pub attempts: i32,
    /// How urgent it is (`PRIORITY_LIVE` or `PRIORITY_BULK`).
    pub priority: i32,
    pub build: Uuid,
    pub owner: String,
    pub claimed_at: DateTime<Utc>,
}

/// A partition's place in the build queue, as readers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueState {
    pub partition: PartitionKey,
    pub state: BuildState,
    pub error: Option<String>,
}

/// A partition given up on because its builds kept stopping their workers.
#[derive(Debug, Clone)]
pub struct Abandoned {
    pub analysis: String,
    pub partition: PartitionKey,
    pub attempts: i32,
}

/// The build queue, shared by every worker process.
#[async_trait]
pub trait BuildQueue: Send + Sync {
    /// Queue builds (coalescing with what is queued or running); returns the partitions
    /// it asked for. `Want::Present` skips partitions built by this version and current.
    async fn request(&self, request: BuildRequest) -> Result<Vec<PartitionKey>>;
    /// Make the queued builds of `analysis` with keys in `[from_key, to_key)` at least as
    /// urgent as `priority` (a lower number is more urgent), so that live work is not kept
    /// behind bulk work it depends on. Queues nothing new and logs nothing; returns how
    /// many builds it moved ahead.
    async fn hasten(
        &self,
        analysis: &str,
        from_key: &str,
        to_key: &str,
        priority: i32,
    ) -> Result<u64>;
    /// Take the most urgent due partition with a lease of `lease`. A partition whose
    /// lease expired is taken over while it has had fewer than `max_attempts` builds;
    /// after that it waits for [`BuildQueue::abandon_poisoned`].
    async fn claim(&self, owner: &str, lease: Duration, max_attempts: i32)
    -> Result<Option<Claim>>;
    /// Extend the lease; false when it was lost.
    async fn heartbeat(&self, claim: &Claim, lease: Duration) -> Result<bool>;
    /// Record a failed build: queued again after `retry_in`, or `failed` for good when it
    /// is `None`. Returns whether it gave up, or `None` when the lease was lost.
    async fn fail(
        &self,
        claim: &Claim,
        version: i64,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<Option<bool>>;
    /// Hand the partition back without counting an attempt: its inputs are not ready.
    async fn defer(&self, claim: &Claim, until: DateTime<Utc>) -> Result<bool>;
    /// Partitions whose lease expired after `max_attempts` builds started: their builds
    /// stop their workers. They become `failed` with `error` (and their events logged).
    async fn abandon_poisoned(&self, max_attempts: i32, error: &str) -> Result<Vec<Abandoned>>;
    /// When the earliest queued build falls due.
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>>;
    /// Queue states of `analysis` for keys in `[from_key, to_key)`.
    async fn states(&self, analysis: &str, from_key: &str, to_key: &str)
    -> Result<Vec<QueueState>>;
    /// Woken when builds may have been queued, in this process or another.
    async fn watch(&self) -> Result<Box<dyn Watch>>;
}

/// What a build read of one input: the span (keys of the input's own partitions, hours for
/// a kind, half-open) and its summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct InputRead {
    pub source: InputSource,
    pub span_from: String,
    pub span_to: String,
    pub rows: i64,
    pub max_seq: i64,
}

/// What a finished build produced.
#[derive(Debug, Clone)]
pub struct NewAnnotation {
    pub version: i64,
    pub columns: Vec<ColumnSpec>,
    /// The rows as a JSON array.
    pub rows_json: String,
    pub row_count: u64,
    pub inputs: Vec<InputRead>,
    pub duration: Duration,
}

impl NewAnnotation {
    /// Rows read, over every input.
    pub fn input_rows(&self) -> i64 {
        self.inputs.iter().map(|i| i.rows).sum()
    }

    /// The highest `seq` read, over every input.
    pub fn input_seq(&self) -> i64 {
        self.inputs.iter().map(|i| i.max_seq).max().unwrap_or(0)
    }
}

/// One stored annotation.
#[derive(Debug)]
pub struct StoredAnnotation {
    pub partition: PartitionKey,
    pub version: i64,
    pub generation: i64,
    pub computed_at: DateTime<Utc>,
    pub input_rows: i64,
    pub input_seq: i64,
    /// The `seq` of the `analysis.completed` event that committed it.
    pub committed_seq: i64,
    pub columns: Vec<ColumnSpec>,
    /// The rows as a JSON array, served without re-serializing.
    pub rows: Box<RawValue>,
}

/// How a commit went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Stored with this generation. `again` when the partition goes round once more: it
    /// was requested during the build, or its input moved after the build read it.
    Generation { generation: i64, again: bool },
    /// Another worker took the partition over; nothing was written.
    LostLease,
}

/// One annotation: an analysis and a partition of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AnnotationKey {
    pub analysis: String,
    pub partition: PartitionKey,
}

/// Annotations: the latest of each (analysis, partition), one generic table for all.
#[async_trait]
pub trait Annotations: Send + Sync {
    /// Annotations of `analysis` with keys in `[first, last]`.
    async fn load(
        &self,
        analysis: &str,
        first: &PartitionKey,
        last: &PartitionKey,
    ) -> Result<Vec<StoredAnnotation>>;
    /// Store a build's annotation and what it read, settle the requests it started from,
    /// and log `analysis.completed`, in one transaction that first checks the lease. If
    /// an input moved since the build read it, the partition is queued again.
    async fn commit(&self, claim: &Claim, annotation: &NewAnnotation) -> Result<Committed>;
    /// Of `partitions` of `analysis`, those built whose read of `input` is older than
    /// `seq` (the planner's question after new data or a new upstream generation).
    async fn behind(
        &self,
        analysis: &str,
        input: &InputSource,
        partitions: &[PartitionKey],
        seq: i64,
    ) -> Result<Vec<PartitionKey>>;
    /// Built partitions whose input moved after their build read it. With `hours`, only
    /// those reading one of these kind-hours (the reconciler's incremental pass);
    /// without, all of them (its full pass). Upstream analyses are always compared.
    async fn moved(&self, hours: Option<&[ChangedHour]>) -> Result<Vec<AnnotationKey>>;
    /// What the build of one partition read.
    async fn inputs(&self, analysis: &str, partition: &PartitionKey) -> Result<Vec<InputRead>>;
    /// Built partitions whose read of `input` covered its partition `key` and saw `seq`
    /// (lineage: what was built from a record, or from an upstream annotation).
    async fn readers(&self, input: &InputSource, key: &str, seq: i64)
    -> Result<Vec<AnnotationKey>>;
    /// The build history of `analysis` (of one partition, when given), newest first, at
    /// most `limit`.
    async fn builds(
        &self,
        analysis: &str,
        partition: Option<&PartitionKey>,
        limit: usize,
    ) -> Result<Vec<BuildRecord>>;
    /// The rows of each stored annotation of `analysis` with keys in `[first, last]`
    /// (what a downstream partition reading them reads), without the rows themselves.
    async fn row_counts(
        &self,
        analysis: &str,
        first: &PartitionKey,
        last: &PartitionKey,
    ) -> Result<Vec<(PartitionKey, i64)>>;
    /// The partitions of `analysis` whose stored annotation `version` built, the latest
    /// partitions first, at most `limit`.
    async fn built(&self, analysis: &str, version: i64, limit: usize) -> Result<Vec<PartitionKey>>;
    /// The build slots (`host-pid#slot`) that finished a build of one of `analyses` since
    /// `since`, or hold a lease now.
    async fn workers_seen(&self, analyses: &[String], since: DateTime<Utc>) -> Result<Vec<String>>;
}

/// How many builds the history keeps of each partition of an analysis; older ones are
/// deleted as new ones are recorded.
pub const BUILDS_KEPT_PER_PARTITION: i64 = 50;
/// How long the history keeps a build, in days; older ones of an analysis are deleted as
/// its new ones are recorded.
pub const BUILDS_KEPT_DAYS: i64 = 30;

/// One build of the history.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BuildRecord {
    /// The build's id (as `analysis.started` and `analysis.completed` name it).
    pub id: Uuid,
    pub partition: PartitionKey,
    /// The analysis' version it built.
    pub version: i64,
    /// The generation it committed; null when it failed.
    pub generation: Option<i64>,
    /// Rows read over every input.
    pub rows_read: i64,
    /// Rows of the annotation it made.
    pub rows_written: i64,
    /// From the claim to the commit (or the failure).
    pub duration_ms: i64,
    /// Builds started for this request, this one included.
    pub attempt: i32,
    /// The build slot that ran it (`host-pid#slot`).
    pub worker: String,
    /// `completed`, `retrying` (a transient failure, tried again) or `failed` (given up).
    #[schema(pattern = "^(completed|retrying|failed)$")]
    pub outcome: String,
    /// Why it failed, as a sentence.
    pub error: Option<String>,
    #[schema(format = DateTime)]
    pub started_at: String,
    #[schema(format = DateTime)]
    pub finished_at: String,
}

/// Every partition an invalidation covers, per analysis.
#[derive(Debug, Clone)]
pub struct InvalidationPlan {
    /// The analysis as asked for: a name, or `*`.
    pub target: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub reason: String,
    pub rebuild: Rebuild,
    pub actor: String,
    /// (analysis, version, partitions), upstream before downstream.
    pub analyses: Vec<(String, i64, Vec<PartitionKey>)>,
}

/// An invalidation and how far it got.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Progress {
    pub id: Uuid,
    pub analysis: String,
    #[schema(format = DateTime)]
    pub from: String,
    #[schema(format = DateTime)]
    pub to: String,
    pub reason: String,
    pub rebuild: Rebuild,
    pub actor: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub state: InvalidationState,
    pub partitions_total: i64,
    pub partitions_done: i64,
    pub partitions_failed: i64,
    pub partitions_cancelled: i64,
    /// The invalidation whose failed partitions this one rebuilds, when it is a retry.
    pub retry_of: Option<Uuid>,
}

/// A retry of an invalidation's failed partitions: the new invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retried {
    pub id: Uuid,
    pub retry_of: Uuid,
    pub partitions: i64,
}

#[async_trait]
pub trait Invalidations: Send + Sync {
    /// Record the invalidation, queue (eager) or mark stale (lazy) its partitions, and log
    /// `analysis.invalidated` (and `analysis.requested`), in one transaction.
    async fn create(&self, plan: InvalidationPlan) -> Result<Uuid>;
    async fn progress(&self, id: Uuid) -> Result<Progress>;
    /// The most recent, newest first.
    async fn list(&self, limit: usize) -> Result<Vec<Progress>>;
    /// No new build starts for it; what runs finishes.
    async fn cancel(&self, id: Uuid, actor: &str) -> Result<Progress>;
    /// A new invalidation of exactly the partitions of `id` that failed, recorded, queued
    /// and logged like any other (with `admin.action` `invalidation.retried`), in one
    /// transaction. Not found for an unknown id; a conflict while `id` still has partitions
    /// pending, or when none failed.
    async fn retry(&self, id: Uuid, actor: &str) -> Result<Retried>;
    /// The records of `kind` per hour in the whole hours `[from, to)`, hours without any
    /// left out, oldest first (what a dry run counts its source rows from).
    async fn hour_rows(
        &self,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<(PartitionKey, i64)>>;
}

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRecord {
    pub name: String,
    pub analysis: String,
    pub cron: String,
    pub window: String,
    pub last_fired: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

#[async_trait]
pub trait Schedules: Send + Sync {
    /// Create or change a schedule, with the audit event.
    async fn put(&self, schedule: &ScheduleRecord, actor: &str) -> Result<()>;
    async fn get(&self, name: &str) -> Result<Option<ScheduleRecord>>;
    async fn list(&self) -> Result<Vec<ScheduleRecord>>;
    /// Claim the firing at `slot`; exactly one process wins each slot.
    async fn claim_firing(&self, name: &str, slot: DateTime<Utc>) -> Result<bool>;
}

-- Analyses: one row per analysis, its current definition and version. A SQL analysis
-- keeps its SQL here; a built-in (Rust) one has none. Adding an analysis never needs a
-- schema change.
CREATE TABLE analyses (
    name        TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    partition   TEXT NOT NULL,
    sql         TEXT,
    description TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    updated_by  TEXT NOT NULL
);

-- The latest annotation of each (analysis, partition): one generic table for every
-- analysis. The rows are JSON, the columns their names and types.
CREATE TABLE annotations (
    analysis    TEXT NOT NULL,
    partition   TEXT NOT NULL,
    version     INTEGER NOT NULL,
    generation  INTEGER NOT NULL,
    computed_at TEXT NOT NULL,
    input_rows  INTEGER NOT NULL,
    input_seq   INTEGER NOT NULL,
    row_count   INTEGER NOT NULL,
    columns     TEXT NOT NULL,
    rows        TEXT NOT NULL,
    build_id    BLOB NOT NULL,
    PRIMARY KEY (analysis, partition)
);

-- Partitions that need (re)building, being built, or that failed: the build queue.
-- requested counts requests; a build records the count it started from, and a request
-- that arrives while it runs sends the partition round again.
CREATE TABLE partition_state (
    analysis      TEXT NOT NULL,
    partition     TEXT NOT NULL,
    state         TEXT NOT NULL,          -- stale | queued | running | failed
    priority      INTEGER NOT NULL,       -- 0 live (someone waits), 10 bulk
    requested     INTEGER NOT NULL,
    claimed       INTEGER NOT NULL DEFAULT 0,
    not_before    TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    lease_owner   TEXT,
    lease_until   TEXT,
    build_id      BLOB,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (analysis, partition)
);
CREATE INDEX partition_state_ready ON partition_state (state, priority, not_before);

CREATE TABLE invalidations (
    id          BLOB PRIMARY KEY,
    analysis    TEXT NOT NULL,
    range_from  TEXT NOT NULL,
    range_to    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    rebuild     TEXT NOT NULL,
    state       TEXT NOT NULL,            -- pending | running | done | failed | cancelled
    actor       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    finished_at TEXT
);

-- The partitions an invalidation asked for, each settled by the first build that
-- started after the request.
CREATE TABLE invalidation_items (
    invalidation BLOB NOT NULL ,
    analysis     TEXT NOT NULL,
    partition    TEXT NOT NULL,
    request      INTEGER NOT NULL,
    state        TEXT NOT NULL,            -- pending | done | failed | cancelled
    PRIMARY KEY (invalidation, analysis, partition)
);
CREATE INDEX invalidation_items_open ON invalidation_items (analysis, partition) WHERE state = 'pending';

CREATE TABLE schedules (
    name        TEXT PRIMARY KEY,
    analysis    TEXT NOT NULL,
    cron        TEXT NOT NULL,
    window_spec TEXT NOT NULL,
    last_fired  TEXT,
    updated_at  TEXT NOT NULL,
    updated_by  TEXT NOT NULL
);

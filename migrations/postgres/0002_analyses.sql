-- Analyses: one row per analysis, its current definition and version. A SQL analysis
-- keeps its SQL here; a built-in (Rust) one has none. Adding an analysis never needs a
-- schema change.
CREATE TABLE analyses (
    name        TEXT PRIMARY KEY,
    version     BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    partition   TEXT NOT NULL,
    sql         TEXT,
    description TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    updated_by  TEXT NOT NULL
);

-- The latest annotation of each (analysis, partition): one generic table for every
-- analysis. The rows are JSON, the columns their names and types.
CREATE TABLE annotations (
    analysis    TEXT NOT NULL,
    partition   TEXT NOT NULL,
    version     BIGINT NOT NULL,
    generation  BIGINT NOT NULL,
    computed_at TIMESTAMPTZ NOT NULL,
    input_rows  BIGINT NOT NULL,
    input_seq   BIGINT NOT NULL,
    row_count   BIGINT NOT NULL,
    columns     TEXT NOT NULL,
    rows        TEXT NOT NULL,
    build_id    UUID NOT NULL,
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
    requested     BIGINT NOT NULL,
    claimed       BIGINT NOT NULL DEFAULT 0,
    not_before    TIMESTAMPTZ NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    lease_owner   TEXT,
    lease_until   TIMESTAMPTZ,
    build_id      UUID,
    updated_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (analysis, partition)
);
CREATE INDEX partition_state_ready ON partition_state (state, priority, not_before);

CREATE TABLE invalidations (
    id          UUID PRIMARY KEY,
    analysis    TEXT NOT NULL,
    range_from  TIMESTAMPTZ NOT NULL,
    range_to    TIMESTAMPTZ NOT NULL,
    reason      TEXT NOT NULL,
    rebuild     TEXT NOT NULL,
    state       TEXT NOT NULL,            -- pending | running | done | failed | cancelled
    actor       TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ
);

-- The partitions an invalidation asked for, each settled by the first build that
-- started after the request.
CREATE TABLE invalidation_items (
    invalidation UUID NOT NULL REFERENCES invalidations (id),
    analysis     TEXT NOT NULL,
    partition    TEXT NOT NULL,
    request      BIGINT NOT NULL,
    state        TEXT NOT NULL,            -- pending | done | failed | cancelled
    PRIMARY KEY (invalidation, analysis, partition)
);
CREATE INDEX invalidation_items_open ON invalidation_items (analysis, partition) WHERE state = 'pending';

CREATE TABLE schedules (
    name        TEXT PRIMARY KEY,
    analysis    TEXT NOT NULL,
    cron        TEXT NOT NULL,
    window_spec TEXT NOT NULL,
    last_fired  TIMESTAMPTZ,
    updated_at  TIMESTAMPTZ NOT NULL,
    updated_by  TEXT NOT NULL
);

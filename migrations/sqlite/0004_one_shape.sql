-- One shape for both databases.
--
-- 1. Times are integer microseconds since the Unix epoch (UTC) in every table, as
--    `records` already had them: each table that kept RFC 3339 text is rebuilt with its
--    times converted (microseconds kept).
-- 2. Records point at their batch; a batch maps to the seq of its source.ingested event.
-- 3. Analyses name their inputs; annotations keep the seq that committed them and, per
--    input, the span their build read and that span's summary (rows, highest seq), from
--    which staleness is derived.
-- 4. Build history.

CREATE TABLE event_log_new (
    seq     INTEGER PRIMARY KEY,
    type    TEXT NOT NULL,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    payload TEXT NOT NULL
);
INSERT INTO event_log_new (seq, type, at, actor, payload)
SELECT seq,
       type,
       (unixepoch(substr(at, 1, 19)) * 1000000 + CASE WHEN substr(at, 20, 1) = '.' THEN CAST(substr(substr(substr(at, 21), 1, instr(substr(at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       actor,
       payload
FROM event_log;
DROP TABLE event_log;
ALTER TABLE event_log_new RENAME TO event_log;

CREATE TABLE quarantine_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    kind        TEXT,
    source      TEXT,
    data_id     BLOB,
    line        INTEGER NOT NULL,
    raw         TEXT NOT NULL,
    error       TEXT NOT NULL,
    actor       TEXT NOT NULL
);
INSERT INTO quarantine_new (id, received_at, kind, source, data_id, line, raw, error, actor)
SELECT id,
       (unixepoch(substr(received_at, 1, 19)) * 1000000 + CASE WHEN substr(received_at, 20, 1) = '.' THEN CAST(substr(substr(substr(received_at, 21), 1, instr(substr(received_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       kind,
       source,
       data_id,
       line,
       raw,
       error,
       actor
FROM quarantine;
DROP TABLE quarantine;
ALTER TABLE quarantine_new RENAME TO quarantine;

CREATE TABLE kinds_new (
    kind       TEXT PRIMARY KEY,
    fields     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
INSERT INTO kinds_new (kind, fields, updated_at)
SELECT kind,
       fields,
       (unixepoch(substr(updated_at, 1, 19)) * 1000000 + CASE WHEN substr(updated_at, 20, 1) = '.' THEN CAST(substr(substr(substr(updated_at, 21), 1, instr(substr(updated_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END)
FROM kinds;
DROP TABLE kinds;
ALTER TABLE kinds_new RENAME TO kinds;

CREATE TABLE tokens_new (
    id          BLOB PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    scope       TEXT NOT NULL,
    sources     TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
INSERT INTO tokens_new (id, secret_hash, scope, sources, name, created_at, revoked_at)
SELECT id,
       secret_hash,
       scope,
       sources,
       name,
       (unixepoch(substr(created_at, 1, 19)) * 1000000 + CASE WHEN substr(created_at, 20, 1) = '.' THEN CAST(substr(substr(substr(created_at, 21), 1, instr(substr(created_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       (unixepoch(substr(revoked_at, 1, 19)) * 1000000 + CASE WHEN substr(revoked_at, 20, 1) = '.' THEN CAST(substr(substr(substr(revoked_at, 21), 1, instr(substr(revoked_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END)
FROM tokens;
DROP TABLE tokens;
ALTER TABLE tokens_new RENAME TO tokens;

CREATE TABLE analyses_new (
    name        TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    partition   TEXT NOT NULL,
    inputs      TEXT NOT NULL,
    sql         TEXT,
    description TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    updated_by  TEXT NOT NULL
);
INSERT INTO analyses_new (name, version, kind, partition, inputs, sql, description, fingerprint, updated_at, updated_by)
SELECT name,
       version,
       kind,
       partition,
       CASE WHEN kind <> '' THEN json_array(json_object('kind', kind)) ELSE '[]' END,
       sql,
       description,
       fingerprint,
       (unixepoch(substr(updated_at, 1, 19)) * 1000000 + CASE WHEN substr(updated_at, 20, 1) = '.' THEN CAST(substr(substr(substr(updated_at, 21), 1, instr(substr(updated_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       updated_by
FROM analyses;
DROP TABLE analyses;
ALTER TABLE analyses_new RENAME TO analyses;

CREATE TABLE annotations_new (
    analysis      TEXT NOT NULL,
    partition     TEXT NOT NULL,
    version       INTEGER NOT NULL,
    generation    INTEGER NOT NULL,
    computed_at   INTEGER NOT NULL,
    input_rows    INTEGER NOT NULL,
    input_seq     INTEGER NOT NULL,
    committed_seq INTEGER NOT NULL,
    row_count     INTEGER NOT NULL,
    columns       TEXT NOT NULL,
    rows          TEXT NOT NULL,
    build_id      BLOB NOT NULL,
    PRIMARY KEY (analysis, partition)
);
INSERT INTO annotations_new (analysis, partition, version, generation, computed_at, input_rows, input_seq, committed_seq, row_count, columns, rows, build_id)
SELECT analysis,
       partition,
       version,
       generation,
       (unixepoch(substr(computed_at, 1, 19)) * 1000000 + CASE WHEN substr(computed_at, 20, 1) = '.' THEN CAST(substr(substr(substr(computed_at, 21), 1, instr(substr(computed_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       input_rows,
       input_seq,
       0,
       row_count,
       columns,
       rows,
       build_id
FROM annotations;
DROP TABLE annotations;
ALTER TABLE annotations_new RENAME TO annotations;

CREATE TABLE partition_state_new (
    analysis      TEXT NOT NULL,
    partition     TEXT NOT NULL,
    state         TEXT NOT NULL,          -- stale | queued | running | failed
    priority      INTEGER NOT NULL,       -- 0 live (someone waits), 10 bulk
    requested     INTEGER NOT NULL,
    claimed       INTEGER NOT NULL DEFAULT 0,
    not_before    INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    lease_owner   TEXT,
    lease_until   INTEGER,
    build_id      BLOB,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (analysis, partition)
);
INSERT INTO partition_state_new (analysis, partition, state, priority, requested, claimed, not_before, attempts, error, lease_owner, lease_until, build_id, updated_at)
SELECT analysis,
       partition,
       state,
       priority,
       requested,
       claimed,
       (unixepoch(substr(not_before, 1, 19)) * 1000000 + CASE WHEN substr(not_before, 20, 1) = '.' THEN CAST(substr(substr(substr(not_before, 21), 1, instr(substr(not_before, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       attempts,
       error,
       lease_owner,
       (unixepoch(substr(lease_until, 1, 19)) * 1000000 + CASE WHEN substr(lease_until, 20, 1) = '.' THEN CAST(substr(substr(substr(lease_until, 21), 1, instr(substr(lease_until, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       build_id,
       (unixepoch(substr(updated_at, 1, 19)) * 1000000 + CASE WHEN substr(updated_at, 20, 1) = '.' THEN CAST(substr(substr(substr(updated_at, 21), 1, instr(substr(updated_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END)
FROM partition_state;
DROP TABLE partition_state;
ALTER TABLE partition_state_new RENAME TO partition_state;

CREATE TABLE invalidations_new (
    id          BLOB PRIMARY KEY,
    analysis    TEXT NOT NULL,
    range_from  INTEGER NOT NULL,
    range_to    INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    rebuild     TEXT NOT NULL,
    state       TEXT NOT NULL,            -- pending | running | done | failed | cancelled
    actor       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
);
INSERT INTO invalidations_new (id, analysis, range_from, range_to, reason, rebuild, state, actor, created_at, finished_at)
SELECT id,
       analysis,
       (unixepoch(substr(range_from, 1, 19)) * 1000000 + CASE WHEN substr(range_from, 20, 1) = '.' THEN CAST(substr(substr(substr(range_from, 21), 1, instr(substr(range_from, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       (unixepoch(substr(range_to, 1, 19)) * 1000000 + CASE WHEN substr(range_to, 20, 1) = '.' THEN CAST(substr(substr(substr(range_to, 21), 1, instr(substr(range_to, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       reason,
       rebuild,
       state,
       actor,
       (unixepoch(substr(created_at, 1, 19)) * 1000000 + CASE WHEN substr(created_at, 20, 1) = '.' THEN CAST(substr(substr(substr(created_at, 21), 1, instr(substr(created_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       (unixepoch(substr(finished_at, 1, 19)) * 1000000 + CASE WHEN substr(finished_at, 20, 1) = '.' THEN CAST(substr(substr(substr(finished_at, 21), 1, instr(substr(finished_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END)
FROM invalidations;
DROP TABLE invalidations;
ALTER TABLE invalidations_new RENAME TO invalidations;

CREATE TABLE schedules_new (
    name        TEXT PRIMARY KEY,
    analysis    TEXT NOT NULL,
    cron        TEXT NOT NULL,
    window_spec TEXT NOT NULL,
    last_fired  INTEGER,
    updated_at  INTEGER NOT NULL,
    updated_by  TEXT NOT NULL
);
INSERT INTO schedules_new (name, analysis, cron, window_spec, last_fired, updated_at, updated_by)
SELECT name,
       analysis,
       cron,
       window_spec,
       (unixepoch(substr(last_fired, 1, 19)) * 1000000 + CASE WHEN substr(last_fired, 20, 1) = '.' THEN CAST(substr(substr(substr(last_fired, 21), 1, instr(substr(last_fired, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       (unixepoch(substr(updated_at, 1, 19)) * 1000000 + CASE WHEN substr(updated_at, 20, 1) = '.' THEN CAST(substr(substr(substr(updated_at, 21), 1, instr(substr(updated_at, 21) || '+', '+') - 1) || '000000', 1, 6) AS INTEGER) ELSE 0 END),
       updated_by
FROM schedules;
DROP TABLE schedules;
ALTER TABLE schedules_new RENAME TO schedules;

CREATE TRIGGER event_log_no_update BEFORE UPDATE ON event_log
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER event_log_no_delete BEFORE DELETE ON event_log
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE INDEX quarantine_received ON quarantine (received_at);
CREATE INDEX partition_state_ready ON partition_state (state, priority, not_before);

ALTER TABLE records RENAME COLUMN seq TO batch;
CREATE TABLE record_batches (
    batch INTEGER PRIMARY KEY,
    seq   INTEGER NOT NULL
);
INSERT INTO record_batches (batch, seq) SELECT DISTINCT batch, batch FROM records;
CREATE INDEX record_hours_max_seq ON record_hours (max_seq);

CREATE TABLE annotation_inputs (
    analysis   TEXT NOT NULL,
    partition  TEXT NOT NULL,
    input_type TEXT NOT NULL,  -- kind | analysis
    input      TEXT NOT NULL,
    span_from  TEXT NOT NULL,  -- keys of the input's own partitions (hours of a kind), half-open
    span_to    TEXT NOT NULL,
    rows       INTEGER NOT NULL,
    max_seq    INTEGER NOT NULL,
    PRIMARY KEY (analysis, partition, input_type, input)
);
CREATE INDEX annotation_inputs_by_input ON annotation_inputs (input_type, input, span_from);
-- What the annotations built so far read: their analysis' kind, over their partition's hours.
INSERT INTO annotation_inputs (analysis, partition, input_type, input, span_from, span_to, rows, max_seq)
SELECT a.analysis, a.partition, 'kind', n.kind,
       CASE WHEN length(a.partition) = 10 THEN a.partition || 'T00' ELSE a.partition END,
       CASE WHEN length(a.partition) = 10 THEN strftime('%Y-%m-%d', a.partition, '+1 day') || 'T00'
            ELSE strftime('%Y-%m-%dT%H', replace(a.partition, 'T', ' ') || ':00:00', '+1 hour') END,
       a.input_rows, a.input_seq
FROM annotations a JOIN analyses n ON n.name = a.analysis
WHERE n.kind <> '';

CREATE TABLE builds (
    build_id     BLOB PRIMARY KEY,
    analysis     TEXT NOT NULL,
    partition    TEXT NOT NULL,
    version      INTEGER NOT NULL,
    generation   INTEGER,
    rows_read    INTEGER NOT NULL,
    rows_written INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    duration_ms  INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    worker       TEXT NOT NULL,
    outcome      TEXT NOT NULL,   -- completed | retrying | failed
    error        TEXT
);
CREATE INDEX builds_by_analysis ON builds (analysis, finished_at);

-- The append-only event log. seq is assigned under the write lock, so it is gap-free
-- and in commit order.
CREATE TABLE event_log (
    seq     INTEGER PRIMARY KEY,
    type    TEXT NOT NULL,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,
    payload TEXT NOT NULL
);

-- Source records. Immutable: corrections arrive as new records. Times are microseconds
-- since the Unix epoch, UTC, so that ranges compare as integers.
CREATE TABLE records (
    data_id     BLOB PRIMARY KEY,
    kind        TEXT NOT NULL,
    source      TEXT NOT NULL,
    created     INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    digest      BLOB NOT NULL,
    data        TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX records_kind_created ON records (kind, created);

CREATE TRIGGER records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'Scholia keeps records immutable: send a correction as a new record'); END;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, 'Scholia keeps records immutable: send a correction as a new record'); END;
CREATE TRIGGER event_log_no_update BEFORE UPDATE ON event_log
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER event_log_no_delete BEFORE DELETE ON event_log
BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;

CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    kind        TEXT,
    source      TEXT,
    data_id     BLOB,
    line        INTEGER NOT NULL,
    raw         TEXT NOT NULL,
    error       TEXT NOT NULL,
    actor       TEXT NOT NULL
);

CREATE TABLE kinds (
    kind       TEXT PRIMARY KEY,
    fields     TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE tokens (
    id          BLOB PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    scope       TEXT NOT NULL,
    sources     TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE relay_cursor (
    name TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL
);

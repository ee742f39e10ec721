-- The append-only event log. seq is assigned under an advisory lock, so it is gap-free
-- and in commit order.
CREATE TABLE event_log (
    seq     BIGINT PRIMARY KEY,
    type    TEXT NOT NULL,
    at      TIMESTAMPTZ NOT NULL,
    actor   TEXT NOT NULL,
    payload JSONB NOT NULL
);

-- Source records. Immutable: corrections arrive as new records.
CREATE TABLE records (
    data_id     UUID PRIMARY KEY,
    kind        TEXT NOT NULL,
    source      TEXT NOT NULL,
    created     TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    seq         BIGINT NOT NULL,
    digest      BYTEA NOT NULL,
    data        JSONB NOT NULL
);
CREATE INDEX records_kind_created ON records (kind, created);

CREATE FUNCTION scholia_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'Scholia keeps % immutable: send a correction as a new record', TG_TABLE_NAME;
END $$;
CREATE TRIGGER records_immutable BEFORE UPDATE OR DELETE ON records
    FOR EACH ROW EXECUTE FUNCTION scholia_refuse_change();
CREATE TRIGGER event_log_append_only BEFORE UPDATE OR DELETE ON event_log
    FOR EACH ROW EXECUTE FUNCTION scholia_refuse_change();

-- Records that could not be accepted, with their raw text.
CREATE TABLE quarantine (
    id          BIGSERIAL PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL,
    kind        TEXT,
    source      TEXT,
    data_id     UUID,
    line        INTEGER NOT NULL,
    raw         TEXT NOT NULL,
    error       TEXT NOT NULL,
    actor       TEXT NOT NULL
);
CREATE INDEX quarantine_received ON quarantine (received_at);

-- Declared field types of a kind.
CREATE TABLE kinds (
    kind       TEXT PRIMARY KEY,
    fields     TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE tokens (
    id          UUID PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    scope       TEXT NOT NULL,
    sources     TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    revoked_at  TIMESTAMPTZ
);

-- How far the relay has published the log to a bus.
CREATE TABLE relay_cursor (
    name TEXT PRIMARY KEY,
    seq  BIGINT NOT NULL
);

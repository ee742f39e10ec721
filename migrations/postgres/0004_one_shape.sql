-- One shape for both databases (PostgreSQL already keeps every time as TIMESTAMPTZ).
--
-- 1. Records point at their batch; a batch maps to the seq of its source.ingested event,
--    assigned under the log lock, so records can be written before the lock is taken.
-- 2. Analyses name their inputs; annotations keep the seq that committed them and, per
--    input, the span their build read and that span's summary (rows, highest seq), from
--    which staleness is derived.
-- 3. Build history.

ALTER TABLE records RENAME COLUMN seq TO batch;
CREATE TABLE record_batches (
    batch BIGINT PRIMARY KEY,
    seq   BIGINT NOT NULL
);
INSERT INTO record_batches (batch, seq) SELECT DISTINCT batch, batch FROM records;
CREATE SEQUENCE record_batch_ids;
SELECT setval('record_batch_ids', COALESCE((SELECT MAX(batch) FROM records), 0) + 1, false);
CREATE INDEX record_hours_max_seq ON record_hours (max_seq);

ALTER TABLE analyses ADD COLUMN inputs TEXT NOT NULL DEFAULT '[]';
UPDATE analyses SET inputs = json_build_array(json_build_object('kind', kind))::text WHERE kind <> '';
ALTER TABLE annotations ADD COLUMN committed_seq BIGINT NOT NULL DEFAULT 0;

CREATE TABLE annotation_inputs (
    analysis   TEXT NOT NULL,
    partition  TEXT NOT NULL,
    input_type TEXT NOT NULL,  -- kind | analysis
    input      TEXT NOT NULL,
    span_from  TEXT NOT NULL,  -- keys of the input's own partitions (hours of a kind), half-open
    span_to    TEXT NOT NULL,
    rows       BIGINT NOT NULL,
    max_seq    BIGINT NOT NULL,
    PRIMARY KEY (analysis, partition, input_type, input)
);
CREATE INDEX annotation_inputs_by_input ON annotation_inputs (input_type, input, span_from);
-- What the annotations built so far read: their analysis' kind, over their partition's hours.
INSERT INTO annotation_inputs (analysis, partition, input_type, input, span_from, span_to, rows, max_seq)
SELECT a.analysis, a.partition, 'kind', n.kind,
       CASE WHEN length(a.partition) = 10 THEN a.partition || 'T00' ELSE a.partition END,
       CASE WHEN length(a.partition) = 10 THEN to_char(a.partition::date + 1, 'YYYY-MM-DD') || 'T00'
            ELSE to_char((a.partition || ':00:00')::timestamp + interval '1 hour', 'YYYY-MM-DD"T"HH24') END,
       a.input_rows, a.input_seq
FROM annotations a JOIN analyses n ON n.name = a.analysis
WHERE n.kind <> '';

CREATE TABLE builds (
    build_id     UUID PRIMARY KEY,
    analysis     TEXT NOT NULL,
    partition    TEXT NOT NULL,
    version      BIGINT NOT NULL,
    generation   BIGINT,
    rows_read    BIGINT NOT NULL,
    rows_written BIGINT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ NOT NULL,
    duration_ms  BIGINT NOT NULL,
    attempt      INTEGER NOT NULL,
    worker       TEXT NOT NULL,
    outcome      TEXT NOT NULL,   -- completed | retrying | failed
    error        TEXT
);
CREATE INDEX builds_by_analysis ON builds (analysis, finished_at);

-- How many records of each kind each hour holds, and the highest log seq among them.
-- Ingest keeps it in the same transaction as the records, so a reader that sees a
-- partition's summary unchanged knows its records are unchanged: workers use it to
-- reuse a partition's columnar frame instead of reading and parsing the rows again.
CREATE TABLE record_hours (
    kind    TEXT NOT NULL,
    hour    TEXT NOT NULL, -- '2024-05-05T13', UTC
    rows    BIGINT NOT NULL,
    max_seq BIGINT NOT NULL,
    PRIMARY KEY (kind, hour)
);

INSERT INTO record_hours (kind, hour, rows, max_seq)
SELECT kind, to_char(created AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24'), count(*), max(seq)
FROM records
GROUP BY 1, 2;

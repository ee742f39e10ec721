-- An id made once, with the database. Files kept outside the database (a worker's
-- frames on local disk) are filed under it, so they are never used for another database.
CREATE TABLE installation (
    id         BLOB PRIMARY KEY,
    created_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER))
);
INSERT INTO installation (id) VALUES (randomblob(16));

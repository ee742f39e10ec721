-- An id made once, with the database. Files kept outside the database (a worker's
-- frames on local disk) are filed under it, so they are never used for another database.
CREATE TABLE installation (
    id         UUID PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO installation (id) VALUES (gen_random_uuid());

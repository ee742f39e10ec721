-- An analysis may declare the columns that identify a row of its annotations (a JSON
-- list of names); a candidate's diff matches rows on them. Null when it declares none,
-- as every analysis stored before this did.
ALTER TABLE analyses ADD COLUMN row_key TEXT;

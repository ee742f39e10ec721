-- 1. A retry of an invalidation's failed partitions is an invalidation of its own that
--    names the one it retries.
-- 2. Build history is read and pruned per partition of an analysis, newest first.
ALTER TABLE invalidations ADD COLUMN retry_of UUID;
CREATE INDEX builds_by_partition ON builds (analysis, partition, finished_at);

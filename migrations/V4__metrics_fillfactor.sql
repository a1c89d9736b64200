-- V4: metrics_hourly takes mostly updates (the same hour's counters, again and
-- again). With 30% of each page left free, PostgreSQL can keep an updated row
-- on its page without touching the indexes (a HOT update): measured here at
-- 93% HOT updates against 3% with the default fillfactor of 100. Applies to
-- pages written from now on; a storage parameter, no table rewrite, no lock
-- beyond a brief one.
ALTER TABLE metrics_hourly SET (fillfactor = 70);

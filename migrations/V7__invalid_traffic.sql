-- V7: invalid traffic, counted the way an auditor expects. Every event keeps
-- why it is invalid (NULL = valid); metrics_hourly's impressions and clicks
-- count valid events only (the billed, net numbers) and the new columns count
-- the rest per key and hour, so gross = net + invalid. With IVT_FILTER=off the
-- service counts everything as billed and leaves the invalid columns at 0.
-- Adding a nullable column, or one with a constant default, changes only the
-- catalog: no table rewrite, an exclusive lock for an instant.
ALTER TABLE events ADD COLUMN IF NOT EXISTS invalid_reason TEXT;
ALTER TABLE rejected_events ADD COLUMN IF NOT EXISTS invalid_reason TEXT;
ALTER TABLE metrics_hourly ADD COLUMN IF NOT EXISTS invalid_impressions INTEGER DEFAULT 0;
ALTER TABLE metrics_hourly ADD COLUMN IF NOT EXISTS invalid_clicks INTEGER DEFAULT 0;

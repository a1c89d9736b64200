-- V2: events that were accepted over HTTP but cannot be stored as facts:
-- their campaign does not exist (reason 'unknown_campaign'), or the database
-- refused their batch for good (reason 'write_failed: ...'). Kept with every
-- parameter so they can be inspected and replayed by hand; never retried
-- automatically.

CREATE TABLE IF NOT EXISTS rejected_events (
    id BIGSERIAL PRIMARY KEY,
    reason TEXT NOT NULL,
    event_type VARCHAR(20) NOT NULL,
    ad_unit_id UUID NOT NULL,
    campaign_id UUID NOT NULL,
    creative_id UUID NOT NULL,
    page_url TEXT NOT NULL,
    user_agent TEXT,
    timestamp TIMESTAMP NOT NULL,
    received_at TIMESTAMP NOT NULL,
    batch_id UUID NOT NULL,
    rejected_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX IF NOT EXISTS rejected_events_campaign_idx ON rejected_events (campaign_id);

-- V1: the Node service's schema, exactly as its README defines it, plus the
-- campaigns table it reads account ids from. IF NOT EXISTS throughout, so this
-- is a no-op on a database the Node service already runs on.

CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,
    event_type VARCHAR(20) NOT NULL,
    ad_unit_id UUID NOT NULL,
    campaign_id UUID NOT NULL,
    creative_id UUID NOT NULL,
    account_id UUID NOT NULL,
    page_url TEXT NOT NULL,
    user_agent TEXT,
    timestamp TIMESTAMP NOT NULL,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS metrics_hourly (
    id BIGSERIAL PRIMARY KEY,
    account_id UUID NOT NULL,
    ad_unit_id UUID,
    campaign_id UUID,
    hour_timestamp TIMESTAMP NOT NULL,
    impressions INTEGER DEFAULT 0,
    clicks INTEGER DEFAULT 0,
    requests INTEGER DEFAULT 0,
    revenue_cents INTEGER DEFAULT 0,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    UNIQUE(account_id, ad_unit_id, campaign_id, hour_timestamp)
);

CREATE TABLE IF NOT EXISTS campaigns (
    id UUID PRIMARY KEY,
    account_id UUID NOT NULL
);

-- keepwarm's ledger on PostgreSQL: the same tables as the SQLite backend at its schema version 3
-- (pings and observations with their origin, and the summaries a restart reads in O(pairs)).
-- Times are unix seconds and money is USD, both double precision: the same IEEE doubles the
-- SQLite file holds, so a copied ledger sums to the same last bit.

CREATE TABLE pings (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time double precision NOT NULL,          -- the ping's start, unix seconds
    expert text NOT NULL,
    model text NOT NULL,
    ttl text NOT NULL,
    fingerprint text NOT NULL,
    result text NOT NULL,
    input bigint,                            -- usage: NULL when the ping failed
    cache_read bigint,
    cache_write_5m bigint,
    cache_write_1h bigint,
    output bigint,
    cost_input double precision,             -- USD: NULL when failed or the model has no price
    cost_cache_read double precision,
    cost_cache_write_5m double precision,
    cost_cache_write_1h double precision,
    cost_output double precision,
    latency double precision,                -- seconds, final attempt
    duration double precision,               -- seconds, all attempts and their backoff
    attempts integer NOT NULL,
    request_id text,
    error_type text,
    error_message text,
    expires_at double precision,             -- NULL when unknown
    miss_cause text,
    origin text NOT NULL DEFAULT 'api'       -- api | emulator | scaled
);
CREATE INDEX pings_time ON pings (time);
CREATE INDEX pings_pair_time ON pings (expert, model, time);

CREATE TABLE observations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time double precision NOT NULL,          -- the production request's start, unix seconds
    received double precision NOT NULL,      -- when keepwarm accepted the observation
    expert text NOT NULL,
    model text NOT NULL,
    ttl text NOT NULL,
    fingerprint text NOT NULL,               -- the pair's, as warmed
    observed_fingerprint text,               -- the request's, when production sent it
    result text NOT NULL,
    input bigint NOT NULL,
    cache_read bigint NOT NULL,
    cache_write_5m bigint NOT NULL,
    cache_write_1h bigint NOT NULL,
    output bigint NOT NULL,
    cost_input double precision,             -- USD: NULL when the model has no price
    cost_cache_read double precision,
    cost_cache_write_5m double precision,
    cost_cache_write_1h double precision,
    cost_output double precision,
    saved integer NOT NULL,                  -- 1: the keepalive spared it a write
    saved_usd double precision,              -- NULL when not saved or unpriced
    drift text,                              -- fingerprint | write_while_warm | NULL
    late integer NOT NULL,                   -- 1: arrived after a later request of its pair
    request_id text,
    origin text NOT NULL DEFAULT 'api'
);
CREATE INDEX observations_time ON observations (time);
CREATE INDEX observations_pair_time ON observations (expert, model, time);

CREATE TABLE pair_state (
    origin text NOT NULL,
    expert text NOT NULL,
    model text NOT NULL,
    fingerprint text NOT NULL,               -- a new prefix is a new cache: its own row
    last_ping double precision,              -- start of the latest ping, whatever it found
    last_result text,
    last_refresh double precision,           -- start of the latest ping that read or wrote the cache
    prefix_tokens bigint,                    -- the prefix size the latest answered ping measured
    last_production double precision,        -- start of the latest production request that read or wrote it
    last_request double precision,           -- start of the latest production request of any kind
    PRIMARY KEY (origin, expert, model, fingerprint)
);

CREATE TABLE spend (
    origin text NOT NULL,
    bucket bigint NOT NULL,                  -- unix time // 10: the budget's steps
    usd double precision NOT NULL,
    PRIMARY KEY (origin, bucket)
);

CREATE TABLE hours (
    origin text NOT NULL,
    expert text NOT NULL,                    -- '' (with model '') for every pair together
    model text NOT NULL,
    hour bigint NOT NULL,                    -- unix time // 3600
    ping_usd double precision NOT NULL DEFAULT 0,
    ping_unpriced bigint NOT NULL DEFAULT 0,
    requests bigint NOT NULL DEFAULT 0,
    cache_read bigint NOT NULL DEFAULT 0,
    cache_write bigint NOT NULL DEFAULT 0,
    saved_usd double precision NOT NULL DEFAULT 0,
    drift bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (origin, expert, model, hour)
);

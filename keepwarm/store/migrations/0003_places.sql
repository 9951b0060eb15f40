-- Where each row's cache lives (SQLite schema version 6): the pair's `accounts` entry, that
-- account's provider, and how the provider routes the model (global, geo, regional or default),
-- which sets its price. Rows stored before take the one Anthropic account a config without
-- `accounts:` has. A constant default adds a column without rewriting the table (PostgreSQL 11+).
ALTER TABLE pings
    ADD COLUMN account text NOT NULL DEFAULT 'default',
    ADD COLUMN provider text NOT NULL DEFAULT 'anthropic',
    ADD COLUMN endpoint text NOT NULL DEFAULT 'default';
ALTER TABLE observations
    ADD COLUMN account text NOT NULL DEFAULT 'default',
    ADD COLUMN provider text NOT NULL DEFAULT 'anthropic',
    ADD COLUMN endpoint text NOT NULL DEFAULT 'default';

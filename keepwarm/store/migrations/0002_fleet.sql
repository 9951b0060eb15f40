-- A fleet's members, and an observation counted once however often it is sent.
--
-- members: a row per daemon sharing the database and a fleet name, with the expiry of a lease
-- its holder renews (keepwarm.fleet); anyone can see a lapsed lease and act on it.
CREATE TABLE members (
    fleet TEXT NOT NULL,
    member TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    joined DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, member)
);

-- The same observation sent twice (a client's retry) counts once: a request_id is the API's
-- own unique id. Copies already stored go first, the earliest row kept.
DELETE FROM observations o USING observations p
    WHERE o.request_id IS NOT NULL AND o.request_id = p.request_id AND o.id > p.id;
CREATE UNIQUE INDEX observations_request_id ON observations (request_id) WHERE request_id IS NOT NULL;

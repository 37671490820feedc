-- What every area shares: the counter shard of a user, and the values the
-- service and the database must agree on.
--
-- Errors raised by the functions use custom SQLSTATEs that the service maps
-- to gRPC codes in one place (service/nexus/errors.py):
--   NX400 invalid argument
--   NX403 permission denied
--   NX404 not found
--   NX409 already exists (a request_id reused with different arguments)
--   NX412 failed precondition (DETAIL holds the precondition type)
-- The request field an NX400 / NX404 names travels in DETAIL as well as
-- COLUMN: Citus re-raises a worker's error on the coordinator with its
-- SQLSTATE, message, detail and hint only, so the COLUMN of an error raised
-- inside a delegated function never reaches the service. A batch function
-- (apply_reactions, apply_token_operations, create_memories) returns an item
-- that fails alone as one row with error_code, error_message and error_detail,
-- as a RAISE would carry them; nexus.group_commit raises that error.
--
-- Functions are PL/pgSQL wherever they read or write a distributed table with
-- a parameter: a SQL function that cannot be inlined runs its statements with
-- parameters, which Citus cannot plan against a distributed table
-- ("parameterized queries for SQL functions referencing distributed tables
-- are not supported"); PL/pgSQL's parameters it plans, routing a user's read
-- to its shard. Plain SQL stays where it inlines into the calling query.

-- Counter rows are spread over 64 shards per entry (and per followed user) so
-- that a viral entry does not serialise every like on one row lock. A user
-- always lands on the same shard (hash of user_id), so each shard is itself an
-- exact count of its users' rows and can never go negative.
CREATE OR REPLACE FUNCTION counter_shard(p_user_id text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (hashtext(p_user_id) & 63)::smallint;

-- One home for each value the service and the database share: each constant
-- is an IMMUTABLE SQL function, inlined where it is used, that every SQL place
-- calls; service/nexus/constants.py holds the Python side and
-- tests/operations/test_constants.py checks that both agree.

-- The NOTIFY channel of the hint "user_id seq" for a user's new events.
CREATE OR REPLACE FUNCTION memory_events_channel() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'nexus_memory_events';

-- The NOTIFY channel of broadcasts (PublishBroadcast).
CREATE OR REPLACE FUNCTION broadcasts_channel() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'nexus_broadcasts';

-- The advisory lock that elects one replica's run_maintenance.
CREATE OR REPLACE FUNCTION maintenance_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 7160813371206;

-- A memory of at least this gravity (and an emotion) counts towards its
-- emotion's arc (build_arc).
CREATE OR REPLACE FUNCTION arc_gravity_threshold() RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 0.8;

-- An account with this many followers broadcasts (db/functions/feed.sql):
-- its followers' pages read its activities instead of each follower getting a
-- copy. At this size a copy to every follower costs a post about 30 ms of
-- PostgreSQL CPU (the feed bench at scale 1); each broadcaster a reader
-- follows costs that reader's page one index probe (docs/feed.md).
CREATE OR REPLACE FUNCTION feed_broadcast_followers() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 1000;

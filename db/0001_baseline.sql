-- The Nexus schema: extensions, types, tables and indexes. The stored functions
-- and the triggers that call them live in db/functions/ (applied after this,
-- and again whenever a file there changes); a later change of a table is a new
-- numbered migration after this one.
--
-- One schema for one PostgreSQL and for a Citus cluster (docs/citus.md).
-- Citus hash-distributes a table by one column and needs every primary key and
-- unique index to include it, foreign keys only between co-located tables, and
-- a write of one key to touch one shard. The schema obeys that on any
-- PostgreSQL; nexus.migrations then distributes it when the database is a
-- Citus coordinator with workers (service/nexus/distribution.py).
--
-- Distribution keys:
--   * by user (co-located): balances, token_transactions, token_requests,
--     memory_users, memories, memory_requests, memory_arcs, memory_arc_members,
--     memory_events, memory_sessions, memory_patterns, memory_terms,
--     consciousness_cache, user_interactions, follows (by follower),
--     follow_counter_shards, shares, entry_requests (by author);
--   * by entry (co-located): entries, reactions, entry_counter_shards — a viral
--     entry and everything that counts it sit on one shard.
-- What touches two keys is a two-shard transaction (Citus two-phase commit):
-- a transfer, a follow's two counters, a share (claim by user, count by
-- entry), a create with a request_id (claim by author), a branch (parent and
-- child). Every such write locks its rows in one global order.

CREATE EXTENSION IF NOT EXISTS vector;
-- GIN over (user_id, tsvector): a user's text search reads that user's postings only.
CREATE EXTENSION IF NOT EXISTS btree_gin;

------------------------------------------------------------------------------
-- Entries, their reply trees, reactions (resonance / amplification), shares,
-- per-user interaction states, and the counters over them.

CREATE TYPE privacy AS ENUM ('public', 'followers', 'private');
CREATE TYPE reaction_kind AS ENUM ('resonance', 'amplification');

-- The parent link is no foreign key: parent and child may sit on different
-- shards, and entries are never removed, only blanked. The tree order is an
-- index, not a unique one (branch_count under the parent's lock numbers the
-- children). request_id and request_fingerprint are unused: request claims
-- live in entry_requests.
CREATE TABLE entries (
    entry_id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    author_id           text NOT NULL,
    parent_entry_id     uuid,
    root_entry_id       uuid NOT NULL,
    depth               integer NOT NULL CHECK (depth >= 0),
    branch_order        integer NOT NULL CHECK (branch_order >= 0),
    -- branch_order of every ancestor below the root, then this entry's own:
    -- '{}' for a root. Sorting by it is a depth-first pre-order walk.
    tree_path           integer[] NOT NULL,
    type                text NOT NULL,
    title               text NOT NULL,
    content             text NOT NULL,
    privacy             privacy NOT NULL,
    tags                text[] NOT NULL,
    metadata            jsonb NOT NULL,
    -- Number of children; also the allocator of the next child's branch_order.
    branch_count        integer NOT NULL DEFAULT 0 CHECK (branch_count >= 0),
    request_id          text,
    request_fingerprint text,
    create_time         timestamptz NOT NULL DEFAULT now(),
    update_time         timestamptz NOT NULL DEFAULT now(),
    delete_time         timestamptz,
    CHECK ((parent_entry_id IS NULL) = (depth = 0)),
    CHECK (cardinality(tree_path) = depth)
) WITH (fillfactor = 90);
CREATE INDEX entries_tree_order ON entries (root_entry_id, tree_path);

-- CreateEntry / CreateBranch request ids: (author, request_id) -> the entry it
-- created. Its own table, by author, so that a retry finds it on the author's shard.
CREATE TABLE entry_requests (
    author_id   text NOT NULL,
    request_id  text NOT NULL,
    fingerprint text NOT NULL,
    entry_id    uuid NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (author_id, request_id)
);

-- One row per (user, entry, kind) while the reaction is on.
CREATE TABLE reactions (
    user_id     text NOT NULL,
    entry_id    uuid NOT NULL,
    kind        reaction_kind NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, entry_id, kind)
);
CREATE INDEX reactions_by_entry ON reactions (entry_id, kind, create_time, user_id);

-- One row per distinct (user, request_id); append-only (functions/interactions.sql).
CREATE TABLE shares (
    user_id     text NOT NULL,
    request_id  text NOT NULL,
    entry_id    uuid NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, request_id)
);

-- Counter rows are spread over 64 shards per entry (counter_shard) so that a
-- viral entry does not serialise every like on one row lock. A user always
-- lands on the same shard (hash of user_id), so each shard is itself an exact
-- count of its users' rows and can never go negative. Counter columns are not
-- indexed, so their updates stay HOT.
CREATE TABLE entry_counter_shards (
    entry_id            uuid NOT NULL,
    shard               smallint NOT NULL CHECK (shard BETWEEN 0 AND 63),
    -- integer: per shard that is ample, and sum(integer) aggregates as bigint
    -- where sum(bigint) would go through numeric.
    resonance_count     integer NOT NULL DEFAULT 0 CHECK (resonance_count >= 0),
    amplification_count integer NOT NULL DEFAULT 0 CHECK (amplification_count >= 0),
    share_count         integer NOT NULL DEFAULT 0 CHECK (share_count >= 0),
    PRIMARY KEY (entry_id, shard)
) WITH (fillfactor = 50);

-- Exactly one row per (user_id, target_id); last write wins.
CREATE TABLE user_interactions (
    user_id     text NOT NULL,
    target_id   text NOT NULL,
    action      text NOT NULL,
    notes       text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, target_id)
);
CREATE INDEX user_interactions_recent ON user_interactions (user_id, update_time, target_id);
CREATE INDEX user_interactions_recent_by_action ON user_interactions (user_id, action, update_time, target_id);

-- The outcome of a reaction or share call: whether the entry was found (and
-- visible to the user), the state after the call, whether the call changed
-- anything, and the entry's counts read after the change.
CREATE TYPE reaction_outcome AS (
    found boolean, state boolean, changed boolean, resonance_count bigint, amplification_count bigint,
    branch_count bigint, share_count bigint);

------------------------------------------------------------------------------
-- The follow graph and its counters; FOLLOWERS entries are visible to the
-- author's followers.

CREATE TABLE follows (
    follower_id text NOT NULL,
    followed_id text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (follower_id, followed_id),
    CHECK (follower_id <> followed_id)
);
CREATE INDEX follows_followers ON follows (followed_id, create_time, follower_id);
CREATE INDEX follows_following ON follows (follower_id, create_time, followed_id);

-- follower_count of (user_id, shard) counts edges x -> user_id with
-- counter_shard(x) = shard; following_count counts edges user_id -> y with
-- counter_shard(y) = shard. Each shard is exact on its own and never negative,
-- and a celebrity's new followers spread over 64 rows.
CREATE TABLE follow_counter_shards (
    user_id         text NOT NULL,
    shard           smallint NOT NULL CHECK (shard BETWEEN 0 AND 63),
    follower_count  integer NOT NULL DEFAULT 0 CHECK (follower_count >= 0),
    following_count integer NOT NULL DEFAULT 0 CHECK (following_count >= 0),
    PRIMARY KEY (user_id, shard)
) WITH (fillfactor = 50);

------------------------------------------------------------------------------
-- The token ledger: balances that never go negative, an append-only ledger
-- they always equal, atomic transfers, and request_id idempotency.

CREATE TYPE token_kind AS ENUM ('credit', 'debit', 'transfer_in', 'transfer_out');

CREATE TABLE balances (
    user_id       text PRIMARY KEY,
    balance       bigint NOT NULL CHECK (balance >= 0),
    -- The sequence of the user's latest ledger row.
    last_sequence bigint NOT NULL DEFAULT 0,
    update_time   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Append-only (functions/tokens.sql). Keyed by user, so a user's ledger sits
-- on their balance's shard.
CREATE TABLE token_transactions (
    transaction_id       uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id              text NOT NULL,
    kind                 token_kind NOT NULL,
    amount               bigint NOT NULL CHECK (amount > 0),
    balance_after        bigint NOT NULL CHECK (balance_after >= 0),
    reason               text NOT NULL,
    reference_id         text NOT NULL,
    counterparty_user_id text,
    request_id           text NOT NULL,
    -- Per user, the order movements were applied in (balance_after follows it).
    sequence             bigint NOT NULL,
    create_time          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (user_id, transaction_id),
    UNIQUE (user_id, sequence),
    CHECK ((kind IN ('transfer_in', 'transfer_out')) = (counterparty_user_id IS NOT NULL))
);

-- One row per applied request: (initiator, request_id) -> what it did. A
-- retry finds it and returns the original transactions; a concurrent retry
-- waits on this row's unique key until the first attempt commits.
CREATE TABLE token_requests (
    user_id         text NOT NULL,
    request_id      text NOT NULL,
    fingerprint     text NOT NULL,
    transaction_ids uuid[] NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (user_id, request_id)
);

------------------------------------------------------------------------------
-- The AI-agent memory store: memories with embeddings, the insert rules,
-- arcs, sessions, patterns, the text postings of search, and the durable
-- per-user event log that the realtime streams read.
--
-- Every change of a user's memories and arcs runs with that user's
-- memory_users row locked (lock_memory_user). That one lock makes the rules
-- race-free (arc building sees every committed memory), keeps the search
-- statistics exact, and numbers the user's events 1, 2, 3 ... in commit order
-- with no gap: a sequence number taken under the lock commits or rolls back
-- with its transaction before the next one is taken.

CREATE TABLE memory_users (
    user_id             text PRIMARY KEY,
    -- The last event number handed out; events are 1 .. last_event_seq.
    last_event_seq      bigint NOT NULL DEFAULT 0,
    -- Events up to here may have been removed by retention.
    purged_event_seq    bigint NOT NULL DEFAULT 0,
    memory_count        integer NOT NULL DEFAULT 0 CHECK (memory_count >= 0),
    identity_entities   text[] NOT NULL DEFAULT '{}',
    -- The sum of the user's search_length; with memory_count, BM25's average
    -- document length.
    search_length_total bigint NOT NULL DEFAULT 0
);

-- Text search: each memory's content and entities as a tsvector (English
-- stemming, stop words dropped) with its length, a GIN index on (user,
-- tsvector), and per-user corpus statistics (memory count and total length)
-- on memory_users, so ranking uses that user's corpus only. The two functions
-- define generated columns, so they live here rather than in db/functions/.

-- The text a memory is found by. IMMUTABLE (array_to_string is only STABLE
-- in general, but not for text[]), so it can define a generated column.
CREATE FUNCTION memory_search_vector(p_content text, p_entities text[]) RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_tsvector('english'::regconfig, p_content || ' ' || array_to_string(p_entities, ' '));

-- BM25's document length: the tokens kept (stop words do not count).
CREATE FUNCTION tsvector_token_count(p_vector tsvector) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(sum(cardinality(t.positions)), 0) FROM unnest(p_vector) t);

CREATE TABLE memories (
    memory_id       uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id         text NOT NULL,
    content         text NOT NULL,
    thread_id       text,
    session_id      text,
    memory_trace_id text,
    gravity_score   double precision NOT NULL CHECK (gravity_score BETWEEN 0 AND 1),
    emotion_type    text,
    entities        text[] NOT NULL DEFAULT '{}',
    meta_tags       text[] NOT NULL DEFAULT '{}',
    temporal_type   text NOT NULL CHECK (temporal_type IN ('past', 'present', 'future')),
    identity_anchor boolean NOT NULL DEFAULT false,
    -- Sized below by the service's setting.
    embedding       vector(384),
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now(),
    search_vector   tsvector GENERATED ALWAYS AS (memory_search_vector(content, entities)) STORED,
    search_length   integer GENERATED ALWAYS AS (tsvector_token_count(memory_search_vector(content, entities))) STORED,
    PRIMARY KEY (user_id, memory_id)
);

-- The embedding dimension is a setting of the service (NEXUS_EMBEDDING_DIM);
-- the migrator passes it as nexus.embedding_dim. It is fixed once the table
-- exists, because the vector indexes are built for one dimension.
--
-- Exact per-user search reads the user's vectors from a covering index
-- (index-only: a few thousand contiguous pages instead of a random heap
-- page per memory, ~10x faster for 10k memories). A B-tree entry holds at
-- most 2704 bytes, so the index exists only for embeddings of up to 640
-- dimensions; above that the exact search reads the heap.
--
-- Larger users get a vector index of their own, built by maintenance
-- (memory_vector_indexes_due in functions/search.sql), not one over every user.
DO $$
DECLARE
    dim integer := coalesce(nullif(current_setting('nexus.embedding_dim', true), ''), '384')::integer;
BEGIN
    IF dim <> 384 THEN
        EXECUTE format('ALTER TABLE memories ALTER COLUMN embedding TYPE vector(%s)', dim);
    END IF;
    IF dim <= 640 THEN
        CREATE INDEX memories_user_vectors ON memories (user_id, create_time)
            INCLUDE (gravity_score, emotion_type, memory_id, embedding);
    END IF;
END
$$;

-- A user's memories by time (also the keyset order of ListMemories), strong
-- memories, identity anchors, entities and tags, emotion (also the arc
-- clusters), temporal type, thread and session; and their text.
CREATE INDEX memories_user_time ON memories (user_id, create_time DESC, memory_id DESC);
CREATE INDEX memories_high_gravity ON memories (user_id, gravity_score DESC) WHERE gravity_score >= 0.7;
CREATE INDEX memories_identity_anchors ON memories (user_id, create_time DESC) WHERE identity_anchor;
CREATE INDEX memories_entities ON memories USING gin (entities);
CREATE INDEX memories_tags ON memories USING gin (meta_tags);
CREATE INDEX memories_emotion ON memories (user_id, emotion_type, create_time DESC) WHERE emotion_type IS NOT NULL;
CREATE INDEX memories_temporal ON memories (user_id, temporal_type);
CREATE INDEX memories_thread ON memories (user_id, thread_id, create_time DESC) WHERE thread_id IS NOT NULL;
CREATE INDEX memories_session ON memories (user_id, session_id, create_time DESC) WHERE session_id IS NOT NULL;
CREATE INDEX memories_search ON memories USING gin (user_id, search_vector);

-- The text postings: which of each user's memories hold each lexeme, with
-- what BM25 needs: the lexeme's count in the memory (term_frequency) and the
-- memory's search_length, in the primary key's index (INCLUDE), so a
-- lexeme's postings are read in key order from the index alone (index-only
-- scan), without the memories heap, and its document frequency is the count
-- of its rows. Kept by the row trigger that keeps the length statistics
-- (count_search_length: same transaction, co-located on Citus).
--
-- One row per (memory, lexeme), not a counter per lexeme: a bulk insert of
-- one user in one transaction would update a counter once per memory, and a
-- row updated n times in one transaction costs O(n) per update (its versions
-- cannot be pruned before the commit: a 10k-memory INSERT took 74 s against
-- 3 s); and deleting a memory deletes its rows, so no word of a deleted
-- memory stays.
CREATE TABLE memory_terms (
    user_id        text NOT NULL,
    lexeme         text NOT NULL,
    memory_id      uuid NOT NULL,
    term_frequency integer NOT NULL,
    search_length  integer NOT NULL,
    PRIMARY KEY (user_id, lexeme, memory_id) INCLUDE (term_frequency, search_length)
);

-- One CreateMemory's arguments, as create_memory takes them (create_memories
-- takes an array of them: concurrent CreateMemory calls of one server go to
-- the database as one call, one round trip and one commit).
CREATE TYPE memory_create AS (
    user_id text, content text, thread_id text, session_id text, memory_trace_id text,
    gravity_score double precision, emotion_type text, entities text[], meta_tags text[], temporal_type text,
    embedding vector, request_id text);

-- CreateMemory request ids: (user, request_id) -> the memory it created.
-- Kept for the idempotency retention (maintenance expires older ones).
CREATE TABLE memory_requests (
    user_id     text NOT NULL,
    request_id  text NOT NULL,
    fingerprint text NOT NULL,
    memory_id   uuid NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, request_id)
);
CREATE INDEX memory_requests_time ON memory_requests (create_time);

CREATE TABLE memory_arcs (
    arc_id          uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id         text NOT NULL,
    arc_name        text NOT NULL,
    emotion_type    text NOT NULL,
    gravity_center  double precision NOT NULL,
    evolution_stage text NOT NULL DEFAULT 'forming' CHECK (evolution_stage IN ('forming', 'active', 'dormant')),
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, arc_id)
);
-- At most one open arc per (user, emotion).
CREATE UNIQUE INDEX memory_arcs_one_open ON memory_arcs (user_id, emotion_type)
    WHERE evolution_stage IN ('forming', 'active');
CREATE INDEX memory_arcs_user_time ON memory_arcs (user_id, create_time DESC, arc_id DESC);
CREATE INDEX memory_arcs_open_time ON memory_arcs (update_time) WHERE evolution_stage IN ('forming', 'active');

CREATE TABLE memory_arc_members (
    arc_id      uuid NOT NULL,
    memory_id   uuid NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    user_id     text NOT NULL,
    PRIMARY KEY (user_id, arc_id, memory_id),
    FOREIGN KEY (user_id, arc_id) REFERENCES memory_arcs (user_id, arc_id) ON DELETE CASCADE,
    FOREIGN KEY (user_id, memory_id) REFERENCES memories (user_id, memory_id) ON DELETE CASCADE
);
CREATE INDEX memory_arc_members_memory ON memory_arc_members (user_id, memory_id);

-- The durable event log of the streams: one row per change, written in the
-- transaction of the change, numbered per user in commit order.
CREATE TABLE memory_events (
    user_id     text NOT NULL,
    seq         bigint NOT NULL,
    topic       text NOT NULL CHECK (topic IN ('memory', 'arc')),
    change      text NOT NULL CHECK (change IN ('created', 'updated', 'deleted')),
    -- The subject as of the event (memory_document / arc_document).
    document    jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (user_id, seq)
);
CREATE INDEX memory_events_time ON memory_events (create_time);

CREATE TABLE memory_sessions (
    user_id           text NOT NULL,
    session_id        text NOT NULL,
    status            text NOT NULL CHECK (status IN ('active', 'idle', 'ended')),
    last_message_time timestamptz NOT NULL DEFAULT now(),
    create_time       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, session_id)
);
CREATE INDEX memory_sessions_recent ON memory_sessions (user_id, last_message_time DESC, session_id DESC);

CREATE TABLE memory_patterns (
    user_id      text NOT NULL,
    pattern_type text NOT NULL,
    intensity    double precision NOT NULL CHECK (intensity BETWEEN 0 AND 1),
    occurrences  bigint NOT NULL DEFAULT 1,
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, pattern_type)
);
CREATE INDEX memory_patterns_strongest ON memory_patterns (user_id, intensity DESC, pattern_type);

-- The seed app's per-user scratch cache (written by the app directly);
-- maintenance removes entries older than a day, as the seed's cleanup did.
CREATE TABLE consciousness_cache (
    user_id     text NOT NULL,
    cache_key   text NOT NULL,
    value       jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, cache_key)
);
CREATE INDEX consciousness_cache_time ON consciousness_cache (create_time);

------------------------------------------------------------------------------
-- Maintenance (functions/maintenance.sql): when each job last ran, across all
-- replicas. Local to the coordinator on Citus.
CREATE TABLE maintenance_runs (
    job      text PRIMARY KEY,
    run_time timestamptz NOT NULL
);

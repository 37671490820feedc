-- The AI-agent memory store (seed 003): memories with embeddings, the insert
-- rules, arcs, sessions, patterns, and the durable per-user event log that
-- the realtime streams read.
--
-- Every change of a user's memories and arcs runs with that user's
-- memory_users row locked (lock_memory_user). That one lock makes the rules
-- race-free (arc building sees every committed memory) and numbers the user's
-- events 1, 2, 3 ... in commit order with no gap: a sequence number taken
-- under the lock commits or rolls back with its transaction before the next
-- one is taken.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE memory_users (
    user_id           text PRIMARY KEY,
    -- The last event number handed out; events are 1 .. last_event_seq.
    last_event_seq    bigint NOT NULL DEFAULT 0,
    -- Events up to here may have been removed by retention.
    purged_event_seq  bigint NOT NULL DEFAULT 0,
    memory_count      integer NOT NULL DEFAULT 0 CHECK (memory_count >= 0),
    identity_entities text[] NOT NULL DEFAULT '{}'
);

-- Locks the user's row (creating it on first use) until the transaction
-- ends. A row lock, not an upsert, so taking it writes no new row version.
CREATE FUNCTION lock_memory_user(p_user_id text) RETURNS memory_users
LANGUAGE plpgsql AS $$
DECLARE
    u memory_users;
BEGIN
    LOOP
        SELECT * INTO u FROM memory_users WHERE user_id = p_user_id FOR UPDATE;
        IF FOUND THEN
            RETURN u;
        END IF;
        -- Waits for a concurrent first insert of the user, then locks that row.
        INSERT INTO memory_users (user_id) VALUES (p_user_id) ON CONFLICT (user_id) DO NOTHING;
    END LOOP;
END
$$;

CREATE TABLE memories (
    memory_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
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
    embedding       vector(384),
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now()
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

-- The seed's queries: a user's memories by time (also the keyset order of
-- ListMemories), strong memories, identity anchors, entities and tags,
-- emotion (also the arc clusters), temporal type, thread and session.
CREATE INDEX memories_user_time ON memories (user_id, create_time DESC, memory_id DESC);
CREATE INDEX memories_high_gravity ON memories (user_id, gravity_score DESC) WHERE gravity_score >= 0.7;
CREATE INDEX memories_identity_anchors ON memories (user_id, create_time DESC) WHERE identity_anchor;
CREATE INDEX memories_entities ON memories USING gin (entities);
CREATE INDEX memories_tags ON memories USING gin (meta_tags);
CREATE INDEX memories_emotion ON memories (user_id, emotion_type, create_time DESC) WHERE emotion_type IS NOT NULL;
CREATE INDEX memories_temporal ON memories (user_id, temporal_type);
CREATE INDEX memories_thread ON memories (user_id, thread_id, create_time DESC) WHERE thread_id IS NOT NULL;
CREATE INDEX memories_session ON memories (user_id, session_id, create_time DESC) WHERE session_id IS NOT NULL;
-- HNSW (not the seed's IVFFlat, which has poor recall when built on an
-- empty table), one per metric SearchMemories offers.
CREATE INDEX memories_embedding_cosine ON memories USING hnsw (embedding vector_cosine_ops);
CREATE INDEX memories_embedding_l2 ON memories USING hnsw (embedding vector_l2_ops);

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
    arc_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         text NOT NULL,
    arc_name        text NOT NULL,
    emotion_type    text NOT NULL,
    gravity_center  double precision NOT NULL,
    evolution_stage text NOT NULL DEFAULT 'forming' CHECK (evolution_stage IN ('forming', 'active', 'dormant')),
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now()
);
-- At most one open arc per (user, emotion).
CREATE UNIQUE INDEX memory_arcs_one_open ON memory_arcs (user_id, emotion_type)
    WHERE evolution_stage IN ('forming', 'active');
CREATE INDEX memory_arcs_user_time ON memory_arcs (user_id, create_time DESC, arc_id DESC);
CREATE INDEX memory_arcs_open_time ON memory_arcs (update_time) WHERE evolution_stage IN ('forming', 'active');

CREATE TABLE memory_arc_members (
    arc_id      uuid NOT NULL REFERENCES memory_arcs ON DELETE CASCADE,
    memory_id   uuid NOT NULL REFERENCES memories ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (arc_id, memory_id)
);
CREATE INDEX memory_arc_members_memory ON memory_arc_members (memory_id);

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
-- Documents: the JSON form of a memory or arc, used both in RPC responses
-- and as the event payload (so both always agree). No embedding.

CREATE FUNCTION memory_document(m memories) RETURNS jsonb
LANGUAGE sql STABLE
RETURN jsonb_build_object(
    'memory_id', m.memory_id, 'user_id', m.user_id, 'content', m.content,
    'thread_id', m.thread_id, 'session_id', m.session_id, 'memory_trace_id', m.memory_trace_id,
    'gravity_score', m.gravity_score, 'emotion_type', m.emotion_type, 'entities', m.entities,
    'meta_tags', m.meta_tags, 'temporal_type', m.temporal_type, 'identity_anchor', m.identity_anchor,
    'create_time', m.create_time, 'update_time', m.update_time);

CREATE FUNCTION arc_document(a memory_arcs) RETURNS jsonb
LANGUAGE sql STABLE
RETURN jsonb_build_object(
    'arc_id', a.arc_id, 'user_id', a.user_id, 'arc_name', a.arc_name, 'emotion_type', a.emotion_type,
    'gravity_center', a.gravity_center, 'evolution_stage', a.evolution_stage,
    'memory_ids', (SELECT coalesce(jsonb_agg(m.memory_id ORDER BY m.create_time, m.memory_id), '[]')
                   FROM memory_arc_members am JOIN memories m USING (memory_id) WHERE am.arc_id = a.arc_id),
    'create_time', a.create_time, 'update_time', a.update_time);

-- Appends an event to the user's log; the caller holds lock_memory_user.
-- NOTIFY is only a wake-up hint ("user_id seq", far below the 8000-byte
-- limit); readers always read the table.
CREATE FUNCTION emit_memory_event(p_user_id text, p_topic text, p_change text, p_document jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    seq bigint;
BEGIN
    UPDATE memory_users SET last_event_seq = last_event_seq + 1
    WHERE user_id = p_user_id
    RETURNING last_event_seq INTO seq;
    INSERT INTO memory_events (user_id, seq, topic, change, document)
    VALUES (p_user_id, seq, p_topic, p_change, p_document);
    PERFORM pg_notify('nexus_memory_events', p_user_id || ' ' || seq);
END
$$;

-- Events of several users after the given positions, in order, up to
-- p_limit per user: the one read of both the hub and a catching-up stream.
CREATE FUNCTION memory_events_after(p_user_ids text[], p_after bigint[], p_limit integer)
RETURNS TABLE (user_id text, seq bigint, topic text, change text, document jsonb, create_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT e.user_id, e.seq, e.topic, e.change, e.document, e.create_time
    FROM unnest(p_user_ids, p_after) AS c(user_id, after)
    CROSS JOIN LATERAL (
        SELECT * FROM memory_events e
        WHERE e.user_id = c.user_id AND e.seq > c.after
        ORDER BY e.seq
        LIMIT p_limit
    ) e
$$;

-- Where a new stream starts: the last event number, and how far retention
-- has removed events.
CREATE FUNCTION memory_stream_position(p_user_id text)
RETURNS TABLE (last_event_seq bigint, purged_event_seq bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(max(u.last_event_seq), 0), coalesce(max(u.purged_event_seq), 0)
    FROM memory_users u WHERE u.user_id = p_user_id
$$;

------------------------------------------------------------------------------
-- The seed's insert rules, with its bugs fixed: whole-word temporal patterns
-- (`willow` is not "will"), identity tagging on any overlap with the user's
-- own identity names (the seed required all four hard-coded names), and no
-- duplicate tags. They apply on every insert and update.

CREATE FUNCTION infer_temporal_type(p_content text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN p_content ~* '\m(yesterday|last\s+(night|week|month|year)|remember(ed)?|before|ago)\M' THEN 'past'
    WHEN p_content ~* '\m(tomorrow|next\s+(week|month|year)|will|plan(s|ning)?|going\s+to)\M' THEN 'future'
    ELSE 'present'
END;

CREATE FUNCTION apply_memory_rules() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.gravity_score >= 0.85 THEN
        NEW.meta_tags := NEW.meta_tags || 'high_gravity'::text;
        NEW.identity_anchor := true;
    END IF;
    IF EXISTS (SELECT 1
               FROM memory_users u, unnest(u.identity_entities) AS identity(name), unnest(NEW.entities) AS e(name)
               WHERE u.user_id = NEW.user_id AND lower(identity.name) = lower(e.name)) THEN
        NEW.meta_tags := NEW.meta_tags || 'identity'::text;
    END IF;
    IF NEW.temporal_type IS NULL THEN
        NEW.temporal_type := infer_temporal_type(NEW.content);
    END IF;
    NEW.meta_tags := ARRAY(SELECT t FROM unnest(NEW.meta_tags) WITH ORDINALITY AS x(t, i) GROUP BY t ORDER BY min(i));
    IF TG_OP = 'UPDATE' THEN
        NEW.update_time := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER memories_rules BEFORE INSERT OR UPDATE ON memories
FOR EACH ROW EXECUTE FUNCTION apply_memory_rules();

------------------------------------------------------------------------------
-- Arcs. Run under the user's lock after a memory of (user, emotion) is
-- written: every statement sees all committed memories, so concurrent inserts
-- cannot form two arcs or leave the first members out (the unique index
-- memory_arcs_one_open backs this up).

CREATE FUNCTION refresh_arc(p_arc_id uuid, p_change text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    arc memory_arcs;
BEGIN
    UPDATE memory_arcs a
    SET gravity_center = coalesce(s.center, 0),
        evolution_stage = CASE WHEN a.evolution_stage = 'forming' AND s.members >= 5 THEN 'active'
                               ELSE a.evolution_stage END,
        update_time = now()
    FROM (SELECT avg(m.gravity_score) AS center, count(*) AS members
          FROM memory_arc_members am JOIN memories m USING (memory_id)
          WHERE am.arc_id = p_arc_id) s
    WHERE a.arc_id = p_arc_id
    RETURNING a.* INTO arc;
    PERFORM emit_memory_event(arc.user_id, 'arc', p_change, arc_document(arc));
END
$$;

CREATE FUNCTION build_arc(p_user_id text, p_emotion text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cluster uuid[];
    arc_id  uuid;
    change  text := 'updated';
    joined  integer;
BEGIN
    SELECT array_agg(m.memory_id) INTO cluster
    FROM memories m
    WHERE m.user_id = p_user_id AND m.emotion_type = p_emotion AND m.gravity_score >= 0.8
      AND m.create_time > now() - interval '24 hours';
    IF coalesce(cardinality(cluster), 0) < 3 THEN
        RETURN;
    END IF;
    SELECT a.arc_id INTO arc_id FROM memory_arcs a
    WHERE a.user_id = p_user_id AND a.emotion_type = p_emotion AND a.evolution_stage IN ('forming', 'active');
    IF arc_id IS NULL THEN
        INSERT INTO memory_arcs (user_id, arc_name, emotion_type, gravity_center)
        VALUES (p_user_id, p_emotion || ' arc', p_emotion, 0)
        RETURNING memory_arcs.arc_id INTO arc_id;
        change := 'created';
    END IF;
    INSERT INTO memory_arc_members (arc_id, memory_id)
    SELECT arc_id, member FROM unnest(cluster) AS member
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS joined = ROW_COUNT;
    IF joined > 0 THEN
        PERFORM refresh_arc(arc_id, change);
    END IF;
END
$$;

------------------------------------------------------------------------------
-- Memory writes. Each takes the user's lock first and emits its events.

CREATE FUNCTION create_memory(
    p_user_id text, p_content text, p_thread_id text, p_session_id text, p_memory_trace_id text,
    p_gravity_score double precision, p_emotion_type text, p_entities text[], p_meta_tags text[],
    p_temporal_type text, p_embedding real[], p_request_id text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    fingerprint text;
    earlier     memory_requests;
    m           memories;
    document    jsonb;
BEGIN
    PERFORM lock_memory_user(p_user_id);
    IF p_request_id IS NOT NULL THEN
        fingerprint := md5(jsonb_build_array(p_content, p_thread_id, p_session_id, p_memory_trace_id, p_gravity_score,
                                             p_emotion_type, p_entities, p_meta_tags, p_temporal_type, p_embedding)::text);
        SELECT * INTO earlier FROM memory_requests r WHERE r.user_id = p_user_id AND r.request_id = p_request_id;
        IF FOUND THEN
            IF earlier.fingerprint <> fingerprint THEN
                RAISE EXCEPTION USING ERRCODE = 'NX409',
                    MESSAGE = format('request_id %s was already used with different arguments', p_request_id);
            END IF;
            SELECT * INTO m FROM memories WHERE memory_id = earlier.memory_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'request_id',
                    MESSAGE = format('the memory created by request_id %s has since been deleted', p_request_id);
            END IF;
            RETURN memory_document(m);
        END IF;
    END IF;

    INSERT INTO memories (user_id, content, thread_id, session_id, memory_trace_id, gravity_score, emotion_type,
                          entities, meta_tags, temporal_type, embedding)
    VALUES (p_user_id, p_content, p_thread_id, p_session_id, p_memory_trace_id, p_gravity_score, p_emotion_type,
            p_entities, p_meta_tags, p_temporal_type, p_embedding::vector)
    RETURNING * INTO m;
    IF p_request_id IS NOT NULL THEN
        INSERT INTO memory_requests (user_id, request_id, fingerprint, memory_id)
        VALUES (p_user_id, p_request_id, fingerprint, m.memory_id);
    END IF;
    UPDATE memory_users SET memory_count = memory_count + 1 WHERE user_id = p_user_id;
    document := memory_document(m);
    PERFORM emit_memory_event(p_user_id, 'memory', 'created', document);
    IF m.gravity_score >= 0.8 AND m.emotion_type IS NOT NULL THEN
        PERFORM build_arc(p_user_id, m.emotion_type);
    END IF;
    RETURN document;
END
$$;

-- p_fields names the fields to change (the update mask); the others keep
-- their values whatever the arguments hold.
CREATE FUNCTION update_memory(
    p_user_id text, p_memory_id uuid, p_fields text[], p_content text, p_thread_id text, p_session_id text,
    p_memory_trace_id text, p_gravity_score double precision, p_emotion_type text, p_entities text[],
    p_meta_tags text[], p_temporal_type text, p_identity_anchor boolean, p_embedding real[])
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    m        memories;
    document jsonb;
BEGIN
    PERFORM lock_memory_user(p_user_id);
    UPDATE memories SET
        content         = CASE WHEN 'content' = ANY (p_fields) THEN p_content ELSE content END,
        thread_id       = CASE WHEN 'thread_id' = ANY (p_fields) THEN p_thread_id ELSE thread_id END,
        session_id      = CASE WHEN 'session_id' = ANY (p_fields) THEN p_session_id ELSE session_id END,
        memory_trace_id = CASE WHEN 'memory_trace_id' = ANY (p_fields) THEN p_memory_trace_id ELSE memory_trace_id END,
        gravity_score   = CASE WHEN 'gravity_score' = ANY (p_fields) THEN p_gravity_score ELSE gravity_score END,
        emotion_type    = CASE WHEN 'emotion_type' = ANY (p_fields) THEN p_emotion_type ELSE emotion_type END,
        entities        = CASE WHEN 'entities' = ANY (p_fields) THEN p_entities ELSE entities END,
        meta_tags       = CASE WHEN 'meta_tags' = ANY (p_fields) THEN p_meta_tags ELSE meta_tags END,
        temporal_type   = CASE WHEN 'temporal_type' = ANY (p_fields) THEN p_temporal_type ELSE temporal_type END,
        identity_anchor = CASE WHEN 'identity_anchor' = ANY (p_fields) THEN p_identity_anchor ELSE identity_anchor END,
        embedding       = CASE WHEN 'embedding' = ANY (p_fields) THEN p_embedding::vector ELSE embedding END
    WHERE memory_id = p_memory_id AND user_id = p_user_id
    RETURNING * INTO m;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'memory.memory_id', MESSAGE = 'memory not found';
    END IF;
    document := memory_document(m);
    PERFORM emit_memory_event(p_user_id, 'memory', 'updated', document);
    IF m.gravity_score >= 0.8 AND m.emotion_type IS NOT NULL THEN
        PERFORM build_arc(p_user_id, m.emotion_type);
    END IF;
    RETURN document;
END
$$;

CREATE FUNCTION delete_memory(p_user_id text, p_memory_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m    memories;
    arcs uuid[];
    arc  uuid;
BEGIN
    PERFORM lock_memory_user(p_user_id);
    SELECT array_agg(am.arc_id) INTO arcs FROM memory_arc_members am WHERE am.memory_id = p_memory_id;
    DELETE FROM memories WHERE memory_id = p_memory_id AND user_id = p_user_id RETURNING * INTO m;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'memory_id', MESSAGE = 'memory not found';
    END IF;
    UPDATE memory_users SET memory_count = memory_count - 1 WHERE user_id = p_user_id;
    PERFORM emit_memory_event(p_user_id, 'memory', 'deleted', memory_document(m));
    FOREACH arc IN ARRAY coalesce(arcs, '{}') LOOP
        PERFORM refresh_arc(arc, 'updated');
    END LOOP;
END
$$;

CREATE FUNCTION set_identity_entities(p_user_id text, p_entities text[]) RETURNS text[]
LANGUAGE sql AS $$
    SELECT lock_memory_user(p_user_id);
    UPDATE memory_users SET identity_entities = p_entities WHERE user_id = p_user_id
    RETURNING identity_entities
$$;

------------------------------------------------------------------------------
-- Reads.

CREATE FUNCTION get_memory(p_user_id text, p_memory_id uuid)
RETURNS TABLE (document jsonb, embedding real[])
LANGUAGE sql STABLE AS $$
    SELECT memory_document(m), m.embedding::real[]
    FROM memories m WHERE m.memory_id = p_memory_id AND m.user_id = p_user_id
$$;

-- Newest first, keyset after (p_after_time, p_after_id).
CREATE FUNCTION list_memories(
    p_user_id text, p_since timestamptz, p_min_gravity double precision, p_emotion_type text, p_thread_id text,
    p_session_id text, p_tags_any text[], p_anchors_only boolean, p_after_time timestamptz, p_after_id uuid,
    p_limit integer)
RETURNS SETOF jsonb
LANGUAGE sql STABLE AS $$
    SELECT memory_document(m)
    FROM memories m
    WHERE m.user_id = p_user_id
      AND (p_since IS NULL OR m.create_time >= p_since)
      AND m.gravity_score >= p_min_gravity
      AND (p_emotion_type IS NULL OR m.emotion_type = p_emotion_type)
      AND (p_thread_id IS NULL OR m.thread_id = p_thread_id)
      AND (p_session_id IS NULL OR m.session_id = p_session_id)
      AND (p_tags_any IS NULL OR m.meta_tags && p_tags_any)
      AND (NOT p_anchors_only OR m.identity_anchor)
      AND (p_after_time IS NULL OR (m.create_time, m.memory_id) < (p_after_time, p_after_id))
    ORDER BY m.create_time DESC, m.memory_id DESC
    LIMIT p_limit
$$;

-- Nearest first, filters applied before the limit. A user with at most
-- p_exact_max memories is searched exactly (a scan of that user's rows: recall
-- 1). A larger user is searched through the HNSW index with pgvector's
-- iterative scan, which keeps scanning until enough rows pass the filters; if
-- it still finds fewer than p_top_k, the exact search answers instead.
CREATE FUNCTION search_memories(
    p_user_id text, p_embedding real[], p_metric text, p_top_k integer, p_min_gravity double precision,
    p_since timestamptz, p_emotion_type text, p_exact_max integer)
RETURNS TABLE (document jsonb, distance double precision)
LANGUAGE plpgsql AS $$
DECLARE
    operator text := CASE p_metric WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' END;
    filters  text := 'm.user_id = $1 AND m.embedding IS NOT NULL AND m.gravity_score >= $3
                      AND ($4::timestamptz IS NULL OR m.create_time >= $4) AND ($5::text IS NULL OR m.emotion_type = $5)';
    ids      uuid[];
    found    integer;
BEGIN
    IF (SELECT memory_count FROM memory_users WHERE user_id = p_user_id) > p_exact_max THEN
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
        PERFORM set_config('hnsw.ef_search', '200', true);
        EXECUTE format('SELECT array_agg(memory_id) FROM (SELECT m.memory_id FROM memories m WHERE %s
                        ORDER BY m.embedding %s $2::vector LIMIT $6) nearest', filters, operator)
        INTO ids USING p_user_id, p_embedding, p_min_gravity, p_since, p_emotion_type, p_top_k;
        IF coalesce(cardinality(ids), 0) >= p_top_k THEN
            RETURN QUERY EXECUTE format('SELECT memory_document(m), m.embedding %s $2::vector
                                         FROM memories m WHERE m.memory_id = ANY ($1) ORDER BY 2, m.memory_id', operator)
                USING ids, p_embedding;
            RETURN;
        END IF;
    END IF;
    -- Exact: distances computed in a materialized CTE, so no index order is used.
    RETURN QUERY EXECUTE format('WITH mine AS MATERIALIZED (
                                     SELECT m.memory_id, m.embedding %s $2::vector AS distance FROM memories m WHERE %s)
                                 SELECT memory_document(m), mine.distance
                                 FROM (SELECT * FROM mine ORDER BY distance, memory_id LIMIT $6) mine
                                 JOIN memories m USING (memory_id)
                                 ORDER BY mine.distance, m.memory_id', operator, filters)
        USING p_user_id, p_embedding, p_min_gravity, p_since, p_emotion_type, p_top_k;
END
$$;

-- Newest first, keyset after (p_after_time, p_after_id).
CREATE FUNCTION list_arcs(p_user_id text, p_after_time timestamptz, p_after_id uuid, p_limit integer)
RETURNS SETOF jsonb
LANGUAGE sql STABLE AS $$
    SELECT arc_document(a)
    FROM memory_arcs a
    WHERE a.user_id = p_user_id
      AND (p_after_time IS NULL OR (a.create_time, a.arc_id) < (p_after_time, p_after_id))
    ORDER BY a.create_time DESC, a.arc_id DESC
    LIMIT p_limit
$$;

------------------------------------------------------------------------------
-- Sessions and patterns.

CREATE FUNCTION touch_session(p_user_id text, p_session_id text, p_status text) RETURNS memory_sessions
LANGUAGE sql AS $$
    INSERT INTO memory_sessions AS s (user_id, session_id, status)
    VALUES (p_user_id, p_session_id, p_status)
    ON CONFLICT (user_id, session_id) DO UPDATE
    SET status = EXCLUDED.status, last_message_time = greatest(now(), s.last_message_time)
    RETURNING *
$$;

-- Most recent first, keyset after (p_after_time, p_after_id).
CREATE FUNCTION list_sessions(p_user_id text, p_status text, p_after_time timestamptz, p_after_id text, p_limit integer)
RETURNS SETOF memory_sessions
LANGUAGE sql STABLE AS $$
    SELECT * FROM memory_sessions s
    WHERE s.user_id = p_user_id
      AND (p_status IS NULL OR s.status = p_status)
      AND (p_after_time IS NULL OR (s.last_message_time, s.session_id) < (p_after_time, p_after_id))
    ORDER BY s.last_message_time DESC, s.session_id DESC
    LIMIT p_limit
$$;

CREATE FUNCTION record_pattern(p_user_id text, p_pattern_type text, p_intensity double precision)
RETURNS memory_patterns
LANGUAGE sql AS $$
    INSERT INTO memory_patterns AS p (user_id, pattern_type, intensity)
    VALUES (p_user_id, p_pattern_type, p_intensity)
    ON CONFLICT (user_id, pattern_type) DO UPDATE
    SET intensity = EXCLUDED.intensity, occurrences = p.occurrences + 1, update_time = now()
    RETURNING *
$$;

-- Strongest first, keyset after (p_after_intensity, p_after_type).
CREATE FUNCTION list_patterns(
    p_user_id text, p_pattern_type text, p_after_intensity double precision, p_after_type text, p_limit integer)
RETURNS SETOF memory_patterns
LANGUAGE sql STABLE AS $$
    SELECT * FROM memory_patterns p
    WHERE p.user_id = p_user_id
      AND (p_pattern_type IS NULL OR p.pattern_type = p_pattern_type)
      AND (p_after_intensity IS NULL OR p.intensity < p_after_intensity
           OR (p.intensity = p_after_intensity AND p.pattern_type > p_after_type))
    ORDER BY p.intensity DESC, p.pattern_type
    LIMIT p_limit
$$;

------------------------------------------------------------------------------
-- Maintenance, run by whichever replica takes the advisory lock; each job
-- runs at most once per p_interval across all replicas and removes at most
-- p_batch rows per run, so no run holds locks for long.

CREATE TABLE maintenance_runs (
    job      text PRIMARY KEY,
    run_time timestamptz NOT NULL
);

CREATE FUNCTION run_maintenance(
    p_interval interval, p_event_retention interval, p_request_retention interval, p_cache_ttl interval,
    p_arc_dormant_after interval, p_batch integer)
RETURNS TABLE (job text, affected bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n   bigint;
    arc memory_arcs;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7160813371206) THEN
        RETURN;  -- another replica is running it
    END IF;
    IF EXISTS (SELECT 1 FROM maintenance_runs WHERE job = 'all' AND run_time > now() - p_interval) THEN
        RETURN;
    END IF;
    INSERT INTO maintenance_runs (job, run_time) VALUES ('all', now())
    ON CONFLICT (job) DO UPDATE SET run_time = EXCLUDED.run_time;

    DELETE FROM consciousness_cache
    WHERE (user_id, cache_key) IN (SELECT user_id, cache_key FROM consciousness_cache
                                   WHERE create_time < now() - p_cache_ttl LIMIT p_batch);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY SELECT 'cache_cleanup', n;

    WITH gone AS (
        DELETE FROM memory_events
        WHERE (user_id, seq) IN (SELECT user_id, seq FROM memory_events
                                 WHERE create_time < now() - p_event_retention LIMIT p_batch)
        RETURNING user_id, seq
    ), marks AS (
        SELECT user_id, max(seq) AS seq, count(*) AS removed FROM gone GROUP BY user_id
    ), marked AS (
        UPDATE memory_users u SET purged_event_seq = greatest(u.purged_event_seq, marks.seq)
        FROM marks WHERE u.user_id = marks.user_id
        RETURNING marks.removed
    )
    SELECT coalesce(sum(removed), 0) INTO n FROM marked;
    RETURN QUERY SELECT 'event_retention', n;

    DELETE FROM memory_requests
    WHERE (user_id, request_id) IN (SELECT user_id, request_id FROM memory_requests
                                    WHERE create_time < now() - p_request_retention LIMIT p_batch);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY SELECT 'request_expiry', n;

    n := 0;
    FOR arc IN SELECT * FROM memory_arcs
               WHERE evolution_stage IN ('forming', 'active') AND update_time < now() - p_arc_dormant_after
               LIMIT p_batch LOOP
        PERFORM lock_memory_user(arc.user_id);
        -- Checked again under the lock: a memory may have joined meanwhile.
        UPDATE memory_arcs SET evolution_stage = 'dormant', update_time = now()
        WHERE arc_id = arc.arc_id AND evolution_stage IN ('forming', 'active')
          AND update_time < now() - p_arc_dormant_after
        RETURNING * INTO arc;
        IF FOUND THEN
            PERFORM emit_memory_event(arc.user_id, 'arc', 'updated', arc_document(arc));
            n := n + 1;
        END IF;
    END LOOP;
    RETURN QUERY SELECT 'arc_dormancy', n;
END
$$;

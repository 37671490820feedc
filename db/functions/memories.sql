-- The AI-agent memory store: memory writes and reads, the insert rules, arcs,
-- sessions and patterns. Every change of a user's memories and arcs takes
-- that user's lock first (lock_memory_user; see db/0001_baseline.sql) and
-- emits its events (emit_memory_event, functions/streams.sql).

-- Locks the user's row (creating it on first use) until the transaction
-- ends. A row lock, not an upsert, so taking it writes no new row version.
CREATE OR REPLACE FUNCTION lock_memory_user(p_user_id text) RETURNS memory_users
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

-- Documents: the JSON form of a memory or arc, used both in RPC responses and
-- as the event payload (so both always agree). No embedding.
--
-- memory_document takes any row with the memories columns. A query on
-- memories inside a delegated function (get_memory, list_memories, the
-- searches) runs on the worker against the shard table, whose row type is
-- memories_<shardid>: a function declared for the row type `memories` would
-- not exist there ("function memory_document(memories_102024) does not
-- exist"). A record parameter accepts both; PL/pgSQL, because a SQL function
-- cannot take a record.
CREATE OR REPLACE FUNCTION memory_document(m record) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'memory_id', m.memory_id, 'user_id', m.user_id, 'content', m.content,
        'thread_id', m.thread_id, 'session_id', m.session_id, 'memory_trace_id', m.memory_trace_id,
        'gravity_score', m.gravity_score, 'emotion_type', m.emotion_type, 'entities', m.entities,
        'meta_tags', m.meta_tags, 'temporal_type', m.temporal_type, 'identity_anchor', m.identity_anchor,
        'create_time', m.create_time, 'update_time', m.update_time);
END $$;

CREATE OR REPLACE FUNCTION arc_document(a memory_arcs) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    members jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(m.memory_id ORDER BY m.create_time, m.memory_id), '[]') INTO members
    FROM memory_arc_members am JOIN memories m ON m.user_id = am.user_id AND m.memory_id = am.memory_id
    WHERE am.user_id = a.user_id AND am.arc_id = a.arc_id;
    RETURN jsonb_build_object(
        'arc_id', a.arc_id, 'user_id', a.user_id, 'arc_name', a.arc_name, 'emotion_type', a.emotion_type,
        'gravity_center', a.gravity_center, 'evolution_stage', a.evolution_stage, 'memory_ids', members,
        'create_time', a.create_time, 'update_time', a.update_time);
END $$;

-- The seed's insert rules, with its bugs fixed: whole-word temporal patterns
-- (`willow` is not "will"), identity tagging on any overlap with the user's
-- own identity names (the seed required all four hard-coded names), and no
-- duplicate tags. They apply on every insert and update.
CREATE OR REPLACE FUNCTION infer_temporal_type(p_content text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN p_content ~* '\m(yesterday|last\s+(night|week|month|year)|remember(ed)?|before|ago)\M' THEN 'past'
    WHEN p_content ~* '\m(tomorrow|next\s+(week|month|year)|will|plan(s|ning)?|going\s+to)\M' THEN 'future'
    ELSE 'present'
END;

-- The rules above, on every insert and update of a memory.
CREATE OR REPLACE FUNCTION apply_memory_rules() RETURNS trigger
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

CREATE OR REPLACE TRIGGER memories_rules BEFORE INSERT OR UPDATE ON memories
FOR EACH ROW EXECUTE FUNCTION apply_memory_rules();

-- Arcs. Run under the user's lock after a memory of (user, emotion) is
-- written: every statement sees all committed memories, so concurrent inserts
-- cannot form two arcs or leave the first members out (the unique index
-- memory_arcs_one_open backs this up). Arcs are addressed by (user, arc).

-- Recomputes an arc from its members and emits its event (p_change).
CREATE OR REPLACE FUNCTION refresh_arc(p_user_id text, p_arc_id uuid, p_change text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    arc     memory_arcs;
    center  double precision;
    members bigint;
BEGIN
    SELECT avg(m.gravity_score), count(*) INTO center, members
    FROM memory_arc_members am JOIN memories m ON m.user_id = am.user_id AND m.memory_id = am.memory_id
    WHERE am.user_id = p_user_id AND am.arc_id = p_arc_id;
    UPDATE memory_arcs a
    SET gravity_center = coalesce(center, 0),
        evolution_stage = CASE WHEN a.evolution_stage = 'forming' AND members >= 5 THEN 'active'
                               ELSE a.evolution_stage END,
        update_time = now()
    WHERE a.user_id = p_user_id AND a.arc_id = p_arc_id
    RETURNING a.* INTO arc;
    PERFORM emit_memory_event(arc.user_id, 'arc', p_change, arc_document(arc));
END
$$;

-- Forms or grows the open arc of (user, emotion) from the user's memories of
-- that emotion at or above arc_gravity_threshold().
CREATE OR REPLACE FUNCTION build_arc(p_user_id text, p_emotion text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cluster uuid[];
    arc_id  uuid;
    change  text := 'updated';
    joined  integer;
BEGIN
    SELECT array_agg(m.memory_id) INTO cluster
    FROM memories m
    WHERE m.user_id = p_user_id AND m.emotion_type = p_emotion AND m.gravity_score >= arc_gravity_threshold()
      AND m.create_time > now() - interval '24 hours';
    IF coalesce(cardinality(cluster), 0) < 3 THEN
        RETURN;
    END IF;
    SELECT a.arc_id INTO arc_id FROM memory_arcs a
    WHERE a.user_id = p_user_id AND a.emotion_type = p_emotion AND a.evolution_stage IN ('forming', 'active');
    IF arc_id IS NULL THEN
        arc_id := gen_random_uuid();
        INSERT INTO memory_arcs (arc_id, user_id, arc_name, emotion_type, gravity_center)
        VALUES (arc_id, p_user_id, p_emotion || ' arc', p_emotion, 0);
        change := 'created';
    END IF;
    INSERT INTO memory_arc_members (user_id, arc_id, memory_id)
    SELECT p_user_id, arc_id, member FROM unnest(cluster) AS member
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS joined = ROW_COUNT;
    IF joined > 0 THEN
        PERFORM refresh_arc(p_user_id, arc_id, change);
    END IF;
END
$$;

-- A created or updated memory's document, announced: its event on the
-- user's stream, and its arc formed or grown when it qualifies.
CREATE OR REPLACE FUNCTION announce_memory(m memories, p_change text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    document jsonb := memory_document(m);
BEGIN
    PERFORM emit_memory_event(m.user_id, 'memory', p_change, document);
    IF m.gravity_score >= arc_gravity_threshold() AND m.emotion_type IS NOT NULL THEN
        PERFORM build_arc(m.user_id, m.emotion_type);
    END IF;
    RETURN document;
END
$$;

-- Memory writes. Each takes the user's lock first and emits its events.
CREATE OR REPLACE FUNCTION create_memory(
    p_user_id text, p_content text, p_thread_id text, p_session_id text, p_memory_trace_id text,
    p_gravity_score double precision, p_emotion_type text, p_entities text[], p_meta_tags text[],
    p_temporal_type text, p_embedding vector, p_request_id text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    fingerprint text;
    earlier     memory_requests;
    m           memories;
BEGIN
    PERFORM lock_memory_user(p_user_id);
    IF p_request_id IS NOT NULL THEN
        fingerprint := md5(jsonb_build_array(p_content, p_thread_id, p_session_id, p_memory_trace_id, p_gravity_score,
                                             p_emotion_type, p_entities, p_meta_tags, p_temporal_type, p_embedding)::text);
        SELECT * INTO earlier FROM memory_requests r WHERE r.user_id = p_user_id AND r.request_id = p_request_id;
        IF FOUND THEN
            IF earlier.fingerprint <> fingerprint THEN
                RAISE EXCEPTION USING ERRCODE = 'NX409', COLUMN = 'request_id', DETAIL = 'request_id',
                    MESSAGE = format('request_id %s was already used with different arguments', p_request_id);
            END IF;
            SELECT * INTO m FROM memories WHERE memory_id = earlier.memory_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'request_id', DETAIL = 'request_id',
                    MESSAGE = format('the memory created by request_id %s has since been deleted', p_request_id);
            END IF;
            RETURN memory_document(m);
        END IF;
    END IF;

    INSERT INTO memories (user_id, content, thread_id, session_id, memory_trace_id, gravity_score, emotion_type,
                          entities, meta_tags, temporal_type, embedding)
    VALUES (p_user_id, p_content, p_thread_id, p_session_id, p_memory_trace_id, p_gravity_score, p_emotion_type,
            p_entities, p_meta_tags, p_temporal_type, p_embedding)
    RETURNING * INTO m;
    IF p_request_id IS NOT NULL THEN
        INSERT INTO memory_requests (user_id, request_id, fingerprint, memory_id)
        VALUES (p_user_id, p_request_id, fingerprint, m.memory_id);
    END IF;
    UPDATE memory_users SET memory_count = memory_count + 1 WHERE user_id = p_user_id;
    RETURN announce_memory(m, 'created');
END
$$;

-- Concurrent CreateMemory calls of one server go to the database as one
-- create_memories call (group commit): one round trip and one commit for many
-- memories. On one node a batch holds many users' memories; on Citus one
-- user's, p_route_user_id, so that Citus delegates the call to the user's
-- worker (on one node p_route_user_id is any item's user and means nothing).
-- Each item as one create_memory call, in order, after every item's user is
-- locked in user_id order (the global lock order of memory writes); rows
-- tagged with item (1-based). An item's request_id conflict (NX409) or
-- deleted memory (NX404) is its own outcome (error_code, error_message,
-- error_detail), rolled back alone; any other error fails the batch.
--
CREATE OR REPLACE FUNCTION create_memories(
    p_route_user_id text, p_items memory_create[], OUT item integer, OUT document jsonb, OUT error_code text,
    OUT error_message text, OUT error_detail text)
RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    c           memory_create;
    locked_user text;
BEGIN
    FOR locked_user IN SELECT DISTINCT asked.user_id FROM unnest(p_items) AS asked ORDER BY 1 LOOP
        PERFORM lock_memory_user(locked_user);
    END LOOP;
    FOR i IN 1 .. cardinality(p_items) LOOP
        c := p_items[i];
        item := i;
        document := NULL;
        error_code := NULL;
        error_message := NULL;
        error_detail := NULL;
        IF c.request_id IS NULL THEN  -- nothing it can fail on alone: no subtransaction
            document := create_memory(c.user_id, c.content, c.thread_id, c.session_id, c.memory_trace_id,
                                      c.gravity_score, c.emotion_type, c.entities, c.meta_tags, c.temporal_type,
                                      c.embedding, NULL);
        ELSE
            BEGIN
                document := create_memory(c.user_id, c.content, c.thread_id, c.session_id, c.memory_trace_id,
                                          c.gravity_score, c.emotion_type, c.entities, c.meta_tags, c.temporal_type,
                                          c.embedding, c.request_id);
            EXCEPTION WHEN SQLSTATE 'NX409' OR SQLSTATE 'NX404' THEN
                GET STACKED DIAGNOSTICS error_code = RETURNED_SQLSTATE, error_message = MESSAGE_TEXT,
                                        error_detail = PG_EXCEPTION_DETAIL;
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- p_fields names the fields to change (the update mask); the others keep
-- their values whatever the arguments hold.
CREATE OR REPLACE FUNCTION update_memory(
    p_user_id text, p_memory_id uuid, p_fields text[], p_content text, p_thread_id text, p_session_id text,
    p_memory_trace_id text, p_gravity_score double precision, p_emotion_type text, p_entities text[],
    p_meta_tags text[], p_temporal_type text, p_identity_anchor boolean, p_embedding vector)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    m memories;
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
        embedding       = CASE WHEN 'embedding' = ANY (p_fields) THEN p_embedding ELSE embedding END
    WHERE memory_id = p_memory_id AND user_id = p_user_id
    RETURNING * INTO m;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'memory.memory_id', DETAIL = 'memory.memory_id', MESSAGE = 'memory not found';
    END IF;
    RETURN announce_memory(m, 'updated');
END
$$;

-- Deletes the memory (its arc memberships go with it), refreshes the arcs it
-- was in and emits the events; NX404 when there is none.
CREATE OR REPLACE FUNCTION delete_memory(p_user_id text, p_memory_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m    memories;
    arcs uuid[];
    arc  uuid;
BEGIN
    PERFORM lock_memory_user(p_user_id);
    SELECT array_agg(am.arc_id) INTO arcs FROM memory_arc_members am
    WHERE am.user_id = p_user_id AND am.memory_id = p_memory_id;
    DELETE FROM memories WHERE memory_id = p_memory_id AND user_id = p_user_id RETURNING * INTO m;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'memory_id', DETAIL = 'memory_id', MESSAGE = 'memory not found';
    END IF;
    UPDATE memory_users SET memory_count = memory_count - 1 WHERE user_id = p_user_id;
    PERFORM emit_memory_event(p_user_id, 'memory', 'deleted', memory_document(m));
    FOREACH arc IN ARRAY coalesce(arcs, '{}') LOOP
        PERFORM refresh_arc(p_user_id, arc, 'updated');
    END LOOP;
END
$$;

-- The names the user is known by (apply_memory_rules tags a memory naming
-- one of them 'identity').
CREATE OR REPLACE FUNCTION set_identity_entities(p_user_id text, p_entities text[]) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    entities text[];
BEGIN
    PERFORM lock_memory_user(p_user_id);
    UPDATE memory_users SET identity_entities = p_entities WHERE user_id = p_user_id
    RETURNING identity_entities INTO entities;
    RETURN entities;
END $$;

-- Reads. A memory that is not there is NX404, like every other error of the service.
CREATE OR REPLACE FUNCTION get_memory(p_user_id text, p_memory_id uuid)
RETURNS TABLE (document jsonb, embedding vector)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT memory_document(m), m.embedding
    FROM memories m WHERE m.memory_id = p_memory_id AND m.user_id = p_user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'memory_id', DETAIL = 'memory_id', MESSAGE = 'memory not found';
    END IF;
END $$;

-- Newest first, keyset after (p_after_time, p_after_id).
CREATE OR REPLACE FUNCTION list_memories(
    p_user_id text, p_since timestamptz, p_min_gravity double precision, p_emotion_type text, p_thread_id text,
    p_session_id text, p_tags_any text[], p_anchors_only boolean, p_after_time timestamptz, p_after_id uuid,
    p_limit integer)
RETURNS SETOF jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
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
    LIMIT p_limit;
END $$;

-- Newest first, keyset after (p_after_time, p_after_id).
CREATE OR REPLACE FUNCTION list_arcs(p_user_id text, p_after_time timestamptz, p_after_id uuid, p_limit integer)
RETURNS SETOF jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    arc memory_arcs;
BEGIN
    -- arc_document reads the arc's members: one statement per arc, not a
    -- subquery per row of a query Citus pushes down.
    FOR arc IN
        SELECT * FROM memory_arcs a
        WHERE a.user_id = p_user_id
          AND (p_after_time IS NULL OR (a.create_time, a.arc_id) < (p_after_time, p_after_id))
        ORDER BY a.create_time DESC, a.arc_id DESC
        LIMIT p_limit
    LOOP
        RETURN NEXT arc_document(arc);
    END LOOP;
END $$;

-- Sessions and patterns.
--
-- No now() in ON CONFLICT DO UPDATE SET: Citus accepts only IMMUTABLE
-- functions there ("functions used in the DO UPDATE SET clause of INSERTs on
-- distributed tables must be marked IMMUTABLE"). The time goes through a
-- variable instead.
CREATE OR REPLACE FUNCTION touch_session(p_user_id text, p_session_id text, p_status text) RETURNS memory_sessions
LANGUAGE plpgsql AS $$
DECLARE
    touched_at timestamptz := now();
    touched    memory_sessions;
BEGIN
    INSERT INTO memory_sessions AS s (user_id, session_id, status)
    VALUES (p_user_id, p_session_id, p_status)
    ON CONFLICT ON CONSTRAINT memory_sessions_pkey DO UPDATE
    SET status = EXCLUDED.status, last_message_time = greatest(touched_at, s.last_message_time)
    RETURNING * INTO touched;
    RETURN touched;
END $$;

-- Most recent first, keyset after (p_after_time, p_after_id).
CREATE OR REPLACE FUNCTION list_sessions(p_user_id text, p_status text, p_after_time timestamptz, p_after_id text,
                                         p_limit integer)
RETURNS SETOF memory_sessions
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM memory_sessions s
    WHERE s.user_id = p_user_id
      AND (p_status IS NULL OR s.status = p_status)
      AND (p_after_time IS NULL OR (s.last_message_time, s.session_id) < (p_after_time, p_after_id))
    ORDER BY s.last_message_time DESC, s.session_id DESC
    LIMIT p_limit;
END $$;

-- Records an occurrence of a pattern: its latest intensity and a count.
CREATE OR REPLACE FUNCTION record_pattern(p_user_id text, p_pattern_type text, p_intensity double precision)
RETURNS memory_patterns
LANGUAGE plpgsql AS $$
DECLARE
    recorded_at timestamptz := now();
    recorded    memory_patterns;
BEGIN
    INSERT INTO memory_patterns AS p (user_id, pattern_type, intensity)
    VALUES (p_user_id, p_pattern_type, p_intensity)
    ON CONFLICT ON CONSTRAINT memory_patterns_pkey DO UPDATE
    SET intensity = EXCLUDED.intensity, occurrences = p.occurrences + 1, update_time = recorded_at
    RETURNING * INTO recorded;
    RETURN recorded;
END $$;

-- Strongest first, keyset after (p_after_intensity, p_after_type).
CREATE OR REPLACE FUNCTION list_patterns(
    p_user_id text, p_pattern_type text, p_after_intensity double precision, p_after_type text, p_limit integer)
RETURNS SETOF memory_patterns
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM memory_patterns p
    WHERE p.user_id = p_user_id
      AND (p_pattern_type IS NULL OR p.pattern_type = p_pattern_type)
      AND (p_after_intensity IS NULL OR p.intensity < p_after_intensity
           OR (p.intensity = p_after_intensity AND p.pattern_type > p_after_type))
    ORDER BY p.intensity DESC, p.pattern_type
    LIMIT p_limit;
END $$;

-- One home for each value the service and the database share, and "not
-- found" as the service's SQLSTATE everywhere (issue 9).
--
-- Each constant is an IMMUTABLE SQL function, inlined where it is used, that
-- every SQL place calls; service/nexus/constants.py holds the Python side and
-- tests/test_constants.py checks that both agree. The functions that wrote a
-- constant out are redefined here unchanged but for that (their bodies as of
-- 0004 / 0007). Not the memory search functions: none of them holds one.

-- The NOTIFY channel of the hint "user_id seq" for a user's new events.
CREATE FUNCTION memory_events_channel() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'nexus_memory_events';

-- The NOTIFY channel of broadcasts (PublishBroadcast).
CREATE FUNCTION broadcasts_channel() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'nexus_broadcasts';

-- The advisory lock that elects one replica's run_maintenance.
CREATE FUNCTION maintenance_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 7160813371206;

-- A memory of at least this gravity (and an emotion) counts towards its
-- emotion's arc (build_arc).
CREATE FUNCTION arc_gravity_threshold() RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 0.8;

CREATE OR REPLACE FUNCTION emit_memory_event(p_user_id text, p_topic text, p_change text, p_document jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    seq bigint;
BEGIN
    UPDATE memory_users SET last_event_seq = last_event_seq + 1
    WHERE user_id = p_user_id
    RETURNING last_event_seq INTO seq;
    INSERT INTO memory_events (user_id, seq, topic, change, document)
    VALUES (p_user_id, seq, p_topic, p_change, p_document);
    PERFORM pg_notify(memory_events_channel(), p_user_id || ' ' || seq);
END
$$;

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

CREATE OR REPLACE FUNCTION create_memory(
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
                RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'request_id', DETAIL = 'request_id',
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
    IF m.gravity_score >= arc_gravity_threshold() AND m.emotion_type IS NOT NULL THEN
        PERFORM build_arc(p_user_id, m.emotion_type);
    END IF;
    RETURN document;
END
$$;

-- p_fields names the fields to change (the update mask); the others keep
-- their values whatever the arguments hold.
CREATE OR REPLACE FUNCTION update_memory(
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
        RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'memory.memory_id', DETAIL = 'memory.memory_id', MESSAGE = 'memory not found';
    END IF;
    document := memory_document(m);
    PERFORM emit_memory_event(p_user_id, 'memory', 'updated', document);
    IF m.gravity_score >= arc_gravity_threshold() AND m.emotion_type IS NOT NULL THEN
        PERFORM build_arc(p_user_id, m.emotion_type);
    END IF;
    RETURN document;
END
$$;

CREATE OR REPLACE FUNCTION run_maintenance(
    p_interval interval, p_event_retention interval, p_request_retention interval, p_cache_ttl interval,
    p_arc_dormant_after interval, p_batch integer)
RETURNS TABLE (job text, affected bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n   bigint;
    arc memory_arcs;
BEGIN
    IF NOT pg_try_advisory_xact_lock(maintenance_lock_key()) THEN
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

------------------------------------------------------------------------------
-- "Not found" as NX404, like every other error of the service.

CREATE OR REPLACE FUNCTION get_memory(p_user_id text, p_memory_id uuid)
RETURNS TABLE (document jsonb, embedding real[])
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT memory_document(m), m.embedding::real[]
    FROM memories m WHERE m.memory_id = p_memory_id AND m.user_id = p_user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'memory_id', DETAIL = 'memory_id', MESSAGE = 'memory not found';
    END IF;
END $$;

-- apply_reactions_v2 with an item's missing entry (missing, deleted or not
-- visible to its user: found = false there) also as an error of that item
-- alone, in the form create_memories returns one (error_code NX404,
-- error_message, error_column). v2 stays for replicas of the previous release.
CREATE FUNCTION apply_reactions_v3(p_entry_id uuid, p_ops text[], p_kinds reaction_kind[], p_user_ids text[],
                                   OUT item integer, OUT outcome reaction_outcome, OUT error_code text,
                                   OUT error_message text, OUT error_column text)
RETURNS SETOF record
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT r.item,
           r.outcome,
           CASE WHEN NOT (r.outcome).found THEN 'NX404' END,
           CASE WHEN NOT (r.outcome).found THEN format('entry %s not found', p_entry_id) END,
           CASE WHEN NOT (r.outcome).found THEN 'entry_id' END
    FROM apply_reactions_v2(p_entry_id, p_ops, p_kinds, p_user_ids) AS r;
END $$;

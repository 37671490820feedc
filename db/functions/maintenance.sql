-- Maintenance, run by whichever replica takes the advisory lock
-- (maintenance_lock_key()); each job runs at most once per p_interval across
-- all replicas (maintenance_runs) and removes at most p_batch rows per run, so
-- no run holds locks for long: expired cache entries, events past retention
-- (purged_event_seq marks how far), expired request ids, and arcs dormant
-- after p_arc_dormant_after.
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

-- The durable per-user event log the realtime streams read (memory_events),
-- numbered 1, 2, 3 ... per user in commit order under the user's lock.

-- Appends an event to the user's log; the caller holds lock_memory_user.
-- NOTIFY is only a wake-up hint ("user_id seq", far below the 8000-byte
-- limit); readers always read the table.
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

-- Events of several users after the given positions, in order, up to
-- p_limit per user: one pruned read of the users' shards, numbered per user
-- by a window partitioned by the user (Citus pushes that down; a correlated
-- LATERAL ... LIMIT it cannot). VOLATILE so that its query takes its snapshot
-- after any lock it waited for: a read that waited for retention sees what
-- retention removed as gone.
CREATE OR REPLACE FUNCTION memory_events_after(p_user_ids text[], p_after bigint[], p_limit integer)
RETURNS TABLE (user_id text, seq bigint, topic text, change text, document jsonb, create_time timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    SELECT x.user_id, x.seq, x.topic, x.change, x.document, x.create_time FROM (
        SELECT e.user_id, e.seq, e.topic, e.change, e.document, e.create_time,
               row_number() OVER (PARTITION BY e.user_id ORDER BY e.seq) AS n
        FROM memory_events e
        WHERE e.user_id = ANY (p_user_ids)
          AND e.seq > p_after[array_position(p_user_ids, e.user_id)]) x
    WHERE x.n <= p_limit
    ORDER BY x.user_id, x.seq;
END $$;

-- Where a new stream starts: the last event number, and how far retention
-- has removed events.
CREATE OR REPLACE FUNCTION memory_stream_position(p_user_id text)
RETURNS TABLE (last_event_seq bigint, purged_event_seq bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT coalesce(max(u.last_event_seq), 0)::bigint, coalesce(max(u.purged_event_seq), 0)::bigint
    FROM memory_users u WHERE u.user_id = p_user_id;
END $$;

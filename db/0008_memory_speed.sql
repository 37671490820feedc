-- CreateMemory by group commit (issue 11): concurrent CreateMemory calls of
-- one server go to the database as one create_memories call — one round trip
-- and one commit for many memories. Measured on the memory bench: a
-- CreateMemory cost the server about as much CPU as PostgreSQL (a round trip,
-- a commit and its WAL flush per call), while the insert itself is cheap.

-- One CreateMemory's arguments, as create_memory takes them.
CREATE TYPE memory_create AS (
    user_id text, content text, thread_id text, session_id text, memory_trace_id text,
    gravity_score double precision, emotion_type text, entities text[], meta_tags text[], temporal_type text,
    embedding real[], request_id text);

-- Each item (all of user p_user_id: group commit batches one key, so Citus
-- delegates the call to the user's worker) as one create_memory call, in
-- order; rows tagged with item (1-based). An item's request_id conflict
-- (NX409) or deleted memory (NX404) is its own outcome (error_code,
-- error_message, error_column), rolled back alone; any other error fails the
-- batch.
CREATE FUNCTION create_memories(
    p_user_id text, p_items memory_create[], OUT item integer, OUT document jsonb, OUT error_code text, OUT error_message text,
    OUT error_column text)
RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    c memory_create;
BEGIN
    PERFORM lock_memory_user(p_user_id);
    FOR i IN 1 .. cardinality(p_items) LOOP
        c := p_items[i];
        item := i;
        document := NULL;
        error_code := NULL;
        error_message := NULL;
        error_column := NULL;
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
                                        error_column = COLUMN_NAME;
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

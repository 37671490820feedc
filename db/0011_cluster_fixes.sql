-- Fixes found by running every server test on the Citus cluster
-- (NEXUS_TEST_BACKEND=citus, docs/citus.md); the same schema on one node.

-- memory_document takes any row with the memories columns. A query on
-- memories inside a delegated function (get_memory, list_memories, the
-- searches) runs on the worker against the shard table, whose row type is
-- memories_<shardid>: a function declared for the row type `memories` then
-- does not exist there ("function memory_document(memories_102024) does not
-- exist"). A record parameter accepts both; PL/pgSQL, because a SQL function
-- cannot take a record. Callers call it by name and need no change.
DROP FUNCTION memory_document(memories);

CREATE FUNCTION memory_document(m record) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'memory_id', m.memory_id, 'user_id', m.user_id, 'content', m.content,
        'thread_id', m.thread_id, 'session_id', m.session_id, 'memory_trace_id', m.memory_trace_id,
        'gravity_score', m.gravity_score, 'emotion_type', m.emotion_type, 'entities', m.entities,
        'meta_tags', m.meta_tags, 'temporal_type', m.temporal_type, 'identity_anchor', m.identity_anchor,
        'create_time', m.create_time, 'update_time', m.update_time);
END $$;

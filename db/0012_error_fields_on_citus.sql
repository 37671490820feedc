-- The request field of an NX4xx error travels in DETAIL as well as COLUMN.
-- Citus re-raises a worker's error on the coordinator with its SQLSTATE,
-- message, detail and hint only, so the COLUMN of an error raised inside a
-- delegated function never reached the service (NOT_FOUND without the field
-- it names on a cluster). nexus.errors reads COLUMN, then DETAIL. Redefined
-- here, bodies otherwise unchanged: the raise sites of the functions that run
-- on workers (0009 sets DETAIL in its own).

CREATE OR REPLACE FUNCTION visible_entry(p_entry_id uuid, p_viewer text, p_field text) RETURNS entries
LANGUAGE plpgsql STABLE AS $$
DECLARE
    e entries;
BEGIN
    SELECT * INTO e FROM entries WHERE entry_id = p_entry_id AND delete_time IS NULL;
    IF NOT FOUND OR NOT entry_visible(e, p_viewer) THEN
        RAISE EXCEPTION 'entry % not found', p_entry_id USING ERRCODE = 'NX404', COLUMN = p_field, DETAIL = p_field;
    END IF;
    RETURN e;
END $$;

CREATE OR REPLACE FUNCTION delete_entry(p_user_id text, p_entry_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    e entries;
BEGIN
    SELECT * INTO e FROM entries WHERE entry_id = p_entry_id AND delete_time IS NULL FOR NO KEY UPDATE;
    IF NOT FOUND OR NOT entry_visible(e, p_user_id) THEN
        RAISE EXCEPTION 'entry % not found', p_entry_id USING ERRCODE = 'NX404', COLUMN = 'entry_id', DETAIL = 'entry_id';
    END IF;
    IF e.author_id <> p_user_id THEN
        RAISE EXCEPTION 'only the author may delete entry %', p_entry_id USING ERRCODE = 'NX403';
    END IF;
    UPDATE entries
    SET title = '', content = '', tags = '{}', metadata = '{}', delete_time = now(), update_time = now()
    WHERE entry_id = p_entry_id;
END $$;

CREATE OR REPLACE FUNCTION record_share(p_user_id text, p_entry_id uuid, p_request_id text)
RETURNS reaction_outcome
LANGUAGE plpgsql AS $$
DECLARE
    e            entries;
    shared_entry uuid;
BEGIN
    -- A retry returns the original outcome even if the entry has gone since.
    SELECT entry_id INTO shared_entry FROM shares WHERE user_id = p_user_id AND request_id = p_request_id;
    IF NOT FOUND THEN
        e := visible_entry(p_entry_id, p_user_id, 'entry_id');
        INSERT INTO shares (user_id, request_id, entry_id) VALUES (p_user_id, p_request_id, p_entry_id)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            INSERT INTO entry_counter_shards AS s (entry_id, shard, share_count)
            VALUES (p_entry_id, counter_shard(p_user_id), 1)
            ON CONFLICT (entry_id, shard) DO UPDATE SET share_count = s.share_count + 1;
            RETURN reaction_outcome(e, true, true);
        END IF;
        SELECT entry_id INTO shared_entry FROM shares WHERE user_id = p_user_id AND request_id = p_request_id;
    END IF;
    SELECT * INTO e FROM entries WHERE entry_id = p_entry_id;
    IF shared_entry <> p_entry_id THEN
        RAISE EXCEPTION 'request_id % was already used for another entry', p_request_id
            USING ERRCODE = 'NX409', COLUMN = 'request_id', DETAIL = 'request_id';
    END IF;
    RETURN reaction_outcome(e, true, false);
END $$;

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

-- Reactions (resonance / amplification), shares, per-user interaction
-- states, and the counters over them.
--
-- Writes are PL/pgSQL, not SQL: a SQL function that cannot be inlined runs
-- its statements with parameters, which Citus cannot plan against a
-- distributed table ("parameterized queries for SQL functions referencing
-- distributed tables are not supported").

-- Counters follow their rows in the same transaction, whoever writes the rows.
-- An insert adds to the user's shard (creating it on first use); a delete
-- subtracts from the shard that insert created. The decrement is a plain
-- UPDATE: CHECK constraints are tested on an upsert's proposed row before the
-- conflict is seen, so an upsert of -1 would fail.
CREATE OR REPLACE FUNCTION count_reaction() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO entry_counter_shards AS s (entry_id, shard, resonance_count, amplification_count)
        VALUES (NEW.entry_id, counter_shard(NEW.user_id),
                (NEW.kind = 'resonance')::integer, (NEW.kind = 'amplification')::integer)
        ON CONFLICT (entry_id, shard) DO UPDATE
            SET resonance_count = s.resonance_count + excluded.resonance_count,
                amplification_count = s.amplification_count + excluded.amplification_count;
    ELSE
        UPDATE entry_counter_shards
        SET resonance_count = resonance_count - (OLD.kind = 'resonance')::integer,
            amplification_count = amplification_count - (OLD.kind = 'amplification')::integer
        WHERE entry_id = OLD.entry_id AND shard = counter_shard(OLD.user_id);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER reactions_counted AFTER INSERT OR DELETE ON reactions
FOR EACH ROW EXECUTE FUNCTION count_reaction();

-- Shares are append-only: share_count counts their rows.
CREATE OR REPLACE FUNCTION forbid_share_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'shares are append-only' USING ERRCODE = 'NX403';
END $$;

CREATE OR REPLACE TRIGGER shares_append_only BEFORE UPDATE OR DELETE ON shares
FOR EACH ROW EXECUTE FUNCTION forbid_share_changes();
CREATE OR REPLACE TRIGGER shares_not_truncated BEFORE TRUNCATE ON shares
FOR EACH STATEMENT EXECUTE FUNCTION forbid_share_changes();

-- The outcome of a call that found the entry, with its counts read now.
CREATE OR REPLACE FUNCTION reaction_outcome(e entries, p_state boolean, p_changed boolean)
RETURNS reaction_outcome
LANGUAGE plpgsql STABLE AS $$
DECLARE
    result reaction_outcome;
BEGIN
    SELECT true, p_state, p_changed, c.resonance_count, c.amplification_count, e.branch_count, c.share_count
    INTO result FROM counter_totals(e.entry_id) c;
    RETURN result;
END $$;

-- Adds / removes one reaction row; true when this call changed it. INSERT ...
-- ON CONFLICT waits for a concurrent uncommitted insert or delete of the same
-- key, and DELETE for a concurrent delete: each acts on the latest committed
-- state.
CREATE OR REPLACE FUNCTION add_reaction(p_kind reaction_kind, p_user_id text, p_entry_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reactions (user_id, entry_id, kind) VALUES (p_user_id, p_entry_id, p_kind) ON CONFLICT DO NOTHING;
    RETURN FOUND;
END $$;

CREATE OR REPLACE FUNCTION remove_reaction(p_kind reaction_kind, p_user_id text, p_entry_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM reactions WHERE user_id = p_user_id AND entry_id = p_entry_id AND kind = p_kind;
    RETURN FOUND;
END $$;

-- Applies reaction writes, one (item, outcome) per item; item i writes
-- p_entry_ids[i] and p_ops[i] is 'toggle', 'on' or 'off'. The service
-- coalesces concurrent calls into one batch (group commit): on one node a
-- batch of many entries, on Citus a batch of one entry, p_route_entry_id,
-- delegated to the worker that owns it (on one node p_route_entry_id is any
-- item's entry and means nothing). Items of one entry apply in order; items of
-- different entries are independent. A batch of one is the plain call. An item
-- whose entry is missing, deleted or not visible to its user fails alone:
-- found = false, and NX404 in the error columns.
--
-- Deadlock freedom: entries are taken in entry_id order; for each, the batch
-- locks its counter shards of the entry's allowed items in shard order, one
-- statement each, before writing (visibility is decided first); two batches
-- that touch the same reaction row need the same shard, so reaction rows never
-- contend between batches, and shard locks are taken in one global order
-- (entry, shard).
--
-- Toggles are linearizable per (user, entry, kind): an add that finds the row
-- present turns into a remove, and a remove that finds it already gone retries
-- the add on the newer state. Never "the insert did nothing, so report on".
CREATE OR REPLACE FUNCTION apply_reactions(p_route_entry_id uuid, p_entry_ids uuid[], p_ops text[],
                                p_kinds reaction_kind[], p_user_ids text[],
                                OUT item integer, OUT outcome reaction_outcome, OUT error_code text,
                                OUT error_message text, OUT error_detail text)
RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    entry_items record;
    e           entries;
    i           integer;
    state       boolean;
    changed     boolean;
    delta       integer;
    user_shard  smallint;
    totals      record;
    resonances  bigint;
    amplifies   bigint;
    -- Whether the entry exists and each item's user may see it, decided once
    -- per entry: the shards locked below are exactly those the loop will write.
    allowed     boolean[];
    amplified   feed_row[] := '{}';  -- the amplifications the batch changed
    change      record;
    amplified_at timestamptz;
BEGIN
    FOR entry_items IN SELECT asked.entry_id, array_agg(asked.position ORDER BY asked.position) AS items
                       FROM unnest(p_entry_ids) WITH ORDINALITY AS asked (entry_id, position)
                       GROUP BY asked.entry_id ORDER BY asked.entry_id LOOP
        SELECT * INTO e FROM entries WHERE entry_id = entry_items.entry_id;
        allowed := '{}';
        FOREACH i IN ARRAY entry_items.items LOOP
            -- One statement per user: a visibility check reads the viewer's follows
            -- (another key's shard on Citus), so it is not evaluated inside a query on entries.
            allowed[i] := e.entry_id IS NOT NULL AND e.delete_time IS NULL AND entry_visible(e, p_user_ids[i]);
        END LOOP;

        FOR user_shard IN SELECT DISTINCT counter_shard(p_user_ids[asked.i])
                          FROM unnest(entry_items.items) AS asked (i) WHERE allowed[asked.i] ORDER BY 1 LOOP
            INSERT INTO entry_counter_shards AS s (entry_id, shard) VALUES (entry_items.entry_id, user_shard)
            ON CONFLICT (entry_id, shard) DO UPDATE SET resonance_count = s.resonance_count;
        END LOOP;
        SELECT * INTO totals FROM counter_totals(entry_items.entry_id);
        resonances := totals.resonance_count;
        amplifies := totals.amplification_count;

        FOREACH i IN ARRAY entry_items.items LOOP
            item := i;
            IF NOT allowed[i] THEN
                outcome := ROW(false, NULL, NULL, NULL, NULL, NULL, NULL);
                error_code := 'NX404';
                error_message := format('entry %s not found', entry_items.entry_id);
                error_detail := 'entry_id';
                RETURN NEXT;
                error_code := NULL;
                error_message := NULL;
                error_detail := NULL;
                CONTINUE;
            END IF;
            IF p_ops[i] = 'toggle' THEN
                LOOP
                    IF add_reaction(p_kinds[i], p_user_ids[i], e.entry_id) THEN
                        state := true;
                        EXIT;
                    END IF;
                    IF remove_reaction(p_kinds[i], p_user_ids[i], e.entry_id) THEN
                        state := false;
                        EXIT;
                    END IF;
                END LOOP;
                changed := true;
            ELSE
                state := p_ops[i] = 'on';
                changed := CASE WHEN state THEN add_reaction(p_kinds[i], p_user_ids[i], e.entry_id)
                                ELSE remove_reaction(p_kinds[i], p_user_ids[i], e.entry_id) END;
            END IF;
            delta := CASE WHEN NOT changed THEN 0 WHEN state THEN 1 ELSE -1 END;
            IF p_kinds[i] = 'resonance' THEN
                resonances := resonances + delta;
            ELSE
                amplifies := amplifies + delta;
            END IF;
            IF changed AND p_kinds[i] = 'amplification' THEN
                amplified := amplified || ROW(e.entry_id, p_user_ids[i], 'amplified', NULL)::feed_row;
            END IF;
            outcome := ROW(true, state, changed, resonances, amplifies, e.branch_count, totals.share_count);
            RETURN NEXT;
        END LOOP;
    END LOOP;

    -- The feed follows the amplifications the batch changed, last (after
    -- every other lock) and in user order: one activity per amplification
    -- that stands.
    FOR change IN SELECT DISTINCT a.actor_id, a.entry_id FROM unnest(amplified) a ORDER BY 1, 2 LOOP
        SELECT r.create_time INTO amplified_at FROM reactions r
        WHERE r.user_id = change.actor_id AND r.entry_id = change.entry_id AND r.kind = 'amplification';
        IF FOUND THEN
            PERFORM feed_publish(change.actor_id, change.entry_id, 'amplified', amplified_at);
        ELSE
            PERFORM feed_retract(change.actor_id, change.entry_id, 'amplified');
        END IF;
    END LOOP;
END $$;

-- Records a share once per (user, request_id); state = shared, changed = this
-- call recorded it (false for a retry). The claim (by user) and the count (by
-- entry) are written in that order by every call.
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

-- Newest first; keyset after (p_after_time, p_after_user).
CREATE OR REPLACE FUNCTION list_reactors(p_kind reaction_kind, p_entry_id uuid, p_viewer text,
                              p_after_time timestamptz, p_after_user text, p_limit integer)
RETURNS TABLE (user_id text, create_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM visible_entry(p_entry_id, p_viewer, 'entry_id');
    RETURN QUERY
    SELECT r.user_id, r.create_time FROM reactions r
    WHERE r.entry_id = p_entry_id AND r.kind = p_kind
      AND (p_after_time IS NULL OR (r.create_time, r.user_id) < (p_after_time, p_after_user))
    ORDER BY r.create_time DESC, r.user_id DESC
    LIMIT p_limit;
END $$;

-- Whether p_user_id has resonated with / amplified each entry, in the order
-- asked for; entries the user may not see, deleted and unknown ones absent.
CREATE OR REPLACE FUNCTION user_interaction_states(p_user_id text, p_entry_ids uuid[])
RETURNS TABLE (entry_id uuid, has_resonated boolean, has_amplified boolean)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT e.entry_id, coalesce(r.has_resonated, false), coalesce(r.has_amplified, false)
    FROM visible_entries(p_entry_ids, p_user_id, followed_authors(p_user_id, p_entry_ids)) e
    LEFT JOIN reaction_states(p_user_id, p_entry_ids) r ON r.entry_id = e.entry_id
    ORDER BY array_position(p_entry_ids, e.entry_id);
END $$;

-- Records the user's interaction with a target, one row per (user, target);
-- created says whether this call made the row.
CREATE OR REPLACE FUNCTION record_interaction(p_user_id text, p_target_id text, p_action text, p_notes text)
RETURNS TABLE (user_id text, target_id text, action text, notes text, create_time timestamptz,
               update_time timestamptz, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    recorded_at timestamptz;
BEGIN
    RETURN QUERY
    INSERT INTO user_interactions AS i (user_id, target_id, action, notes)
    VALUES (p_user_id, p_target_id, p_action, p_notes)
    ON CONFLICT ON CONSTRAINT user_interactions_pkey DO NOTHING
    RETURNING i.user_id, i.target_id, i.action, i.notes, i.create_time, i.update_time, true;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Last write wins: the time is taken once the row is locked, so the last
    -- writer has the latest update_time. (A variable, not clock_timestamp()
    -- in the UPDATE: Citus refuses volatile functions there.)
    PERFORM FROM user_interactions i WHERE i.user_id = p_user_id AND i.target_id = p_target_id FOR UPDATE;
    recorded_at := clock_timestamp();
    RETURN QUERY
    UPDATE user_interactions AS i SET action = p_action, notes = p_notes, update_time = recorded_at
    WHERE i.user_id = p_user_id AND i.target_id = p_target_id
    RETURNING i.user_id, i.target_id, i.action, i.notes, i.create_time, i.update_time, false;
END $$;

-- Most recently updated first; keyset after (p_after_time, p_after_target).
CREATE OR REPLACE FUNCTION list_interactions(p_user_id text, p_action text, p_after_time timestamptz,
                                             p_after_target text, p_limit integer)
RETURNS SETOF user_interactions
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM user_interactions i
    WHERE i.user_id = p_user_id
      AND (p_action IS NULL OR i.action = p_action)
      AND (p_after_time IS NULL OR (i.update_time, i.target_id) < (p_after_time, p_after_target))
    ORDER BY i.update_time DESC, i.target_id DESC
    LIMIT p_limit;
END $$;

-- Recounts every entry counter from the rows it counts. Returns one row per
-- counter that differs; with p_fix, also repairs it.
CREATE OR REPLACE FUNCTION reconcile_entry_counters(p_fix boolean)
RETURNS TABLE (entry_id uuid, shard smallint, counter text, stored bigint, actual bigint)
LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE IF EXISTS pg_temp.counter_drift;
    CREATE TEMP TABLE counter_drift ON COMMIT DROP AS
    WITH actual AS (
        SELECT r.entry_id, counter_shard(r.user_id) AS shard,
               count(*) FILTER (WHERE r.kind = 'resonance') AS resonance_count,
               count(*) FILTER (WHERE r.kind = 'amplification') AS amplification_count,
               0::bigint AS share_count
        FROM reactions r GROUP BY 1, 2
        UNION ALL
        SELECT s.entry_id, counter_shard(s.user_id), 0, 0, count(*) FROM shares s GROUP BY 1, 2
    ), actual_by_shard AS (
        SELECT a.entry_id, a.shard, sum(a.resonance_count)::bigint AS resonance_count,
               sum(a.amplification_count)::bigint AS amplification_count,
               sum(a.share_count)::bigint AS share_count
        FROM actual a GROUP BY 1, 2
    ), compared AS (
        SELECT coalesce(a.entry_id, s.entry_id) AS entry_id, coalesce(a.shard, s.shard) AS shard,
               coalesce(s.resonance_count, 0)::bigint AS stored_resonance,
               coalesce(a.resonance_count, 0) AS actual_resonance,
               coalesce(s.amplification_count, 0)::bigint AS stored_amplification,
               coalesce(a.amplification_count, 0) AS actual_amplification,
               coalesce(s.share_count, 0)::bigint AS stored_share, coalesce(a.share_count, 0) AS actual_share
        FROM actual_by_shard a FULL JOIN entry_counter_shards s ON s.entry_id = a.entry_id AND s.shard = a.shard
    )
    SELECT c.entry_id, c.shard, v.counter, v.stored, v.actual
    FROM compared c
    CROSS JOIN LATERAL (VALUES ('resonance_count', c.stored_resonance, c.actual_resonance),
                               ('amplification_count', c.stored_amplification, c.actual_amplification),
                               ('share_count', c.stored_share, c.actual_share)) AS v (counter, stored, actual)
    WHERE v.stored <> v.actual
    UNION ALL
    SELECT e.entry_id, NULL, 'branch_count', e.branch_count::bigint, coalesce(children.count, 0)
    FROM entries e
    LEFT JOIN (SELECT child.parent_entry_id, count(*) AS count FROM entries child
               WHERE child.parent_entry_id IS NOT NULL GROUP BY 1) children ON children.parent_entry_id = e.entry_id
    WHERE e.branch_count <> coalesce(children.count, 0);

    IF p_fix THEN
        INSERT INTO entry_counter_shards AS s (entry_id, shard)
        SELECT DISTINCT d.entry_id, d.shard FROM counter_drift d WHERE d.shard IS NOT NULL
        ON CONFLICT DO NOTHING;
        UPDATE entry_counter_shards s SET resonance_count = d.actual
        FROM counter_drift d WHERE d.counter = 'resonance_count' AND (s.entry_id, s.shard) = (d.entry_id, d.shard);
        UPDATE entry_counter_shards s SET amplification_count = d.actual
        FROM counter_drift d WHERE d.counter = 'amplification_count' AND (s.entry_id, s.shard) = (d.entry_id, d.shard);
        UPDATE entry_counter_shards s SET share_count = d.actual
        FROM counter_drift d WHERE d.counter = 'share_count' AND (s.entry_id, s.shard) = (d.entry_id, d.shard);
        UPDATE entries e SET branch_count = d.actual
        FROM counter_drift d WHERE d.counter = 'branch_count' AND e.entry_id = d.entry_id;
    END IF;
    RETURN QUERY SELECT * FROM counter_drift;
END $$;

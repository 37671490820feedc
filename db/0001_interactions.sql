-- Entries, their reply trees, reactions (resonance / amplification), shares,
-- per-user interaction states, and the counters over them.
--
-- Errors raised here use custom SQLSTATEs that the service maps to gRPC codes
-- in one place (nexus/errors.py):
--   NX400 invalid argument (COLUMN names the request field)
--   NX403 permission denied
--   NX404 not found (COLUMN names the request field)
--   NX409 already exists (a request_id reused with different arguments)
--   NX412 failed precondition (DETAIL holds the precondition type)

CREATE TYPE privacy AS ENUM ('public', 'followers', 'private');
CREATE TYPE reaction_kind AS ENUM ('resonance', 'amplification');

-- Counter rows are spread over this many shards per entry so that a viral
-- entry does not serialise every like on one row lock. A user always lands on
-- the same shard (hash of user_id), so each shard is itself an exact count of
-- its users' rows and can never go negative.
CREATE FUNCTION counter_shard(p_user_id text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (hashtext(p_user_id) & 63)::smallint;

CREATE TABLE entries (
    entry_id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    author_id           text NOT NULL,
    parent_entry_id     uuid REFERENCES entries (entry_id),
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

CREATE UNIQUE INDEX entries_tree_order ON entries (root_entry_id, tree_path);
CREATE UNIQUE INDEX entries_request ON entries (author_id, request_id) WHERE request_id IS NOT NULL;

-- One row per (user, entry, kind) while the reaction is on.
CREATE TABLE reactions (
    user_id     text NOT NULL,
    entry_id    uuid NOT NULL,
    kind        reaction_kind NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, entry_id, kind)
);
CREATE INDEX reactions_by_entry ON reactions (entry_id, kind, create_time, user_id);

-- One row per distinct (user, request_id).
CREATE TABLE shares (
    user_id     text NOT NULL,
    request_id  text NOT NULL,
    entry_id    uuid NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, request_id)
);

-- Counter columns are not indexed, so their updates stay HOT.
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

-- Counters follow their rows in the same transaction, whoever writes the rows.
-- An insert adds to the user's shard (creating it on first use); a delete
-- subtracts from the shard that insert created. The decrement is a plain
-- UPDATE: CHECK constraints are tested on an upsert's proposed row before the
-- conflict is seen, so an upsert of -1 would fail.
CREATE FUNCTION count_reaction() RETURNS trigger
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

CREATE TRIGGER reactions_counted AFTER INSERT OR DELETE ON reactions
FOR EACH ROW EXECUTE FUNCTION count_reaction();

CREATE FUNCTION count_share() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO entry_counter_shards AS s (entry_id, shard, share_count)
    VALUES (NEW.entry_id, counter_shard(NEW.user_id), 1)
    ON CONFLICT (entry_id, shard) DO UPDATE SET share_count = s.share_count + 1;
    RETURN NULL;
END $$;

CREATE TRIGGER shares_counted AFTER INSERT ON shares
FOR EACH ROW EXECUTE FUNCTION count_share();

CREATE FUNCTION forbid_share_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'shares are append-only' USING ERRCODE = 'NX403';
END $$;

CREATE TRIGGER shares_append_only BEFORE UPDATE OR DELETE ON shares
FOR EACH ROW EXECUTE FUNCTION forbid_share_changes();
CREATE TRIGGER shares_not_truncated BEFORE TRUNCATE ON shares
FOR EACH STATEMENT EXECUTE FUNCTION forbid_share_changes();

-- May p_viewer see the entry? A NULL viewer is an internal service acting for
-- no one in particular, which sees everything. Until the follow graph exists
-- (0002 redefines this), FOLLOWERS entries are for their author only.
CREATE FUNCTION entry_visible(e entries, p_viewer text) RETURNS boolean
LANGUAGE sql STABLE
RETURN p_viewer IS NULL OR e.privacy = 'public' OR e.author_id = p_viewer;

-- The live, visible entry, or NX404 naming the request field.
CREATE FUNCTION visible_entry(p_entry_id uuid, p_viewer text, p_field text) RETURNS entries
LANGUAGE plpgsql STABLE AS $$
DECLARE
    e entries;
BEGIN
    SELECT * INTO e FROM entries WHERE entry_id = p_entry_id AND delete_time IS NULL;
    IF NOT FOUND OR NOT entry_visible(e, p_viewer) THEN
        RAISE EXCEPTION 'entry % not found', p_entry_id USING ERRCODE = 'NX404', COLUMN = p_field;
    END IF;
    RETURN e;
END $$;

-- The sums of an entry's counter shards (zeros when it has none).
CREATE FUNCTION counter_totals(p_entry_id uuid)
RETURNS TABLE (resonance_count bigint, amplification_count bigint, share_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(s.resonance_count), 0)::bigint,
           coalesce(sum(s.amplification_count), 0)::bigint,
           coalesce(sum(s.share_count), 0)::bigint
    FROM entry_counter_shards s WHERE s.entry_id = p_entry_id
$$;

-- Counts of entries in the order asked for; entries p_viewer may not see,
-- deleted and unknown entries are absent.
CREATE FUNCTION entry_counts(p_entry_ids uuid[], p_viewer text)
RETURNS TABLE (entry_id uuid, resonance_count bigint, amplification_count bigint,
               branch_count bigint, share_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT e.entry_id, c.resonance_count, c.amplification_count, e.branch_count, c.share_count
    FROM unnest(p_entry_ids) WITH ORDINALITY AS asked (entry_id, position)
    JOIN entries e ON e.entry_id = asked.entry_id
    CROSS JOIN LATERAL counter_totals(e.entry_id) c
    WHERE e.delete_time IS NULL AND entry_visible(e, p_viewer)
    ORDER BY asked.position
$$;

-- The entry an earlier call with this request_id created (NULL: none); the
-- same request_id with other arguments is NX409.
CREATE FUNCTION earlier_entry(p_author_id text, p_request_id text, p_fingerprint text) RETURNS entries
LANGUAGE plpgsql STABLE AS $$
DECLARE
    existing entries;
BEGIN
    SELECT * INTO existing FROM entries WHERE author_id = p_author_id AND request_id = p_request_id;
    IF FOUND AND existing.request_fingerprint <> p_fingerprint THEN
        RAISE EXCEPTION 'request_id % was already used with different arguments', p_request_id
            USING ERRCODE = 'NX409', COLUMN = 'request_id';
    END IF;
    RETURN existing;
END $$;

CREATE FUNCTION create_entry(
    p_author_id text, p_parent_entry_id uuid, p_type text, p_title text, p_content text,
    p_privacy privacy, p_tags text[], p_metadata jsonb, p_request_id text)
RETURNS SETOF entries
LANGUAGE plpgsql AS $$
DECLARE
    fingerprint text := md5(jsonb_build_array(p_parent_entry_id, p_type, p_title, p_content,
                                              p_privacy, p_tags, p_metadata)::text);
    parent   entries;
    existing entries;
    created  entries;
BEGIN
    -- A retry returns the original even if the parent has gone since.
    existing := earlier_entry(p_author_id, p_request_id, fingerprint);
    IF existing.entry_id IS NOT NULL THEN
        RETURN NEXT existing;
        RETURN;
    END IF;

    IF p_parent_entry_id IS NOT NULL THEN
        -- Lock the parent: children of one parent are numbered one at a time,
        -- and a concurrent first attempt of the same request is waited for
        -- here (and found just below).
        SELECT * INTO parent FROM entries
        WHERE entry_id = p_parent_entry_id AND delete_time IS NULL
        FOR NO KEY UPDATE;
        IF NOT FOUND OR NOT entry_visible(parent, p_author_id) THEN
            RAISE EXCEPTION 'entry % not found', p_parent_entry_id
                USING ERRCODE = 'NX404', COLUMN = 'parent_entry_id';
        END IF;
        IF parent.depth >= 255 THEN
            RAISE EXCEPTION 'entry % is at the maximum depth of 255', p_parent_entry_id
                USING ERRCODE = 'NX412', DETAIL = 'MAX_DEPTH';
        END IF;
    END IF;

    existing := earlier_entry(p_author_id, p_request_id, fingerprint);
    IF existing.entry_id IS NOT NULL THEN
        RETURN NEXT existing;
        RETURN;
    END IF;

    IF p_parent_entry_id IS NULL THEN
        INSERT INTO entries (entry_id, author_id, root_entry_id, depth, branch_order, tree_path, type,
                             title, content, privacy, tags, metadata, request_id, request_fingerprint)
        SELECT id, p_author_id, id, 0, 0, '{}', p_type, p_title, p_content, p_privacy, p_tags,
               p_metadata, p_request_id, fingerprint
        FROM gen_random_uuid() AS id
        ON CONFLICT (author_id, request_id) WHERE request_id IS NOT NULL DO NOTHING
        RETURNING * INTO created;
        IF NOT FOUND THEN
            -- A concurrent first attempt of the same request committed meanwhile.
            RETURN QUERY SELECT * FROM create_entry(p_author_id, p_parent_entry_id, p_type, p_title,
                                                    p_content, p_privacy, p_tags, p_metadata, p_request_id);
            RETURN;
        END IF;
    ELSE
        UPDATE entries SET branch_count = branch_count + 1 WHERE entry_id = p_parent_entry_id;
        -- A request_id reused with a different parent is not serialised by the
        -- parent lock; the unique index refuses it (NX409 via unique_violation).
        INSERT INTO entries (author_id, parent_entry_id, root_entry_id, depth, branch_order, tree_path,
                             type, title, content, privacy, tags, metadata, request_id, request_fingerprint)
        VALUES (p_author_id, p_parent_entry_id, parent.root_entry_id, parent.depth + 1, parent.branch_count,
                parent.tree_path || parent.branch_count, p_type, p_title, p_content, p_privacy, p_tags,
                p_metadata, p_request_id, fingerprint)
        RETURNING * INTO created;
    END IF;
    RETURN NEXT created;
END $$;

CREATE FUNCTION delete_entry(p_user_id text, p_entry_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    e entries;
BEGIN
    SELECT * INTO e FROM entries WHERE entry_id = p_entry_id AND delete_time IS NULL FOR NO KEY UPDATE;
    IF NOT FOUND OR NOT entry_visible(e, p_user_id) THEN
        RAISE EXCEPTION 'entry % not found', p_entry_id USING ERRCODE = 'NX404', COLUMN = 'entry_id';
    END IF;
    IF e.author_id <> p_user_id THEN
        RAISE EXCEPTION 'only the author may delete entry %', p_entry_id USING ERRCODE = 'NX403';
    END IF;
    UPDATE entries
    SET title = '', content = '', tags = '{}', metadata = '{}', delete_time = now(), update_time = now()
    WHERE entry_id = p_entry_id;
END $$;

-- The outcome of a reaction or share call: whether the entry was found (and
-- visible to the user), the state after the call, whether the call changed
-- anything, and the entry's counts read after the change.
CREATE TYPE reaction_outcome AS (
    found boolean, state boolean, changed boolean, resonance_count bigint, amplification_count bigint,
    branch_count bigint, share_count bigint);

CREATE FUNCTION reaction_outcome(e entries, p_state boolean, p_changed boolean)
RETURNS reaction_outcome
LANGUAGE sql STABLE AS $$
    SELECT true, p_state, p_changed, c.resonance_count, c.amplification_count, e.branch_count, c.share_count
    FROM counter_totals(e.entry_id) c
$$;

-- Adds / removes one reaction row; true when this call changed it. INSERT ...
-- ON CONFLICT waits for a concurrent uncommitted insert or delete of the same
-- key, and DELETE for a concurrent delete: each acts on the latest committed
-- state.
CREATE FUNCTION add_reaction(p_kind reaction_kind, p_user_id text, p_entry_id uuid) RETURNS boolean
LANGUAGE sql AS $$
    WITH added AS (
        INSERT INTO reactions (user_id, entry_id, kind) VALUES (p_user_id, p_entry_id, p_kind)
        ON CONFLICT DO NOTHING RETURNING 1)
    SELECT count(*) = 1 FROM added
$$;

CREATE FUNCTION remove_reaction(p_kind reaction_kind, p_user_id text, p_entry_id uuid) RETURNS boolean
LANGUAGE sql AS $$
    WITH removed AS (
        DELETE FROM reactions WHERE user_id = p_user_id AND entry_id = p_entry_id AND kind = p_kind RETURNING 1)
    SELECT count(*) = 1 FROM removed
$$;

-- Applies reaction writes in order, one (item, outcome) per item. p_ops[i] is
-- 'toggle', 'on' or 'off'. The service coalesces concurrent calls into one
-- batch (group commit); a batch of one is the plain call.
--
-- Deadlock freedom: the batch first locks the counter shards of all its items
-- in (entry_id, shard) order, creating missing ones, and the loop writes only
-- those shards (visibility is decided once, before the locks). Two batches
-- that touch the same reaction row need the same shard, so reaction rows never
-- contend between batches, and shard locks are taken in one global order.
--
-- Toggles are linearizable per (user, entry, kind): an add that finds the row
-- present turns into a remove, and a remove that finds it already gone retries
-- the add on the newer state. Never "the insert did nothing, so report on".
-- An entry that is missing, deleted or invisible to the user gives found =
-- false for that item only.
CREATE FUNCTION apply_reactions(p_ops text[], p_kinds reaction_kind[], p_user_ids text[], p_entry_ids uuid[],
                                OUT item integer, OUT outcome reaction_outcome)
RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    e          entries;
    state      boolean;
    changed    boolean;
    delta      integer;
    -- Running counts per entry of the batch: summed from the shards once, on
    -- the entry's first item, then carried through the batch's own changes
    -- (re-summing per item would walk the versions this transaction adds).
    seen       uuid[] := '{}';
    resonances bigint[] := '{}';
    amplifies  bigint[] := '{}';
    shares     bigint[] := '{}';
    slot       integer;
    totals     record;
    -- Whether each item's entry exists and its user may see it, decided once:
    -- the shards locked below are exactly those the loop will write.
    allowed    boolean[];
BEGIN
    SELECT array_agg(target.entry_id IS NOT NULL AND target.delete_time IS NULL
                     AND entry_visible(target, asked.user_id) ORDER BY asked.position)
    INTO allowed
    FROM unnest(p_user_ids, p_entry_ids) WITH ORDINALITY AS asked (user_id, entry_id, position)
    LEFT JOIN entries target ON target.entry_id = asked.entry_id;

    INSERT INTO entry_counter_shards AS s (entry_id, shard)
    SELECT DISTINCT asked.entry_id, counter_shard(asked.user_id)
    FROM unnest(p_user_ids, p_entry_ids, allowed) AS asked (user_id, entry_id, allowed)
    WHERE asked.allowed
    ORDER BY 1, 2
    ON CONFLICT (entry_id, shard) DO UPDATE SET resonance_count = s.resonance_count;

    FOR i IN 1 .. cardinality(p_ops) LOOP
        item := i;
        SELECT * INTO e FROM entries WHERE entry_id = p_entry_ids[i];
        IF NOT allowed[i] THEN
            outcome := ROW(false, NULL, NULL, NULL, NULL, NULL, NULL);
            RETURN NEXT;
            CONTINUE;
        END IF;
        slot := array_position(seen, e.entry_id);
        IF slot IS NULL THEN
            seen := seen || e.entry_id;
            slot := cardinality(seen);
            SELECT * INTO totals FROM counter_totals(e.entry_id);
            resonances[slot] := totals.resonance_count;
            amplifies[slot] := totals.amplification_count;
            shares[slot] := totals.share_count;
        END IF;

        IF p_ops[i] = 'toggle' THEN
            LOOP
                IF add_reaction(p_kinds[i], p_user_ids[i], p_entry_ids[i]) THEN
                    state := true;
                    EXIT;
                END IF;
                IF remove_reaction(p_kinds[i], p_user_ids[i], p_entry_ids[i]) THEN
                    state := false;
                    EXIT;
                END IF;
            END LOOP;
            changed := true;
        ELSE
            state := p_ops[i] = 'on';
            changed := CASE WHEN state THEN add_reaction(p_kinds[i], p_user_ids[i], p_entry_ids[i])
                            ELSE remove_reaction(p_kinds[i], p_user_ids[i], p_entry_ids[i]) END;
        END IF;
        delta := CASE WHEN NOT changed THEN 0 WHEN state THEN 1 ELSE -1 END;
        IF p_kinds[i] = 'resonance' THEN
            resonances[slot] := resonances[slot] + delta;
        ELSE
            amplifies[slot] := amplifies[slot] + delta;
        END IF;
        outcome := ROW(true, state, changed, resonances[slot], amplifies[slot], e.branch_count, shares[slot]);
        RETURN NEXT;
    END LOOP;
END $$;

-- Records a share once per (user, request_id); state = shared, changed = this
-- call recorded it (false for a retry).
CREATE FUNCTION record_share(p_user_id text, p_entry_id uuid, p_request_id text)
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
            RETURN reaction_outcome(e, true, true);
        END IF;
        SELECT entry_id INTO shared_entry FROM shares WHERE user_id = p_user_id AND request_id = p_request_id;
    END IF;
    SELECT * INTO e FROM entries WHERE entry_id = p_entry_id;
    IF shared_entry <> p_entry_id THEN
        RAISE EXCEPTION 'request_id % was already used for another entry', p_request_id
            USING ERRCODE = 'NX409', COLUMN = 'request_id';
    END IF;
    RETURN reaction_outcome(e, true, false);
END $$;

-- Entries with counts and, when p_states_for is set, that user's states; in
-- the order asked for, visible to p_viewer, deleted and unknown ones absent.
CREATE FUNCTION get_entries(p_entry_ids uuid[], p_viewer text, p_states_for text)
RETURNS TABLE (entry_id uuid, author_id text, parent_entry_id uuid, root_entry_id uuid, depth integer,
               branch_order integer, type text, title text, content text, privacy privacy, tags text[],
               metadata jsonb, create_time timestamptz, update_time timestamptz, branch_count bigint,
               resonance_count bigint, amplification_count bigint, share_count bigint,
               has_resonated boolean, has_amplified boolean)
LANGUAGE sql STABLE AS $$
    SELECT e.entry_id, e.author_id, e.parent_entry_id, e.root_entry_id, e.depth, e.branch_order, e.type,
           e.title, e.content, e.privacy, e.tags, e.metadata, e.create_time, e.update_time, e.branch_count,
           c.resonance_count, c.amplification_count, c.share_count,
           p_states_for IS NOT NULL AND EXISTS (
               SELECT FROM reactions r
               WHERE r.user_id = p_states_for AND r.entry_id = e.entry_id AND r.kind = 'resonance'),
           p_states_for IS NOT NULL AND EXISTS (
               SELECT FROM reactions r
               WHERE r.user_id = p_states_for AND r.entry_id = e.entry_id AND r.kind = 'amplification')
    FROM unnest(p_entry_ids) WITH ORDINALITY AS asked (entry_id, position)
    JOIN entries e ON e.entry_id = asked.entry_id
    CROSS JOIN LATERAL counter_totals(e.entry_id) c
    WHERE e.delete_time IS NULL AND entry_visible(e, p_viewer)
    ORDER BY asked.position
$$;

CREATE FUNCTION user_interaction_states(p_user_id text, p_entry_ids uuid[])
RETURNS TABLE (entry_id uuid, has_resonated boolean, has_amplified boolean)
LANGUAGE sql STABLE AS $$
    SELECT asked.entry_id,
           bool_or(r.kind = 'resonance') IS TRUE,
           bool_or(r.kind = 'amplification') IS TRUE
    FROM unnest(p_entry_ids) WITH ORDINALITY AS asked (entry_id, position)
    JOIN entries e ON e.entry_id = asked.entry_id
    LEFT JOIN reactions r ON r.user_id = p_user_id AND r.entry_id = asked.entry_id
    WHERE e.delete_time IS NULL AND entry_visible(e, p_user_id)
    GROUP BY asked.entry_id, asked.position
    ORDER BY asked.position
$$;

-- Depth-first pre-order over the subtree of p_entry_id, after the node whose
-- tree_path is p_after (NULL: from the start), at most p_max_depth levels
-- below it (NULL: no limit). Nodes p_viewer may not see are left out.
CREATE FUNCTION branch_tree(p_entry_id uuid, p_viewer text, p_max_depth integer,
                            p_after integer[], p_limit integer)
RETURNS TABLE (entry_id uuid, parent_entry_id uuid, depth integer, branch_order integer,
               deleted boolean, tree_path integer[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    top   entries := visible_entry(p_entry_id, p_viewer, 'root_entry_id');
    -- The subtree is the tree_path range [top.tree_path, next sibling's path).
    upper integer[] := CASE WHEN top.depth = 0 THEN NULL
                            ELSE top.tree_path[1:top.depth - 1] || (top.tree_path[top.depth] + 1) END;
BEGIN
    RETURN QUERY
    SELECT e.entry_id, e.parent_entry_id, e.depth, e.branch_order, e.delete_time IS NOT NULL, e.tree_path
    FROM entries e
    WHERE e.root_entry_id = top.root_entry_id
      AND e.tree_path >= coalesce(p_after, top.tree_path)
      AND (p_after IS NULL OR e.tree_path <> p_after)
      AND (upper IS NULL OR e.tree_path < upper)
      AND (p_max_depth IS NULL OR e.depth <= top.depth + p_max_depth)
      AND entry_visible(e, p_viewer)
    ORDER BY e.tree_path
    LIMIT p_limit;
END $$;

-- Newest first; keyset after (p_after_time, p_after_user).
CREATE FUNCTION list_reactors(p_kind reaction_kind, p_entry_id uuid, p_viewer text,
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

CREATE FUNCTION record_interaction(p_user_id text, p_target_id text, p_action text, p_notes text)
RETURNS TABLE (user_id text, target_id text, action text, notes text, create_time timestamptz,
               update_time timestamptz, created boolean)
LANGUAGE sql AS $$
    INSERT INTO user_interactions AS i (user_id, target_id, action, notes)
    VALUES (p_user_id, p_target_id, p_action, p_notes)
    ON CONFLICT (user_id, target_id) DO UPDATE
        SET action = excluded.action, notes = excluded.notes, update_time = clock_timestamp()
    -- xmax is 0 on a freshly inserted row version, set on an updated one.
    RETURNING i.user_id, i.target_id, i.action, i.notes, i.create_time, i.update_time, i.xmax = 0
$$;

-- Most recently updated first; keyset after (p_after_time, p_after_target).
CREATE FUNCTION list_interactions(p_user_id text, p_action text, p_after_time timestamptz,
                                  p_after_target text, p_limit integer)
RETURNS SETOF user_interactions
LANGUAGE sql STABLE AS $$
    SELECT * FROM user_interactions i
    WHERE i.user_id = p_user_id
      AND (p_action IS NULL OR i.action = p_action)
      AND (p_after_time IS NULL OR (i.update_time, i.target_id) < (p_after_time, p_after_target))
    ORDER BY i.update_time DESC, i.target_id DESC
    LIMIT p_limit
$$;

-- Recounts every entry counter from the rows it counts. Returns one row per
-- counter that differs; with p_fix, also repairs it.
CREATE FUNCTION reconcile_entry_counters(p_fix boolean)
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

-- One schema for one PostgreSQL and for a Citus cluster (docs/citus.md).
--
-- Citus hash-distributes a table by one column and needs every primary key and
-- unique index to include it, foreign keys only between co-located tables, and
-- a write of one key to touch one shard. This migration makes the schema obey
-- that on any PostgreSQL; nexus.migrations then distributes it when the
-- database is a Citus coordinator with workers (nexus/distribution.py).
--
-- Distribution keys:
--   * by user (co-located): balances, token_transactions, token_requests,
--     memory_users, memories, memory_requests, memory_arcs, memory_arc_members,
--     memory_events, memory_sessions, memory_patterns, consciousness_cache,
--     user_interactions, follows (by follower), follow_counter_shards, shares,
--     entry_requests (by author);
--   * by entry (co-located): entries, reactions, entry_counter_shards — a viral
--     entry and everything that counts it sit on one shard.
-- What touches two keys is a two-shard transaction (Citus two-phase commit):
-- a transfer, a follow's two counters, a share (claim by user, count by
-- entry), a create with a request_id (claim by author), a branch (parent and
-- child). Every such write locks its rows in one global order.

------------------------------------------------------------------------------
-- Entries: the request claim moves to its own table (by author), the tree
-- order stays an index (branch_count under the parent's lock numbers the
-- children), the parent link is no foreign key (parent and child may sit on
-- different shards; entries are never removed, only blanked).

CREATE TABLE entry_requests (
    author_id   text NOT NULL,
    request_id  text NOT NULL,
    fingerprint text NOT NULL,
    entry_id    uuid NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (author_id, request_id)
);
INSERT INTO entry_requests (author_id, request_id, fingerprint, entry_id, create_time)
SELECT author_id, request_id, request_fingerprint, entry_id, create_time FROM entries WHERE request_id IS NOT NULL;

DROP INDEX entries_request;
DROP INDEX entries_tree_order;
CREATE INDEX entries_tree_order ON entries (root_entry_id, tree_path);
ALTER TABLE entries DROP CONSTRAINT entries_parent_entry_id_fkey;

-- The entry an earlier call with this request_id created (NULL: none); the
-- same request_id with other arguments is NX409.
CREATE OR REPLACE FUNCTION earlier_entry(p_author_id text, p_request_id text, p_fingerprint text) RETURNS entries
LANGUAGE plpgsql STABLE AS $$
DECLARE
    claim    entry_requests;
    existing entries;
BEGIN
    SELECT * INTO claim FROM entry_requests r WHERE r.author_id = p_author_id AND r.request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF claim.fingerprint <> p_fingerprint THEN
        RAISE EXCEPTION 'request_id % was already used with different arguments', p_request_id
            USING ERRCODE = 'NX409', COLUMN = 'request_id';
    END IF;
    SELECT * INTO existing FROM entries WHERE entry_id = claim.entry_id;
    RETURN existing;
END $$;

-- The request is claimed first (author, request_id): a concurrent attempt of
-- the same request waits on that key until the first commits, then returns
-- its entry; a failed first attempt rolls its claim back. The parent is
-- locked after the claim, so every create locks author then parent.
CREATE OR REPLACE FUNCTION create_entry(
    p_author_id text, p_parent_entry_id uuid, p_type text, p_title text, p_content text,
    p_privacy privacy, p_tags text[], p_metadata jsonb, p_request_id text)
RETURNS SETOF entries
LANGUAGE plpgsql AS $$
DECLARE
    fingerprint text := md5(jsonb_build_array(p_parent_entry_id, p_type, p_title, p_content,
                                              p_privacy, p_tags, p_metadata)::text);
    new_id   uuid := gen_random_uuid();
    parent   entries;
    existing entries;
    created  entries;
BEGIN
    IF p_request_id IS NOT NULL THEN
        -- A retry returns the original even if the parent has gone since.
        INSERT INTO entry_requests (author_id, request_id, fingerprint, entry_id)
        VALUES (p_author_id, p_request_id, fingerprint, new_id)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            existing := earlier_entry(p_author_id, p_request_id, fingerprint);
            RETURN NEXT existing;
            RETURN;
        END IF;
    END IF;

    IF p_parent_entry_id IS NULL THEN
        INSERT INTO entries (entry_id, author_id, root_entry_id, depth, branch_order, tree_path, type,
                             title, content, privacy, tags, metadata, request_id, request_fingerprint)
        VALUES (new_id, p_author_id, new_id, 0, 0, '{}', p_type, p_title, p_content, p_privacy, p_tags,
                p_metadata, p_request_id, fingerprint)
        RETURNING * INTO created;
    ELSE
        -- Lock the parent: children of one parent are numbered one at a time.
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
        UPDATE entries SET branch_count = branch_count + 1 WHERE entry_id = p_parent_entry_id;
        INSERT INTO entries (entry_id, author_id, parent_entry_id, root_entry_id, depth, branch_order, tree_path,
                             type, title, content, privacy, tags, metadata, request_id, request_fingerprint)
        VALUES (new_id, p_author_id, p_parent_entry_id, parent.root_entry_id, parent.depth + 1, parent.branch_count,
                parent.tree_path || parent.branch_count, p_type, p_title, p_content, p_privacy, p_tags,
                p_metadata, p_request_id, fingerprint)
        RETURNING * INTO created;
    END IF;
    RETURN NEXT created;
END $$;

------------------------------------------------------------------------------
-- Counting moves out of the triggers whose two rows sit under different keys
-- (a trigger runs on its row's shard and may not write another key's shard).

DROP TRIGGER shares_counted ON shares;
DROP FUNCTION count_share();

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
            USING ERRCODE = 'NX409', COLUMN = 'request_id';
    END IF;
    RETURN reaction_outcome(e, true, false);
END $$;

DROP TRIGGER follows_counted ON follows;
DROP FUNCTION count_follow();

-- Adds (p_delta 1) or removes (-1) the two counts of edge follower ->
-- followed. The two rows are locked one statement each, in (user_id, shard)
-- order, so a -> b racing b -> a cannot deadlock, on one node or across
-- workers. Plain updates after the lock (an upsert's proposed row would fail
-- the CHECK on a decrement).
CREATE FUNCTION count_follow_edge(p_follower_id text, p_followed_id text, p_delta integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    row_key record;
BEGIN
    FOR row_key IN
        SELECT * FROM (VALUES (p_followed_id, counter_shard(p_follower_id)),
                              (p_follower_id, counter_shard(p_followed_id))) AS v (user_id, shard)
        ORDER BY 1, 2
    LOOP
        INSERT INTO follow_counter_shards AS s (user_id, shard) VALUES (row_key.user_id, row_key.shard)
        ON CONFLICT (user_id, shard) DO UPDATE SET follower_count = s.follower_count;
    END LOOP;
    UPDATE follow_counter_shards SET follower_count = follower_count + p_delta
    WHERE user_id = p_followed_id AND shard = counter_shard(p_follower_id);
    UPDATE follow_counter_shards SET following_count = following_count + p_delta
    WHERE user_id = p_follower_id AND shard = counter_shard(p_followed_id);
END $$;

-- Idempotent: returns whether this call changed the edge.
CREATE OR REPLACE FUNCTION follow(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO follows (follower_id, followed_id) VALUES (p_follower_id, p_followed_id) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM count_follow_edge(p_follower_id, p_followed_id, 1);
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION unfollow(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM follows WHERE follower_id = p_follower_id AND followed_id = p_followed_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM count_follow_edge(p_follower_id, p_followed_id, -1);
    RETURN true;
END $$;

------------------------------------------------------------------------------
-- Keys that include the user: the ledger, memories, arcs, arc members.

ALTER TABLE token_transactions DROP CONSTRAINT token_transactions_pkey,
    ADD PRIMARY KEY (user_id, transaction_id);

ALTER TABLE memory_arc_members ADD COLUMN user_id text;
UPDATE memory_arc_members am SET user_id = a.user_id FROM memory_arcs a WHERE a.arc_id = am.arc_id;
ALTER TABLE memory_arc_members ALTER COLUMN user_id SET NOT NULL,
    DROP CONSTRAINT memory_arc_members_arc_id_fkey,
    DROP CONSTRAINT memory_arc_members_memory_id_fkey,
    DROP CONSTRAINT memory_arc_members_pkey;
ALTER TABLE memories DROP CONSTRAINT memories_pkey, ADD PRIMARY KEY (user_id, memory_id);
ALTER TABLE memory_arcs DROP CONSTRAINT memory_arcs_pkey, ADD PRIMARY KEY (user_id, arc_id);
ALTER TABLE memory_arc_members ADD PRIMARY KEY (user_id, arc_id, memory_id),
    ADD FOREIGN KEY (user_id, arc_id) REFERENCES memory_arcs (user_id, arc_id) ON DELETE CASCADE,
    ADD FOREIGN KEY (user_id, memory_id) REFERENCES memories (user_id, memory_id) ON DELETE CASCADE;
DROP INDEX memory_arc_members_memory;
CREATE INDEX memory_arc_members_memory ON memory_arc_members (user_id, memory_id);

CREATE OR REPLACE FUNCTION arc_document(a memory_arcs) RETURNS jsonb
LANGUAGE sql STABLE
RETURN jsonb_build_object(
    'arc_id', a.arc_id, 'user_id', a.user_id, 'arc_name', a.arc_name, 'emotion_type', a.emotion_type,
    'gravity_center', a.gravity_center, 'evolution_stage', a.evolution_stage,
    'memory_ids', (SELECT coalesce(jsonb_agg(m.memory_id ORDER BY m.create_time, m.memory_id), '[]')
                   FROM memory_arc_members am JOIN memories m ON m.user_id = am.user_id AND m.memory_id = am.memory_id
                   WHERE am.user_id = a.user_id AND am.arc_id = a.arc_id),
    'create_time', a.create_time, 'update_time', a.update_time);

-- Arcs are addressed by (user, arc) from here on.
DROP FUNCTION refresh_arc(uuid, text);

CREATE FUNCTION refresh_arc(p_user_id text, p_arc_id uuid, p_change text) RETURNS void
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
    WHERE m.user_id = p_user_id AND m.emotion_type = p_emotion AND m.gravity_score >= 0.8
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
        RAISE EXCEPTION USING ERRCODE = 'NX404', COLUMN = 'memory_id', MESSAGE = 'memory not found';
    END IF;
    UPDATE memory_users SET memory_count = memory_count - 1 WHERE user_id = p_user_id;
    PERFORM emit_memory_event(p_user_id, 'memory', 'deleted', memory_document(m));
    FOREACH arc IN ARRAY coalesce(arcs, '{}') LOOP
        PERFORM refresh_arc(p_user_id, arc, 'updated');
    END LOOP;
END
$$;

------------------------------------------------------------------------------
-- Group-commit batches of one key: one call per entry (reactions) and per
-- initiating user (token operations), so that on Citus a batch is one call
-- delegated to the worker that owns its key. Semantics per item are those of
-- apply_reactions / apply_token_operations (0001, 0003), which stay for
-- replicas of the previous release.

-- Toggles and sets of reactions on one entry, in order. Deadlock freedom: the
-- batch locks the entry's counter shards of all its allowed items in shard
-- order, one statement each, before writing; two batches that touch the same
-- reaction row need the same shard.
CREATE FUNCTION apply_reactions_v2(p_entry_id uuid, p_ops text[], p_kinds reaction_kind[], p_user_ids text[],
                                   OUT item integer, OUT outcome reaction_outcome)
RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    e          entries;
    state      boolean;
    changed    boolean;
    delta      integer;
    user_shard smallint;
    totals     record;
    resonances bigint;
    amplifies  bigint;
    -- Whether the entry exists and each item's user may see it, decided once:
    -- the shards locked below are exactly those the loop will write.
    allowed    boolean[] := '{}';
BEGIN
    SELECT * INTO e FROM entries WHERE entry_id = p_entry_id;
    FOR i IN 1 .. cardinality(p_ops) LOOP
        -- One statement per user: a visibility check reads the viewer's follows
        -- (another key's shard on Citus), so it is not evaluated inside a query on entries.
        allowed[i] := e.entry_id IS NOT NULL AND e.delete_time IS NULL AND entry_visible(e, p_user_ids[i]);
    END LOOP;

    FOR user_shard IN SELECT DISTINCT counter_shard(asked.user_id)
                 FROM unnest(p_user_ids, allowed) AS asked (user_id, allowed) WHERE asked.allowed ORDER BY 1 LOOP
        INSERT INTO entry_counter_shards AS s (entry_id, shard) VALUES (p_entry_id, user_shard)
        ON CONFLICT (entry_id, shard) DO UPDATE SET resonance_count = s.resonance_count;
    END LOOP;
    SELECT * INTO totals FROM counter_totals(p_entry_id);
    resonances := totals.resonance_count;
    amplifies := totals.amplification_count;

    FOR i IN 1 .. cardinality(p_ops) LOOP
        item := i;
        IF NOT allowed[i] THEN
            outcome := ROW(false, NULL, NULL, NULL, NULL, NULL, NULL);
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF p_ops[i] = 'toggle' THEN
            LOOP
                IF add_reaction(p_kinds[i], p_user_ids[i], p_entry_id) THEN
                    state := true;
                    EXIT;
                END IF;
                IF remove_reaction(p_kinds[i], p_user_ids[i], p_entry_id) THEN
                    state := false;
                    EXIT;
                END IF;
            END LOOP;
            changed := true;
        ELSE
            state := p_ops[i] = 'on';
            changed := CASE WHEN state THEN add_reaction(p_kinds[i], p_user_ids[i], p_entry_id)
                            ELSE remove_reaction(p_kinds[i], p_user_ids[i], p_entry_id) END;
        END IF;
        delta := CASE WHEN NOT changed THEN 0 WHEN state THEN 1 ELSE -1 END;
        IF p_kinds[i] = 'resonance' THEN
            resonances := resonances + delta;
        ELSE
            amplifies := amplifies + delta;
        END IF;
        outcome := ROW(true, state, changed, resonances, amplifies, e.branch_count, totals.share_count);
        RETURN NEXT;
    END LOOP;
END $$;

-- Ledger operations initiated by one user (p_user_id pays or is credited;
-- a transfer pays p_counterparties[i]), in order; results as
-- apply_token_operations. Deadlock freedom: every balance row the batch
-- touches is locked up front, one statement per row, in user_id order (rows
-- of new users are created at 0 for that and removed again at the end if
-- nothing moved), so batches lock in one global order on one node and across
-- workers alike.
CREATE FUNCTION apply_token_operations_v2(
    p_user_id text, p_ops text[], p_counterparties text[], p_amounts bigint[], p_reasons text[],
    p_reference_ids text[], p_request_ids text[])
RETURNS TABLE (item integer, status text, transaction_id uuid, user_id text, kind token_kind, amount bigint,
               balance_after bigint, reason text, reference_id text, counterparty_user_id text,
               request_id text, sequence bigint, create_time timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    holder       text;
    created      boolean;
    created_rows text[] := '{}';
    ids          uuid[];
    earlier      token_requests;
    fingerprint  text;
    payer        text;
    payee        text;
    payer_balance  bigint;
    payer_sequence bigint;
    payee_balance  bigint;
    payee_sequence bigint;
    -- Citus refuses a volatile function in an UPDATE of a distributed table:
    -- the time is taken per item into a variable instead.
    moved_at       timestamptz;
BEGIN
    FOR holder IN SELECT DISTINCT u FROM unnest(p_user_id || p_counterparties) AS u WHERE u IS NOT NULL ORDER BY u LOOP
        INSERT INTO balances AS b (user_id, balance) VALUES (holder, 0)
        ON CONFLICT (user_id) DO UPDATE SET balance = b.balance
        RETURNING b.xmax = 0 INTO created;
        IF created THEN
            created_rows := created_rows || holder;
        END IF;
    END LOOP;

    FOR i IN 1 .. cardinality(p_ops) LOOP
        payer := CASE WHEN p_ops[i] = 'credit' THEN NULL ELSE p_user_id END;
        payee := CASE p_ops[i] WHEN 'credit' THEN p_user_id WHEN 'transfer' THEN p_counterparties[i] END;
        fingerprint := md5(jsonb_build_array(p_ops[i], p_counterparties[i], p_amounts[i], p_reasons[i],
                                             p_reference_ids[i])::text);
        ids := CASE WHEN p_ops[i] = 'transfer' THEN ARRAY[gen_random_uuid(), gen_random_uuid()]
                    ELSE ARRAY[gen_random_uuid()] END;

        INSERT INTO token_requests AS r (user_id, request_id, fingerprint, transaction_ids)
        VALUES (p_user_id, p_request_ids[i], fingerprint, ids)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO earlier FROM token_requests r
            WHERE r.user_id = p_user_id AND r.request_id = p_request_ids[i];
            IF earlier.fingerprint <> fingerprint THEN
                RETURN QUERY SELECT i, 'request_conflict', NULL::uuid, NULL, NULL::token_kind, NULL::bigint,
                                    NULL::bigint, NULL, NULL, NULL, NULL, NULL::bigint, NULL::timestamptz;
            ELSE
                -- The legs sit under the payer's and (a transfer) the payee's keys.
                RETURN QUERY SELECT i, 'ok', t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after,
                                    t.reason, t.reference_id, t.counterparty_user_id, t.request_id, t.sequence,
                                    t.create_time
                             FROM token_transactions t
                             WHERE t.user_id IN (p_user_id, p_counterparties[i])
                               AND t.transaction_id = ANY (earlier.transaction_ids)
                             ORDER BY array_position(earlier.transaction_ids, t.transaction_id);
            END IF;
            CONTINUE;
        END IF;

        IF payer IS NOT NULL AND (SELECT b.balance FROM balances b WHERE b.user_id = payer) < p_amounts[i] THEN
            status := 'insufficient_funds';
        ELSIF payee IS NOT NULL
              AND (SELECT b.balance FROM balances b WHERE b.user_id = payee) > 9223372036854775807 - p_amounts[i] THEN
            status := 'balance_overflow';
        ELSE
            status := 'ok';
        END IF;
        IF status <> 'ok' THEN
            DELETE FROM token_requests r WHERE r.user_id = p_user_id AND r.request_id = p_request_ids[i];
            RETURN QUERY SELECT i, status, NULL::uuid, NULL, NULL::token_kind, NULL::bigint, NULL::bigint,
                                NULL, NULL, NULL, NULL, NULL::bigint, NULL::timestamptz;
            CONTINUE;
        END IF;

        moved_at := clock_timestamp();
        IF payer IS NOT NULL THEN
            UPDATE balances b SET balance = b.balance - p_amounts[i], last_sequence = b.last_sequence + 1,
                                  update_time = moved_at
            WHERE b.user_id = payer RETURNING b.balance, b.last_sequence INTO payer_balance, payer_sequence;
            RETURN QUERY
            INSERT INTO token_transactions AS t (transaction_id, user_id, kind, amount, balance_after, reason,
                                                 reference_id, counterparty_user_id, request_id, sequence)
            VALUES (ids[1], payer, CASE WHEN p_ops[i] = 'transfer' THEN 'transfer_out' ELSE 'debit' END::token_kind,
                    p_amounts[i], payer_balance, p_reasons[i], p_reference_ids[i], payee, p_request_ids[i],
                    payer_sequence)
            RETURNING i, 'ok', t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after, t.reason,
                      t.reference_id, t.counterparty_user_id, t.request_id, t.sequence, t.create_time;
        END IF;
        IF payee IS NOT NULL THEN
            UPDATE balances b SET balance = b.balance + p_amounts[i], last_sequence = b.last_sequence + 1,
                                  update_time = moved_at
            WHERE b.user_id = payee RETURNING b.balance, b.last_sequence INTO payee_balance, payee_sequence;
            RETURN QUERY
            INSERT INTO token_transactions AS t (transaction_id, user_id, kind, amount, balance_after, reason,
                                                 reference_id, counterparty_user_id, request_id, sequence)
            VALUES (ids[cardinality(ids)], payee,
                    CASE WHEN p_ops[i] = 'transfer' THEN 'transfer_in' ELSE 'credit' END::token_kind,
                    p_amounts[i], payee_balance, p_reasons[i], p_reference_ids[i], payer, p_request_ids[i],
                    payee_sequence)
            RETURNING i, 'ok', t.transaction_id, t.user_id, t.kind, t.amount, t.balance_after, t.reason,
                      t.reference_id, t.counterparty_user_id, t.request_id, t.sequence, t.create_time;
        END IF;
    END LOOP;

    DELETE FROM balances b WHERE b.user_id = ANY (created_rows) AND b.last_sequence = 0;
END $$;

------------------------------------------------------------------------------
-- Writes that were SQL functions become PL/pgSQL: a SQL function that cannot
-- be inlined runs its statements with parameters, which Citus cannot plan
-- against a distributed table ("parameterized queries for SQL functions
-- referencing distributed tables are not supported"). Same statements, same
-- results.

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

CREATE OR REPLACE FUNCTION touch_session(p_user_id text, p_session_id text, p_status text) RETURNS memory_sessions
LANGUAGE plpgsql AS $$
DECLARE
    touched memory_sessions;
BEGIN
    INSERT INTO memory_sessions AS s (user_id, session_id, status)
    VALUES (p_user_id, p_session_id, p_status)
    ON CONFLICT ON CONSTRAINT memory_sessions_pkey DO UPDATE
    SET status = EXCLUDED.status, last_message_time = greatest(now(), s.last_message_time)
    RETURNING * INTO touched;
    RETURN touched;
END $$;

CREATE OR REPLACE FUNCTION record_pattern(p_user_id text, p_pattern_type text, p_intensity double precision)
RETURNS memory_patterns
LANGUAGE plpgsql AS $$
DECLARE
    recorded memory_patterns;
BEGIN
    INSERT INTO memory_patterns AS p (user_id, pattern_type, intensity)
    VALUES (p_user_id, p_pattern_type, p_intensity)
    ON CONFLICT ON CONSTRAINT memory_patterns_pkey DO UPDATE
    SET intensity = EXCLUDED.intensity, occurrences = p.occurrences + 1, update_time = now()
    RETURNING * INTO recorded;
    RETURN recorded;
END $$;

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

-- Reads likewise: the same queries, run by PL/pgSQL (whose parameters Citus
-- plans, routing a user's read to its shard). entry_visible stays an inlined
-- SQL expression; counter_totals and visible_links become PL/pgSQL too, and
-- the reads of many entries write the sums out in their own query.

CREATE OR REPLACE FUNCTION follows_user(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT FROM follows f WHERE f.follower_id = p_follower_id AND f.followed_id = p_followed_id);
END $$;

CREATE OR REPLACE FUNCTION follow_counts(p_user_ids text[])
RETURNS TABLE (user_id text, follower_count bigint, following_count bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT asked.user_id,
           coalesce(sum(s.follower_count), 0)::bigint,
           coalesce(sum(s.following_count), 0)::bigint
    FROM unnest(p_user_ids) WITH ORDINALITY AS asked (user_id, position)
    LEFT JOIN follow_counter_shards s ON s.user_id = asked.user_id
    GROUP BY asked.user_id, asked.position
    ORDER BY asked.position;
END $$;

CREATE OR REPLACE FUNCTION follow_states(p_user_id text, p_other_user_ids text[])
RETURNS TABLE (user_id text, following boolean, followed_by boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    following   text[];
    followed_by text[];
BEGIN
    -- Two reads, each of one key's edges (the user's own; the others' edges to the user).
    SELECT coalesce(array_agg(f.followed_id), '{}') INTO following
    FROM follows f WHERE f.follower_id = p_user_id AND f.followed_id = ANY (p_other_user_ids);
    SELECT coalesce(array_agg(f.follower_id), '{}') INTO followed_by
    FROM follows f WHERE f.follower_id = ANY (p_other_user_ids) AND f.followed_id = p_user_id;
    RETURN QUERY
    SELECT asked.user_id, asked.user_id = ANY (following), asked.user_id = ANY (followed_by)
    FROM unnest(p_other_user_ids) WITH ORDINALITY AS asked (user_id, position)
    ORDER BY asked.position;
END $$;

CREATE OR REPLACE FUNCTION list_followers(p_user_id text, p_after_time timestamptz, p_after_user text, p_limit integer)
RETURNS TABLE (user_id text, create_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT f.follower_id, f.create_time FROM follows f
    WHERE f.followed_id = p_user_id
      AND (p_after_time IS NULL OR (f.create_time, f.follower_id) < (p_after_time, p_after_user))
    ORDER BY f.create_time DESC, f.follower_id DESC
    LIMIT p_limit;
END $$;

CREATE OR REPLACE FUNCTION list_following(p_user_id text, p_after_time timestamptz, p_after_user text, p_limit integer)
RETURNS TABLE (user_id text, create_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT f.followed_id, f.create_time FROM follows f
    WHERE f.follower_id = p_user_id
      AND (p_after_time IS NULL OR (f.create_time, f.followed_id) < (p_after_time, p_after_user))
    ORDER BY f.create_time DESC, f.followed_id DESC
    LIMIT p_limit;
END $$;

CREATE OR REPLACE FUNCTION counter_totals(p_entry_id uuid)
RETURNS TABLE (resonance_count bigint, amplification_count bigint, share_count bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT coalesce(sum(s.resonance_count), 0)::bigint,
           coalesce(sum(s.amplification_count), 0)::bigint,
           coalesce(sum(s.share_count), 0)::bigint
    FROM entry_counter_shards s WHERE s.entry_id = p_entry_id;
END $$;

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

-- The entry's parent and root ids as p_viewer is shown them (0005), the
-- parent and the root read one statement each (each on its own shard).
CREATE OR REPLACE FUNCTION visible_links(e entries, p_viewer text)
RETURNS TABLE (parent_entry_id uuid, root_entry_id uuid)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    linked entries;
BEGIN
    parent_entry_id := e.parent_entry_id;
    root_entry_id := e.root_entry_id;
    IF e.parent_entry_id IS NOT NULL THEN
        SELECT * INTO linked FROM entries WHERE entries.entry_id = e.parent_entry_id;
        IF NOT FOUND OR NOT entry_visible(linked, p_viewer) THEN
            parent_entry_id := NULL;
        END IF;
    END IF;
    IF e.root_entry_id <> e.entry_id THEN
        SELECT * INTO linked FROM entries WHERE entries.entry_id = e.root_entry_id;
        IF NOT FOUND OR NOT entry_visible(linked, p_viewer) THEN
            root_entry_id := NULL;
        END IF;
    END IF;
    RETURN NEXT;
END $$;

------------------------------------------------------------------------------
-- Visibility in reads of many entries. entry_visible asks follows_user per
-- FOLLOWERS entry; inside a query Citus pushes down to the entries' shards,
-- that lookup of another table would be a distributed query from a query on
-- a shard, which Citus refuses. So the reads of many entries first gather,
-- in statements of their own, what p_viewer may see: the authors (of the
-- entries, their parents and roots) p_viewer follows, and which parents and
-- roots p_viewer may see; the main query then checks against those arrays.

-- entry_visible with the follows already looked up: p_followed holds the
-- authors of interest that p_viewer follows. It takes the entry's columns,
-- not its row: on a shard the row has the shard table's type.
CREATE FUNCTION entry_visible_given(p_privacy privacy, p_author_id text, p_viewer text, p_followed text[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_viewer IS NULL OR p_privacy = 'public' OR p_author_id = p_viewer
       OR (p_privacy = 'followers' AND p_author_id = ANY (p_followed));

CREATE FUNCTION viewer_context(p_viewer text, p_entry_ids uuid[], OUT followed text[], OUT visible_links uuid[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    linked  uuid[];
    authors text[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT link), '{}') INTO linked
    FROM entries e CROSS JOIN LATERAL unnest(ARRAY[e.parent_entry_id, e.root_entry_id]) AS link
    WHERE e.entry_id = ANY (p_entry_ids) AND link IS NOT NULL AND link <> e.entry_id;
    followed := '{}';
    IF p_viewer IS NOT NULL THEN
        SELECT coalesce(array_agg(DISTINCT e.author_id), '{}') INTO authors
        FROM entries e
        WHERE (e.entry_id = ANY (p_entry_ids) OR e.entry_id = ANY (linked))
          AND e.privacy = 'followers' AND e.author_id <> p_viewer;
        IF cardinality(authors) > 0 THEN
            SELECT coalesce(array_agg(f.followed_id), '{}') INTO followed
            FROM follows f WHERE f.follower_id = p_viewer AND f.followed_id = ANY (authors);
        END IF;
    END IF;
    SELECT coalesce(array_agg(e.entry_id), '{}') INTO visible_links
    FROM entries e WHERE e.entry_id = ANY (linked) AND entry_visible_given(e.privacy, e.author_id, p_viewer, followed);
END $$;

CREATE OR REPLACE FUNCTION get_entries(p_entry_ids uuid[], p_viewer text, p_states_for text)
RETURNS TABLE (entry_id uuid, author_id text, parent_entry_id uuid, root_entry_id uuid, depth integer,
               branch_order integer, type text, title text, content text, privacy privacy, tags text[],
               metadata jsonb, create_time timestamptz, update_time timestamptz, branch_count bigint,
               resonance_count bigint, amplification_count bigint, share_count bigint,
               has_resonated boolean, has_amplified boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    seen record := viewer_context(p_viewer, p_entry_ids);
BEGIN
    RETURN QUERY
    SELECT e.entry_id, e.author_id,
           CASE WHEN e.parent_entry_id = ANY (seen.visible_links) THEN e.parent_entry_id END,
           CASE WHEN e.root_entry_id = e.entry_id OR e.root_entry_id = ANY (seen.visible_links)
                THEN e.root_entry_id END,
           e.depth, e.branch_order, e.type,
           e.title, e.content, e.privacy, e.tags, e.metadata, e.create_time, e.update_time, e.branch_count::bigint,
           c.resonance_count, c.amplification_count, c.share_count,
           p_states_for IS NOT NULL AND EXISTS (
               SELECT 1 FROM reactions r
               WHERE r.user_id = p_states_for AND r.entry_id = e.entry_id AND r.kind = 'resonance'),
           p_states_for IS NOT NULL AND EXISTS (
               SELECT 1 FROM reactions r
               WHERE r.user_id = p_states_for AND r.entry_id = e.entry_id AND r.kind = 'amplification')
    FROM unnest(p_entry_ids) WITH ORDINALITY AS asked (entry_id, position)
    JOIN entries e ON e.entry_id = asked.entry_id
    CROSS JOIN LATERAL (
        -- counter_totals, written out: inside a query Citus pushes down to the shards.
        SELECT coalesce(sum(s.resonance_count), 0)::bigint AS resonance_count,
               coalesce(sum(s.amplification_count), 0)::bigint AS amplification_count,
               coalesce(sum(s.share_count), 0)::bigint AS share_count
        FROM entry_counter_shards s WHERE s.entry_id = e.entry_id) c
    WHERE e.delete_time IS NULL AND entry_visible_given(e.privacy, e.author_id, p_viewer, seen.followed)
    ORDER BY asked.position;
END $$;

CREATE OR REPLACE FUNCTION entry_counts(p_entry_ids uuid[], p_viewer text)
RETURNS TABLE (entry_id uuid, resonance_count bigint, amplification_count bigint,
               branch_count bigint, share_count bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    seen record := viewer_context(p_viewer, p_entry_ids);
BEGIN
    RETURN QUERY
    SELECT e.entry_id, c.resonance_count, c.amplification_count, e.branch_count::bigint, c.share_count
    FROM unnest(p_entry_ids) WITH ORDINALITY AS asked (entry_id, position)
    JOIN entries e ON e.entry_id = asked.entry_id
    CROSS JOIN LATERAL (
        -- counter_totals, written out: inside a query Citus pushes down to the shards.
        SELECT coalesce(sum(s.resonance_count), 0)::bigint AS resonance_count,
               coalesce(sum(s.amplification_count), 0)::bigint AS amplification_count,
               coalesce(sum(s.share_count), 0)::bigint AS share_count
        FROM entry_counter_shards s WHERE s.entry_id = e.entry_id) c
    WHERE e.delete_time IS NULL AND entry_visible_given(e.privacy, e.author_id, p_viewer, seen.followed)
    ORDER BY asked.position;
END $$;

CREATE OR REPLACE FUNCTION user_interaction_states(p_user_id text, p_entry_ids uuid[])
RETURNS TABLE (entry_id uuid, has_resonated boolean, has_amplified boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    seen record := viewer_context(p_user_id, p_entry_ids);
BEGIN
    RETURN QUERY
    SELECT asked.entry_id,
           EXISTS (SELECT 1 FROM reactions r
                   WHERE r.user_id = p_user_id AND r.entry_id = e.entry_id AND r.kind = 'resonance'),
           EXISTS (SELECT 1 FROM reactions r
                   WHERE r.user_id = p_user_id AND r.entry_id = e.entry_id AND r.kind = 'amplification')
    FROM unnest(p_entry_ids) WITH ORDINALITY AS asked (entry_id, position)
    JOIN entries e ON e.entry_id = asked.entry_id
    WHERE e.delete_time IS NULL AND entry_visible_given(e.privacy, e.author_id, p_user_id, seen.followed)
    ORDER BY asked.position;
END $$;

------------------------------------------------------------------------------
-- The remaining reads of 0001-0004, as PL/pgSQL (same queries; see above).

CREATE OR REPLACE FUNCTION get_balances(p_user_ids text[])
RETURNS TABLE (user_id text, balance bigint, update_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT asked.user_id, coalesce(b.balance, 0), b.update_time
    FROM unnest(p_user_ids) WITH ORDINALITY AS asked (user_id, position)
    LEFT JOIN balances b ON b.user_id = asked.user_id
    ORDER BY asked.position;
END $$;

CREATE OR REPLACE FUNCTION list_transactions(p_user_id text, p_after_sequence bigint, p_limit integer)
RETURNS SETOF token_transactions
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM token_transactions t
    WHERE t.user_id = p_user_id AND (p_after_sequence IS NULL OR t.sequence < p_after_sequence)
    ORDER BY t.sequence DESC
    LIMIT p_limit;
END $$;

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

CREATE OR REPLACE FUNCTION get_memory(p_user_id text, p_memory_id uuid)
RETURNS TABLE (document jsonb, embedding real[])
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT memory_document(m), m.embedding::real[]
    FROM memories m WHERE m.memory_id = p_memory_id AND m.user_id = p_user_id;
END $$;

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

CREATE OR REPLACE FUNCTION memory_stream_position(p_user_id text)
RETURNS TABLE (last_event_seq bigint, purged_event_seq bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT coalesce(max(u.last_event_seq), 0)::bigint, coalesce(max(u.purged_event_seq), 0)::bigint
    FROM memory_users u WHERE u.user_id = p_user_id;
END $$;

-- Events of several users after the given positions, in order, up to
-- p_limit per user: one pruned read of the users' shards, numbered per user
-- by a window partitioned by the user (Citus pushes that down; a correlated
-- LATERAL ... LIMIT it cannot). VOLATILE so that its query takes its snapshot
-- after any lock it waited for, as the inlined SQL function of 0004 did: a
-- read that waited for retention sees what retention removed as gone.
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

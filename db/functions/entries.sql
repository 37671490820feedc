-- Entries and their reply trees, and who may see them.
--
-- Privacy of reply trees: the id of an entry a viewer may not see never
-- reaches that viewer. The rule, as a social app shows a conversation: it
-- continues only through entries you can see.
--   * GetBranchTree leaves out an entry the viewer may not see together with
--     its whole subtree: a public reply under a private one would otherwise be
--     listed with the private reply's id as its parent. The listed entry's own
--     parent is shown only if the viewer may see it.
--   * An entry read on its own (GetEntries, the CreateEntry / CreateBranch
--     reply) names its parent and root only if the viewer may see them; else
--     they are NULL (empty on the wire).
--   * Counts are not ids: branch_count still counts every child, seen or not.
--     It allocates branch_order (0..n-1), so it must equal the rows it counts.
-- A deleted entry keeps its place (and id) in the tree: visibility is by
-- privacy, not by deletion.

-- May p_viewer see the entry? A NULL viewer is an internal service acting for
-- no one in particular, which sees everything; FOLLOWERS entries are for their
-- author and the author's followers. The subquery stays inside follows_user,
-- so this expression inlines into the queries that use it, and only FOLLOWERS
-- entries pay for the lookup.
CREATE OR REPLACE FUNCTION entry_visible(e entries, p_viewer text) RETURNS boolean
LANGUAGE sql STABLE
RETURN p_viewer IS NULL OR e.privacy = 'public' OR e.author_id = p_viewer
       OR (e.privacy = 'followers' AND follows_user(p_viewer, e.author_id));

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
CREATE OR REPLACE FUNCTION entry_visible_given(p_privacy privacy, p_author_id text, p_viewer text, p_followed text[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_viewer IS NULL OR p_privacy = 'public' OR p_author_id = p_viewer
       OR (p_privacy = 'followers' AND p_author_id = ANY (p_followed));

-- The authors of FOLLOWERS entries among p_entry_ids that p_viewer follows
-- (none when p_viewer is NULL, who sees everything).
CREATE OR REPLACE FUNCTION followed_authors(p_viewer text, p_entry_ids uuid[]) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    authors  text[];
    followed text[] := '{}';
BEGIN
    IF p_viewer IS NOT NULL THEN
        SELECT coalesce(array_agg(DISTINCT e.author_id), '{}') INTO authors
        FROM entries e
        WHERE e.entry_id = ANY (p_entry_ids) AND e.privacy = 'followers' AND e.author_id <> p_viewer;
        IF cardinality(authors) > 0 THEN
            SELECT coalesce(array_agg(f.followed_id), '{}') INTO followed
            FROM follows f WHERE f.follower_id = p_viewer AND f.followed_id = ANY (authors);
        END IF;
    END IF;
    RETURN followed;
END $$;

-- What p_viewer may see around the entries asked for: the authors of
-- FOLLOWERS entries among them (and their parents and roots) that p_viewer
-- follows, and which of their parents and roots p_viewer may see.
CREATE OR REPLACE FUNCTION viewer_context(p_viewer text, p_entry_ids uuid[], OUT followed text[], OUT visible_links uuid[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    linked uuid[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT link), '{}') INTO linked
    FROM entries e CROSS JOIN LATERAL unnest(ARRAY[e.parent_entry_id, e.root_entry_id]) AS link
    WHERE e.entry_id = ANY (p_entry_ids) AND link IS NOT NULL AND link <> e.entry_id;
    followed := followed_authors(p_viewer, p_entry_ids || linked);  -- one list: one read of their shards
    visible_links := '{}';
    IF cardinality(linked) > 0 THEN  -- an empty list would make Citus read every shard
        SELECT coalesce(array_agg(e.entry_id), '{}') INTO visible_links
        FROM entries e WHERE e.entry_id = ANY (linked) AND entry_visible_given(e.privacy, e.author_id, p_viewer, followed);
    END IF;
END $$;

-- The live, visible entry, or NX404 naming the request field p_field.
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

-- The entry's parent and root ids as p_viewer is shown them: NULL where the
-- viewer may not see that entry. The parent and the root are read one
-- statement each (each on its own shard).
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

-- The whole entry as p_viewer is shown it (for the reply to a create).
CREATE OR REPLACE FUNCTION entry_as_seen(e entries, p_viewer text) RETURNS entries
LANGUAGE plpgsql STABLE AS $$
BEGIN
    SELECT l.parent_entry_id, l.root_entry_id INTO e.parent_entry_id, e.root_entry_id
    FROM visible_links(e, p_viewer) l;
    RETURN e;
END $$;

-- The sums of an entry's counter shards (zeros when it has none).
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

-- Batch reads join the results of these three, each a read of one table
-- filtered by key: a join of the tables Citus runs on every shard. On Citus
-- their statements (and those of followed_authors and viewer_context) are
-- planned with each call's keys (nexus.distribution.CITUS_FUNCTION_SETTINGS),
-- so they read only the asked entries' shards.

-- The live entries among p_entry_ids that p_viewer may see (p_followed: from
-- followed_authors), in no particular order.
CREATE OR REPLACE FUNCTION visible_entries(p_entry_ids uuid[], p_viewer text, p_followed text[])
RETURNS SETOF entries
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM entries e
    WHERE e.entry_id = ANY (p_entry_ids)
      AND e.delete_time IS NULL AND entry_visible_given(e.privacy, e.author_id, p_viewer, p_followed);
END $$;

-- counter_totals of each of p_entry_ids that has counter shards.
CREATE OR REPLACE FUNCTION counter_totals_of(p_entry_ids uuid[])
RETURNS TABLE (entry_id uuid, resonance_count bigint, amplification_count bigint, share_count bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT s.entry_id, sum(s.resonance_count)::bigint, sum(s.amplification_count)::bigint,
           sum(s.share_count)::bigint
    FROM entry_counter_shards s WHERE s.entry_id = ANY (p_entry_ids)
    GROUP BY s.entry_id;
END $$;

-- Whether p_user_id has resonated with / amplified each of p_entry_ids it has
-- reacted to (none when p_user_id is NULL).
CREATE OR REPLACE FUNCTION reaction_states(p_user_id text, p_entry_ids uuid[])
RETURNS TABLE (entry_id uuid, has_resonated boolean, has_amplified boolean)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_user_id IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT r.entry_id, bool_or(r.kind = 'resonance'), bool_or(r.kind = 'amplification')
    FROM reactions r WHERE r.entry_id = ANY (p_entry_ids) AND r.user_id = p_user_id
    GROUP BY r.entry_id;
END $$;

-- Counts of entries in the order asked for; entries p_viewer may not see,
-- deleted and unknown entries are absent.
CREATE OR REPLACE FUNCTION entry_counts(p_entry_ids uuid[], p_viewer text)
RETURNS TABLE (entry_id uuid, resonance_count bigint, amplification_count bigint,
               branch_count bigint, share_count bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT e.entry_id, coalesce(c.resonance_count, 0), coalesce(c.amplification_count, 0), e.branch_count::bigint,
           coalesce(c.share_count, 0)
    FROM visible_entries(p_entry_ids, p_viewer, followed_authors(p_viewer, p_entry_ids)) e
    LEFT JOIN counter_totals_of(p_entry_ids) c ON c.entry_id = e.entry_id
    ORDER BY array_position(p_entry_ids, e.entry_id);
END $$;

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
            USING ERRCODE = 'NX409', COLUMN = 'request_id', DETAIL = 'request_id';
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
        PERFORM feed_publish(p_author_id, new_id, 'authored', created.create_time);
    ELSE
        -- Lock the parent: children of one parent are numbered one at a time.
        SELECT * INTO parent FROM entries
        WHERE entry_id = p_parent_entry_id AND delete_time IS NULL
        FOR NO KEY UPDATE;
        IF NOT FOUND OR NOT entry_visible(parent, p_author_id) THEN
            RAISE EXCEPTION 'entry % not found', p_parent_entry_id
                USING ERRCODE = 'NX404', COLUMN = 'parent_entry_id', DETAIL = 'parent_entry_id';
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

-- Blanks the author's entry (title, content, tags, metadata) and marks it
-- deleted; it keeps its place and id in the tree. NX404 for an entry the
-- user cannot see, NX403 for someone else's.
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
    IF e.depth = 0 THEN
        PERFORM feed_retract(e.author_id, p_entry_id, 'authored');
    END IF;
END $$;

-- Entries with counts and, when p_states_for is set, that user's states; in
-- the order asked for, visible to p_viewer, deleted and unknown ones absent.
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
           coalesce(c.resonance_count, 0), coalesce(c.amplification_count, 0), coalesce(c.share_count, 0),
           coalesce(r.has_resonated, false), coalesce(r.has_amplified, false)
    FROM visible_entries(p_entry_ids, p_viewer, seen.followed) e
    LEFT JOIN counter_totals_of(p_entry_ids) c ON c.entry_id = e.entry_id
    LEFT JOIN reaction_states(p_states_for, p_entry_ids) r ON r.entry_id = e.entry_id
    ORDER BY array_position(p_entry_ids, e.entry_id);
END $$;

-- Depth-first pre-order over the subtree of p_entry_id, after the node whose
-- tree_path is p_after (NULL: from the start), at most p_max_depth levels
-- below it (NULL: no limit), at most p_limit nodes. A node p_viewer may not
-- see is left out with its subtree: the scan resumes at the path of its next
-- sibling, so a hidden subtree costs one index probe however large it is. A
-- page ends on a listed node, never inside a hidden subtree.
CREATE OR REPLACE FUNCTION branch_tree(p_entry_id uuid, p_viewer text, p_max_depth integer,
                                       p_after integer[], p_limit integer)
RETURNS TABLE (entry_id uuid, parent_entry_id uuid, depth integer, branch_order integer,
               deleted boolean, tree_path integer[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    top       entries := visible_entry(p_entry_id, p_viewer, 'root_entry_id');
    -- The subtree is the tree_path range [top.tree_path, next sibling's path).
    upper     integer[] := CASE WHEN top.depth = 0 THEN NULL
                                ELSE top.tree_path[1:top.depth - 1] || (top.tree_path[top.depth] + 1) END;
    from_path integer[] := coalesce(p_after, top.tree_path);
    from_past boolean := p_after IS NOT NULL;  -- whether from_path itself was listed already
    listed    integer := 0;
    skipped   boolean;
    node      entries;
BEGIN
    LOOP
        skipped := false;
        FOR node IN
            SELECT * FROM entries e
            WHERE e.root_entry_id = top.root_entry_id
              AND e.tree_path >= from_path
              AND NOT (from_past AND e.tree_path = from_path)
              AND (upper IS NULL OR e.tree_path < upper)
              AND (p_max_depth IS NULL OR e.depth <= top.depth + p_max_depth)
            ORDER BY e.tree_path
            LIMIT p_limit - listed
        LOOP
            IF NOT entry_visible(node, p_viewer) THEN
                from_path := node.tree_path[1:node.depth - 1] || (node.tree_path[node.depth] + 1);
                from_past := false;
                skipped := true;
                EXIT;
            END IF;
            entry_id := node.entry_id;
            -- Every other listed node's parent is listed too; the top's may be hidden.
            parent_entry_id := CASE WHEN node.entry_id = top.entry_id
                                    THEN (SELECT l.parent_entry_id FROM visible_links(top, p_viewer) l)
                                    ELSE node.parent_entry_id END;
            depth := node.depth;
            branch_order := node.branch_order;
            deleted := node.delete_time IS NOT NULL;
            tree_path := node.tree_path;
            RETURN NEXT;
            listed := listed + 1;
        END LOOP;
        EXIT WHEN NOT skipped;  -- the page is full, or the subtree has no more nodes
    END LOOP;
END $$;

-- Privacy of reply trees: the id of an entry a viewer may not see never
-- reaches that viewer.
--
-- The rule, as a social app shows a conversation: it continues only through
-- entries you can see.
--   * GetBranchTree leaves out an entry the viewer may not see together with
--     its whole subtree: a public reply under a private one would otherwise be
--     listed with the private reply's id as its parent. The listed entry's own
--     parent is shown only if the viewer may see it.
--   * An entry read on its own (GetEntries, the CreateEntry / CreateBranch
--     reply) names its parent and root only if the viewer may see them; else
--     they are NULL (empty on the wire).
--   * Counts are not ids: branch_count still counts every child, seen or not.
--     It allocates branch_order (0..n-1), so it must equal the rows it counts.
-- A deleted entry keeps its place (and id) in the tree as before: visibility
-- is by privacy, not by deletion.

-- The id, if p_viewer may see that entry (NULL viewer: a service, sees all).
CREATE FUNCTION entry_ref(p_entry_id uuid, p_viewer text) RETURNS uuid
LANGUAGE sql STABLE
RETURN CASE WHEN p_viewer IS NULL OR p_entry_id IS NULL THEN p_entry_id
            ELSE (SELECT e.entry_id FROM entries e WHERE e.entry_id = p_entry_id AND entry_visible(e, p_viewer)) END;

-- The entry as p_viewer is shown it: parent and root ids only where visible.
CREATE FUNCTION entry_as_seen(e entries, p_viewer text) RETURNS entries
LANGUAGE plpgsql STABLE AS $$
BEGIN
    e.parent_entry_id := entry_ref(e.parent_entry_id, p_viewer);
    e.root_entry_id := CASE WHEN e.root_entry_id = e.entry_id THEN e.entry_id
                            ELSE entry_ref(e.root_entry_id, p_viewer) END;
    RETURN e;
END $$;

CREATE OR REPLACE FUNCTION get_entries(p_entry_ids uuid[], p_viewer text, p_states_for text)
RETURNS TABLE (entry_id uuid, author_id text, parent_entry_id uuid, root_entry_id uuid, depth integer,
               branch_order integer, type text, title text, content text, privacy privacy, tags text[],
               metadata jsonb, create_time timestamptz, update_time timestamptz, branch_count bigint,
               resonance_count bigint, amplification_count bigint, share_count bigint,
               has_resonated boolean, has_amplified boolean)
LANGUAGE sql STABLE AS $$
    SELECT e.entry_id, e.author_id, seen.parent_entry_id, seen.root_entry_id, e.depth, e.branch_order, e.type,
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
    CROSS JOIN LATERAL entry_as_seen(e, p_viewer) seen
    WHERE e.delete_time IS NULL AND entry_visible(e, p_viewer)
    ORDER BY asked.position
$$;

-- Depth-first pre-order over the subtree of p_entry_id, after the node whose
-- tree_path is p_after (NULL: from the start), at most p_max_depth levels
-- below it (NULL: no limit), at most p_limit nodes. A node p_viewer may not
-- see is left out with its subtree, which follows it in pre-order; the
-- subtree's own nodes are never listed, so a page boundary (always a listed
-- node) never falls inside one.
CREATE OR REPLACE FUNCTION branch_tree(p_entry_id uuid, p_viewer text, p_max_depth integer,
                                       p_after integer[], p_limit integer)
RETURNS TABLE (entry_id uuid, parent_entry_id uuid, depth integer, branch_order integer,
               deleted boolean, tree_path integer[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    top    entries := visible_entry(p_entry_id, p_viewer, 'root_entry_id');
    -- The subtree is the tree_path range [top.tree_path, next sibling's path).
    upper  integer[] := CASE WHEN top.depth = 0 THEN NULL
                             ELSE top.tree_path[1:top.depth - 1] || (top.tree_path[top.depth] + 1) END;
    hidden integer[];  -- the path of the last node left out: its subtree is skipped
    node   entries;
    listed integer := 0;
BEGIN
    IF p_limit < 1 THEN
        RETURN;
    END IF;
    FOR node IN
        SELECT * FROM entries e
        WHERE e.root_entry_id = top.root_entry_id
          AND e.tree_path >= coalesce(p_after, top.tree_path)
          AND (p_after IS NULL OR e.tree_path <> p_after)
          AND (upper IS NULL OR e.tree_path < upper)
          AND (p_max_depth IS NULL OR e.depth <= top.depth + p_max_depth)
        ORDER BY e.tree_path
    LOOP
        CONTINUE WHEN hidden IS NOT NULL AND node.tree_path[1:cardinality(hidden)] = hidden;
        IF NOT entry_visible(node, p_viewer) THEN
            hidden := node.tree_path;
            CONTINUE;
        END IF;
        entry_id := node.entry_id;
        -- Every other listed node's parent is listed too; the top's may be hidden.
        parent_entry_id := CASE WHEN node.entry_id = top.entry_id THEN entry_ref(node.parent_entry_id, p_viewer)
                                ELSE node.parent_entry_id END;
        depth := node.depth;
        branch_order := node.branch_order;
        deleted := node.delete_time IS NOT NULL;
        tree_path := node.tree_path;
        RETURN NEXT;
        listed := listed + 1;
        EXIT WHEN listed = p_limit;
    END LOOP;
END $$;

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

-- The entry's parent and root ids as p_viewer is shown them: NULL where the
-- viewer may not see that entry (a NULL viewer, a service, sees all). Plain
-- SQL, so it inlines into the queries that use it.
CREATE FUNCTION visible_links(e entries, p_viewer text)
RETURNS TABLE (parent_entry_id uuid, root_entry_id uuid)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN entry_visible(parent, p_viewer) THEN e.parent_entry_id END,
           CASE WHEN e.root_entry_id = e.entry_id OR entry_visible(root, p_viewer) THEN e.root_entry_id END
    FROM (VALUES (e.parent_entry_id, e.root_entry_id)) AS link (parent_id, root_id)
    LEFT JOIN entries parent ON parent.entry_id = link.parent_id
    LEFT JOIN entries root ON root.entry_id = link.root_id
$$;

-- The whole entry as p_viewer is shown it (for the reply to a create).
CREATE FUNCTION entry_as_seen(e entries, p_viewer text) RETURNS entries
LANGUAGE plpgsql STABLE AS $$
BEGIN
    SELECT l.parent_entry_id, l.root_entry_id INTO e.parent_entry_id, e.root_entry_id
    FROM visible_links(e, p_viewer) l;
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
    CROSS JOIN LATERAL visible_links(e, p_viewer) seen
    WHERE e.delete_time IS NULL AND entry_visible(e, p_viewer)
    ORDER BY asked.position
$$;

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

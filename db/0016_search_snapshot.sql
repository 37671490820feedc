-- A search reads its memories at one instant (issue 11 review).
--
-- search_memories ranks in one statement and reads the page's memories in
-- another (and hybrid search ranks text and vectors apart). Declared VOLATILE,
-- as they were, each statement took a new snapshot: a memory deleted between
-- them left a hole in the page (9 results of 10 while more matched), and one
-- updated between them came back with its new content beside the old score.
-- A STABLE function's statements all read the calling query's snapshot.
-- These only read; what they call is STABLE or IMMUTABLE, except set_config
-- (a built-in that runs no statement, so takes no snapshot).

ALTER FUNCTION memory_vector_nearest(text, real[], text, integer, double precision, timestamptz, text, integer) STABLE;
ALTER FUNCTION memory_hybrid_top(text, real[], text, text, integer, double precision, timestamptz, text,
                                 double precision, integer) STABLE;
ALTER FUNCTION search_memories(text, real[], text, text, integer, double precision, timestamptz, text,
                               double precision, integer, double precision, double precision) STABLE;

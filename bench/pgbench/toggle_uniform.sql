-- ToggleResonance spread over 100k entries (bench/pgbench/setup.sql makes them).
\set entry random(1, 100000)
\set user random(1, 1000000)
SELECT toggle_reaction('resonance', 'bench-user-' || :user, md5('bench-entry-' || :entry)::uuid);

-- ToggleResonance by many users on one viral entry.
\set user random(1, 1000000)
SELECT toggle_reaction('resonance', 'bench-user-' || :user, md5('bench-entry-1')::uuid);

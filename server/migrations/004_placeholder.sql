-- Placeholder for version 4, which another branch (the relay's own next migration) fills in;
-- it lets the console's 005 run on this branch. Renumbered at merge.
SELECT 1;

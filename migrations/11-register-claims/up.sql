-- Which daemon runs a machine's registration, and until when: a claim taken before a run and
-- renewed while it goes on, so that of several daemons sharing one inventory exactly one
-- runs it, and another takes it over once the claim runs out (its daemon died).
CREATE TABLE register_claims (
    mac     TEXT PRIMARY KEY NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
    daemon  TEXT NOT NULL,
    until   INTEGER NOT NULL
);

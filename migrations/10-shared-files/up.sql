-- Files every daemon sharing one inventory must hold the same copy of: the node CA (its key
-- and certificate), the daemon's SSH key, the admin token. Used when several daemons share a
-- PostgreSQL database: each is sealed (ChaCha20-Poly1305) with the key every daemon is given
-- (--secret-key-file), named by its path under the data directory. A daemon on its own SQLite
-- file keeps them only in its data directory, and this table stays empty.
CREATE TABLE shared_files (
    name        TEXT PRIMARY KEY NOT NULL,
    sealed      BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Relay schema, version 4: the agency console (office users signing in with a browser).

-- An office user's sign-in name and password (argon2id, PHC string); NULL until the user has
-- followed their one-time set-password link.
CREATE TABLE console_logins (
    user_id         TEXT PRIMARY KEY REFERENCES users (id),
    login           TEXT NOT NULL UNIQUE,
    password_hash   TEXT,
    password_set_at INTEGER,
    created_at      INTEGER NOT NULL
) STRICT;

-- One-time set-password links, stored only as SHA-256 of the token.
CREATE TABLE console_password_links (
    token_hash BLOB PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    used_at    INTEGER
) STRICT;
CREATE INDEX console_password_links_user ON console_password_links (user_id);

-- Signed-in browser sessions: the cookie's secret is stored as SHA-256; `id` (`web_…`) is what
-- audit rows name as the device.
CREATE TABLE console_sessions (
    token_hash     BLOB PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    user_id        TEXT NOT NULL REFERENCES users (id),
    csrf           TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL
) STRICT;
CREATE INDEX console_sessions_user ON console_sessions (user_id);

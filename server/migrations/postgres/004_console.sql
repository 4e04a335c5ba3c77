-- Relay schema on PostgreSQL, version 4 (mirrors ../004_console.sql): the agency console.

CREATE TABLE console_logins (
    user_id         TEXT PRIMARY KEY REFERENCES users (id),
    login           TEXT NOT NULL UNIQUE,
    password_hash   TEXT,
    password_set_at BIGINT,
    created_at      BIGINT NOT NULL
);

CREATE TABLE console_password_links (
    token_hash BYTEA PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    used_at    BIGINT
);
CREATE INDEX console_password_links_user ON console_password_links (user_id);

CREATE TABLE console_sessions (
    token_hash     BYTEA PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    user_id        TEXT NOT NULL REFERENCES users (id),
    csrf           TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    last_active_at BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL
);
CREATE INDEX console_sessions_user ON console_sessions (user_id);

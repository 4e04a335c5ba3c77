-- Per-peer automerge sync state, so a reconnect resumes instead of starting over.
CREATE TABLE sync_states (
    peer_id  TEXT NOT NULL,
    doc_id   BLOB NOT NULL,
    state    BLOB NOT NULL,
    PRIMARY KEY (peer_id, doc_id)
) WITHOUT ROWID;

-- Receipts: the heads the relay confirmed durable, and when.
CREATE TABLE receipts (
    doc_id        BLOB NOT NULL,
    peer_id       TEXT NOT NULL,
    heads         TEXT NOT NULL,
    confirmed_at  INTEGER NOT NULL,
    PRIMARY KEY (doc_id, peer_id)
) WITHOUT ROWID;

-- Change-feed cursor per relay.
CREATE TABLE feed_cursors (
    peer_id  TEXT PRIMARY KEY,
    cursor   TEXT NOT NULL
) WITHOUT ROWID;

-- Documents the relay refused, with the reason, shown to the user; never silently retried.
CREATE TABLE sync_failures (
    doc_id   BLOB NOT NULL,
    peer_id  TEXT NOT NULL,
    reason   TEXT NOT NULL,
    at       INTEGER NOT NULL,
    PRIMARY KEY (doc_id, peer_id)
) WITHOUT ROWID;

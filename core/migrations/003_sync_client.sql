-- The device side of sync (core::sync): which relay storage each configured relay served, this
-- store's own storage id, and retry bookkeeping for refused documents.

-- Receipts, sync states and feed cursors are keyed by the relay's `storageId` (from its `peer`
-- message); this maps the relay address the app is configured with to the storage it served
-- last, so a pass can read the change feed before it opens a WebSocket. A relay restored
-- onto a new storage gets a new id, and nothing confirmed by the old one counts for it.
CREATE TABLE sync_relays (
    relay       TEXT PRIMARY KEY,
    peer_id     TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- The `storageId` this store advertises in `join`, so the relay keeps its sync state for us
-- across connections. Random per store file: a reinstalled app is a new storage.
CREATE TABLE sync_identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    storage_id  TEXT NOT NULL
);

-- `kind`: 'refused' (the relay answered doc-unavailable for data only this device holds) or
-- 'unauthorized' (the token was rejected while the document had unconfirmed changes).
-- Refused documents are retried no earlier than `retry_at` (exponential backoff by `attempts`).
ALTER TABLE sync_failures ADD COLUMN kind TEXT NOT NULL DEFAULT 'refused';
ALTER TABLE sync_failures ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
ALTER TABLE sync_failures ADD COLUMN retry_at INTEGER NOT NULL DEFAULT 0;

-- Relay schema, version 1.
--
-- Times are milliseconds since the Unix epoch (UTC). Document ids are the 16 raw bytes of the
-- automerge-repo document id (so they sort like `DocumentId`); heads are concatenated 32-byte
-- change hashes. `seq` columns are positions in the relay-wide sequence kept in `counters`.

CREATE TABLE relay_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
INSERT INTO counters (name, value) VALUES ('seq', 0);

CREATE TABLE agencies (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    agency_id  TEXT NOT NULL REFERENCES agencies (id),
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('clinician', 'office', 'admin')),
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX users_agency ON users (agency_id);

CREATE TABLE patients (
    id                TEXT PRIMARY KEY,
    agency_id         TEXT NOT NULL REFERENCES agencies (id),
    chart_document_id BLOB NOT NULL,
    created_at        INTEGER NOT NULL
) STRICT;
CREATE INDEX patients_agency ON patients (agency_id);

CREATE TABLE care_team (
    user_id     TEXT NOT NULL REFERENCES users (id),
    patient_id  TEXT NOT NULL REFERENCES patients (id),
    seq         INTEGER NOT NULL,
    assigned_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, patient_id)
) STRICT;
CREATE INDEX care_team_patient ON care_team (patient_id);

CREATE TABLE devices (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    name        TEXT NOT NULL,
    token_hash  BLOB NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    revoked_seq INTEGER
) STRICT;
CREATE INDEX devices_user ON devices (user_id);
CREATE INDEX devices_revoked_seq ON devices (revoked_seq) WHERE revoked_seq IS NOT NULL;

CREATE TABLE documents (
    id         BLOB PRIMARY KEY,
    agency_id  TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    heads      BLOB NOT NULL,
    seq        INTEGER NOT NULL,
    snapshot   BLOB,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE INDEX documents_agency_seq ON documents (agency_id, seq, id);
CREATE INDEX documents_patient ON documents (patient_id, seq, id);

-- Incremental chunks appended after the document's snapshot; compaction deletes them in the
-- transaction that writes the snapshot replacing them.
CREATE TABLE document_chunks (
    id          INTEGER PRIMARY KEY,
    document_id BLOB NOT NULL REFERENCES documents (id),
    bytes       BLOB NOT NULL
) STRICT;
CREATE INDEX document_chunks_document ON document_chunks (document_id, id);

CREATE TABLE peer_sync_states (
    user_id     TEXT NOT NULL,
    storage_id  TEXT NOT NULL,
    document_id BLOB NOT NULL,
    state       BLOB NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (user_id, storage_id, document_id)
) STRICT;

CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    agency_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    document_id BLOB NOT NULL,
    patient_id  TEXT,
    action      TEXT NOT NULL CHECK (action IN ('read', 'write', 'deny')),
    heads       BLOB NOT NULL
) STRICT;
CREATE INDEX audit_log_patient ON audit_log (patient_id, at);
CREATE INDEX audit_log_user ON audit_log (user_id, at);
CREATE INDEX audit_log_at ON audit_log (at);

-- The audit log is append-only, whoever holds the database.
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

-- Relay schema on PostgreSQL, version 1 (mirrors ../001_initial.sql).
--
-- Times are milliseconds since the Unix epoch (UTC). Document ids are the 16 raw bytes of the
-- automerge-repo document id (bytea compares bytewise, so they sort like `DocumentId`); heads
-- are concatenated 32-byte change hashes. `seq` columns are positions in the relay-wide
-- sequence kept in `counters`: the row is updated in the transaction that takes a position, so
-- its row lock serialises those transactions and they commit in sequence order.

CREATE TABLE relay_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('seq', 0);

CREATE TABLE agencies (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    agency_id  TEXT NOT NULL REFERENCES agencies (id),
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('clinician', 'office', 'admin')),
    created_at BIGINT NOT NULL
);
CREATE INDEX users_agency ON users (agency_id);

CREATE TABLE patients (
    id                TEXT PRIMARY KEY,
    agency_id         TEXT NOT NULL REFERENCES agencies (id),
    chart_document_id BYTEA NOT NULL,
    created_at        BIGINT NOT NULL
);
CREATE INDEX patients_agency ON patients (agency_id);

CREATE TABLE care_team (
    user_id     TEXT NOT NULL REFERENCES users (id),
    patient_id  TEXT NOT NULL REFERENCES patients (id),
    seq         BIGINT NOT NULL,
    assigned_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, patient_id)
);
CREATE INDEX care_team_patient ON care_team (patient_id);

CREATE TABLE devices (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    name        TEXT NOT NULL,
    token_hash  BYTEA NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    revoked_seq BIGINT
);
CREATE INDEX devices_user ON devices (user_id);
CREATE INDEX devices_revoked_seq ON devices (revoked_seq) WHERE revoked_seq IS NOT NULL;

CREATE TABLE documents (
    id         BYTEA PRIMARY KEY,
    agency_id  TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    heads      BYTEA NOT NULL,
    seq        BIGINT NOT NULL,
    snapshot   BYTEA,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX documents_agency_seq ON documents (agency_id, seq, id);
CREATE INDEX documents_patient ON documents (patient_id, seq, id);

-- Incremental chunks appended after the document's snapshot; compaction deletes them in the
-- transaction that writes the snapshot replacing them (under the document row's lock).
CREATE TABLE document_chunks (
    id          BIGSERIAL PRIMARY KEY,
    document_id BYTEA NOT NULL REFERENCES documents (id),
    bytes       BYTEA NOT NULL
);
CREATE INDEX document_chunks_document ON document_chunks (document_id, id);

CREATE TABLE peer_sync_states (
    user_id     TEXT NOT NULL,
    storage_id  TEXT NOT NULL,
    document_id BYTEA NOT NULL,
    state       BYTEA NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (user_id, storage_id, document_id)
);

CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    agency_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    document_id BYTEA NOT NULL,
    patient_id  TEXT,
    action      TEXT NOT NULL CONSTRAINT audit_log_action_check CHECK (action IN ('read', 'write', 'deny')),
    heads       BYTEA NOT NULL
);
CREATE INDEX audit_log_patient ON audit_log (patient_id, at);
CREATE INDEX audit_log_user ON audit_log (user_id, at);
CREATE INDEX audit_log_at ON audit_log (at);

-- The audit log is append-only, whoever holds the database.
CREATE FUNCTION fieldchart_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION fieldchart_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION fieldchart_append_only();

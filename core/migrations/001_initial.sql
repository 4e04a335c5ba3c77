-- Documents: one automerge document each, stored as a snapshot plus incremental chunks.
CREATE TABLE documents (
    doc_id      BLOB PRIMARY KEY,
    kind        TEXT,
    patient_id  TEXT,
    agency_id   TEXT,
    snapshot    BLOB,
    updated_at  INTEGER NOT NULL,
    -- 1 while the document has local changes the relay has not confirmed.
    unsynced    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX documents_unsynced ON documents(unsynced) WHERE unsynced = 1;

CREATE TABLE chunks (
    id      INTEGER PRIMARY KEY,
    doc_id  BLOB NOT NULL,
    bytes   BLOB NOT NULL
);
CREATE INDEX chunks_doc ON chunks(doc_id, id);

-- Index tables: kept in the same transaction as the document write.
CREATE TABLE patients (
    patient_id  TEXT NOT NULL,
    doc_id      BLOB PRIMARY KEY,
    agency_id   TEXT NOT NULL,
    name        TEXT
) WITHOUT ROWID;
CREATE INDEX patients_by_id ON patients(patient_id);

CREATE TABLE notes (
    doc_id        BLOB PRIMARY KEY,
    patient_id    TEXT NOT NULL,
    visit_date    TEXT,
    status        TEXT NOT NULL,
    clinician_id  TEXT,
    service_type  TEXT,
    started_at    INTEGER,
    signed_at     INTEGER
) WITHOUT ROWID;
CREATE INDEX notes_by_patient ON notes(patient_id, visit_date);
CREATE INDEX notes_by_date ON notes(visit_date);
CREATE INDEX notes_by_status ON notes(status);

CREATE TABLE conflicts (
    doc_id       BLOB NOT NULL,
    path         TEXT NOT NULL,
    values_json  TEXT NOT NULL,
    PRIMARY KEY (doc_id, path)
) WITHOUT ROWID;

CREATE TABLE review_items (
    doc_id     BLOB NOT NULL,
    change     TEXT NOT NULL,
    item_json  TEXT NOT NULL,
    PRIMARY KEY (doc_id, change)
) WITHOUT ROWID;

-- Local audit trail (HIPAA audit controls on the device): append-only.
CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    action     TEXT NOT NULL,
    doc_id     BLOB,
    patient_id TEXT,
    detail     TEXT
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

-- Relay schema (PostgreSQL), version 5: devices' sync failures, as the devices report them, for
-- the console's review queue (the same table as the SQLite backend's 005). Each device reports
-- its whole current list after a pass (document id, kind, reason, time, attempts; never note
-- content): its rows are replaced in one transaction, so a document a later pass synced is gone.
CREATE TABLE device_sync_failures (
    device_id     TEXT NOT NULL REFERENCES devices (id),
    document_id   BYTEA NOT NULL,
    agency_id     TEXT NOT NULL REFERENCES agencies (id),
    user_id       TEXT NOT NULL REFERENCES users (id),
    -- The patient, when the relay knows them in the device's agency (NULL otherwise).
    patient_id    TEXT REFERENCES patients (id),
    -- The document's kind as the device indexed it (`visit-note`, `patient`), if known.
    document_kind TEXT,
    -- `refused` (the relay would not take the device's data) or `invalid` (the relay's data
    -- could not be applied on the device).
    failure       TEXT NOT NULL,
    reason        TEXT NOT NULL,
    at_ms         BIGINT NOT NULL,
    attempts      BIGINT NOT NULL,
    reported_at   BIGINT NOT NULL,
    PRIMARY KEY (device_id, document_id)
);
CREATE INDEX device_sync_failures_agency ON device_sync_failures (agency_id, at_ms);

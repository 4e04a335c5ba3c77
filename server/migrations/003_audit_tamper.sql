-- Signed notes: refused tampering is audited as `tamper`. SQLite cannot change a CHECK
-- constraint in place, so the append-only audit log is rebuilt with the wider CHECK, rows copied
-- as they are (ids kept), and its indexes and append-only triggers made again.
DROP TRIGGER audit_log_no_update;
DROP TRIGGER audit_log_no_delete;
ALTER TABLE audit_log RENAME TO audit_log_v2;
CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    agency_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    document_id BLOB NOT NULL,
    patient_id  TEXT,
    action      TEXT NOT NULL CHECK (action IN ('read', 'write', 'deny', 'tamper')),
    heads       BLOB NOT NULL
) STRICT;
INSERT INTO audit_log (id, at, agency_id, user_id, device_id, document_id, patient_id, action, heads)
    SELECT id, at, agency_id, user_id, device_id, document_id, patient_id, action, heads FROM audit_log_v2;
DROP TABLE audit_log_v2;
CREATE INDEX audit_log_patient ON audit_log (patient_id, at);
CREATE INDEX audit_log_user ON audit_log (user_id, at);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

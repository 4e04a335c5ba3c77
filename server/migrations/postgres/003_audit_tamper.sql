-- Relay schema on PostgreSQL, version 3 (mirrors ../003_audit_tamper.sql): refused tampering
-- with a signed note is audited as `tamper`. PostgreSQL changes the CHECK in place; no row is
-- touched (so the append-only triggers stay as they are).
ALTER TABLE audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check
    CHECK (action IN ('read', 'write', 'deny', 'tamper'));

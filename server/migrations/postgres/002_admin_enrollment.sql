-- Relay schema on PostgreSQL, version 2 (mirrors ../002_admin_enrollment.sql): accountable
-- administration, enrollment, device keys, offboarding.

ALTER TABLE users ADD COLUMN disabled_at BIGINT;

ALTER TABLE devices ADD COLUMN public_key BYTEA CHECK (public_key IS NULL OR length(public_key) = 32);
ALTER TABLE devices ADD COLUMN enrolled_by TEXT;
ALTER TABLE devices ADD COLUMN last_seen_at BIGINT;
CREATE INDEX devices_key ON devices (user_id) WHERE public_key IS NOT NULL;

CREATE TABLE enrollment_codes (
    code_hash   BYTEA PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    device_name TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    used_at     BIGINT,
    device_id   TEXT
);
CREATE INDEX enrollment_codes_user ON enrollment_codes (user_id);

CREATE TABLE admin_log (
    id              BIGSERIAL PRIMARY KEY,
    at              BIGINT NOT NULL,
    agency_id       TEXT,
    actor           TEXT NOT NULL,
    actor_device_id TEXT,
    source          TEXT NOT NULL CHECK (source IN ('cli', 'http')),
    remote_addr     TEXT,
    action          TEXT NOT NULL,
    target          TEXT NOT NULL,
    details         TEXT NOT NULL
);
CREATE INDEX admin_log_agency ON admin_log (agency_id, id);
CREATE INDEX admin_log_target ON admin_log (target, id);
CREATE INDEX admin_log_actor ON admin_log (actor, id);

CREATE TRIGGER admin_log_no_update BEFORE UPDATE OR DELETE ON admin_log
    FOR EACH ROW EXECUTE FUNCTION fieldchart_append_only();
CREATE TRIGGER admin_log_no_truncate BEFORE TRUNCATE ON admin_log
    FOR EACH STATEMENT EXECUTE FUNCTION fieldchart_append_only();

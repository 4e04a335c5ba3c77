-- Relay schema, version 2: accountable administration, enrollment, device keys, offboarding.

-- A disabled user keeps their history but can get no new device, and every device they had is
-- revoked in the transaction that disables them.
ALTER TABLE users ADD COLUMN disabled_at INTEGER;

-- The Ed25519 public key a device enrolled with (32 bytes; NULL for devices given a bare token),
-- who provisioned it (`usr_…` of an admin, or `cli:<operator>`), and when it last authenticated
-- (updated at most once a minute).
ALTER TABLE devices ADD COLUMN public_key BLOB CHECK (public_key IS NULL OR length(public_key) = 32);
ALTER TABLE devices ADD COLUMN enrolled_by TEXT;
ALTER TABLE devices ADD COLUMN last_seen_at INTEGER;
CREATE INDEX devices_key ON devices (user_id) WHERE public_key IS NOT NULL;

-- One-time enrollment codes, stored only as SHA-256; `used_at`/`device_id` are set in the
-- transaction that creates the device.
CREATE TABLE enrollment_codes (
    code_hash   BLOB PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    device_name TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    used_at     INTEGER,
    device_id   TEXT
) STRICT;
CREATE INDEX enrollment_codes_user ON enrollment_codes (user_id);

-- Administrative actions: who (actor), from where (source, remote address), what (action,
-- target, details), when. Written in the transaction of the change it records.
CREATE TABLE admin_log (
    id              INTEGER PRIMARY KEY,
    at              INTEGER NOT NULL,
    agency_id       TEXT,
    actor           TEXT NOT NULL,
    actor_device_id TEXT,
    source          TEXT NOT NULL CHECK (source IN ('cli', 'http')),
    remote_addr     TEXT,
    action          TEXT NOT NULL,
    target          TEXT NOT NULL,
    details         TEXT NOT NULL
) STRICT;
CREATE INDEX admin_log_agency ON admin_log (agency_id, id);
CREATE INDEX admin_log_target ON admin_log (target, id);
CREATE INDEX admin_log_actor ON admin_log (actor, id);

CREATE TRIGGER admin_log_no_update BEFORE UPDATE ON admin_log
BEGIN
    SELECT RAISE(ABORT, 'admin_log is append-only');
END;
CREATE TRIGGER admin_log_no_delete BEFORE DELETE ON admin_log
BEGIN
    SELECT RAISE(ABORT, 'admin_log is append-only');
END;

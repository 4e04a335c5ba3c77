-- Signing (issue: signed notes that cannot be forged). The device's Ed25519 key pair is made on
-- the device; its secret lives only here, inside the SQLCipher-encrypted file. The relay learns
-- the public key at enrollment.
CREATE TABLE device_key (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    secret      BLOB NOT NULL,
    public_key  BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

-- The agency's device keys as last fetched from the relay (`GET /v1/keys`), so signatures verify
-- offline. One row: the whole directory as the relay published it.
CREATE TABLE key_directory (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    json        TEXT NOT NULL,
    fetched_at  INTEGER NOT NULL
);

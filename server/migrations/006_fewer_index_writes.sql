-- Relay schema, version 6: fewer pages rewritten per write.
--
-- `audit_log_patient` (patient_id, at) and `audit_log_user` (user_id, at) served no query: the
-- one audit query (`query_audit_tx`: a time range, optionally one patient and/or one user,
-- ordered by time) is planned on `audit_log_at`, because its optional filters
-- (`?3 IS NULL OR patient_id = ?3`) cannot use an index. Each of them still cost one random
-- leaf page per audit row, rewritten to the WAL in every commit that appended one (a third of
-- the bytes a sync storm wrote). The rows themselves and their append-only triggers are
-- unchanged.
DROP INDEX audit_log_patient;
DROP INDEX audit_log_user;

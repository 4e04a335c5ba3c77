//! Signatures on visit notes: device keys, the signed payload, verification, and the ledger that
//! reads signed-ness from a note's history rather than from its current value.
//!
//! # What a signature is
//! A device holds an Ed25519 key pair made on the device (the secret stays in the encrypted
//! store); the relay learns the public key at enrollment and publishes the agency's keys
//! ([`KeyDirectory`]). Signing appends an entry `{payload, signature}` to the note's
//! `signatures` list, in one change. `payload` is a JSON text ([`SignaturePayload`], versioned)
//! naming the document, the heads at signing, the SHA-256 of the canonical rendering at those
//! heads (rendering versioned), the signer's user, device and role, and the time;
//! `signature` is the Ed25519 signature (hex) over [`SIGNATURE_DOMAIN`] followed by the payload's
//! exact bytes. Verifying the exact stored bytes means no re-canonicalisation can disagree.
//!
//! # Signed-ness comes from history
//! [`NoteLedger`] walks a note's changes (incrementally: each call looks only at changes it has
//! not seen) and records every signature entry ever written, even one a later change deleted.
//! It reports, without trusting the current value of anything:
//! - tampering: a signature entry deleted or altered after the change that wrote it, the
//!   `signatures` list replaced, or a root identity field (`kind`, `patientId`, `agencyId`)
//!   written after it was first set (including a concurrent, losing value);
//! - changes that are not part of the signed version: concurrent with the signature (an offline
//!   edit that had not seen it) or body edits causally after it, coalesced per author, field set
//!   and burst, so typing is one review item, not one per keystroke.
//!
//! The same ledger and [`verify`] run on devices and on the relay: one routine, used twice.

use std::collections::{BTreeMap, HashMap, HashSet};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ChangeHash, ObjType, ROOT, ReadDoc, ScalarValue};
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Actor, Role, change_author_of, get_string};
use crate::protocol::DocumentId;
use crate::{Error, Result};

/// Version of [`SignaturePayload`] this build writes and accepts.
pub const PAYLOAD_VERSION: u32 = 1;
/// Version of the canonical rendering (see `visit_note::canonical_rendering`).
pub const RENDERING_VERSION: u32 = 1;
/// Bytes prepended to the payload before signing, so a Fieldchart signature can never be
/// replayed as a signature over anything else made with the same key.
pub const SIGNATURE_DOMAIN: &[u8] = b"fieldchart-note-signature\0";
/// Root key of the signature list.
pub const SIGNATURES_KEY: &str = "signatures";
/// Root fields fixed once set: the relay decides access from them.
pub const IDENTITY_KEYS: &[&str] = &["kind", "patientId", "agencyId"];
/// Root keys that may change after signing without altering the signed body.
pub const AFTER_SIGNING_KEYS: &[&str] = &[SIGNATURES_KEY, "status", "addenda", "resolutions"];
/// How far in the future a signature's time may lie (device clocks drift).
pub const MAX_CLOCK_SKEW_MS: i64 = 10 * 60 * 1000;
/// Changes by one author to the same fields further apart than this start a new review item.
pub const REVIEW_BURST_GAP_MS: i64 = 10 * 60 * 1000;
/// Longest payload text accepted (a payload is a few hundred bytes).
const MAX_PAYLOAD_BYTES: usize = 16 * 1024;

/// A device's signing key. The secret never leaves the device's encrypted store.
pub struct DeviceKey(ed25519_dalek::SigningKey);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey")
            .field("public", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl DeviceKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> DeviceKey {
        let mut secret = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut secret);
        DeviceKey(ed25519_dalek::SigningKey::from_bytes(&secret))
    }

    /// Rebuild from the 32 secret bytes kept in the store.
    pub fn from_secret(secret: &[u8; 32]) -> DeviceKey {
        DeviceKey(ed25519_dalek::SigningKey::from_bytes(secret))
    }

    /// The secret bytes (for the encrypted store only).
    pub(crate) fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key the relay binds to this device at enrollment.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

/// One device key published by the relay (`GET /v1/keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectoryKey {
    /// The user the device belongs to.
    pub user_id: String,
    /// That user's role (`clinician`, `office`, `admin`).
    pub role: String,
    /// The device.
    pub device_id: String,
    /// Ed25519 public key, hex.
    pub public_key: String,
    /// When the device enrolled, ms since the epoch.
    pub enrolled_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
}

/// The agency's device keys, as published by the relay; devices keep a copy to verify offline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyDirectory {
    /// The agency.
    pub agency_id: String,
    /// Every device key, revoked ones included (old signatures stay verifiable).
    pub keys: Vec<DirectoryKey>,
}

impl KeyDirectory {
    /// Parse the relay's JSON. Malformed keys are an error, not skipped.
    pub fn parse(json: &str) -> Result<KeyDirectory> {
        let dir: KeyDirectory = serde_json::from_str(json)
            .map_err(|e| Error::InvalidInput(format!("key directory: {e}")))?;
        for k in &dir.keys {
            parse_public_key(&k.public_key)?;
        }
        Ok(dir)
    }

    /// The key of a device.
    pub fn device(&self, device_id: &str) -> Option<&DirectoryKey> {
        self.keys.iter().find(|k| k.device_id == device_id)
    }
}

fn parse_public_key(hex_key: &str) -> Result<ed25519_dalek::VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::InvalidInput("public key is not 32 bytes of hex".into()))?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| Error::InvalidInput("public key is not an Ed25519 point".into()))
}

/// What a signature covers. Stored as JSON text; verified over its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignaturePayload {
    /// [`PAYLOAD_VERSION`].
    pub v: u32,
    /// The note (bs58check document id).
    pub document_id: String,
    /// Document heads at signing, hex, sorted.
    pub heads: Vec<String>,
    /// [`RENDERING_VERSION`] of the rendering hashed.
    pub rendering: u32,
    /// SHA-256 (hex) of the canonical rendering at `heads`.
    pub content_hash: String,
    /// Signer's user id.
    pub user_id: String,
    /// Signer's device id.
    pub device_id: String,
    /// Signer's role when signing.
    pub role: String,
    /// When, ms since the epoch (device clock).
    pub signed_at_ms: i64,
}

impl SignaturePayload {
    /// The heads, parsed.
    pub fn change_hashes(&self) -> Option<Vec<ChangeHash>> {
        self.heads.iter().map(|h| h.parse().ok()).collect()
    }
}

/// A signature entry as found in a note's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// The entry's object id in the document.
    pub entry: String,
    /// The change that wrote it (hex).
    pub change: String,
    /// The payload, parsed (`None`: malformed).
    pub payload: Option<SignaturePayload>,
    /// The payload text as stored.
    pub payload_json: String,
    /// The signature, hex as stored.
    pub signature: String,
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InvalidSignature {
    /// Payload or signature unreadable, or an unknown version.
    Malformed,
    /// The payload names another document.
    WrongDocument,
    /// No key is published for the device.
    UnknownKey,
    /// The device's key belongs to another user.
    KeyOfAnotherUser,
    /// The key was revoked before the signing time.
    KeyRevoked,
    /// The signing time is before enrollment or too far in the future.
    BadTime,
    /// The Ed25519 signature does not verify.
    BadSignature,
    /// The rendering at the signed heads does not hash to the signed content hash.
    ContentMismatch,
    /// The signer may not sign this note (role or care team).
    NotAllowed,
}

/// Result of verifying one signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
pub enum Verdict {
    /// Cryptographically valid, by an enrolled, unrevoked key of an allowed signer, over the
    /// rendering at the signed heads.
    Valid,
    /// The signed heads are not all in this replica yet.
    HeadsMissing,
    /// Does not verify.
    Invalid(InvalidSignature),
}

/// Who may sign which note (DOMAIN: the clinicians caring for the patient sign their visits).
pub trait SigningPolicy {
    /// `Some(true/false)` when known; `None` when this replica cannot tell (e.g. a device
    /// without the patient's chart), which is not held against the signature.
    fn may_sign(&self, user_id: &str, role: &str, patient_id: &str) -> Option<bool>;
}

/// The role rule alone: clinicians sign visit notes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoleOnly;

impl SigningPolicy for RoleOnly {
    fn may_sign(&self, _user: &str, role: &str, _patient: &str) -> Option<bool> {
        (role != Role::Clinician.as_str()).then_some(false)
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn signed_message(payload_json: &str) -> Vec<u8> {
    let mut m = SIGNATURE_DOMAIN.to_vec();
    m.extend_from_slice(payload_json.as_bytes());
    m
}

/// Sign the note as it is now: appends a signature entry (and sets `status`). The caller commits.
pub fn sign(
    doc: &mut AutoCommit,
    id: DocumentId,
    key: &DeviceKey,
    actor: &Actor,
    role: Role,
    now_ms: i64,
) -> Result<SignaturePayload> {
    let mut heads = doc.get_heads();
    heads.sort();
    let rendering = super::visit_note::canonical_rendering(doc, &heads);
    let payload = SignaturePayload {
        v: PAYLOAD_VERSION,
        document_id: id.to_string(),
        heads: heads.iter().map(|h| h.to_string()).collect(),
        rendering: RENDERING_VERSION,
        content_hash: sha256_hex(&rendering),
        user_id: actor.user_id.clone(),
        device_id: actor.device_id.clone(),
        role: role.as_str().to_owned(),
        signed_at_ms: now_ms,
    };
    let payload_json = serde_json::to_string(&payload)?;
    let signature = key.sign(&signed_message(&payload_json));
    let list = super::ensure_obj(doc, &ROOT, SIGNATURES_KEY, ObjType::List)?;
    let at = doc.length(&list);
    let entry = doc.insert_object(&list, at, ObjType::Map)?;
    doc.put(&entry, "payload", payload_json.as_str())?;
    doc.put(&entry, "signature", hex::encode(signature).as_str())?;
    doc.put(ROOT, "status", super::NoteStatus::Signed.as_str())?;
    Ok(payload)
}

/// Verify one signature entry of note `id` against the agency's keys and a signing policy.
pub fn verify(
    doc: &Automerge,
    id: DocumentId,
    entry: &SignatureEntry,
    keys: &KeyDirectory,
    policy: &dyn SigningPolicy,
) -> Verdict {
    use InvalidSignature as I;
    let invalid = Verdict::Invalid;
    let Some(payload) = &entry.payload else {
        return invalid(I::Malformed);
    };
    if payload.v != PAYLOAD_VERSION || payload.rendering != RENDERING_VERSION {
        return invalid(I::Malformed);
    }
    if payload.document_id != id.to_string() {
        return invalid(I::WrongDocument);
    }
    let Some(key) = keys.device(&payload.device_id) else {
        return invalid(I::UnknownKey);
    };
    if key.user_id != payload.user_id {
        return invalid(I::KeyOfAnotherUser);
    }
    let Ok(public) = parse_public_key(&key.public_key) else {
        return invalid(I::UnknownKey);
    };
    let Some(sig) = hex::decode(&entry.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return invalid(I::Malformed);
    };
    if public
        .verify(
            &signed_message(&entry.payload_json),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .is_err()
    {
        return invalid(I::BadSignature);
    }
    if key.revoked_at_ms.is_some_and(|r| r <= payload.signed_at_ms) {
        return invalid(I::KeyRevoked);
    }
    if payload.signed_at_ms < key.enrolled_at_ms {
        return invalid(I::BadTime);
    }
    // The key directory's role is authoritative; the payload's must agree with it.
    if key.role != payload.role {
        return invalid(I::NotAllowed);
    }
    let patient = get_string(doc, &ROOT, "patientId").unwrap_or_default();
    if RoleOnly.may_sign(&key.user_id, &key.role, &patient) == Some(false)
        || policy.may_sign(&key.user_id, &key.role, &patient) == Some(false)
    {
        return invalid(I::NotAllowed);
    }
    let Some(heads) = payload.change_hashes() else {
        return invalid(I::Malformed);
    };
    if heads.iter().any(|h| doc.get_change_by_hash(h).is_none()) {
        return Verdict::HeadsMissing;
    }
    let rendering = super::visit_note::canonical_rendering(doc, &heads);
    if sha256_hex(&rendering) != payload.content_hash {
        return invalid(I::ContentMismatch);
    }
    Verdict::Valid
}

/// Check a payload's time against the verifier's clock (the relay's, at receipt).
pub fn signed_in_future(payload: &SignaturePayload, now_ms: i64) -> bool {
    payload.signed_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS)
}

/// What a tampering change did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Tamper {
    /// A signature entry was deleted (or the list position overwritten).
    SignatureDeleted,
    /// A field of a signature entry was changed after the change that wrote it.
    SignatureAltered,
    /// The root `signatures` list was replaced or deleted.
    SignaturesReplaced,
    /// A root identity field was written after it was first set.
    IdentityChanged {
        /// `kind`, `patientId` or `agencyId`.
        field: String,
    },
    /// A signature that does not verify.
    InvalidSignature {
        /// Why.
        reason: InvalidSignature,
    },
}

/// Why a change is listed for review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum ReviewReason {
    /// Made without having seen the signature (offline, concurrently). Not part of the signed
    /// version, which is rendered at the signature heads.
    ConcurrentWithSignature,
    /// Made after the signature yet touching the body (only a misbehaving client does this).
    BodyEditAfterSignature,
    /// Tampering with signatures or identity fields (never part of what is rendered as signed).
    Tampered(Tamper),
}

/// A change (or a burst of changes by one author to the same fields) of a signed note that is
/// not part of the signed version, or that tampered with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewItem {
    /// Stable id: the first change's hash (hex), with a suffix for tampering found in it.
    pub id: String,
    /// The first change (hex).
    pub change: String,
    /// The last change folded into this item (hex).
    pub last_change: String,
    /// How many changes it covers.
    pub changes: u32,
    /// Who made them.
    pub author: Option<Actor>,
    /// When the first was made, ms since the epoch (second precision).
    pub time_ms: i64,
    /// When the last was made.
    pub last_time_ms: i64,
    /// Field paths touched (`/`-separated), sorted.
    pub fields: Vec<String>,
    /// Why it is listed.
    pub reason: ReviewReason,
}

/// The first valid signature, as the note's signed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedState {
    /// The signature entry.
    pub entry: SignatureEntry,
    /// Its verdict when last checked.
    pub verdict: Verdict,
}

/// Per-note record of signatures and review items, built from history, updated incrementally.
/// See the module docs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NoteLedger {
    /// Changes already looked at.
    seen: HashSet<ChangeHash>,
    /// The `signatures` list object (the first one made).
    list: Option<String>,
    /// Signature entries by object id, with the change that made them.
    entries: BTreeMap<String, SignatureEntry>,
    /// Objects inside signature entries (nested values), mapped to their entry.
    entry_objects: HashMap<String, String>,
    /// Identity fields already set, with the change that set them first.
    identity: BTreeMap<String, String>,
    /// The signing change whose signature is the note's signature, and its signed heads.
    signing: Option<(ChangeHash, Vec<ChangeHash>)>,
    /// Changes descending from the signing change.
    after: HashSet<ChangeHash>,
    /// Review items, in order of discovery.
    items: Vec<ReviewItem>,
    /// Signature entries that did not verify (entry id → reason).
    rejected: BTreeMap<String, InvalidSignature>,
    /// Review item position by id.
    #[serde(skip)]
    item_index: HashMap<String, usize>,
    /// Object id → path, kept across calls (a typing session hits one Text object; finding an
    /// object's path walks automerge's op set).
    #[serde(skip)]
    paths: PathCache,
}

/// How a ledger treats signature entries it finds.
#[derive(Clone, Copy)]
pub enum Verification<'a> {
    /// Verify each against these keys and policy (devices).
    Verify {
        /// The agency's keys.
        keys: &'a KeyDirectory,
        /// Who may sign.
        policy: &'a dyn SigningPolicy,
    },
    /// Count every entry as valid: the relay's stored history, whose signatures were verified
    /// when they were accepted.
    Trust,
    /// Report new entries in [`Observed::new_signatures`] without deciding; the caller verifies
    /// them (the relay, which looks keys up in its storage) and admits the valid ones with
    /// [`NoteLedger::admit_trusted`].
    Defer,
}

impl std::fmt::Debug for Verification<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verification::Verify { .. } => "Verify",
            Verification::Trust => "Trust",
            Verification::Defer => "Defer",
        })
    }
}

/// What one [`NoteLedger::observe`] call found in the new changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Tampering found (the relay refuses changes carrying any).
    pub tampers: Vec<(String, Tamper)>,
    /// Signature entries written by the new changes.
    pub new_signatures: Vec<SignatureEntry>,
    /// Whether a change edits the body of a note already signed (causally after the signature).
    pub body_after_signature: bool,
    /// Review items created or extended (by [`ReviewItem::id`]).
    pub touched_items: Vec<String>,
}

impl NoteLedger {
    /// Build from a document's whole history.
    pub fn build(doc: &Automerge, keys: &KeyDirectory, policy: &dyn SigningPolicy) -> NoteLedger {
        NoteLedger::build_with(doc, Verification::Verify { keys, policy })
    }

    /// Build from a document's whole history, treating signatures as `verification` says.
    pub fn build_with(doc: &Automerge, verification: Verification<'_>) -> NoteLedger {
        let mut ledger = NoteLedger::default();
        let changes = doc.get_changes(&[]);
        ledger.observe_with(doc, &changes, verification);
        ledger
    }

    /// Look at changes not seen before (in causal order, as `get_changes` gives them), verify
    /// new signatures, and update the review items. Cost is proportional to the new changes.
    pub fn observe(
        &mut self,
        doc: &Automerge,
        changes: &[automerge::Change],
        keys: &KeyDirectory,
        policy: &dyn SigningPolicy,
    ) -> Observed {
        self.observe_with(doc, changes, Verification::Verify { keys, policy })
    }

    /// [`NoteLedger::observe`] with the signature treatment chosen by the caller.
    pub fn observe_with(
        &mut self,
        doc: &Automerge,
        changes: &[automerge::Change],
        verification: Verification<'_>,
    ) -> Observed {
        let mut out = Observed::default();
        let mut paths = std::mem::take(&mut self.paths);
        for change in changes {
            let hash = change.hash();
            if !self.seen.insert(hash) {
                continue;
            }
            let scan = self.scan(doc, change, &mut paths);
            for t in &scan.tampers {
                out.tampers.push((hash.to_string(), t.clone()));
            }
            let descends = self
                .signing
                .as_ref()
                .is_some_and(|(s, _)| change.deps().contains(s))
                || change.deps().iter().any(|d| self.after.contains(d));
            if descends {
                self.after.insert(hash);
            }
            for entry in &scan.new_entries {
                out.new_signatures.push(entry.clone());
            }
            // Tampering is listed whether or not the note is signed yet.
            for t in scan.tampers {
                self.push_item(
                    doc,
                    change,
                    scan.fields.clone(),
                    ReviewReason::Tampered(t),
                    &mut out,
                );
            }
            if self.signing.is_some() && scan.new_entries.is_empty() {
                self.review_change(doc, change, scan.fields.clone(), descends, &mut out);
            }
            for entry in scan.new_entries {
                match verification {
                    Verification::Verify { keys, policy } => {
                        self.admit_signature(doc, entry, keys, policy, &mut out)
                    }
                    Verification::Trust => self.admit_trusted(doc, &entry),
                    Verification::Defer => {}
                }
            }
        }
        self.paths = paths;
        out.body_after_signature = out.touched_items.iter().any(|id| {
            self.review_item(id)
                .is_some_and(|i| i.reason == ReviewReason::BodyEditAfterSignature)
        });
        out
    }

    /// Count a signature entry verified elsewhere (the relay's storage, or the relay after
    /// checking a deferred one): it becomes the note's signature if it is the first.
    pub fn admit_trusted(&mut self, doc: &Automerge, entry: &SignatureEntry) {
        self.adopt(doc, entry, &mut Observed::default());
    }

    /// Make `entry` the note's signature unless one already is.
    fn adopt(&mut self, doc: &Automerge, entry: &SignatureEntry, out: &mut Observed) {
        if self.signing.is_some() {
            return;
        }
        let heads = entry
            .payload
            .as_ref()
            .and_then(SignaturePayload::change_hashes)
            .unwrap_or_default();
        if let Ok(hash) = entry.change.parse::<ChangeHash>() {
            self.signing = Some((hash, heads.clone()));
            self.after.insert(hash);
            self.after_signing_discovered(doc, hash, &heads, out);
        }
    }

    /// Verify a newly seen signature; the first valid one becomes the note's signature.
    fn admit_signature(
        &mut self,
        doc: &Automerge,
        entry: SignatureEntry,
        keys: &KeyDirectory,
        policy: &dyn SigningPolicy,
        out: &mut Observed,
    ) {
        let id = entry
            .payload
            .as_ref()
            .and_then(|p| p.document_id.parse::<DocumentId>().ok());
        let verdict = match id {
            Some(id) => verify(doc, id, &entry, keys, policy),
            None => Verdict::Invalid(InvalidSignature::Malformed),
        };
        // A key the directory does not know yet (a stale copy on a device) is not held against
        // the signature: the note stays locked and shows as unverified until keys are fetched.
        let counts = matches!(
            verdict,
            Verdict::Valid | Verdict::HeadsMissing | Verdict::Invalid(InvalidSignature::UnknownKey)
        );
        if let Verdict::Invalid(reason) = &verdict {
            // Listed even for a key this replica does not know (its directory may be stale):
            // a person sees "signature by an unknown device" until the keys say otherwise.
            self.rejected.insert(entry.entry.clone(), reason.clone());
            out.tampers.push((
                entry.change.clone(),
                Tamper::InvalidSignature {
                    reason: reason.clone(),
                },
            ));
            if let Ok(hash) = entry.change.parse::<ChangeHash>()
                && let Some(change) = doc.get_change_by_hash(&hash)
            {
                self.push_item(
                    doc,
                    &change,
                    vec![SIGNATURES_KEY.to_owned()],
                    ReviewReason::Tampered(Tamper::InvalidSignature {
                        reason: reason.clone(),
                    }),
                    out,
                );
            }
        }
        if counts {
            self.adopt(doc, &entry, out);
        }
    }

    /// When the signature is first known, earlier-seen changes that are not in the signed
    /// version (concurrent ones merged before it) are listed, and descendants recorded.
    fn after_signing_discovered(
        &mut self,
        doc: &Automerge,
        signing: ChangeHash,
        heads: &[ChangeHash],
        out: &mut Observed,
    ) {
        for change in doc.get_changes(heads) {
            let hash = change.hash();
            if hash == signing || !self.seen.contains(&hash) {
                continue;
            }
            let descends = change.deps().iter().any(|d| self.after.contains(d));
            if descends {
                self.after.insert(hash);
            }
            let mut paths = std::mem::take(&mut self.paths);
            let fields = ops_fields(doc, &change, &mut paths);
            self.paths = paths;
            self.review_change(doc, &change, fields, descends, out);
        }
    }

    /// List a change of a signed note that is not part of the signed version: a body edit
    /// causally after the signature, or anything concurrent with it. Identity fields are left
    /// out of body edits (writing them is listed as tampering).
    fn review_change(
        &mut self,
        doc: &Automerge,
        change: &automerge::Change,
        fields: Vec<String>,
        descends: bool,
        out: &mut Observed,
    ) {
        if descends {
            let body: Vec<String> = fields
                .into_iter()
                .filter(|f| {
                    !AFTER_SIGNING_KEYS.contains(&root_key(f))
                        && !IDENTITY_KEYS.contains(&root_key(f))
                })
                .collect();
            if !body.is_empty() {
                self.push_item(doc, change, body, ReviewReason::BodyEditAfterSignature, out);
            }
        } else if !fields.is_empty() {
            self.push_item(
                doc,
                change,
                fields,
                ReviewReason::ConcurrentWithSignature,
                out,
            );
        }
    }

    fn push_item(
        &mut self,
        doc: &Automerge,
        change: &automerge::Change,
        mut fields: Vec<String>,
        reason: ReviewReason,
        out: &mut Observed,
    ) {
        fields.sort();
        fields.dedup();
        let author = change_author_of(doc, change);
        let time_ms = change.timestamp().saturating_mul(1000);
        let hash = change.hash().to_string();
        let id = match &reason {
            ReviewReason::Tampered(_) => format!(
                "{hash}#{}",
                self.items.iter().filter(|i| i.change == hash).count()
            ),
            _ => hash.clone(),
        };
        let mergeable = |item: &ReviewItem| {
            !matches!(reason, ReviewReason::Tampered(_))
                && item.reason == reason
                && item.author == author
                && item.fields == fields
                && (time_ms - item.last_time_ms).abs() <= REVIEW_BURST_GAP_MS
        };
        if let Some(last) = self.items.iter_mut().rev().find(|i| i.author == author)
            && mergeable(last)
        {
            last.last_change = hash;
            last.changes += 1;
            last.last_time_ms = last.last_time_ms.max(time_ms);
            out.touched_items.push(last.id.clone());
            return;
        }
        out.touched_items.push(id.clone());
        self.item_index.insert(id.clone(), self.items.len());
        self.items.push(ReviewItem {
            id,
            change: hash.clone(),
            last_change: hash,
            changes: 1,
            author,
            time_ms,
            last_time_ms: time_ms,
            fields,
            reason,
        });
    }

    /// Inspect one change's operations.
    fn scan(&mut self, doc: &Automerge, change: &automerge::Change, paths: &mut PathCache) -> Scan {
        let mut scan = Scan::default();
        let Some(expanded) = decode(change) else {
            scan.tampers.push(Tamper::SignatureAltered);
            return scan;
        };
        let actor = change.actor_id().to_hex_string();
        let start = change.start_op().get();
        let hash = change.hash().to_string();
        let mut made_here: HashSet<String> = HashSet::new();
        let mut new_entries: Vec<String> = Vec::new();
        // The last op that only named a body field: a burst of typing is hundreds of ops on one
        // Text object, each naming the same field, so they are recognised without formatting
        // ids. Exact: whether an object is the signature list or an entry is decided by ops
        // that make it, which precede every op on it.
        let mut last_body_field: Option<&automerge::legacy::ObjectId> = None;
        for (i, op) in expanded.operations.iter().enumerate() {
            let made = matches!(op.action, automerge::legacy::OpType::Make(_));
            let seq_key = matches!(op.key, automerge::legacy::Key::Seq(_));
            if !made && seq_key && last_body_field == Some(&op.obj) {
                continue;
            }
            last_body_field = None;
            let op_id = format!("{}@{}", start + i as u64, actor);
            let obj = op.obj.to_string();
            let key = match &op.key {
                automerge::legacy::Key::Map(k) => Some(k.to_string()),
                automerge::legacy::Key::Seq(_) => None,
            };
            if made {
                made_here.insert(op_id.clone());
            }
            if obj == "_root" {
                let k = key.clone().unwrap_or_default();
                scan.fields.push(k.clone());
                if k == SIGNATURES_KEY {
                    if self.list.is_none() && made {
                        self.list = Some(op_id.clone());
                    } else {
                        scan.tampers.push(Tamper::SignaturesReplaced);
                    }
                }
                if IDENTITY_KEYS.contains(&k.as_str()) {
                    match self.identity.get(&k) {
                        Some(first) if *first != hash => scan
                            .tampers
                            .push(Tamper::IdentityChanged { field: k.clone() }),
                        Some(_) => {}
                        None => {
                            self.identity.insert(k.clone(), hash.clone());
                        }
                    }
                }
                continue;
            }
            if self.list.as_deref() == Some(obj.as_str()) {
                scan.fields.push(SIGNATURES_KEY.to_owned());
                if op.insert && matches!(op.action, automerge::legacy::OpType::Make(ObjType::Map)) {
                    new_entries.push(op_id.clone());
                } else if !made_here.contains(&obj) {
                    // Delete, or a put over an existing element.
                    scan.tampers.push(Tamper::SignatureDeleted);
                }
                continue;
            }
            if let Some(entry) = self
                .entries
                .contains_key(&obj)
                .then(|| obj.clone())
                .or_else(|| self.entry_objects.get(&obj).cloned())
            {
                scan.fields.push(SIGNATURES_KEY.to_owned());
                let in_creating_change = self.entries.get(&entry).is_some_and(|e| e.change == hash);
                if !in_creating_change {
                    scan.tampers.push(Tamper::SignatureAltered);
                }
                if made {
                    self.entry_objects.insert(op_id.clone(), entry);
                }
                continue;
            }
            if new_entries.contains(&obj) || self.entry_objects.contains_key(&obj) {
                continue;
            }
            scan.fields.push(paths.field(doc, &obj, key.as_deref()));
            if seq_key && !made {
                last_body_field = Some(&op.obj);
            }
        }
        for entry in new_entries {
            self.entries.insert(
                entry.clone(),
                SignatureEntry {
                    entry: entry.clone(),
                    change: hash.clone(),
                    payload: None,
                    payload_json: String::new(),
                    signature: String::new(),
                },
            );
            let read = read_entry(doc, &entry, change.hash());
            if let Some(e) = self.entries.get_mut(&entry) {
                e.payload_json = read.0;
                e.signature = read.1;
                e.payload = (e.payload_json.len() <= MAX_PAYLOAD_BYTES)
                    .then(|| serde_json::from_str(&e.payload_json).ok())
                    .flatten();
                scan.new_entries.push(e.clone());
            }
        }
        scan.fields.sort();
        scan.fields.dedup();
        scan
    }

    /// Whether the note is signed for good: some signature counts (valid, or by a key this
    /// replica's directory does not know yet). Body edits are refused from then on.
    pub fn is_signed(&self) -> bool {
        self.signing.is_some()
    }

    /// The signature the note is signed with (the first that counts).
    pub fn signature(&self) -> Option<&SignatureEntry> {
        let (hash, _) = self.signing.as_ref()?;
        let hash = hash.to_string();
        self.entries.values().find(|e| e.change == hash)
    }

    /// Every signature entry ever written, including deleted and invalid ones.
    pub fn signatures(&self) -> impl Iterator<Item = &SignatureEntry> {
        self.entries.values()
    }

    /// Review items, in order of discovery.
    pub fn review_items(&self) -> &[ReviewItem] {
        &self.items
    }

    /// One review item by id.
    pub fn review_item(&self, id: &str) -> Option<&ReviewItem> {
        self.item_index.get(id).and_then(|i| self.items.get(*i))
    }

    /// Why a signature entry was rejected, if it was.
    pub fn rejection(&self, entry: &str) -> Option<&InvalidSignature> {
        self.rejected.get(entry)
    }
}

#[derive(Default)]
struct Scan {
    fields: Vec<String>,
    tampers: Vec<Tamper>,
    new_entries: Vec<SignatureEntry>,
}

fn root_key(path: &str) -> &str {
    path.split('/').next().unwrap_or("")
}

/// Decode a change's operations. automerge validated the change when it was applied; a panic
/// here would only come from a bug, and must not take the relay or the app down.
fn decode(change: &automerge::Change) -> Option<automerge::ExpandedChange> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode())).ok()
}

/// Read a signature entry's two fields as written by its change (not as they are now).
fn read_entry(doc: &Automerge, entry: &str, at: ChangeHash) -> (String, String) {
    let Ok(obj) = doc.import_obj(entry) else {
        return (String::new(), String::new());
    };
    let get = |key: &str| match doc.get_at(&obj, key, &[at]) {
        Ok(Some((automerge::Value::Scalar(s), _))) => match s.as_ref() {
            ScalarValue::Str(s) => s.to_string(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    (get("payload"), get("signature"))
}

/// Field paths one change touched, from its operations (no document diff).
fn ops_fields(doc: &Automerge, change: &automerge::Change, paths: &mut PathCache) -> Vec<String> {
    let Some(expanded) = decode(change) else {
        return Vec::new();
    };
    let mut fields: Vec<String> = expanded
        .operations
        .iter()
        .map(|op| {
            let key = match &op.key {
                automerge::legacy::Key::Map(k) => Some(k.to_string()),
                automerge::legacy::Key::Seq(_) => None,
            };
            paths.field(doc, &op.obj.to_string(), key.as_deref())
        })
        .collect();
    fields.sort();
    fields.dedup();
    fields
}

/// Object id → path (a burst of keystrokes hits one Text object). A list element's index is the
/// one it had when first seen: good enough to name the field for a reviewer.
#[derive(Debug, Clone, Default)]
struct PathCache(HashMap<String, String>);

impl PathCache {
    fn field(&mut self, doc: &Automerge, obj: &str, key: Option<&str>) -> String {
        let base = if obj == "_root" {
            String::new()
        } else if let Some(p) = self.0.get(obj) {
            p.clone()
        } else {
            let p = object_path(doc, obj);
            self.0.insert(obj.to_owned(), p.clone());
            p
        };
        match key {
            Some(k) if base.is_empty() => k.to_owned(),
            Some(k) => format!("{base}/{k}"),
            None => base,
        }
    }
}

fn object_path(doc: &Automerge, obj: &str) -> String {
    let Ok(id) = doc.import_obj(obj) else {
        return "?".into();
    };
    let Ok(parents) = doc.parents(&id) else {
        return "?".into();
    };
    parents
        .path()
        .into_iter()
        .map(|(_, p)| match p {
            automerge::Prop::Map(k) => k,
            automerge::Prop::Seq(i) => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::visit_note::new_visit_note;
    use crate::model::{Actor, VisitStart, commit};

    #[test]
    fn a_concurrent_identity_write_is_tampering_in_a_trusted_ledger() {
        let nurse = Actor {
            user_id: "n1".into(),
            device_id: "phone".into(),
        };
        let start = VisitStart {
            agency_id: "ag".into(),
            patient_id: "p1".into(),
            service_type: "sn".into(),
            date: "2026-11-27".into(),
            location: "home".into(),
            started_at_ms: 1,
            start_monotonic_ms: 1,
        };
        let (_, mut doc) = new_visit_note(&start, &nurse, 1_000).unwrap();
        let before = doc.get_heads();
        let mut ledger = NoteLedger::build_with(doc.document(), Verification::Trust);
        let mut fork = doc.fork_at(&before).unwrap();
        fork.put(ROOT, "patientId", "p2").unwrap();
        commit(&mut fork, "move", 2_000);
        doc.merge(&mut fork).unwrap();
        let changes = doc.get_changes(&before);
        assert_eq!(changes.len(), 1);
        let seen = ledger.observe_with(doc.document(), &changes, Verification::Defer);
        assert_eq!(
            seen.tampers
                .iter()
                .map(|(_, t)| t.clone())
                .collect::<Vec<_>>(),
            vec![Tamper::IdentityChanged {
                field: "patientId".into()
            }]
        );
    }
}

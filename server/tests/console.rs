//! The agency console's routes, driven with `oneshot` against the relay's router over a real
//! SQLite file: sign-in (set-password link, wrong password, rate limit, cookie attributes),
//! CSRF refusal, session expiry and sign-out, role and agency scoping, the chart and the note
//! (signature verified, or the reason it is not), audit rows for every view, and the
//! administration pages (users, patients, assignment, enrollment QR, devices, audit + CSV).

use std::sync::Arc;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ReadDoc};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use fieldchart_core::model::signing::{self, DeviceKey};
use fieldchart_core::model::{Actor, NoteText, VisitStart, VitalReading, VitalType};
use fieldchart_core::protocol::DocumentId;
use fieldchart_core::store::{Store, StoreConfig, StoreKey};
use fieldchart_server::admin::{self, AdminContext};
use fieldchart_server::auth::hash_secret;
use fieldchart_server::config::Limits;
use fieldchart_server::console::store::ConsoleStore;
use fieldchart_server::console::{self, ConsoleOptions};
use fieldchart_server::identity::{AgencyId, DeviceId, Patient, Role, User};
use fieldchart_server::storage::memory::MemoryConsole;
use fieldchart_server::storage::{
    AuditAction, AuditQuery, DocMeta, DocumentData, DocumentWrite, MemoryStorage, PostgresStorage,
    Redemption, SqliteStorage, Storage,
};
use fieldchart_server::{AppState, clock::now_ms};
use tower::ServiceExt;

const PASSWORD: &str = "correct horse battery";

/// Which storage backend a test runs on.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Memory,
    /// A fresh schema of its own on the test PostgreSQL server (see [`Schema`]).
    Postgres,
}

/// Connections the PostgreSQL backend's pool holds in these tests.
const POSTGRES_POOL: usize = 4;

/// The PostgreSQL server the tests use: `FIELDCHART_TEST_POSTGRES` (libpq key=value), default
/// `host=127.0.0.1 port=5432 user=postgres dbname=postgres` (trust auth).
fn postgres_server() -> String {
    std::env::var("FIELDCHART_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

/// Run `sql` on the test server; panics with a clear message when it is not reachable.
async fn postgres_execute(sql: &str) {
    let server = postgres_server();
    let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is needed for this test and is not reachable at `{server}` ({e}). \
                 Start it (`.ci/run` does) or set FIELDCHART_TEST_POSTGRES."
            )
        });
    let connection = tokio::spawn(connection);
    client.batch_execute(sql).await.expect(sql);
    drop(client);
    let _ = connection.await;
}

/// A schema of its own for one test (so the tests run in parallel), dropped with the relay.
struct Schema {
    name: String,
    url: String,
}

impl Schema {
    async fn create() -> Schema {
        let name = format!("fc_console_{:016x}", rand::random::<u64>());
        postgres_execute(&format!("CREATE SCHEMA {name}")).await;
        let url = format!(
            "{} application_name={name} options='-c search_path={name}'",
            postgres_server()
        );
        Schema { name, url }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: a thread of its own with its own runtime. The
        // relay's pool may still hold connections: end them first so they block nothing.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(postgres_execute(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = '{name}';
                     DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
        })
        .join();
        if dropped.is_err() {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}

/// A task aborted when dropped.
struct Aborted(tokio::task::JoinHandle<()>);

impl Drop for Aborted {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Relay {
    _dir: tempfile::TempDir,
    /// The PostgreSQL backend's schema, dropped after the test (held by the first relay).
    _schema: Option<Schema>,
    /// On PostgreSQL: the listener for other relays' notifications (`fieldchart_server::notify`).
    _listener: Option<Aborted>,
    /// How many times that listener has started listening.
    listening: Option<tokio::sync::watch::Receiver<u64>>,
    /// On PostgreSQL: the schema's connection string (for another relay beside this one).
    postgres_url: Option<String>,
    dir: std::path::PathBuf,
    storage: Arc<dyn Storage>,
    console: Arc<dyn ConsoleStore>,
    app: Router,
    agency: AgencyId,
    state: AppState,
}

fn cli() -> AdminContext {
    AdminContext::cli("test")
}

/// A response, read whole.
struct Page {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .map(str::to_owned)
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        hidden(&self.body, "csrf")
    }
}

fn hidden(body: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = body
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} field in {body}"))
        + marker.len();
    body[start..]
        .split('"')
        .next()
        .expect("field value")
        .to_owned()
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .expect("cookie value")
}

/// A browser: its cookies.
#[derive(Clone, Default)]
struct Browser {
    form: Option<String>,
    session: Option<String>,
}

impl Browser {
    fn cookie_header(&self) -> String {
        let mut parts = Vec::new();
        if let Some(f) = &self.form {
            parts.push(format!("{}={f}", console::auth::FORM_COOKIE));
        }
        if let Some(s) = &self.session {
            parts.push(format!("{}={s}", console::auth::SESSION_COOKIE));
        }
        parts.join("; ")
    }

    fn absorb(&mut self, page: &Page) {
        if let Some(c) = page.set_cookie(console::auth::FORM_COOKIE) {
            self.form = Some(cookie_value(&c));
        }
        if let Some(c) = page.set_cookie(console::auth::SESSION_COOKIE) {
            let v = cookie_value(&c);
            self.session = (!v.is_empty()).then_some(v);
        }
    }
}

fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Relay {
    async fn start(options: ConsoleOptions) -> Relay {
        Relay::start_on(Backend::Sqlite, options).await
    }

    async fn start_on(backend: Backend, options: ConsoleOptions) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut schema = None;
        let mut postgres = None;
        let (storage, console): (Arc<dyn Storage>, Arc<dyn ConsoleStore>) = match backend {
            Backend::Sqlite => {
                let s = Arc::new(
                    SqliteStorage::open(&dir.path().join("relay.sqlite3"))
                        .expect("open relay database"),
                );
                (s.clone(), s)
            }
            Backend::Memory => {
                let s = Arc::new(MemoryStorage::new());
                (s.clone(), Arc::new(MemoryConsole::new(s)))
            }
            Backend::Postgres => {
                let created = Schema::create().await;
                let s = PostgresStorage::connect(&created.url, POSTGRES_POOL)
                    .await
                    .expect("open the PostgreSQL schema");
                postgres = Some((s.clone(), created.url.clone()));
                schema = Some(created);
                let s = Arc::new(s);
                (s.clone(), s)
            }
        };
        let agency = admin::create_agency(&*storage, &cli(), "Riverside")
            .await
            .expect("agency")
            .id;
        Relay::open(dir, schema, postgres, (storage, console), options, agency).await
    }

    /// Another relay process on the same PostgreSQL schema: a pool and a `LISTEN` connection of
    /// its own, the same agency.
    async fn beside(&self, options: ConsoleOptions) -> Relay {
        let url = self
            .postgres_url
            .clone()
            .expect("a second relay needs the PostgreSQL backend");
        let s = PostgresStorage::connect(&url, POSTGRES_POOL)
            .await
            .expect("open the PostgreSQL schema");
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = Arc::new(s.clone());
        Relay::open(
            dir,
            None,
            Some((s, url)),
            (shared.clone(), shared),
            options,
            self.agency.clone(),
        )
        .await
    }

    /// The relay's state over `storage`; on PostgreSQL also its listener for other relays'
    /// notifications, as `serve --database` runs it.
    async fn open(
        dir: tempfile::TempDir,
        schema: Option<Schema>,
        postgres: Option<(PostgresStorage, String)>,
        (storage, console): (Arc<dyn Storage>, Arc<dyn ConsoleStore>),
        options: ConsoleOptions,
        agency: AgencyId,
    ) -> Relay {
        let path = dir.path().to_owned();
        let state = AppState::new(storage.clone(), Limits::default())
            .await
            .expect("state");
        state.attach_console(console.clone(), options);
        let (listener, listening, postgres_url) = match postgres {
            Some((pg, url)) => {
                let (task, listening) =
                    fieldchart_server::notify::spawn_watched(&pg, state.clone());
                (Some(Aborted(task)), Some(listening), Some(url))
            }
            None => (None, None, None),
        };
        Relay {
            _dir: dir,
            _schema: schema,
            _listener: listener,
            listening,
            postgres_url,
            dir: path,
            storage,
            console,
            app: fieldchart_server::app(state.clone()),
            agency,
            state,
        }
    }

    async fn request(&self, req: Request<Body>) -> Page {
        let response = self.app.clone().oneshot(req).await.expect("response");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .expect("body");
        Page {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, browser: &mut Browser, path: &str) -> Page {
        let page = self
            .request(
                Request::get(path)
                    .header(header::COOKIE, browser.cookie_header())
                    .body(Body::empty())
                    .expect("request"),
            )
            .await;
        browser.absorb(&page);
        page
    }

    async fn post(&self, browser: &mut Browser, path: &str, fields: &[(&str, &str)]) -> Page {
        let page = self
            .request(
                Request::post(path)
                    .header(header::COOKIE, browser.cookie_header())
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(Body::from(form_body(fields)))
                    .expect("request"),
            )
            .await;
        browser.absorb(&page);
        page
    }

    /// A console user of `agency` with `role`, whose password is set through their link.
    async fn console_user(&self, agency: &AgencyId, role: Role, login: &str) -> User {
        let user = admin::create_user(&*self.storage, &cli(), agency, login, role)
            .await
            .expect("user");
        let token = console::auth::create_login(&*self.console, &cli(), &user, login)
            .await
            .expect("login");
        let mut browser = Browser::default();
        let page = self
            .get(
                &mut browser,
                &format!("/console/set-password?token={token}"),
            )
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let set = self
            .post(
                &mut browser,
                "/console/set-password",
                &[
                    ("token", &token),
                    ("password", PASSWORD),
                    ("confirm", PASSWORD),
                    ("csrf", &page.csrf()),
                ],
            )
            .await;
        assert_eq!(set.status, StatusCode::SEE_OTHER, "{}", set.body);
        user
    }

    /// Sign in; returns the signed-in browser and the CSRF token of its session.
    async fn sign_in(&self, login: &str, password: &str) -> (Browser, Page) {
        let mut browser = Browser::default();
        let page = self.get(&mut browser, "/console/sign-in").await;
        let csrf = page.csrf();
        let page = self
            .post(
                &mut browser,
                "/console/sign-in",
                &[("login", login), ("password", password), ("csrf", &csrf)],
            )
            .await;
        (browser, page)
    }

    async fn signed_in(&self, login: &str) -> (Browser, String) {
        let (mut browser, page) = self.sign_in(login, PASSWORD).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
        assert_eq!(page.location(), "/console/");
        let home = self.get(&mut browser, "/console/").await;
        assert_eq!(home.status, StatusCode::OK, "{}", home.body);
        let csrf = home.csrf();
        (browser, csrf)
    }

    async fn patient(&self, agency: &AgencyId, name: &str) -> Patient {
        admin::create_patient(&*self.storage, &cli(), agency, name)
            .await
            .expect("patient")
    }

    /// An enrolled clinician device: the user, its device id and its signing key.
    async fn enrolled_nurse(&self, agency: &AgencyId, name: &str) -> (User, DeviceId, DeviceKey) {
        let user = admin::create_user(&*self.storage, &cli(), agency, name, Role::Clinician)
            .await
            .expect("nurse");
        let issued = admin::enroll(&*self.storage, &cli(), &user.id, "phone", None)
            .await
            .expect("code");
        let key = DeviceKey::generate();
        let (device, _) = self
            .storage
            .redeem_enrollment(Redemption {
                code_hash: hash_secret(&issued.code),
                device_id: DeviceId::random(),
                device_name: None,
                token_hash: hash_secret(&format!("fct_{}", user.id)),
                public_key: key.public_key(),
                at_ms: now_ms() - 60_000,
                token_expires_at: now_ms() + 86_400_000,
                remote_addr: None,
            })
            .await
            .expect("redeem");
        (user, device.id, key)
    }

    /// A visit note charted on a real device store and signed by `key`, stored on the relay.
    async fn signed_note(
        &self,
        patient: &Patient,
        nurse: &User,
        device: &DeviceId,
        key: &DeviceKey,
    ) -> DocumentId {
        self.note_with(patient, nurse, device, key, false).await
    }

    /// Like `signed_note`; with `offline_edit`, another copy of the note (made before the
    /// signing) sets `nextVisit` concurrently, and both are merged: a change for review.
    async fn note_with(
        &self,
        patient: &Patient,
        nurse: &User,
        device: &DeviceId,
        key: &DeviceKey,
        offline_edit: bool,
    ) -> DocumentId {
        let actor = Actor {
            user_id: nurse.id.to_string(),
            device_id: device.to_string(),
        };
        let store = Store::open(StoreConfig {
            path: self.dir.join(format!("{device}.db")),
            key: StoreKey::random(),
            actor: actor.clone(),
            role: Role::Clinician,
            keystroke_journal: false,
        })
        .expect("device store");
        let note = store
            .start_visit(&VisitStart {
                agency_id: patient.agency_id.to_string(),
                patient_id: patient.id.to_string(),
                service_type: "skilled-nursing".into(),
                date: "2026-11-29".into(),
                location: "12 Elm St".into(),
                started_at_ms: now_ms() - 30_000,
                start_monotonic_ms: 1,
            })
            .expect("start visit");
        store
            .update_text(note, NoteText::Assessment, "Wound healing well.")
            .expect("assessment");
        for (vital, value, unit, ago) in [
            (VitalType::BloodPressure, "128/82", "mmHg", 20_000),
            (VitalType::Pulse, "76", "/min", 19_000),
        ] {
            store
                .record_vital(
                    note,
                    &VitalReading {
                        id: String::new(),
                        vital,
                        value: value.into(),
                        unit: unit.into(),
                        taken_at_ms: now_ms() - ago,
                        recorded_by: String::new(),
                        supersedes: None,
                    },
                )
                .expect("vital");
        }
        let mut doc = AutoCommit::load(&store.export_changes(note).expect("export")).expect("load");
        doc.set_actor(automerge::ActorId::random());
        doc.set_author(Some(actor.author()));
        let mut offline = doc.fork();
        signing::sign(&mut doc, note, key, &actor, Role::Clinician, now_ms()).expect("sign");
        doc.commit();
        if offline_edit {
            offline.set_actor(automerge::ActorId::random());
            offline.set_author(Some(actor.author()));
            offline
                .put(automerge::ROOT, "nextVisit", "Thursday")
                .expect("offline edit");
            offline.commit();
            doc.merge(&mut offline).expect("merge");
        }
        let saved = doc.save();
        let heads = Automerge::load(&saved).expect("reload").get_heads();
        self.storage
            .write_document(DocumentWrite {
                document_id: note,
                meta: DocMeta {
                    agency_id: patient.agency_id.clone(),
                    patient_id: patient.id.clone(),
                    kind: "visit-note".into(),
                },
                create: true,
                data: DocumentData::Snapshot(saved),
                heads,
                audit: None,
            })
            .await
            .expect("store the note");
        note
    }

    async fn audit_rows(&self, user: &User) -> Vec<(AuditAction, String, Option<String>)> {
        self.storage
            .query_audit(AuditQuery {
                patient_id: None,
                user_id: Some(user.id.clone()),
                from_ms: 0,
                to_ms: i64::MAX,
                limit: 1_000,
            })
            .await
            .expect("audit")
            .into_iter()
            .map(|r| {
                (
                    r.event.action,
                    r.event.device_id.to_string(),
                    r.event.patient_id.map(|p| p.to_string()),
                )
            })
            .collect()
    }
}

#[tokio::test]
async fn the_root_leads_to_sign_in_and_every_page_carries_a_strict_csp() {
    let relay = Relay::start(ConsoleOptions::default()).await;
    let mut browser = Browser::default();
    let root = relay.get(&mut browser, "/").await;
    assert_eq!(root.status, StatusCode::SEE_OTHER);
    assert_eq!(root.location(), "/console/");
    let home = relay.get(&mut browser, "/console/").await;
    assert_eq!(home.status, StatusCode::SEE_OTHER, "not signed in");
    assert_eq!(home.location(), "/console/sign-in");
    let sign_in = relay.get(&mut browser, "/console/sign-in").await;
    assert_eq!(sign_in.status, StatusCode::OK);
    let csp = sign_in
        .headers
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .expect("CSP header");
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(!sign_in.body.contains("<script"), "no script on the page");
    assert!(
        sign_in.body.contains("<label for=\"login\">"),
        "labelled fields"
    );
    let css = relay.get(&mut browser, "/console/console.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.body.contains("body"));
}

#[tokio::test]
async fn a_link_sets_the_password_once_and_sign_in_sets_a_strict_cookie() {
    let relay = Relay::start(ConsoleOptions::default()).await;
    let user = admin::create_user(&*relay.storage, &cli(), &relay.agency, "Olga", Role::Office)
        .await
        .expect("user");
    let token = console::auth::create_login(&*relay.console, &cli(), &user, "Olga@Example.org")
        .await
        .expect("login");
    // Before the password is set, nothing signs in.
    let (_, refused) = relay.sign_in("olga@example.org", "").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    let mut browser = Browser::default();
    let page = relay
        .get(
            &mut browser,
            &format!("/console/set-password?token={token}"),
        )
        .await;
    assert!(page.body.contains("Olga"));
    let csrf = page.csrf();
    let short = relay
        .post(
            &mut browser,
            "/console/set-password",
            &[
                ("token", &token),
                ("password", "short"),
                ("confirm", "short"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(short.status, StatusCode::BAD_REQUEST, "too short");
    let set = relay
        .post(
            &mut browser,
            "/console/set-password",
            &[
                ("token", &token),
                ("password", PASSWORD),
                ("confirm", PASSWORD),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(set.status, StatusCode::SEE_OTHER, "{}", set.body);
    let again = relay
        .post(
            &mut browser,
            "/console/set-password",
            &[
                ("token", &token),
                ("password", "another password!"),
                ("confirm", "another password!"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "a link works once");
    let unknown = relay
        .get(&mut browser, "/console/set-password?token=fcp_nothing")
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let (_, wrong) = relay.sign_in("olga@example.org", "not the password").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("Wrong sign-in name or password"));

    let (_, ok) = relay.sign_in("  OLGA@example.org ", PASSWORD).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    let cookie = ok
        .set_cookie(console::auth::SESSION_COOKIE)
        .expect("session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "no TLS here: {cookie}");
    // The password is stored as argon2id, not as given.
    let record = relay
        .console
        .login("olga@example.org".into())
        .await
        .expect("login")
        .expect("record");
    let hash = record.password_hash.expect("hash");
    assert!(
        hash.starts_with("$argon2id$") && !hash.contains(PASSWORD),
        "{hash}"
    );

    let tls = Relay::start(ConsoleOptions {
        secure_cookies: true,
        ..ConsoleOptions::default()
    })
    .await;
    tls.console_user(&tls.agency.clone(), Role::Office, "olga")
        .await;
    let (_, ok) = tls.sign_in("olga", PASSWORD).await;
    let cookie = ok
        .set_cookie(console::auth::SESSION_COOKIE)
        .expect("session cookie");
    assert!(cookie.contains("; Secure"), "{cookie}");
}

#[tokio::test]
async fn failed_sign_ins_are_rate_limited() {
    let relay = Relay::start(ConsoleOptions::default()).await;
    relay
        .console_user(&relay.agency.clone(), Role::Office, "olga")
        .await;
    for attempt in 0..console::SIGN_IN_FAILURES {
        let (_, page) = relay.sign_in("olga", "guess").await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    let (_, page) = relay.sign_in("olga", PASSWORD).await;
    assert_eq!(
        page.status,
        StatusCode::TOO_MANY_REQUESTS,
        "even the right password waits out the window"
    );
    assert!(page.set_cookie(console::auth::SESSION_COOKIE).is_none());
}

#[tokio::test]
async fn forms_without_the_csrf_token_are_refused() {
    let relay = Relay::start(ConsoleOptions::default()).await;
    relay
        .console_user(&relay.agency.clone(), Role::Admin, "ada")
        .await;
    // Sign-in without the form cookie's token.
    let mut stranger = Browser::default();
    let page = relay
        .post(
            &mut stranger,
            "/console/sign-in",
            &[("login", "ada"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);

    let (mut browser, csrf) = relay.signed_in("ada").await;
    let before = relay
        .console
        .agency_users(relay.agency.clone())
        .await
        .expect("users")
        .len();
    for token in ["", "0000"] {
        let page = relay
            .post(
                &mut browser,
                "/console/admin/users",
                &[
                    ("name", "Mallory"),
                    ("role", "admin"),
                    ("login", "mallory"),
                    ("csrf", token),
                ],
            )
            .await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "token {token:?}");
    }
    let page = relay
        .post(
            &mut browser,
            "/console/admin/patients",
            &[("name", "Nobody")],
        )
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    let page = relay.post(&mut browser, "/console/sign-out", &[]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    let after = relay
        .console
        .agency_users(relay.agency.clone())
        .await
        .expect("users")
        .len();
    assert_eq!(before, after, "nothing was created");
    // With the token the same form works.
    let page = relay
        .post(
            &mut browser,
            "/console/admin/users",
            &[
                ("name", "Nora"),
                ("role", "clinician"),
                ("login", ""),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("Added Nora"));
}

#[tokio::test]
async fn idle_sessions_and_signed_out_sessions_end() {
    let relay = Relay::start(ConsoleOptions {
        idle_timeout: Duration::ZERO,
        ..ConsoleOptions::default()
    })
    .await;
    relay
        .console_user(&relay.agency.clone(), Role::Office, "olga")
        .await;
    let (mut browser, page) = relay.sign_in("olga", PASSWORD).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    let home = relay.get(&mut browser, "/console/").await;
    assert_eq!(
        home.status,
        StatusCode::SEE_OTHER,
        "idle at once: signed out"
    );
    assert_eq!(home.location(), "/console/sign-in");
    // The session is gone, not just refused once.
    let secret = browser.session.clone().expect("cookie");
    assert!(
        relay
            .console
            .session(hash_secret(&secret))
            .await
            .expect("lookup")
            .is_none()
    );

    let relay = Relay::start(ConsoleOptions::default()).await;
    relay
        .console_user(&relay.agency.clone(), Role::Office, "olga")
        .await;
    let (mut browser, csrf) = relay.signed_in("olga").await;
    let out = relay
        .post(&mut browser, "/console/sign-out", &[("csrf", &csrf)])
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(browser.session, None, "the cookie is cleared");
}

#[tokio::test]
async fn a_signed_out_cookie_no_longer_works() {
    let relay = Relay::start(ConsoleOptions::default()).await;
    relay
        .console_user(&relay.agency.clone(), Role::Office, "olga")
        .await;
    let (mut browser, csrf) = relay.signed_in("olga").await;
    let mut copy = browser.clone();
    relay
        .post(&mut browser, "/console/sign-out", &[("csrf", &csrf)])
        .await;
    let page = relay.get(&mut copy, "/console/").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "the old cookie is dead");
}

async fn agencies_roles_and_care_teams_scope_what_the_console_shows_on(backend: Backend) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let b = admin::create_agency(&*relay.storage, &cli(), "Elsewhere")
        .await
        .expect("agency b")
        .id;
    let grace = relay.patient(&a, "Grace Hopper").await;
    let other = relay.patient(&b, "Bob Otherside").await;
    let olga = relay.console_user(&a, Role::Office, "olga").await;
    let nurse = relay.console_user(&a, Role::Clinician, "nina").await;
    relay.console_user(&b, Role::Admin, "bert").await;

    let (mut office, _) = relay.signed_in("olga").await;
    let list = relay.get(&mut office, "/console/").await;
    assert!(list.body.contains("Grace Hopper"));
    assert!(
        !list.body.contains("Bob Otherside"),
        "another agency's patient"
    );
    let page = relay
        .get(&mut office, &format!("/console/patients/{}", grace.id))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let page = relay
        .get(&mut office, &format!("/console/patients/{}", other.id))
        .await;
    assert_eq!(
        page.status,
        StatusCode::NOT_FOUND,
        "agency B is invisible to A"
    );
    assert!(!page.body.contains("Bob"));
    for admin_page in ["/console/admin/users", "/console/admin/audit"] {
        let page = relay.get(&mut office, admin_page).await;
        assert_eq!(
            page.status,
            StatusCode::FORBIDDEN,
            "{admin_page} for office"
        );
    }

    // A clinician: only her care team's patients; never the admin pages.
    let (mut clinician, csrf) = relay.signed_in("nina").await;
    let page = relay
        .get(&mut clinician, &format!("/console/patients/{}", grace.id))
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "not on the care team");
    assert!(
        relay
            .audit_rows(&nurse)
            .await
            .iter()
            .any(|(a, _, p)| *a == AuditAction::Deny && p.as_deref() == Some(grace.id.as_str())),
        "the refusal is audited"
    );
    admin::assign(&*relay.storage, &cli(), &nurse.id, &grace.id)
        .await
        .expect("assign");
    let page = relay
        .get(&mut clinician, &format!("/console/patients/{}", grace.id))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    for admin_page in ["/console/admin/users", "/console/admin/audit"] {
        let page = relay.get(&mut clinician, admin_page).await;
        assert_eq!(
            page.status,
            StatusCode::FORBIDDEN,
            "{admin_page} for a clinician"
        );
    }
    let page = relay
        .post(
            &mut clinician,
            "/console/admin/patients",
            &[("name", "Sneaky"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);

    // Agency B's admin sees none of A's users or patients.
    let (mut bert, _) = relay.signed_in("bert").await;
    let page = relay.get(&mut bert, "/console/admin/users").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("olga") && !page.body.contains("Grace"));
    let page = relay
        .get(&mut bert, &format!("/console/admin/users/{}", olga.id))
        .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    let page = relay
        .get(
            &mut bert,
            &format!("/console/admin/audit?patient={}", grace.id),
        )
        .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
}

async fn the_note_page_verifies_the_signature_and_every_view_is_audited_on(backend: Backend) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let grace = relay.patient(&a, "Grace Hopper").await;
    let (nurse, device, key) = relay.enrolled_nurse(&a, "Ana Ruiz").await;
    let note = relay.signed_note(&grace, &nurse, &device, &key).await;
    // A note signed with a key the relay never enrolled.
    let (rogue, rogue_device, _) = relay.enrolled_nurse(&a, "Rex").await;
    let forged = relay
        .signed_note(&grace, &rogue, &rogue_device, &DeviceKey::generate())
        .await;
    let olga = relay.console_user(&a, Role::Office, "olga").await;
    let ada = relay.console_user(&a, Role::Admin, "ada").await;

    let (mut browser, _) = relay.signed_in("olga").await;
    let chart = relay
        .get(&mut browser, &format!("/console/patients/{}", grace.id))
        .await;
    assert_eq!(chart.status, StatusCode::OK, "{}", chart.body);
    assert!(chart.body.contains("Grace Hopper"));
    assert!(
        chart.body.contains("<svg class=\"vitals-panel\""),
        "vitals chart"
    );
    assert!(chart.body.contains("Blood pressure") && chart.body.contains("Pulse"));
    assert!(chart.body.contains(&format!("/console/notes/{note}")));

    let page = relay
        .get(&mut browser, &format!("/console/notes/{note}"))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body.contains("<strong>Valid</strong>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("Ana Ruiz"));
    assert!(page.body.contains(device.as_str()));
    assert!(
        page.body.contains("Wound healing well."),
        "the signed rendering"
    );
    assert!(page.body.contains("128/82"));

    let page = relay
        .get(&mut browser, &format!("/console/notes/{forged}"))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        !page.body.contains("<strong>Valid</strong>"),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains("the cryptographic signature does not verify"),
        "{}",
        page.body
    );
    let page = relay.get(&mut browser, "/console/notes/not-a-note").await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);

    // Every view is a `read` row naming Olga and her browser session.
    let rows = relay.audit_rows(&olga).await;
    let reads: Vec<_> = rows
        .iter()
        .filter(|(a, _, p)| *a == AuditAction::Read && p.as_deref() == Some(grace.id.as_str()))
        .collect();
    // chart page: chart + 2 notes; then 2 note pages.
    assert_eq!(reads.len(), 5, "{rows:?}");
    assert!(
        reads.iter().all(|(_, d, _)| d.starts_with("web_")),
        "{rows:?}"
    );

    // The admin's audit search lists them, and exports them as CSV.
    let (mut admin_browser, _) = relay.signed_in("ada").await;
    let page = relay
        .get(
            &mut admin_browser,
            &format!("/console/admin/audit?user={}&action=read", olga.id),
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("5 rows"), "{}", page.body);
    let csv = relay
        .get(
            &mut admin_browser,
            &format!(
                "/console/admin/audit?user={}&action=read&format=csv",
                olga.id
            ),
        )
        .await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(
        csv.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/csv"))
    );
    assert_eq!(
        csv.body
            .lines()
            .filter(|l| l.contains(olga.id.as_str()))
            .count(),
        5,
        "{}",
        csv.body
    );
    let page = relay
        .get(
            &mut admin_browser,
            &format!("/console/admin/audit?user={}&action=tamper", olga.id),
        )
        .await;
    assert!(page.body.contains("0 rows"));
    let _ = ada;
}

async fn administration_creates_users_and_patients_assigns_enrolls_and_revokes_on(
    backend: Backend,
) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    relay.console_user(&a, Role::Admin, "ada").await;
    let (mut browser, csrf) = relay.signed_in("ada").await;

    // A patient.
    let page = relay
        .post(
            &mut browser,
            "/console/admin/patients",
            &[("name", "Grace Hopper"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let chart_url = page.location().to_owned();
    let patient_id = chart_url.rsplit('/').next().expect("id").to_owned();

    // A nurse, assigned.
    let page = relay
        .post(
            &mut browser,
            "/console/admin/users",
            &[("name", "Ana Ruiz"), ("role", "clinician"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let users = relay.console.agency_users(a.clone()).await.expect("users");
    let ana = users
        .iter()
        .find(|u| u.user.name == "Ana Ruiz")
        .expect("Ana")
        .user
        .clone();
    let page = relay
        .post(
            &mut browser,
            "/console/admin/assign",
            &[
                ("user", ana.id.as_str()),
                ("patient", &patient_id),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        relay
            .storage
            .on_care_team(
                ana.id.clone(),
                fieldchart_server::identity::PatientId::new(patient_id.as_str())
            )
            .await
            .expect("care team")
    );

    // An office user: the page shows their one-time link, which works.
    let page = relay
        .post(
            &mut browser,
            "/console/admin/users",
            &[
                ("name", "Olga"),
                ("role", "office"),
                ("login", "olga"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    // A taken sign-in name refuses the whole request: no user without a login is left behind.
    let taken = relay
        .post(
            &mut browser,
            "/console/admin/users",
            &[
                ("name", "Other Olga"),
                ("role", "office"),
                ("login", "OLGA"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(taken.status, StatusCode::CONFLICT, "{}", taken.body);
    assert!(
        !relay
            .console
            .agency_users(a.clone())
            .await
            .expect("users")
            .iter()
            .any(|u| u.user.name == "Other Olga")
    );
    let start = page
        .body
        .find("/console/set-password?token=")
        .expect("link");
    let link: String = page.body[start..]
        .chars()
        .take_while(|c| *c != '<')
        .collect();
    let mut olga = Browser::default();
    assert_eq!(relay.get(&mut olga, &link).await.status, StatusCode::OK);

    // Enroll Ana's phone: the QR page shows an SVG code and the code, which redeems.
    let page = relay
        .post(
            &mut browser,
            &format!("/console/admin/users/{}/enroll", ana.id),
            &[("device", "Ana's phone"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body
            .contains("<svg role=\"img\" aria-label=\"Enrollment QR code\"")
    );
    let start = page.body.find("fce_").expect("code");
    let code: String = page.body[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let (device, _) = relay
        .storage
        .redeem_enrollment(Redemption {
            code_hash: hash_secret(&code),
            device_id: DeviceId::random(),
            device_name: None,
            token_hash: hash_secret("fct_ana"),
            public_key: DeviceKey::generate().public_key(),
            at_ms: now_ms(),
            token_expires_at: now_ms() + 86_400_000,
            remote_addr: None,
        })
        .await
        .expect("the code from the page enrolls a device");

    // The device list shows it; revoking it works.
    let page = relay
        .get(&mut browser, &format!("/console/admin/users/{}", ana.id))
        .await;
    assert!(
        page.body.contains("Ana&#39;s phone") || page.body.contains("Ana's phone"),
        "{}",
        page.body
    );
    let page = relay
        .post(
            &mut browser,
            &format!("/console/admin/devices/{}/revoke", device.id),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(
        relay
            .storage
            .device(device.id.clone())
            .await
            .expect("device")
            .expect("exists")
            .revoked_at
            .is_some()
    );

    // Disabling a console user ends their session.
    let olga_user = relay
        .console
        .agency_users(a.clone())
        .await
        .expect("users")
        .into_iter()
        .find(|u| u.user.name == "Olga")
        .expect("Olga")
        .user;
    let page = relay.get(&mut olga, &link).await;
    let olga_csrf = page.csrf();
    let token = link.rsplit('=').next().expect("token").to_owned();
    relay
        .post(
            &mut olga,
            "/console/set-password",
            &[
                ("token", &token),
                ("password", PASSWORD),
                ("confirm", PASSWORD),
                ("csrf", &olga_csrf),
            ],
        )
        .await;
    let (mut olga, _) = relay.signed_in("olga").await;
    let page = relay
        .post(
            &mut browser,
            &format!("/console/admin/users/{}/disable", olga_user.id),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(
        relay.get(&mut olga, "/console/").await.status,
        StatusCode::SEE_OTHER,
        "a disabled user's session ends"
    );
    let (_, page) = relay.sign_in("olga", PASSWORD).await;
    assert_eq!(
        page.status,
        StatusCode::UNAUTHORIZED,
        "and they cannot sign in"
    );

    // Every one of these is in the admin log under Ada with her browser session.
    let log = relay
        .storage
        .admin_log(fieldchart_server::storage::AdminLogQuery {
            agency_id: Some(a.clone()),
            target: None,
            actor: None,
            after_id: 0,
            limit: 1_000,
        })
        .await
        .expect("log");
    for action in [
        "create-patient",
        "create-user",
        "assign",
        "console-create-login",
        "enroll",
        "revoke-device",
        "disable-user",
        "console-sign-in",
    ] {
        assert!(
            log.iter().any(|r| r.event.action == action
                && r.event
                    .actor_device_id
                    .as_ref()
                    .is_some_and(|d| d.as_str().starts_with("web_"))),
            "{action} logged with the browser session"
        );
    }
}

async fn the_review_queue_lists_late_changes_and_conflicts_side_by_side_on(backend: Backend) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let grace = relay.patient(&a, "Grace Hopper").await;
    let (nurse, device, key) = relay.enrolled_nurse(&a, "Ana Ruiz").await;
    let note = relay.note_with(&grace, &nurse, &device, &key, true).await;
    // Two offline edits of the chart's phone number, by two authors.
    let stored = relay
        .storage
        .load_document(grace.chart_document_id)
        .await
        .expect("load")
        .expect("chart");
    let mut chart = AutoCommit::load(&stored.snapshot.expect("snapshot")).expect("chart doc");
    let before = chart.get_heads();
    let demographics = match chart.get(automerge::ROOT, "demographics").expect("get") {
        Some((automerge::Value::Object(_), id)) => id,
        other => panic!("demographics: {other:?}"),
    };
    let mut other = chart.fork();
    for (doc, who, phone) in [
        (&mut chart, "usr_olga", "555-0100"),
        (&mut other, "usr_nina", "555-0199"),
    ] {
        doc.set_actor(automerge::ActorId::random());
        doc.set_author(Some(
            Actor {
                user_id: who.into(),
                device_id: "dev_x".into(),
            }
            .author(),
        ));
        doc.put(&demographics, "phone", phone).expect("phone");
        doc.commit();
    }
    chart.merge(&mut other).expect("merge");
    let changes: Vec<u8> = chart
        .get_changes(&before)
        .iter()
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect();
    relay
        .storage
        .write_document(DocumentWrite {
            document_id: grace.chart_document_id,
            meta: DocMeta {
                agency_id: a.clone(),
                patient_id: grace.id.clone(),
                kind: "patient".into(),
            },
            create: false,
            data: DocumentData::Chunk(changes),
            heads: chart.get_heads(),
            audit: None,
        })
        .await
        .expect("store the conflict");

    relay.console_user(&a, Role::Office, "olga").await;
    let (mut browser, _) = relay.signed_in("olga").await;
    let page = relay.get(&mut browser, "/console/review").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body
            .contains("made offline without seeing the signature"),
        "{}",
        page.body
    );
    assert!(page.body.contains("nextVisit"), "the field is named");
    assert!(page.body.contains(&format!("/console/notes/{note}")));
    assert!(page.body.contains("demographics/phone"), "{}", page.body);
    for value in ["555-0100", "555-0199", "usr_olga", "usr_nina"] {
        assert!(page.body.contains(value), "{value} shown side by side");
    }
    // The note page lists the same change as awaiting review; the signed version is unchanged.
    let page = relay
        .get(&mut browser, &format!("/console/notes/{note}"))
        .await;
    assert!(page.body.contains("<strong>Valid</strong>"));
    assert!(
        page.body
            .contains("made offline without seeing the signature")
    );
    assert!(
        !page.body.contains("Thursday"),
        "not part of the signed rendering"
    );
}

async fn schedulers_plan_visits_and_the_board_shows_how_far_each_got_on(backend: Backend) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let grace = relay.patient(&a, "Grace Hopper").await;
    let (nurse, device, key) = relay.enrolled_nurse(&a, "Ana Ruiz").await;
    relay.console_user(&a, Role::Office, "sam").await;
    relay.console_user(&a, Role::Clinician, "nina").await;
    let (mut sam, csrf) = relay.signed_in("sam").await;
    let board = relay.get(&mut sam, "/console/board?date=2026-11-29").await;
    assert_eq!(board.status, StatusCode::OK, "{}", board.body);
    assert!(board.body.contains("No visits scheduled"));

    let schedule = |date: &'static str, start: &'static str, end: &'static str| {
        vec![
            ("patient", grace.id.to_string()),
            ("clinician", nurse.id.to_string()),
            ("date", date.to_owned()),
            ("start", start.to_owned()),
            ("end", end.to_owned()),
            ("service", "skilled-nursing".to_owned()),
            ("csrf", csrf.clone()),
        ]
    };
    let post = |fields: &Vec<(&'static str, String)>| {
        fields
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect::<Vec<_>>()
    };
    let bad = post(&schedule("2026-11-29", "10:00", "09:00"));
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let page = relay.post(&mut sam, "/console/schedule", &bad).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    assert!(
        !relay
            .storage
            .on_care_team(nurse.id.clone(), grace.id.clone())
            .await
            .expect("team"),
        "a refused visit changes nothing"
    );
    for (date, start, end) in [
        ("2026-11-29", "09:00", "10:00"),
        ("2099-01-01", "09:00", "10:00"),
    ] {
        let fields = post(&schedule(date, start, end));
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = relay.post(&mut sam, "/console/schedule", &fields).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    }
    // One schedule document for the patient, holding both visits; the nurse is on the care
    // team now, so her phone syncs the chart and the schedule.
    let docs = relay
        .console
        .patient_documents(grace.id.clone())
        .await
        .expect("docs");
    let schedules: Vec<_> = docs.iter().filter(|(_, k)| k == "schedule").collect();
    assert_eq!(schedules.len(), 1, "{docs:?}");
    let stored = relay
        .storage
        .load_document(schedules[0].0)
        .await
        .expect("load")
        .expect("schedule");
    let mut bytes = stored.snapshot.clone().unwrap_or_default();
    for chunk in &stored.chunks {
        bytes.extend_from_slice(chunk);
    }
    let doc = AutoCommit::load(&bytes).expect("schedule doc");
    let visits = fieldchart_core::model::schedule::read_schedule(&doc);
    assert_eq!(visits.len(), 2);
    assert!(visits.iter().all(|v| v.clinician_id == nurse.id.as_str()));
    assert!(
        relay
            .storage
            .on_care_team(nurse.id.clone(), grace.id.clone())
            .await
            .expect("team")
    );

    // Yesterday's visit, no note: late and missing.
    let board = relay.get(&mut sam, "/console/board?date=2026-11-29").await;
    assert!(board.body.contains("Ana Ruiz") && board.body.contains("Grace Hopper"));
    assert!(
        board.body.contains("Late") && board.body.contains("Note missing"),
        "{}",
        board.body
    );
    let future = relay.get(&mut sam, "/console/board?date=2099-01-01").await;
    assert!(future.body.contains("scheduled") && !future.body.contains("Late"));

    // The note arrives signed: received, signed, nothing flagged.
    let note = relay.signed_note(&grace, &nurse, &device, &key).await;
    let board = relay.get(&mut sam, "/console/board?date=2026-11-29").await;
    assert!(board.body.contains("signed, received"), "{}", board.body);
    assert!(!board.body.contains("Late") && !board.body.contains("Note missing"));
    assert!(board.body.contains(&format!("/console/notes/{note}")));

    // Clinicians read the board but do not schedule.
    let (mut nina, nina_csrf) = relay.signed_in("nina").await;
    let mut fields = post(&schedule("2026-11-29", "09:00", "10:00"));
    fields.retain(|(k, _)| *k != "csrf");
    fields.push(("csrf", nina_csrf));
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let page = relay.post(&mut nina, "/console/schedule", &fields).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn agencies_roles_and_care_teams_scope_what_the_console_shows() {
    agencies_roles_and_care_teams_scope_what_the_console_shows_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn agencies_roles_and_care_teams_scope_what_the_console_shows_in_memory() {
    agencies_roles_and_care_teams_scope_what_the_console_shows_on(Backend::Memory).await;
}

#[tokio::test]
async fn agencies_roles_and_care_teams_scope_what_the_console_shows_on_postgres() {
    agencies_roles_and_care_teams_scope_what_the_console_shows_on(Backend::Postgres).await;
}

#[tokio::test]
async fn the_note_page_verifies_the_signature_and_every_view_is_audited() {
    the_note_page_verifies_the_signature_and_every_view_is_audited_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_note_page_verifies_the_signature_and_every_view_is_audited_in_memory() {
    the_note_page_verifies_the_signature_and_every_view_is_audited_on(Backend::Memory).await;
}

#[tokio::test]
async fn the_note_page_verifies_the_signature_and_every_view_is_audited_on_postgres() {
    the_note_page_verifies_the_signature_and_every_view_is_audited_on(Backend::Postgres).await;
}

#[tokio::test]
async fn administration_creates_users_and_patients_assigns_enrolls_and_revokes() {
    administration_creates_users_and_patients_assigns_enrolls_and_revokes_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn administration_creates_users_and_patients_assigns_enrolls_and_revokes_in_memory() {
    administration_creates_users_and_patients_assigns_enrolls_and_revokes_on(Backend::Memory).await;
}

#[tokio::test]
async fn administration_creates_users_and_patients_assigns_enrolls_and_revokes_on_postgres() {
    administration_creates_users_and_patients_assigns_enrolls_and_revokes_on(Backend::Postgres)
        .await;
}

#[tokio::test]
async fn schedulers_plan_visits_and_the_board_shows_how_far_each_got() {
    schedulers_plan_visits_and_the_board_shows_how_far_each_got_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn schedulers_plan_visits_and_the_board_shows_how_far_each_got_in_memory() {
    schedulers_plan_visits_and_the_board_shows_how_far_each_got_on(Backend::Memory).await;
}

#[tokio::test]
async fn schedulers_plan_visits_and_the_board_shows_how_far_each_got_on_postgres() {
    schedulers_plan_visits_and_the_board_shows_how_far_each_got_on(Backend::Postgres).await;
}

#[tokio::test]
async fn the_review_queue_lists_late_changes_and_conflicts_side_by_side() {
    the_review_queue_lists_late_changes_and_conflicts_side_by_side_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_review_queue_lists_late_changes_and_conflicts_side_by_side_in_memory() {
    the_review_queue_lists_late_changes_and_conflicts_side_by_side_on(Backend::Memory).await;
}

#[tokio::test]
async fn the_review_queue_lists_late_changes_and_conflicts_side_by_side_on_postgres() {
    the_review_queue_lists_late_changes_and_conflicts_side_by_side_on(Backend::Postgres).await;
}

/// Reads the event stream until an `event: changed` frame, bounded; returns its data.
async fn next_change(
    stream: &mut (impl futures::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin),
) -> String {
    use futures::StreamExt;
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("an event within 20 s")
            .expect("stream open")
            .expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(at) = text.find("event: changed") {
            let rest = &text[at..];
            if let Some(data) = rest.lines().find_map(|l| l.strip_prefix("data: "))
                && rest.contains("\n\n")
            {
                return data.to_owned();
            }
        }
    }
}

#[tokio::test]
async fn live_updates_follow_the_users_own_agency_only() {
    let relay = Relay::start(ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let b = admin::create_agency(&*relay.storage, &cli(), "Elsewhere")
        .await
        .expect("agency b")
        .id;
    relay.console_user(&a, Role::Office, "olga").await;
    let (browser, _) = relay.signed_in("olga").await;
    let response = relay
        .app
        .clone()
        .oneshot(
            Request::get("/console/events")
                .header(header::COOKIE, browser.cookie_header())
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
    );
    let mut stream = response.into_body().into_data_stream();
    // A write in agency B, then one in A: the first event is A's.
    relay.patient(&b, "Bob Otherside").await;
    let seq_b = relay.storage.current_seq().await.expect("seq");
    relay.patient(&a, "Grace Hopper").await;
    let seq_a = relay.storage.current_seq().await.expect("seq");
    let data = next_change(&mut stream).await;
    let seen: u64 = data.parse().expect("a feed position");
    assert!(
        seen > seq_b && seen <= seq_a,
        "event {seen}, B at {seq_b}, A at {seq_a}"
    );

    // The board and the review queue load the script; the CSP allows only the relay's own.
    let mut browser = browser;
    let board = relay.get(&mut browser, "/console/board").await;
    assert!(
        board
            .body
            .contains("<script src=\"/console/live.js\" defer>")
    );
    let csp = board
        .headers
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .expect("csp");
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
    let script = relay.get(&mut browser, "/console/live.js").await;
    assert!(script.body.contains("EventSource(\"/console/events\")"));

    // Signed out, the stream ends.
    let csrf = board.csrf();
    relay
        .post(&mut browser, "/console/sign-out", &[("csrf", &csrf)])
        .await;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        use futures::StreamExt;
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the event stream ends with the session");
}

/// The stored chart (snapshot and every chunk after it), as a device would load it.
async fn stored_chart(relay: &Relay, patient: &Patient) -> AutoCommit {
    let stored = relay
        .storage
        .load_document(patient.chart_document_id)
        .await
        .expect("load")
        .expect("chart");
    let mut doc = AutoCommit::load(&stored.snapshot.expect("snapshot")).expect("chart doc");
    for chunk in &stored.chunks {
        doc.load_incremental(chunk).expect("chunk");
    }
    doc
}

fn goal_status(doc: &AutoCommit, problem: &str, goal: &str) -> Vec<String> {
    let path = format!("carePlan/problems/{problem}/goals/{goal}/status");
    fieldchart_core::model::find_conflicts(doc)
        .into_iter()
        .filter(|c| c.path == path)
        .flat_map(|c| c.values.into_iter().map(|v| v.value.to_string()))
        .collect()
}

async fn care_plans_are_edited_in_the_browser_and_conflicts_resolved_by_a_person_on(
    backend: Backend,
) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let grace = relay.patient(&a, "Grace Hopper").await;
    // A problem and a goal a nurse charted, then two offline status changes of the goal by two
    // authors (two concurrent automerge changes), stored on the relay like a device's sync.
    let mut chart = stored_chart(&relay, &grace).await;
    let before = chart.get_heads();
    chart.set_author(Some(
        Actor {
            user_id: "usr_ana".into(),
            device_id: "dev_a".into(),
        }
        .author(),
    ));
    let problem =
        fieldchart_core::model::add_care_plan_item(&mut chart, &[], "Impaired mobility", "active")
            .expect("problem");
    let goal = fieldchart_core::model::add_care_plan_item(
        &mut chart,
        std::slice::from_ref(&problem),
        "Walks 50 m with a frame",
        "active",
    )
    .expect("goal");
    chart.commit();
    let mut other = chart.fork();
    let path = [problem.clone(), goal.clone()];
    for (doc, who, status) in [
        (&mut chart, "usr_ana", "met"),
        (&mut other, "usr_ben", "on hold"),
    ] {
        doc.set_actor(automerge::ActorId::random());
        doc.set_author(Some(
            Actor {
                user_id: who.into(),
                device_id: "dev_x".into(),
            }
            .author(),
        ));
        fieldchart_core::model::set_care_plan_status(doc, &path, status).expect("status");
        doc.commit();
    }
    chart.merge(&mut other).expect("merge");
    assert_eq!(
        goal_status(&chart, &problem, &goal).len(),
        2,
        "the goal's status is in conflict"
    );
    let changes: Vec<u8> = chart
        .get_changes(&before)
        .iter()
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect();
    relay
        .storage
        .write_document(DocumentWrite {
            document_id: grace.chart_document_id,
            meta: DocMeta {
                agency_id: a.clone(),
                patient_id: grace.id.clone(),
                kind: "patient".into(),
            },
            create: false,
            data: DocumentData::Chunk(changes),
            heads: chart.get_heads(),
            audit: None,
        })
        .await
        .expect("store the conflict");

    let olga = relay.console_user(&a, Role::Office, "olga").await;
    let chart_page = format!("/console/patients/{}", grace.id);
    let edit = format!("/console/patients/{}/care-plan", grace.id);
    let resolve = format!("/console/patients/{}/resolve", grace.id);
    let (mut browser, csrf) = relay.signed_in("olga").await;

    // The chart shows both values with author and time, each with a "keep" button.
    let page = relay.get(&mut browser, &chart_page).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("Conflicting values"), "{}", page.body);
    for shown in ["met", "on hold", "usr_ana on dev_x", "usr_ben on dev_x"] {
        assert!(page.body.contains(shown), "{shown} shown side by side");
    }
    assert_eq!(page.body.matches("Keep this value").count(), 2);
    let listed = hidden(&page.body, "listed");
    let ids: Vec<&str> = listed.split(' ').collect();
    assert_eq!(ids.len(), 2);
    let conflict_path = format!("carePlan/problems/{problem}/goals/{goal}/status");
    // The review queue offers the same buttons.
    let queue = relay.get(&mut browser, "/console/review").await;
    assert!(queue.body.contains(&conflict_path), "{}", queue.body);
    assert_eq!(queue.body.matches("Keep this value").count(), 2);

    // A clinician's console account cannot edit or resolve; nothing changes.
    relay.console_user(&a, Role::Clinician, "nina").await;
    let (mut nina, nina_csrf) = relay.signed_in("nina").await;
    let refused = relay
        .post(
            &mut nina,
            &edit,
            &[
                ("csrf", &nina_csrf),
                ("action", "add"),
                ("path", ""),
                ("description", "Falls"),
                ("status", "active"),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let refused = relay
        .post(
            &mut nina,
            &resolve,
            &[
                ("csrf", &nina_csrf),
                ("path", &conflict_path),
                ("listed", &listed),
                ("choice", ids[0]),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    // Without the CSRF token: refused.
    let refused = relay
        .post(
            &mut browser,
            &edit,
            &[
                ("action", "add"),
                ("path", ""),
                ("description", "Falls"),
                ("status", "active"),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let refused = relay
        .post(
            &mut browser,
            &resolve,
            &[
                ("path", &conflict_path),
                ("listed", &listed),
                ("choice", ids[0]),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(
        goal_status(&stored_chart(&relay, &grace).await, &problem, &goal).len(),
        2,
        "refused requests changed nothing"
    );

    // A list that is not what the field holds (a value the page never showed) is refused.
    let stale = relay
        .post(
            &mut browser,
            &resolve,
            &[
                ("csrf", &csrf),
                ("path", &conflict_path),
                ("listed", &format!("{} 9@00ff", ids[0])),
                ("choice", ids[0]),
            ],
        )
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    assert!(stale.body.contains("changed since the page was shown"));

    // Olga keeps "on hold" (whichever id it has).
    let keep = if page.body.find("on hold").expect("on hold")
        < page.body.find("<strong>met</strong>").expect("met")
    {
        ids[0]
    } else {
        ids[1]
    };
    let done = relay
        .post(
            &mut browser,
            &resolve,
            &[
                ("csrf", &csrf),
                ("path", &conflict_path),
                ("listed", &listed),
                ("choice", keep),
                ("back", "review"),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let mut stored = stored_chart(&relay, &grace).await;
    assert!(goal_status(&stored, &problem, &goal).is_empty(), "resolved");
    let read = fieldchart_core::model::PatientChart::read(grace.chart_document_id, &stored);
    assert_eq!(read.care_plan[0].children[0].status, "on hold");
    let last = fieldchart_core::model::history(&mut stored)
        .pop()
        .expect("a change");
    assert_eq!(
        last.author.as_ref().map(|a| a.user_id.as_str()),
        Some(olga.id.as_str()),
        "the resolution is the office user's change"
    );
    // The same form again (the page is now stale: the conflict is gone) is refused clearly.
    let again = relay
        .post(
            &mut browser,
            &resolve,
            &[
                ("csrf", &csrf),
                ("path", &conflict_path),
                ("listed", &listed),
                ("choice", keep),
            ],
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);

    // Edits: add a problem, a goal under it, set the goal's status, rewrite its description.
    let added = relay
        .post(
            &mut browser,
            &edit,
            &[
                ("csrf", &csrf),
                ("action", "add"),
                ("path", ""),
                ("description", "Risk of falls"),
                ("status", "active"),
            ],
        )
        .await;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.body);
    let read = fieldchart_core::model::PatientChart::read(
        grace.chart_document_id,
        &stored_chart(&relay, &grace).await,
    );
    let falls = read
        .care_plan
        .iter()
        .find(|p| p.description == "Risk of falls")
        .expect("the new problem")
        .id
        .clone();
    for (fields, what) in [
        (
            vec![
                ("action", "add"),
                ("path", falls.as_str()),
                ("description", "No falls this month"),
                ("status", "active"),
            ],
            "add goal",
        ),
        (
            vec![
                ("action", "status"),
                ("path", "NOTSET"),
                ("status", "not a status"),
            ],
            "bad status",
        ),
    ] {
        let mut fields = fields;
        fields.push(("csrf", &csrf));
        let page = relay.post(&mut browser, &edit, &fields).await;
        if what == "bad status" {
            assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
            assert!(page.body.contains("unknown status"));
        } else {
            assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
        }
    }
    let read = fieldchart_core::model::PatientChart::read(
        grace.chart_document_id,
        &stored_chart(&relay, &grace).await,
    );
    let falls_item = read
        .care_plan
        .iter()
        .find(|p| p.id == falls)
        .expect("problem");
    let goal_path = format!("{falls}/{}", falls_item.children[0].id);
    for fields in [
        [
            ("action", "status"),
            ("path", goal_path.as_str()),
            ("status", "met"),
            ("description", ""),
        ],
        [
            ("action", "description"),
            ("path", goal_path.as_str()),
            ("status", ""),
            ("description", "No falls for 30 days"),
        ],
    ] {
        let mut fields = fields.to_vec();
        fields.push(("csrf", &csrf));
        let page = relay.post(&mut browser, &edit, &fields).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    }
    // An entry that does not exist is a clear refusal, not a server error.
    let missing = relay
        .post(
            &mut browser,
            &edit,
            &[
                ("csrf", &csrf),
                ("action", "status"),
                ("path", "nosuch/entry"),
                ("status", "met"),
            ],
        )
        .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST, "{}", missing.body);
    let page = relay.get(&mut browser, &chart_page).await;
    assert!(page.body.contains("No falls for 30 days"), "{}", page.body);
    assert!(!page.body.contains("Conflicting values"));
    let mut stored = stored_chart(&relay, &grace).await;
    let read = fieldchart_core::model::PatientChart::read(grace.chart_document_id, &stored);
    let g = &read
        .care_plan
        .iter()
        .find(|p| p.id == falls)
        .expect("problem")
        .children[0];
    assert_eq!(
        (g.description.as_str(), g.status.as_str()),
        ("No falls for 30 days", "met")
    );
    // Every write is the office user's change and a `write` audit row.
    let writes = relay
        .audit_rows(&olga)
        .await
        .into_iter()
        .filter(|(action, _, patient)| {
            *action == AuditAction::Write && patient.as_deref() == Some(grace.id.as_str())
        })
        .count();
    assert_eq!(writes, 5, "resolution, problem, goal, status, description");
    let authors: std::collections::BTreeSet<String> = fieldchart_core::model::history(&mut stored)
        .into_iter()
        .rev()
        .take(5)
        .filter_map(|h| h.author.map(|a| a.user_id))
        .collect();
    assert_eq!(
        authors.into_iter().collect::<Vec<_>>(),
        vec![olga.id.to_string()]
    );
}

#[tokio::test]
async fn care_plans_are_edited_in_the_browser_and_conflicts_resolved_by_a_person() {
    care_plans_are_edited_in_the_browser_and_conflicts_resolved_by_a_person_on(Backend::Sqlite)
        .await;
}

#[tokio::test]
async fn care_plans_are_edited_in_the_browser_and_conflicts_resolved_by_a_person_in_memory() {
    care_plans_are_edited_in_the_browser_and_conflicts_resolved_by_a_person_on(Backend::Memory)
        .await;
}

#[tokio::test]
async fn care_plans_are_edited_in_the_browser_and_conflicts_resolved_by_a_person_on_postgres() {
    care_plans_are_edited_in_the_browser_and_conflicts_resolved_by_a_person_on(Backend::Postgres)
        .await;
}

/// What a device's sync does on the relay: its changes committed through the relay's loaded
/// documents (as the WebSocket session does), so the console sees them at once.
async fn device_commits(
    relay: &Relay,
    patient: &Patient,
    id: DocumentId,
    author: (&User, &DeviceId),
    changes: Vec<automerge::Change>,
) {
    let docs = relay.state.docs();
    let guard = docs.open(id).await.expect("open").expect("stored");
    let applied = changes.clone();
    let (guard, done) = docs
        .blocking(guard, move |g| g.doc_mut().apply_changes(applied))
        .await
        .expect("blocking");
    done.expect("apply the device's changes");
    let heads = guard.heads();
    docs.commit(
        guard,
        &changes,
        fieldchart_server::storage::AuditEvent {
            at_ms: now_ms(),
            agency_id: patient.agency_id.clone(),
            user_id: author.0.id.clone(),
            device_id: author.1.clone(),
            document_id: id,
            patient_id: Some(patient.id.clone()),
            action: AuditAction::Write,
            heads,
        },
        1,
    )
    .await
    .expect("commit");
}

/// The value of `field` of the allergy or medication entry `id` in `list`, every concurrent
/// value when it is in conflict.
fn entry_values(doc: &AutoCommit, list: &str, id: &str, field: &str) -> Vec<String> {
    let path = format!("{list}/{id}/{field}");
    let conflicts: Vec<String> = fieldchart_core::model::find_conflicts(doc)
        .into_iter()
        .filter(|c| c.path == path)
        .flat_map(|c| c.values.into_iter().map(|v| shown(&v.value)))
        .collect();
    if !conflicts.is_empty() {
        return conflicts;
    }
    let chart = fieldchart_core::model::PatientChart::read(DocumentId::random(), doc);
    let value = match list {
        "allergies" => chart
            .allergies
            .iter()
            .find(|a| a.id == id)
            .map(|a| match field {
                "severity" => a.severity.clone(),
                "reaction" => a.reaction.clone(),
                _ => a.substance.clone(),
            }),
        _ => chart
            .medications
            .iter()
            .find(|m| m.id == id)
            .map(|m| match field {
                "dose" => m.dose.clone(),
                _ => m.name.clone(),
            }),
    };
    value.into_iter().collect()
}

fn shown(v: &serde_json::Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

async fn demographics_allergies_and_medications_are_edited_in_the_browser_on(backend: Backend) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let grace = relay.patient(&a, "Grace Hopper").await;
    let (nurse, device, _) = relay.enrolled_nurse(&a, "Ana").await;
    let olga = relay.console_user(&a, Role::Office, "olga").await;
    let (mut browser, csrf) = relay.signed_in("olga").await;
    let chart_page = format!("/console/patients/{}", grace.id);
    let demographics = format!("/console/patients/{}/demographics", grace.id);
    let allergies = format!("/console/patients/{}/allergies", grace.id);
    let medications = format!("/console/patients/{}/medications", grace.id);

    let page = relay.get(&mut browser, &chart_page).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    for form in ["New allergy", "New medication", "demo-phone"] {
        assert!(page.body.contains(form), "{form} on the chart page");
    }

    // A demographic field, against the value the page showed.
    let done = relay
        .post(
            &mut browser,
            &demographics,
            &[
                ("csrf", &csrf),
                ("field", "phone"),
                ("was", ""),
                ("value", "555-0100"),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let stale = relay
        .post(
            &mut browser,
            &demographics,
            &[
                ("csrf", &csrf),
                ("field", "phone"),
                ("was", "555-9999"),
                ("value", "555-0200"),
            ],
        )
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    assert!(stale.body.contains("changed since the page was shown"));
    for bad in [
        [("field", "shoeSize"), ("was", ""), ("value", "42")],
        [("field", "name"), ("was", "Grace Hopper"), ("value", "  ")],
    ] {
        let mut fields = bad.to_vec();
        fields.push(("csrf", &csrf));
        let page = relay.post(&mut browser, &demographics, &fields).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    }
    let chart = stored_chart(&relay, &grace).await;
    let read = fieldchart_core::model::PatientChart::read(grace.chart_document_id, &chart);
    assert_eq!(read.demographics["phone"], "555-0100");
    assert_eq!(
        read.demographics["name"], "Grace Hopper",
        "refused: unchanged"
    );

    // An allergy and a medication added, each the office user's change.
    let added = relay
        .post(
            &mut browser,
            &allergies,
            &[
                ("csrf", &csrf),
                ("substance", "Penicillin"),
                ("reaction", "Rash"),
                ("severity", "moderate"),
                ("status", "active"),
            ],
        )
        .await;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.body);
    let added = relay
        .post(
            &mut browser,
            &medications,
            &[
                ("csrf", &csrf),
                ("name", "Metformin"),
                ("dose", "500 mg"),
                ("route", "oral"),
                ("frequency", "twice daily"),
                ("status", "active"),
            ],
        )
        .await;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.body);
    let unknown = relay
        .post(
            &mut browser,
            &allergies,
            &[
                ("csrf", &csrf),
                ("substance", "Latex"),
                ("severity", "apocalyptic"),
                ("status", "active"),
            ],
        )
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST, "{}", unknown.body);
    let mut chart = stored_chart(&relay, &grace).await;
    let read = fieldchart_core::model::PatientChart::read(grace.chart_document_id, &chart);
    assert_eq!(read.allergies.len(), 1, "the refused allergy was not added");
    let allergy = read.allergies[0].clone();
    let medication = read.medications[0].clone();
    assert_eq!(
        (allergy.substance.as_str(), medication.dose.as_str()),
        ("Penicillin", "500 mg")
    );

    // The nurse's phone, offline, changes the allergy's severity and the medication's dose;
    // meanwhile the case manager changes the same fields in the browser.
    let before = chart.get_heads();
    chart.set_actor(automerge::ActorId::random());
    let phone = Actor {
        user_id: nurse.id.to_string(),
        device_id: device.to_string(),
    };
    chart.set_author(Some(phone.author()));
    fieldchart_core::model::upsert_allergy(
        &mut chart,
        Some(&allergy),
        &fieldchart_core::model::Allergy {
            severity: "severe".into(),
            ..allergy.clone()
        },
        &phone,
        now_ms(),
    )
    .expect("the phone's allergy edit");
    fieldchart_core::model::upsert_medication(
        &mut chart,
        Some(&medication),
        &fieldchart_core::model::Medication {
            dose: "850 mg".into(),
            ..medication.clone()
        },
        &phone,
        now_ms(),
    )
    .expect("the phone's medication edit");
    chart.commit();
    let offline: Vec<automerge::Change> = chart.get_changes(&before);

    let allergy_form = |severity: &'static str| {
        vec![
            ("id", allergy.id.clone()),
            ("substance", "Penicillin".to_owned()),
            ("reaction", "Rash".to_owned()),
            ("severity", severity.to_owned()),
            ("status", "active".to_owned()),
            ("was_substance", "Penicillin".to_owned()),
            ("was_reaction", "Rash".to_owned()),
            ("was_severity", "moderate".to_owned()),
            ("was_status", "active".to_owned()),
            ("csrf", csrf.clone()),
        ]
    };
    let fields = allergy_form("mild");
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let edited = relay.post(&mut browser, &allergies, &fields).await;
    assert_eq!(edited.status, StatusCode::SEE_OTHER, "{}", edited.body);
    let edited = relay
        .post(
            &mut browser,
            &medications,
            &[
                ("id", &medication.id),
                ("name", "Metformin"),
                ("dose", "1000 mg"),
                ("route", "oral"),
                ("frequency", "twice daily"),
                ("status", "active"),
                ("was_name", "Metformin"),
                ("was_dose", "500 mg"),
                ("was_route", "oral"),
                ("was_frequency", "twice daily"),
                ("was_status", "active"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(edited.status, StatusCode::SEE_OTHER, "{}", edited.body);

    // The phone syncs: both values of each field stand side by side; nothing is chosen.
    device_commits(
        &relay,
        &grace,
        grace.chart_document_id,
        (&nurse, &device),
        offline,
    )
    .await;
    let stored = stored_chart(&relay, &grace).await;
    let mut severities = entry_values(&stored, "allergies", &allergy.id, "severity");
    severities.sort();
    assert_eq!(severities, ["mild", "severe"], "never auto-resolved");
    let mut doses = entry_values(&stored, "medications", &medication.id, "dose");
    doses.sort();
    assert_eq!(doses, ["1000 mg", "850 mg"], "never auto-resolved");

    let page = relay.get(&mut browser, &chart_page).await;
    let severity_path = format!("allergies/{}/severity", allergy.id);
    assert!(page.body.contains(&severity_path), "{}", page.body);
    for shown in [
        "<strong>mild</strong>",
        "<strong>severe</strong>",
        "<strong>850 mg</strong>",
        "<strong>1000 mg</strong>",
    ] {
        assert!(page.body.contains(shown), "{shown} side by side");
    }
    assert!(page.body.contains(&format!("{} on {}", nurse.id, device)));
    assert_eq!(page.body.matches("Keep this value").count(), 4);
    // Editing a field in conflict is refused until a person resolves it.
    let fields = allergy_form("moderate");
    let mut fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for f in &mut fields {
        if f.0 == "was_severity" {
            f.1 = "severe";
        }
    }
    let refused = relay.post(&mut browser, &allergies, &fields).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert!(
        refused.body.contains("conflicting values"),
        "{}",
        refused.body
    );

    // She keeps the nurse's severity.
    let section = &page.body[page.body.find(&severity_path).expect("severity conflict")..];
    let listed = hidden(section, "listed");
    let severe_at = section.find("<strong>severe</strong>").expect("severe");
    let mild_at = section.find("<strong>mild</strong>").expect("mild");
    let ids: Vec<&str> = listed.split(' ').collect();
    let keep = if severe_at < mild_at { ids[0] } else { ids[1] };
    let resolve = format!("/console/patients/{}/resolve", grace.id);
    let done = relay
        .post(
            &mut browser,
            &resolve,
            &[
                ("csrf", &csrf),
                ("path", &severity_path),
                ("listed", &listed),
                ("choice", keep),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let mut stored = stored_chart(&relay, &grace).await;
    assert_eq!(
        entry_values(&stored, "allergies", &allergy.id, "severity"),
        ["severe"]
    );
    assert_eq!(
        entry_values(&stored, "medications", &medication.id, "dose").len(),
        2,
        "the dose still waits for a person"
    );
    let last = fieldchart_core::model::history(&mut stored)
        .pop()
        .expect("a change");
    assert_eq!(
        last.author.map(|a| a.user_id),
        Some(olga.id.to_string()),
        "the resolution is the office user's change"
    );

    // A clinician's console account and a form without the CSRF token change nothing.
    relay.console_user(&a, Role::Clinician, "nina").await;
    let (mut nina, nina_csrf) = relay.signed_in("nina").await;
    let refused = relay
        .post(
            &mut nina,
            &demographics,
            &[
                ("csrf", &nina_csrf),
                ("field", "phone"),
                ("was", "555-0100"),
                ("value", "555-0300"),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let refused = relay
        .post(
            &mut browser,
            &demographics,
            &[
                ("field", "phone"),
                ("was", "555-0100"),
                ("value", "555-0300"),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    // Another agency's case manager cannot reach the chart.
    let b = admin::create_agency(&*relay.storage, &cli(), "Elsewhere")
        .await
        .expect("agency b")
        .id;
    relay.console_user(&b, Role::Office, "bert").await;
    let (mut bert, bert_csrf) = relay.signed_in("bert").await;
    let refused = relay
        .post(
            &mut bert,
            &demographics,
            &[
                ("csrf", &bert_csrf),
                ("field", "phone"),
                ("was", "555-0100"),
                ("value", "555-0300"),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND, "{}", refused.body);
    let read = fieldchart_core::model::PatientChart::read(
        grace.chart_document_id,
        &stored_chart(&relay, &grace).await,
    );
    assert_eq!(read.demographics["phone"], "555-0100");
    let writes = relay
        .audit_rows(&olga)
        .await
        .into_iter()
        .filter(|(action, _, _)| *action == AuditAction::Write)
        .count();
    assert_eq!(
        writes, 6,
        "phone, allergy, medication, severity, dose, resolution: one write row each; the refused \
         requests wrote nothing"
    );
}

#[tokio::test]
async fn demographics_allergies_and_medications_are_edited_in_the_browser() {
    demographics_allergies_and_medications_are_edited_in_the_browser_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn demographics_allergies_and_medications_are_edited_in_the_browser_in_memory() {
    demographics_allergies_and_medications_are_edited_in_the_browser_on(Backend::Memory).await;
}

#[tokio::test]
async fn demographics_allergies_and_medications_are_edited_in_the_browser_on_postgres() {
    demographics_allergies_and_medications_are_edited_in_the_browser_on(Backend::Postgres).await;
}

/// A draft visit note whose `nextVisit` two copies set concurrently (the phone and the
/// nurse's tablet, offline), stored on the relay; with `signed`, signed before the two edits.
async fn note_in_conflict(
    relay: &Relay,
    patient: &Patient,
    nurse: &User,
    device: &DeviceId,
    key: Option<&DeviceKey>,
) -> DocumentId {
    let actor = Actor {
        user_id: nurse.id.to_string(),
        device_id: device.to_string(),
    };
    let store = Store::open(StoreConfig {
        path: relay.dir.join(format!("{}.db", DocumentId::random())),
        key: StoreKey::random(),
        actor: actor.clone(),
        role: Role::Clinician,
        keystroke_journal: false,
    })
    .expect("device store");
    let note = store
        .start_visit(&VisitStart {
            agency_id: patient.agency_id.to_string(),
            patient_id: patient.id.to_string(),
            service_type: "skilled-nursing".into(),
            date: "2026-11-29".into(),
            location: "12 Elm St".into(),
            started_at_ms: now_ms() - 30_000,
            start_monotonic_ms: 1,
        })
        .expect("start visit");
    store
        .update_text(note, NoteText::Assessment, "Wound healing well.")
        .expect("assessment");
    let mut doc = AutoCommit::load(&store.export_changes(note).expect("export")).expect("load");
    doc.set_actor(automerge::ActorId::random());
    doc.set_author(Some(actor.author()));
    if let Some(key) = key {
        signing::sign(&mut doc, note, key, &actor, Role::Clinician, now_ms()).expect("sign");
        doc.commit();
    }
    let mut tablet = doc.fork();
    doc.put(automerge::ROOT, "nextVisit", "Thursday")
        .expect("phone");
    doc.commit();
    tablet.set_actor(automerge::ActorId::random());
    tablet.set_author(Some(
        Actor {
            user_id: nurse.id.to_string(),
            device_id: "dev_tablet".into(),
        }
        .author(),
    ));
    tablet
        .put(automerge::ROOT, "nextVisit", "Friday")
        .expect("tablet");
    tablet.commit();
    doc.merge(&mut tablet).expect("merge");
    assert_eq!(fieldchart_core::model::find_conflicts(&doc).len(), 1);
    let saved = doc.save();
    let heads = Automerge::load(&saved).expect("reload").get_heads();
    relay
        .storage
        .write_document(DocumentWrite {
            document_id: note,
            meta: DocMeta {
                agency_id: patient.agency_id.clone(),
                patient_id: patient.id.clone(),
                kind: "visit-note".into(),
            },
            create: true,
            data: DocumentData::Snapshot(saved),
            heads,
            audit: None,
        })
        .await
        .expect("store the note");
    note
}

async fn stored_note(relay: &Relay, id: DocumentId) -> AutoCommit {
    let stored = relay
        .storage
        .load_document(id)
        .await
        .expect("load")
        .expect("note");
    let mut doc = AutoCommit::load(&stored.snapshot.expect("snapshot")).expect("note doc");
    for chunk in &stored.chunks {
        doc.load_incremental(chunk).expect("chunk");
    }
    doc
}

async fn conflicts_of_draft_notes_are_resolved_in_the_browser_and_signed_notes_never_on(
    backend: Backend,
) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let grace = relay.patient(&a, "Grace Hopper").await;
    let (nurse, device, key) = relay.enrolled_nurse(&a, "Ana").await;
    let draft = note_in_conflict(&relay, &grace, &nurse, &device, None).await;
    let signed = note_in_conflict(&relay, &grace, &nurse, &device, Some(&key)).await;
    let olga = relay.console_user(&a, Role::Office, "olga").await;
    let (mut browser, csrf) = relay.signed_in("olga").await;

    // The draft's note page lists both values with their authors, each with a button.
    let page = relay
        .get(&mut browser, &format!("/console/notes/{draft}"))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("Conflicting values"), "{}", page.body);
    for shown in [
        "<strong>Thursday</strong>",
        "<strong>Friday</strong>",
        "on dev_tablet",
    ] {
        assert!(page.body.contains(shown), "{shown}");
    }
    assert_eq!(page.body.matches("Keep this value").count(), 2);
    let listed = hidden(&page.body, "listed");
    let ids: Vec<&str> = listed.split(' ').collect();
    // The signed note's conflict is listed without buttons.
    let signed_page = relay
        .get(&mut browser, &format!("/console/notes/{signed}"))
        .await;
    assert!(
        signed_page.body.contains("The note is signed"),
        "{}",
        signed_page.body
    );
    assert!(!signed_page.body.contains("Keep this value"));
    // The review queue: buttons for the draft only.
    let queue = relay.get(&mut browser, "/console/review").await;
    assert_eq!(
        queue
            .body
            .matches(&format!("/console/notes/{draft}/resolve"))
            .count(),
        2,
        "{}",
        queue.body
    );
    assert!(
        !queue
            .body
            .contains(&format!("/console/notes/{signed}/resolve"))
    );

    // Resolving the signed note's conflict is refused and writes nothing.
    let signed_conflict =
        fieldchart_core::model::find_conflicts(&stored_note(&relay, signed).await)
            .pop()
            .expect("the signed note's conflict");
    let signed_listed = signed_conflict
        .values
        .iter()
        .map(|v| v.id.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let refused = relay
        .post(
            &mut browser,
            &format!("/console/notes/{signed}/resolve"),
            &[
                ("csrf", &csrf),
                ("path", "nextVisit"),
                ("listed", &signed_listed),
                ("choice", signed_listed.split(' ').next().expect("id")),
            ],
        )
        .await;
    assert!(
        matches!(refused.status, StatusCode::CONFLICT),
        "{}: {}",
        refused.status,
        refused.body
    );
    assert_eq!(
        fieldchart_core::model::find_conflicts(&stored_note(&relay, signed).await).len(),
        1
    );

    // A clinician cannot resolve; no token, no resolution.
    relay.console_user(&a, Role::Clinician, "nina").await;
    let (mut nina, nina_csrf) = relay.signed_in("nina").await;
    let resolve = format!("/console/notes/{draft}/resolve");
    let refused = relay
        .post(
            &mut nina,
            &resolve,
            &[
                ("csrf", &nina_csrf),
                ("path", "nextVisit"),
                ("listed", &listed),
                ("choice", ids[0]),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let refused = relay
        .post(
            &mut browser,
            &resolve,
            &[
                ("path", "nextVisit"),
                ("listed", &listed),
                ("choice", ids[0]),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);

    // She keeps "Friday".
    let keep = if page.body.find("<strong>Friday</strong>")
        < page.body.find("<strong>Thursday</strong>")
    {
        ids[0]
    } else {
        ids[1]
    };
    let done = relay
        .post(
            &mut browser,
            &resolve,
            &[
                ("csrf", &csrf),
                ("path", "nextVisit"),
                ("listed", &listed),
                ("choice", keep),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.location(), format!("/console/notes/{draft}#conflicts"));
    let mut note = stored_note(&relay, draft).await;
    assert!(fieldchart_core::model::find_conflicts(&note).is_empty());
    assert_eq!(
        fieldchart_tests_get(&note, "nextVisit").as_deref(),
        Some("Friday")
    );
    let last = fieldchart_core::model::history(&mut note)
        .pop()
        .expect("a change");
    assert_eq!(last.author.map(|a| a.user_id), Some(olga.id.to_string()));
    // The same form again: the values changed since; refused.
    let again = relay
        .post(
            &mut browser,
            &resolve,
            &[
                ("csrf", &csrf),
                ("path", "nextVisit"),
                ("listed", &listed),
                ("choice", keep),
            ],
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);
    // A chart's id is not a note.
    let wrong = relay
        .post(
            &mut browser,
            &format!("/console/notes/{}/resolve", grace.chart_document_id),
            &[
                ("csrf", &csrf),
                ("path", "nextVisit"),
                ("listed", &listed),
                ("choice", keep),
            ],
        )
        .await;
    assert_eq!(wrong.status, StatusCode::NOT_FOUND, "{}", wrong.body);
}

fn fieldchart_tests_get(doc: &AutoCommit, key: &str) -> Option<String> {
    match doc.get(automerge::ROOT, key).ok().flatten() {
        Some((automerge::Value::Scalar(s), _)) => match s.as_ref() {
            automerge::ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

#[tokio::test]
async fn conflicts_of_draft_notes_are_resolved_in_the_browser_and_signed_notes_never() {
    conflicts_of_draft_notes_are_resolved_in_the_browser_and_signed_notes_never_on(Backend::Sqlite)
        .await;
}

#[tokio::test]
async fn conflicts_of_draft_notes_are_resolved_in_the_browser_and_signed_notes_never_in_memory() {
    conflicts_of_draft_notes_are_resolved_in_the_browser_and_signed_notes_never_on(Backend::Memory)
        .await;
}

#[tokio::test]
async fn conflicts_of_draft_notes_are_resolved_in_the_browser_and_signed_notes_never_on_postgres() {
    conflicts_of_draft_notes_are_resolved_in_the_browser_and_signed_notes_never_on(
        Backend::Postgres,
    )
    .await;
}

/// `POST /v1/sync-failures` with a device's bearer token.
async fn report_failures(relay: &Relay, token: Option<&str>, body: serde_json::Value) -> Page {
    let mut req =
        Request::post("/v1/sync-failures").header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    relay
        .request(req.body(Body::from(body.to_string())).expect("request"))
        .await
}

fn failure(document: &str, patient: &str, reason: &str) -> serde_json::Value {
    serde_json::json!({
        "documentId": document,
        "documentKind": "visit-note",
        "patientId": patient,
        "failure": "refused",
        "reason": reason,
        "atMs": now_ms() - 5_000,
        "attempts": 2,
    })
}

async fn device_sync_failures_reach_the_review_queue_of_their_agency_only_on(backend: Backend) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let b = admin::create_agency(&*relay.storage, &cli(), "Elsewhere")
        .await
        .expect("agency b")
        .id;
    let grace = relay.patient(&a, "Grace Hopper").await;
    let phone = |agency: AgencyId, name: &'static str| {
        let storage = relay.storage.clone();
        async move {
            let user = admin::create_user(&*storage, &cli(), &agency, name, Role::Clinician)
                .await
                .expect("nurse");
            let (device, token) =
                admin::issue_token(&*storage, &cli(), &user.id, "phone", now_ms() + 86_400_000)
                    .await
                    .expect("token");
            (device.id, token)
        }
    };
    let (ana_device, ana_token) = phone(a.clone(), "Ana").await;
    let (_, bea_token) = phone(b.clone(), "Bea").await;
    relay.console_user(&a, Role::Office, "olga").await;
    relay.console_user(&b, Role::Office, "bert").await;
    relay.console_user(&a, Role::Clinician, "nina").await;
    let (mut olga, _) = relay.signed_in("olga").await;
    let (mut bert, _) = relay.signed_in("bert").await;
    let (mut nina, _) = relay.signed_in("nina").await;

    let queue = relay.get(&mut olga, "/console/review").await;
    assert!(
        queue
            .body
            .contains("Every device reports its documents in sync")
    );
    // Olga's review queue is open (its event stream) when the phone reports.
    let events = relay
        .app
        .clone()
        .oneshot(
            Request::get("/console/events")
                .header(header::COOKIE, olga.cookie_header())
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    let mut stream = events.into_body().into_data_stream();

    // Ana's phone cannot sync a note for Grace (not on her care team): it reports it.
    let refused_note = DocumentId::random().to_string();
    let done = report_failures(
        &relay,
        Some(&ana_token),
        serde_json::json!({ "failures": [failure(&refused_note, grace.id.as_str(), "the relay refused the document (no access to the patient)")] }),
    )
    .await;
    assert_eq!(done.status, StatusCode::NO_CONTENT, "{}", done.body);
    let data = next_change(&mut stream).await;
    assert!(data.starts_with("failures-"), "a live update: {data}");
    let queue = relay.get(&mut olga, "/console/review").await;
    for shown in [
        refused_note.as_str(),
        "Grace Hopper",
        &format!("Ana on {ana_device}"),
        "the relay refused the device",
        "no access to the patient",
        "2 attempts",
        &format!("/console/patients/{}", grace.id),
    ] {
        assert!(queue.body.contains(shown), "{shown} in {}", queue.body);
    }
    // Another agency's office and a clinician not on Grace's care team do not see it.
    assert!(
        !relay
            .get(&mut bert, "/console/review")
            .await
            .body
            .contains(&refused_note)
    );
    assert!(
        !relay
            .get(&mut nina, "/console/review")
            .await
            .body
            .contains(&refused_note)
    );

    // A device of agency B naming Grace cannot place a row in A, nor learn about Grace.
    let b_note = DocumentId::random().to_string();
    let done = report_failures(
        &relay,
        Some(&bea_token),
        serde_json::json!({ "failures": [failure(&b_note, grace.id.as_str(), "refused")] }),
    )
    .await;
    assert_eq!(done.status, StatusCode::NO_CONTENT, "{}", done.body);
    assert!(
        !relay
            .get(&mut olga, "/console/review")
            .await
            .body
            .contains(&b_note)
    );
    let b_queue = relay.get(&mut bert, "/console/review").await;
    assert!(b_queue.body.contains(&b_note) && b_queue.body.contains("unknown to the relay"));
    assert!(!b_queue.body.contains("Grace Hopper"));

    // Bad reports are refused and change nothing; so is a report without a token.
    for (token, body) in [
        (
            Some(ana_token.as_str()),
            serde_json::json!({ "failures": [{ "documentId": refused_note, "failure": "exploded", "reason": "", "atMs": 1, "attempts": 1 }] }),
        ),
        (
            Some(&ana_token),
            serde_json::json!({ "failures": [failure("not-a-document", "", "x")] }),
        ),
        (
            Some(&ana_token),
            serde_json::json!({ "failures": [failure(&b_note, "", "x"), failure(&b_note, "", "y")] }),
        ),
        (
            Some(&ana_token),
            serde_json::json!({ "failures": [failure(&b_note, "", &"x".repeat(501))] }),
        ),
        (
            Some(&ana_token),
            serde_json::json!({ "failures": (0..1_001).map(|_| failure(&DocumentId::random().to_string(), "", "x")).collect::<Vec<_>>() }),
        ),
    ] {
        let refused = report_failures(&relay, token, body).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    }
    let refused = report_failures(&relay, None, serde_json::json!({ "failures": [] })).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(
        relay
            .get(&mut olga, "/console/review")
            .await
            .body
            .contains(&refused_note)
    );

    // A later pass synced it: the phone reports an empty list and the row is gone.
    let done = report_failures(
        &relay,
        Some(&ana_token),
        serde_json::json!({ "failures": [] }),
    )
    .await;
    assert_eq!(done.status, StatusCode::NO_CONTENT);
    let queue = relay.get(&mut olga, "/console/review").await;
    assert!(!queue.body.contains(&refused_note));
    assert!(
        queue
            .body
            .contains("Every device reports its documents in sync")
    );
    assert_eq!(
        relay
            .console
            .agency_sync_failures(b.clone())
            .await
            .expect("b's failures")
            .len(),
        1,
        "agency B's row is untouched"
    );
}

#[tokio::test]
async fn device_sync_failures_reach_the_review_queue_of_their_agency_only() {
    device_sync_failures_reach_the_review_queue_of_their_agency_only_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn device_sync_failures_reach_the_review_queue_of_their_agency_only_in_memory() {
    device_sync_failures_reach_the_review_queue_of_their_agency_only_on(Backend::Memory).await;
}

#[tokio::test]
async fn device_sync_failures_reach_the_review_queue_of_their_agency_only_on_postgres() {
    device_sync_failures_reach_the_review_queue_of_their_agency_only_on(Backend::Postgres).await;
}

/// A phone whose report is sent twice at once (a retry racing the first send, or two relays
/// behind a load balancer): every send is answered 204 and the stored list is the report, once
/// — the first report of a device has no rows to lock, so the backend must serialise them.
async fn concurrent_first_reports_of_one_device_all_succeed_on(backend: Backend) {
    let relay = Relay::start_on(backend, ConsoleOptions::default()).await;
    let a = relay.agency.clone();
    let grace = relay.patient(&a, "Grace Hopper").await;
    let user = admin::create_user(&*relay.storage, &cli(), &a, "Ana", Role::Clinician)
        .await
        .expect("nurse");
    let (_, token) = admin::issue_token(
        &*relay.storage,
        &cli(),
        &user.id,
        "phone",
        now_ms() + 86_400_000,
    )
    .await
    .expect("token");
    let notes: Vec<String> = (0..3).map(|_| DocumentId::random().to_string()).collect();
    let body = serde_json::json!({ "failures": notes
        .iter()
        .map(|n| failure(n, grace.id.as_str(), "the relay refused the document"))
        .collect::<Vec<_>>() });
    let sends = (0..4).map(|_| report_failures(&relay, Some(&token), body.clone()));
    for done in futures::future::join_all(sends).await {
        assert_eq!(done.status, StatusCode::NO_CONTENT, "{}", done.body);
    }
    relay.console_user(&a, Role::Office, "olga").await;
    let (mut olga, _) = relay.signed_in("olga").await;
    let queue = relay.get(&mut olga, "/console/review").await;
    for note in &notes {
        assert_eq!(queue.body.matches(note.as_str()).count(), 1, "{note} once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_reports_of_one_device_all_succeed() {
    concurrent_first_reports_of_one_device_all_succeed_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_reports_of_one_device_all_succeed_on_postgres() {
    concurrent_first_reports_of_one_device_all_succeed_on(Backend::Postgres).await;
}

/// Two relays on one PostgreSQL schema, each with its own pool and `LISTEN` connection as two
/// `serve --database` processes have: a device's failure report through relay 1 moves the
/// review queue's live event stream open on relay 2 (the report's `NOTIFY`), and relay 2's
/// queue lists it. Without the notification only relay 1's own pages would move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_report_through_one_relay_moves_the_live_review_queue_on_another() {
    let one = Relay::start_on(Backend::Postgres, ConsoleOptions::default()).await;
    let two = one.beside(ConsoleOptions::default()).await;
    let a = one.agency.clone();
    let grace = one.patient(&a, "Grace Hopper").await;
    let ana = admin::create_user(&*one.storage, &cli(), &a, "Ana", Role::Clinician)
        .await
        .expect("nurse");
    let (_, ana_token) = admin::issue_token(
        &*one.storage,
        &cli(),
        &ana.id,
        "phone",
        now_ms() + 86_400_000,
    )
    .await
    .expect("token");
    two.console_user(&a, Role::Office, "olga").await;
    let (mut olga, _) = two.signed_in("olga").await;
    // Relay 2 has started listening (a notification sent before would not reach it).
    let mut listening = two.listening.clone().expect("relay 2 listens");
    tokio::time::timeout(Duration::from_secs(20), listening.wait_for(|n| *n > 0))
        .await
        .expect("relay 2 listening within 20 s")
        .expect("the listener runs");
    let events = two
        .app
        .clone()
        .oneshot(
            Request::get("/console/events")
                .header(header::COOKIE, olga.cookie_header())
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(events.status(), StatusCode::OK);
    let mut stream = events.into_body().into_data_stream();

    let refused_note = DocumentId::random().to_string();
    let done = report_failures(
        &one,
        Some(&ana_token),
        serde_json::json!({ "failures": [failure(&refused_note, grace.id.as_str(), "the relay refused the document (no access to the patient)")] }),
    )
    .await;
    assert_eq!(done.status, StatusCode::NO_CONTENT, "{}", done.body);
    let data = next_change(&mut stream).await;
    assert!(
        data.starts_with("failures-"),
        "a live update on relay 2: {data}"
    );
    let queue = two.get(&mut olga, "/console/review").await;
    assert!(
        queue.body.contains(&refused_note) && queue.body.contains("Grace Hopper"),
        "{}",
        queue.body
    );
}

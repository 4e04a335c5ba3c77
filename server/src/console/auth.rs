//! Signing in to the console: passwords (argon2id), one-time set-password links, the session
//! cookie, CSRF tokens, the sign-in rate limit and idle sign-out.
//!
//! - The cookie holds 256 random bits; the store keeps only their SHA-256 (like device
//!   tokens). `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends
//!   it), `Secure` when the relay serves TLS, `Path=/console`.
//! - CSRF: a signed-in session has its own random token, put into every form and compared on
//!   every post. The two forms used before a session exists (sign-in, set-password) use a
//!   double-submit cookie instead. `SameSite=Strict` alone would stop most cross-site posts;
//!   the token also stops them from a sibling subdomain and from browsers that ignore it.
//! - Rate limit: [`SIGN_IN_FAILURES`] failures per sign-in name and per remote address in
//!   [`SIGN_IN_WINDOW`], counted in memory (a restart forgets them; argon2 makes every guess
//!   cost ~50 ms of CPU anyway).
//! - A password is checked against argon2id's PHC string; a sign-in name without a password
//!   (or unknown) is hashed against a dummy so its timing matches a wrong password.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock, PoisonError};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, password_hash::rand_core::OsRng};
use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{
    Console, ConsoleError, ConsoleResult, MAX_PASSWORD_BYTES, MIN_PASSWORD_CHARS,
    PASSWORD_LINK_TTL, SESSION_LIFETIME, SIGN_IN_FAILURES, SIGN_IN_TRACKED_KEYS, SIGN_IN_WINDOW,
    pages, redirect,
};
use crate::admin::{AdminContext, PeerAddr};
use crate::auth::{Principal, hash_secret};
use crate::clock::now_ms;
use crate::console::store::{ConsoleSession, ConsoleStore, PasswordLink};
use crate::error::Error;
use crate::identity::{User, UserId, random_hex};
use crate::state::AppState;
use crate::storage::AdminEvent;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "fc_console";
/// Name of the double-submit cookie of the sign-in and set-password forms.
pub const FORM_COOKIE: &str = "fc_form";
/// Prefix of set-password link tokens.
pub const PASSWORD_LINK_PREFIX: &str = "fcp_";
/// Prefix of console session ids (the "device" audit rows name).
pub const SESSION_ID_PREFIX: &str = "web_";

fn console(state: &AppState) -> Result<&Console, Error> {
    state
        .console()
        .map(|c| &**c)
        .ok_or(Error::NotFound("console"))
}

// --- passwords -------------------------------------------------------------------------------

/// argon2id PHC string of `password` (the crate's defaults: argon2id v19, 19 MiB, t=2, p=1 —
/// OWASP's minimum recommendation). CPU work: call it on the blocking pool.
pub fn hash_password(password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Storage(format!("password hashing failed: {e}")))
}

/// Whether `password` matches the PHC string `hash`. CPU work.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A hash to check unknown names against, so they cost what a wrong password costs.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password("not a password of anyone").unwrap_or_else(|_| String::from("$argon2id$"))
    })
}

/// Check a new password: [`MIN_PASSWORD_CHARS`]..[`MAX_PASSWORD_BYTES`], equal to its
/// confirmation.
pub fn check_new_password(password: &str, confirm: &str) -> Result<(), Error> {
    if password != confirm {
        return Err(Error::BadRequest("the two passwords differ".into()));
    }
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::BadRequest(format!(
            "a password is at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    Ok(())
}

/// Normalise a sign-in name: trimmed, lower case; 3..=200 printable characters.
pub fn normalise_login(login: &str) -> Result<String, Error> {
    let login = login.trim().to_lowercase();
    if login.chars().count() < 3
        || login.chars().count() > 200
        || login.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::BadRequest(
            "a sign-in name is 3 to 200 characters without spaces".into(),
        ));
    }
    Ok(login)
}

/// A normalised sign-in name nobody has yet: checked before a user is created for it, so a
/// taken name refuses the whole request instead of leaving a user without a login.
pub async fn free_login(store: &dyn ConsoleStore, login: &str) -> Result<String, Error> {
    let login = normalise_login(login)?;
    if store.login(login.clone()).await?.is_some() {
        return Err(Error::Conflict(format!(
            "the sign-in name {login:?} is taken"
        )));
    }
    Ok(login)
}

// --- set-password links ---------------------------------------------------------------------

/// A fresh link token and its stored record.
fn new_link(user_id: &UserId, created_by: &str) -> (String, PasswordLink) {
    let token = format!("{PASSWORD_LINK_PREFIX}{}", random_hex::<32>());
    let now = now_ms();
    let link = PasswordLink {
        token_hash: hash_secret(&token),
        user_id: user_id.clone(),
        created_at: now,
        expires_at: now.saturating_add(PASSWORD_LINK_TTL.as_millis() as i64),
        created_by: created_by.to_owned(),
    };
    (token, link)
}

/// The URL of a set-password link (relative when the relay's public URL is not known).
pub fn link_url(public_url: Option<&str>, token: &str) -> String {
    format!(
        "{}/console/set-password?token={token}",
        public_url.unwrap_or("").trim_end_matches('/')
    )
}

/// Give an office (or admin) user a console sign-in name and a one-time set-password link;
/// returns the link's token. Logged as `console-create-login`. (The admin CLI calls this too.)
pub async fn create_login(
    store: &dyn ConsoleStore,
    ctx: &AdminContext,
    user: &User,
    login: &str,
) -> Result<String, Error> {
    let login = normalise_login(login)?;
    let (token, link) = new_link(&user.id, &ctx.actor);
    let event = ctx.event(
        Some(&user.agency_id),
        "console-create-login",
        user.id.as_str(),
        json!({ "login": login }),
    );
    store
        .create_login(user.id.clone(), login, link, event)
        .await?;
    Ok(token)
}

/// A new set-password link for a user who has a sign-in name (a reset). Logged.
pub async fn reset_password_link(
    store: &dyn ConsoleStore,
    ctx: &AdminContext,
    user: &User,
) -> Result<String, Error> {
    let (token, link) = new_link(&user.id, &ctx.actor);
    let event = ctx.event(
        Some(&user.agency_id),
        "console-password-link",
        user.id.as_str(),
        json!({}),
    );
    store.insert_password_link(link, event).await?;
    Ok(token)
}

// --- rate limit -----------------------------------------------------------------------------

/// Failed sign-ins per key (`login:…`, `addr:…`) within [`SIGN_IN_WINDOW`].
#[derive(Debug, Default)]
pub struct SignInLimiter {
    failures: Mutex<HashMap<String, VecDeque<i64>>>,
}

impl SignInLimiter {
    fn window_ms() -> i64 {
        SIGN_IN_WINDOW.as_millis() as i64
    }

    /// Whether any of `keys` has used up its failures.
    fn blocked(&self, keys: &[String], now: i64) -> bool {
        let mut map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        keys.iter().any(|k| {
            map.get_mut(k).is_some_and(|q| {
                while q.front().is_some_and(|t| *t <= now - Self::window_ms()) {
                    q.pop_front();
                }
                q.len() >= SIGN_IN_FAILURES
            })
        })
    }

    fn record_failure(&self, keys: &[String], now: i64) {
        let mut map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= SIGN_IN_TRACKED_KEYS {
            let cutoff = now - Self::window_ms();
            map.retain(|_, q| q.back().is_some_and(|t| *t > cutoff));
            if map.len() >= SIGN_IN_TRACKED_KEYS {
                map.clear();
            }
        }
        for k in keys {
            let q = map.entry(k.clone()).or_default();
            q.push_back(now);
            while q.len() > SIGN_IN_FAILURES {
                q.pop_front();
            }
        }
    }

    fn clear(&self, login_key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(login_key);
    }
}

// --- cookies ---------------------------------------------------------------------------------

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

fn set_cookie(name: &str, value: &str, max_age_s: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The double-submit token of a pre-session form: the cookie's, or a fresh one to set.
fn form_token(headers: &HeaderMap) -> (String, bool) {
    match cookie(headers, FORM_COOKIE).filter(|v| v.len() == 64) {
        Some(v) => (v.to_owned(), false),
        None => (random_hex::<32>(), true),
    }
}

fn with_form_cookie(mut response: Response, token: &str, fresh: bool, secure: bool) -> Response {
    if fresh {
        response
            .headers_mut()
            .append(SET_COOKIE, set_cookie(FORM_COOKIE, token, 3600, secure));
    }
    response
}

fn check_form_token(headers: &HeaderMap, submitted: &str) -> Result<(), Error> {
    match cookie(headers, FORM_COOKIE) {
        Some(expected) if constant_time_eq(expected, submitted) => Ok(()),
        _ => Err(Error::Forbidden(
            "the form's security token is missing or stale; reload the page and try again",
        )),
    }
}

// --- the signed-in user ---------------------------------------------------------------------

/// A signed-in console user: their principal (device = the browser session), the session's
/// CSRF token and what admin log rows record for them.
#[derive(Debug, Clone)]
pub struct Office {
    /// The user, acting through this browser session.
    pub principal: Principal,
    /// The session's CSRF token (put into every form).
    pub csrf: String,
    /// What admin log rows record for this user's actions.
    pub ctx: AdminContext,
}

impl Office {
    /// The user.
    pub fn user(&self) -> &User {
        &self.principal.user
    }

    /// Refuse a post whose CSRF token is not the session's.
    pub fn check_csrf(&self, submitted: &str) -> Result<(), Error> {
        if constant_time_eq(&self.csrf, submitted) {
            Ok(())
        } else {
            Err(Error::Forbidden(
                "the form's security token is missing or stale; reload the page and try again",
            ))
        }
    }
}

impl FromRequestParts<AppState> for Office {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ConsoleResult<Office> {
        let console = console(state)?;
        let Some(secret) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(Error::Unauthorized.into());
        };
        let hash = hash_secret(secret);
        let Some(session) = console.store().session(hash).await? else {
            return Err(Error::Unauthorized.into());
        };
        let now = now_ms();
        let idle_ms = console.options().idle_timeout.as_millis() as i64;
        if now - session.last_active_at >= idle_ms || now >= session.expires_at {
            console.store().delete_session(hash).await?;
            return Err(Error::Unauthorized.into());
        }
        let user = state
            .storage()
            .user(session.user_id.clone())
            .await?
            .ok_or(Error::Unauthorized)?;
        if state
            .storage()
            .user_disabled_at(user.id.clone())
            .await?
            .is_some()
        {
            console
                .store()
                .delete_user_sessions(user.id.clone())
                .await?;
            return Err(Error::Unauthorized.into());
        }
        console.store().touch_session(hash, now).await?;
        let principal = Principal {
            user,
            device_id: crate::identity::DeviceId::new(session.id.as_str()),
            expires_at: session.expires_at,
        };
        let Ok(PeerAddr(remote)) = PeerAddr::from_request_parts(parts, state).await;
        let ctx = AdminContext::http(&principal, remote);
        Ok(Office {
            principal,
            csrf: session.csrf,
            ctx,
        })
    }
}

// --- handlers --------------------------------------------------------------------------------

/// Query of the sign-in page.
#[derive(Debug, Deserialize)]
pub struct SignInQuery {
    /// Why the user is here (`idle`, `signed-out`, `password-set`).
    #[serde(default)]
    pub note: Option<String>,
}

/// `GET /console/sign-in`
pub async fn sign_in_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<SignInQuery>,
) -> ConsoleResult<Response> {
    let console = console(&state)?;
    let (token, fresh) = form_token(&headers);
    let note = match q.note.as_deref() {
        Some("signed-out") => Some("You are signed out."),
        Some("password-set") => Some("Your password is set. Sign in with it."),
        _ => None,
    };
    Ok(with_form_cookie(
        pages::sign_in_page(&token, note, None).into_response(),
        &token,
        fresh,
        console.options().secure_cookies,
    ))
}

/// The sign-in form.
#[derive(Debug, Deserialize)]
pub struct SignInForm {
    /// Sign-in name.
    pub login: String,
    /// Password.
    pub password: String,
    /// Double-submit token.
    #[serde(default)]
    pub csrf: String,
}

/// `POST /console/sign-in`
pub async fn sign_in(
    State(state): State<AppState>,
    PeerAddr(remote): PeerAddr,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> ConsoleResult<Response> {
    let console = console(&state)?;
    check_form_token(&headers, &form.csrf)?;
    let secure = console.options().secure_cookies;
    let login = form.login.trim().to_lowercase();
    let login_key = format!("login:{login}");
    let keys = [
        login_key.clone(),
        format!(
            "addr:{}",
            remote.map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string())
        ),
    ];
    let now = now_ms();
    let refuse = |message: &str, status| {
        let (token, _) = form_token(&headers);
        (status, pages::sign_in_page(&token, None, Some(message))).into_response()
    };
    if console.limiter.blocked(&keys, now) {
        return Ok(refuse(
            "Too many failed sign-ins. Wait 15 minutes and try again.",
            axum::http::StatusCode::TOO_MANY_REQUESTS,
        ));
    }
    let record = console.store().login(login.clone()).await?;
    let password = form.password;
    let (hash, known) = match record.as_ref().and_then(|r| r.password_hash.clone()) {
        Some(h) => (h, true),
        None => (dummy_hash().to_owned(), false),
    };
    let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(Error::from)?;
    let user = match (&record, known && matches) {
        (Some(r), true) => state.storage().user(r.user_id.clone()).await?,
        _ => None,
    };
    let disabled = match &user {
        Some(u) => state
            .storage()
            .user_disabled_at(u.id.clone())
            .await?
            .is_some(),
        None => false,
    };
    let Some(user) = user.filter(|_| !disabled) else {
        console.limiter.record_failure(&keys, now);
        tracing::warn!(remote = ?remote, "console sign-in refused");
        return Ok(refuse(
            "Wrong sign-in name or password.",
            axum::http::StatusCode::UNAUTHORIZED,
        ));
    };
    console.limiter.clear(&login_key);
    let secret = random_hex::<32>();
    let session = ConsoleSession {
        token_hash: hash_secret(&secret),
        id: format!("{SESSION_ID_PREFIX}{}", random_hex::<16>()),
        user_id: user.id.clone(),
        csrf: random_hex::<32>(),
        created_at: now,
        last_active_at: now,
        expires_at: now.saturating_add(SESSION_LIFETIME.as_millis() as i64),
    };
    let event = AdminEvent {
        at_ms: now,
        agency_id: Some(user.agency_id.clone()),
        actor: user.id.to_string(),
        actor_device_id: Some(crate::identity::DeviceId::new(session.id.as_str())),
        source: "http".into(),
        remote_addr: remote.map(|a| a.to_string()),
        action: "console-sign-in".into(),
        target: user.id.to_string(),
        details: json!({ "session": session.id }).to_string(),
    };
    console.store().insert_session(session, event).await?;
    let mut response = redirect("/console/");
    response.headers_mut().append(
        SET_COOKIE,
        set_cookie(SESSION_COOKIE, &secret, SESSION_LIFETIME.as_secs(), secure),
    );
    Ok(response)
}

/// A form with only its CSRF token.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
}

/// `POST /console/sign-out`
pub async fn sign_out(
    State(state): State<AppState>,
    office: Office,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> ConsoleResult<Response> {
    office.check_csrf(&form.csrf)?;
    let console = console(&state)?;
    if let Some(secret) = cookie(&headers, SESSION_COOKIE) {
        console.store().delete_session(hash_secret(secret)).await?;
    }
    let mut response = redirect("/console/sign-in?note=signed-out");
    response.headers_mut().append(
        SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", 0, console.options().secure_cookies),
    );
    Ok(response)
}

/// Query of the set-password page.
#[derive(Debug, Deserialize)]
pub struct LinkQuery {
    /// The link's token.
    #[serde(default)]
    pub token: String,
}

/// `GET /console/set-password?token=…`
pub async fn set_password_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<LinkQuery>,
) -> ConsoleResult<Response> {
    let console = console(&state)?;
    let user_id = console
        .store()
        .password_link_user(hash_secret(&q.token), now_ms())
        .await?;
    let user = state
        .storage()
        .user(user_id)
        .await?
        .ok_or(Error::NotFound("user"))?;
    let (token, fresh) = form_token(&headers);
    Ok(with_form_cookie(
        pages::set_password_page(&token, &q.token, &user.name, None).into_response(),
        &token,
        fresh,
        console.options().secure_cookies,
    ))
}

/// The set-password form.
#[derive(Debug, Deserialize)]
pub struct SetPasswordForm {
    /// The link's token.
    pub token: String,
    /// New password.
    pub password: String,
    /// Its confirmation.
    pub confirm: String,
    /// Double-submit token.
    #[serde(default)]
    pub csrf: String,
}

/// `POST /console/set-password`
pub async fn set_password(
    State(state): State<AppState>,
    PeerAddr(remote): PeerAddr,
    headers: HeaderMap,
    Form(form): Form<SetPasswordForm>,
) -> ConsoleResult<Response> {
    let console = console(&state)?;
    check_form_token(&headers, &form.csrf)?;
    let link_hash = hash_secret(&form.token);
    let user_id = console
        .store()
        .password_link_user(link_hash, now_ms())
        .await?;
    let user = state
        .storage()
        .user(user_id)
        .await?
        .ok_or(Error::NotFound("user"))?;
    if let Err(e) = check_new_password(&form.password, &form.confirm) {
        let (token, _) = form_token(&headers);
        return Ok((
            axum::http::StatusCode::BAD_REQUEST,
            pages::set_password_page(&token, &form.token, &user.name, Some(&e.to_string())),
        )
            .into_response());
    }
    let password = form.password;
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(Error::from)??;
    let event = AdminEvent {
        at_ms: now_ms(),
        agency_id: Some(user.agency_id.clone()),
        actor: user.id.to_string(),
        actor_device_id: None,
        source: "http".into(),
        remote_addr: remote.map(|a| a.to_string()),
        action: "console-set-password".into(),
        target: user.id.to_string(),
        details: "{}".into(),
    };
    console
        .store()
        .redeem_password_link(link_hash, hash, event)
        .await?;
    Ok(redirect("/console/sign-in?note=password-set"))
}

/// JSON form of a created login, for the CLI.
pub fn login_json(user: &User, login: &str, url: &str) -> serde_json::Value {
    json!({ "userId": user.id, "name": user.name, "role": user.role, "login": login, "setPasswordLink": url })
}

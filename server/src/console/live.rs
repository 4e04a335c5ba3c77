//! Live updates: the Today board and the review queue reload when the user's records change,
//! over Server-Sent Events.
//!
//! `GET /console/events` follows the change feed of what the signed-in user may see (the
//! agency's documents for office and admin users, the care team's for clinicians: the devices'
//! own feed query, so nothing of another agency ever moves it) from the moment it is opened,
//! polling it every [`LIVE_POLL`], and sends `event: changed` with the feed position when
//! something moved. The stream ends when the browser session ends (sign-out, idle, disabled):
//! the browser's reconnect then gets the sign-in redirect and stops. `console/static/live.js`
//! (the console's only script, served from the relay) reloads the page on an event unless the
//! user is in a form.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;

use super::ConsoleResult;
use super::auth::{Office, SESSION_COOKIE, cookie};
use crate::auth::hash_secret;
use crate::clock::now_ms;
use crate::error::Error;
use crate::identity::Role;
use crate::state::AppState;
use crate::storage::{FeedCursor, FeedQuery, FeedScope};

/// How often an open event stream looks at the change feed (one indexed read per stream).
pub const LIVE_POLL: Duration = Duration::from_secs(1);
/// Feed entries read per poll (only the last position matters).
const LIVE_PAGE: usize = 256;

/// `GET /console/events`
pub async fn events(
    State(state): State<AppState>,
    office: Office,
    headers: HeaderMap,
) -> ConsoleResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let session = cookie(&headers, SESSION_COOKIE)
        .map(hash_secret)
        .ok_or(Error::Unauthorized)?;
    let user = office.user();
    let scope = match user.role {
        Role::Clinician => FeedScope::CareTeam {
            agency_id: user.agency_id.clone(),
            user_id: user.id.clone(),
        },
        Role::Office | Role::Admin => FeedScope::Agency(user.agency_id.clone()),
    };
    let cursor = FeedCursor {
        seq: state.storage().current_seq().await?,
        document_id: None,
    };
    let agency = user.agency_id.clone();
    let reports = state
        .console()
        .map(|c| c.failure_reports(&agency))
        .unwrap_or_default();
    let mut tick = tokio::time::interval(LIVE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures::stream::unfold(
        (state, scope, cursor, tick, (agency, reports)),
        move |(state, scope, mut cursor, mut tick, (agency, mut reports))| async move {
            loop {
                tick.tick().await;
                let console = state.console()?;
                let idle_ms = console.options().idle_timeout.as_millis() as i64;
                let now = now_ms();
                match console.store().session(session).await {
                    Ok(Some(s)) if now - s.last_active_at < idle_ms && now < s.expires_at => {}
                    _ => return None,
                }
                // A device of the agency reported changed sync failures.
                let now_reports = console.failure_reports(&agency);
                if now_reports != reports {
                    reports = now_reports;
                    let event = Event::default()
                        .event("changed")
                        .data(format!("failures-{reports}"));
                    return Some((Ok(event), (state, scope, cursor, tick, (agency, reports))));
                }
                let page = state
                    .storage()
                    .changes(FeedQuery {
                        scope: scope.clone(),
                        after: cursor,
                        limit: LIVE_PAGE,
                    })
                    .await;
                match page {
                    Ok(page) => {
                        if let Some(last) = page.entries.last() {
                            cursor = FeedCursor {
                                seq: last.seq,
                                document_id: Some(last.document_id),
                            };
                            let event =
                                Event::default().event("changed").data(last.seq.to_string());
                            return Some((
                                Ok(event),
                                (state, scope, cursor, tick, (agency, reports)),
                            ));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "console event stream cannot read the feed");
                        return None;
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

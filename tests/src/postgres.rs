//! A fresh PostgreSQL database per test, for relays started with `serve --database`
//! ([`crate::relay_process::RelayProcess::start_postgres`]).
//!
//! The server is `FIELDCHART_TEST_POSTGRES` (a libpq key=value string), default
//! `host=127.0.0.1 port=5432 user=postgres dbname=postgres` (trust auth); `.ci/run` installs and
//! starts one when none runs. An unreachable server fails the test and says so: tests that need
//! PostgreSQL never skip silently.

use std::time::Duration;

/// Longest wait to connect to the test server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's connection string (the maintenance database).
pub fn server() -> String {
    std::env::var("FIELDCHART_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

/// Run one statement on the maintenance database, on a runtime of its own (callable from sync
/// code, from `Drop`, and from inside another runtime).
fn maintenance(sql: String) -> Result<(), String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let server = server();
            let connect = tokio_postgres::connect(&server, tokio_postgres::NoTls);
            let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| {
                    format!("no answer from PostgreSQL at `{server}` within {CONNECT_TIMEOUT:?}")
                })?
                .map_err(|e| format!("PostgreSQL is not reachable at `{server}`: {e}"))?;
            tokio::spawn(connection);
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| format!("{sql}: {e}"))
        })
    })
    .join()
    .map_err(|_| "the maintenance thread panicked".to_owned())?
}

/// A database of its own, dropped (with any connection still on it) when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    /// Create a fresh, empty database; panics with a clear message when PostgreSQL is not
    /// reachable.
    pub fn create() -> TestDatabase {
        Self::try_create().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Create a fresh, empty database; `Err` says why (e.g. PostgreSQL is not reachable).
    pub fn try_create() -> Result<TestDatabase, String> {
        let name = format!("fc_test_{:016x}", rand::random::<u64>());
        maintenance(format!("CREATE DATABASE {name}")).map_err(|e| {
            format!(
                "this needs PostgreSQL: {e}. Start it (`.ci/run` does) or point \
                 FIELDCHART_TEST_POSTGRES at one."
            )
        })?;
        let (host, port, user) = (
            option(&server(), "host").unwrap_or_else(|| "127.0.0.1".into()),
            option(&server(), "port").unwrap_or_else(|| "5432".into()),
            option(&server(), "user").unwrap_or_else(|| "postgres".into()),
        );
        let url = format!("postgres://{user}@{host}:{port}/{name}");
        Ok(TestDatabase { name, url })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `postgres://…` of the database: what `serve --database` takes.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// The value of `key` in a simple libpq key=value string.
fn option(conninfo: &str, key: &str) -> Option<String> {
    conninfo.split_whitespace().find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.trim_matches('\'').to_owned())
    })
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Err(e) = maintenance(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

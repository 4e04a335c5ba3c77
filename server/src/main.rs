//! `fieldchart-server`: the relay (`serve`) and its administration (`admin ...`).
//!
//! Every command prints exactly one JSON object on stdout (`serve` prints it once it listens:
//! `{"listening":"127.0.0.1:3030",...}`); logs go to stderr. Errors print `{"error": "..."}`
//! and exit with status 1.
//!
//! # The database key
//! The relay database is SQLCipher-encrypted. Its key (64 hex digits) comes from, in order:
//! `--key-file PATH`, `FIELDCHART_DB_KEY_FILE`, `FIELDCHART_DB_KEY`, or `<data-dir>/relay.key`.
//! When none exists and the data directory holds no database yet, a random key is written to
//! `<data-dir>/relay.key` (mode 0600) and a warning says so: the zero-setup start keeps working,
//! and the file is encrypted from its first byte. A key beside the database only protects a
//! copied database file, not a stolen disk: production keeps the key elsewhere (a secrets
//! manager writing `FIELDCHART_DB_KEY_FILE` on a tmpfs). `admin rekey --new-key-file` rotates it.
//!
//! # The operator
//! Admin commands record `cli:<operator>` as the actor of their admin log row: `--actor NAME`,
//! else the OS user (`$USER`/`$LOGNAME`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use fieldchart_server::admin;
use fieldchart_server::admin::AdminContext;
use fieldchart_server::clock::parse_time;
use fieldchart_server::config::{
    DEFAULT_AUDIT_PAGE, DEFAULT_DATA_DIR, DEFAULT_KEY_FILE, DEFAULT_LISTEN, KEY_ENV, KEY_FILE_ENV,
    Limits, MAX_AUDIT_ROWS, database_path,
};
use fieldchart_server::console;
use fieldchart_server::console::store::ConsoleStore;
use fieldchart_server::identity::{AgencyId, DeviceId, PatientId, Role, UserId, parse_role};
use fieldchart_server::storage::{
    AdminLogQuery, DatabaseKey, PostgresStorage, SqliteStorage, Storage,
};
use fieldchart_server::{AppState, Error, Result, audit};
use serde_json::{Value, json};

/// Lock file that keeps a second `serve` off a data directory.
const SERVE_LOCK_FILE: &str = "serve.lock";

#[derive(Debug, Parser)]
#[command(
    name = "fieldchart-server",
    version,
    about = "Fieldchart relay: automerge-repo sync, access control, audit"
)]
struct Cli {
    /// Directory holding the relay database (created if missing).
    #[arg(long, global = true, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// File holding the database key (64 hex digits). Also `FIELDCHART_DB_KEY_FILE`, or the key
    /// itself in `FIELDCHART_DB_KEY`; default `<data-dir>/relay.key`, generated on first use.
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// Operator name recorded as the actor of admin commands (default: the OS user).
    #[arg(long, global = true)]
    actor: Option<String>,
    /// Keep the relay's state in this PostgreSQL database (`postgres://user@host:5432/db`)
    /// instead of the SQLite file in --data-dir: several relays may serve from one database.
    /// Encryption at rest is then the database's business (--key-file does not apply).
    #[arg(long, global = true)]
    database: Option<String>,
    /// Connections each relay process keeps to --database.
    #[arg(long, global = true, default_value_t = fieldchart_server::storage::postgres::DEFAULT_POOL_SIZE)]
    database_pool: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay.
    Serve {
        /// Address to listen on (port 0 picks a free port; the chosen address is printed).
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// PEM certificate chain: serve HTTPS/WSS (needs --tls-key). Reloaded on SIGHUP and
        /// when the file changes.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve `/metrics` without a token on this separate address (keep it private). On the
        /// main listener `/metrics` needs an admin token.
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
        /// Automerge documents kept in memory; beyond it the least recently used documents no
        /// session is working on are dropped (they reload from the database on next use).
        #[arg(long, default_value_t = fieldchart_server::config::MAX_DOCS_IN_MEMORY,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        max_docs_in_memory: usize,
    },
    /// Administer agencies, users, patients, devices and the audit log.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create an agency (tenant).
    CreateAgency {
        #[arg(long)]
        name: String,
    },
    /// Create a user of an agency.
    CreateUser {
        #[arg(long)]
        agency: String,
        #[arg(long)]
        name: String,
        /// clinician, office or admin.
        #[arg(long)]
        role: String,
    },
    /// Create an office (or admin) user who signs in to the console, and print their one-time
    /// set-password link.
    CreateOfficeUser {
        #[arg(long)]
        agency: String,
        #[arg(long)]
        name: String,
        /// office or admin.
        #[arg(long, default_value = "office")]
        role: String,
        /// Console sign-in name (e.g. an e-mail address).
        #[arg(long)]
        login: String,
        /// The relay's URL as the user's browser reaches it (goes into the link).
        #[arg(long, default_value = "http://127.0.0.1:3030")]
        relay_url: String,
    },
    /// Print a new one-time set-password link for a console user (a reset).
    ConsolePasswordLink {
        #[arg(long)]
        user: String,
        /// The relay's URL as the user's browser reaches it.
        #[arg(long, default_value = "http://127.0.0.1:3030")]
        relay_url: String,
    },
    /// Create a patient and their chart document.
    CreatePatient {
        #[arg(long)]
        agency: String,
        #[arg(long)]
        name: String,
    },
    /// Put a user on a patient's care team.
    Assign {
        #[arg(long)]
        user: String,
        #[arg(long)]
        patient: String,
    },
    /// Take a user off a patient's care team.
    Unassign {
        #[arg(long)]
        user: String,
        #[arg(long)]
        patient: String,
    },
    /// Issue a bearer token for a new device of a user (printed once, stored only as a hash).
    IssueToken {
        #[arg(long)]
        user: String,
        /// A name for the device ("Maria's phone").
        #[arg(long)]
        device: String,
        /// Lifetime in days.
        #[arg(long, conflicts_with = "expires_at")]
        ttl_days: Option<u32>,
        /// Exact expiry (RFC 3339, a date, or ms since the epoch) instead of --ttl-days.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Issue a one-time enrollment code for a new device of a user (printed once, with a QR
    /// payload; stored only as a hash).
    Enroll {
        #[arg(long)]
        user: String,
        /// A name for the device ("Maria's phone"); the device may send its own.
        #[arg(long)]
        device: String,
        /// Lifetime of the code in minutes (default 15, at most a day).
        #[arg(long)]
        ttl_minutes: Option<u32>,
        /// The relay's public URL, put into the QR payload.
        #[arg(long)]
        relay_url: Option<String>,
    },
    /// Revoke a device: its token stops working and its open sessions close within a second.
    RevokeDevice {
        #[arg(long)]
        device: String,
    },
    /// Offboard a user: every device revoked (open sessions close within a second), future
    /// tokens and enrollments refused.
    DisableUser {
        #[arg(long)]
        user: String,
    },
    /// A user's devices, with last-seen times.
    ListDevices {
        #[arg(long)]
        user: String,
    },
    /// The admin log (who administered what, when, from where), a page at a time.
    AdminLog {
        #[arg(long)]
        agency: Option<String>,
        /// Only rows acting on this id.
        #[arg(long)]
        target: Option<String>,
        /// Only rows of this actor (`usr_…` or `cli:<name>`).
        #[arg(long)]
        by: Option<String>,
        /// Rows after this cursor (the `next` of the previous page).
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = DEFAULT_AUDIT_PAGE)]
        limit: usize,
    },
    /// Re-encrypt the database under a new key (the relay must be stopped). If the current key
    /// is the generated `<data-dir>/relay.key`, that file is replaced by the new key.
    Rekey {
        /// File holding the new key (64 hex digits).
        #[arg(long)]
        new_key_file: PathBuf,
    },
    /// Query the audit log by patient and/or user over a time range.
    Audit {
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Start (inclusive): RFC 3339, a date, or ms since the epoch. Default: the beginning.
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive). Default: now and beyond.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = AuditFormat::Json)]
        format: AuditFormat,
        /// Write every matching row (all pages, JSON or CSV) to this file instead of printing
        /// one page.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Rows after this cursor (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Rows per page.
        #[arg(long, default_value_t = DEFAULT_AUDIT_PAGE)]
        limit: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuditFormat {
    Json,
    Csv,
}

/// Threads in tokio's blocking pool (SQLite reads, automerge work off the async workers). Tokio's
/// default is 512: in a 1,000-device storm the relay grew to 512 threads and 600 MB of RSS,
/// with 4 reader connections and 2 cores to run them. Work beyond this waits in the pool's
/// queue instead of on a reader mutex in a thread of its own.
const MAX_BLOCKING_THREADS: usize = 32;

/// glibc malloc arenas the relay may use (`M_ARENA_MAX`). glibc's default is 8 per core; with
/// tokio's workers, the blocking pool and the SQLite writer each allocating in its own arena,
/// documents loaded and dropped under a storm left memory fragmented across arenas: relay peak
/// RSS for `reconnect-storm --devices 1000 --docs 8` was 270 MB with the default and 177 MB
/// with 2 arenas, at the same docs/s (README, Throughput).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 2;

/// Pending connections the relay's listening socket queues before it accepts them (the kernel
/// caps it at `net.core.somaxconn`, 4,096 on current Linux). tokio's `TcpListener::bind` asks
/// for 1,024: when 1,000 phones reconnect at once the queue overflowed, the kernel dropped
/// handshakes (`ListenOverflows` in `/proc/net/netstat`) and those phones waited for TCP's
/// one-second retransmission — the reconnect storm's p99 was 1.16 s with a p50 of 0.19 s.
const LISTEN_BACKLOG: u32 = 4096;

/// The relay's listening socket on `addr`, with [`LISTEN_BACKLOG`].
fn listen_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does on Unix: a restarted relay can bind while old connections
    // linger in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets an allocator parameter; it is called before any thread exists
    // (the runtime is built below). A refusal (return 0) leaves glibc's default, which is safe.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run_cli()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_cli() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, matches!(cli.command, Command::Serve { .. }));
    let result = match cli.command {
        Command::Serve {
            listen,
            tls_cert,
            tls_key,
            metrics_addr,
            max_docs_in_memory,
        } => {
            let tls = tls_cert.zip(tls_key);
            let limits = Limits {
                max_docs_in_memory,
                ..Limits::default()
            };
            match &cli.database {
                Some(url) => {
                    serve_postgres(url, cli.database_pool, listen, tls, metrics_addr, limits)
                        .await
                }
                None => {
                    serve(
                        &cli.data_dir,
                        cli.key_file.as_deref(),
                        listen,
                        tls,
                        metrics_addr,
                        limits,
                    )
                    .await
                }
            }
        }
        Command::Admin(AdminCommand::Rekey { .. }) if cli.database.is_some() => {
            Err(Error::BadRequest(
                "rekey re-encrypts the SQLite database; a PostgreSQL database is encrypted at rest by its own host"
                    .into(),
            ))
        }
        Command::Admin(command) if cli.database.is_some() => {
            let ctx = AdminContext::cli(&operator(cli.actor.as_deref()));
            let url = cli.database.as_deref().unwrap_or_default();
            match PostgresStorage::connect(url, 2).await {
                Ok(storage) => run_admin(&storage, &ctx, command)
                    .await
                    .map(|output| print_json(&output)),
                Err(e) => Err(e),
            }
        }
        Command::Admin(AdminCommand::Rekey { new_key_file }) => {
            rekey(&cli.data_dir, cli.key_file.as_deref(), &new_key_file)
                .map(|output| print_json(&output))
        }
        Command::Admin(command) => {
            let ctx = AdminContext::cli(&operator(cli.actor.as_deref()));
            match open_storage(&cli.data_dir, cli.key_file.as_deref()).await {
                Ok(storage) => run_admin(&storage, &ctx, command)
                    .await
                    .map(|output| print_json(&output)),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "failed");
            print_json(&json!({ "error": e.to_string() }));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat, serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn print_json(value: &Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout leaves nobody to tell.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// The operator recorded on admin log rows: `--actor`, else the OS user.
fn operator(actor: Option<&str>) -> String {
    actor
        .map(str::to_owned)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .map(|name| {
            name.trim()
                .chars()
                .filter(|c| !c.is_control())
                .take(100)
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Where the database key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySource {
    File(PathBuf),
    Env,
    /// `<data-dir>/relay.key`; `true` when it was generated just now.
    Default(PathBuf, bool),
}

fn read_key_file(path: &Path) -> Result<DatabaseKey> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::BadRequest(format!("cannot read the key file {}: {e}", path.display()))
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "the database key file is readable by other users; chmod 600 it");
        }
    }
    DatabaseKey::from_hex(&text)
}

/// The database key, from the options, the environment, or the data directory's key file
/// (generated when there is neither a key file nor a database yet).
fn resolve_key(data_dir: &Path, key_file: Option<&Path>) -> Result<(DatabaseKey, KeySource)> {
    if let Some(path) = key_file {
        return Ok((read_key_file(path)?, KeySource::File(path.to_owned())));
    }
    if let Some(path) = std::env::var_os(KEY_FILE_ENV) {
        let path = PathBuf::from(path);
        return Ok((read_key_file(&path)?, KeySource::File(path)));
    }
    if let Ok(hex) = std::env::var(KEY_ENV) {
        return Ok((DatabaseKey::from_hex(&hex)?, KeySource::Env));
    }
    let path = data_dir.join(DEFAULT_KEY_FILE);
    if path.exists() {
        return Ok((read_key_file(&path)?, KeySource::Default(path, false)));
    }
    if database_path(data_dir).exists() {
        return Err(Error::BadRequest(format!(
            "{} exists but no key was given and {} is missing: pass --key-file, {KEY_FILE_ENV} or {KEY_ENV}",
            database_path(data_dir).display(),
            path.display()
        )));
    }
    std::fs::create_dir_all(data_dir)?;
    let key = DatabaseKey::random();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => {
            writeln!(file, "{}", key.to_hex())?;
            file.sync_all()?;
            tracing::warn!(
                path = %path.display(),
                "no database key given: generated one beside the database. Keep a copy elsewhere \
                 (without it the database cannot be read), and in production keep the key off \
                 the data disk (--key-file / {KEY_FILE_ENV})"
            );
            Ok((key, KeySource::Default(path, true)))
        }
        // Another process (serve and an admin command at once) made it first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((read_key_file(&path)?, KeySource::Default(path, false)))
        }
        Err(e) => Err(e.into()),
    }
}

async fn open_storage(data_dir: &Path, key_file: Option<&Path>) -> Result<SqliteStorage> {
    let (key, _) = resolve_key(data_dir, key_file)?;
    let path = database_path(data_dir);
    tokio::task::spawn_blocking(move || SqliteStorage::open_encrypted(&path, &key)).await?
}

/// Take the data directory's serve lock: one relay per data directory (and no rekey while one
/// runs).
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(data_dir)?;
    let lock = std::fs::File::create(data_dir.join(SERVE_LOCK_FILE))?;
    if lock.try_lock().is_err() {
        return Err(Error::Conflict(format!(
            "another `fieldchart-server serve` is running on {}",
            data_dir.display()
        )));
    }
    Ok(lock)
}

/// `admin rekey`: re-encrypt under a new key, then (for the generated key file) replace it.
fn rekey(data_dir: &Path, key_file: Option<&Path>, new_key_file: &Path) -> Result<Value> {
    let lock = lock_data_dir(data_dir)?;
    let (old, source) = resolve_key(data_dir, key_file)?;
    let new = read_key_file(new_key_file)?;
    SqliteStorage::rekey(&database_path(data_dir), &old, &new)?;
    let mut replaced = false;
    if let KeySource::Default(path, _) = &source {
        // Write-then-rename: the key file is never half written.
        let tmp = path.with_extension("key.new");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        writeln!(file, "{}", new.to_hex())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        replaced = true;
    }
    drop(lock);
    Ok(json!({ "rekeyed": true, "defaultKeyFileReplaced": replaced }))
}

async fn serve(
    data_dir: &Path,
    key_file: Option<&Path>,
    listen: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
    metrics_addr: Option<SocketAddr>,
    limits: Limits,
) -> Result<()> {
    // One relay process per data directory: each keeps documents in memory and relies on being
    // their only writer. (The admin CLI may run alongside; it never touches a loaded document.)
    let lock = lock_data_dir(data_dir)?;
    let storage = open_storage(data_dir, key_file).await?;
    let tls = tls
        .map(|(cert, key)| fieldchart_server::tls::TlsFiles::load(&cert, &key))
        .transpose()?;
    let storage = Arc::new(storage);
    let state = AppState::new(storage.clone(), limits).await?;
    state.attach_console(
        storage,
        console::ConsoleOptions {
            secure_cookies: tls.is_some(),
            ..console::ConsoleOptions::default()
        },
    );
    let listener = listen_socket(listen)?;
    let addr = listener.local_addr()?;
    let metrics = match metrics_addr {
        Some(metrics_addr) => Some(tokio::net::TcpListener::bind(metrics_addr).await?),
        None => None,
    };
    let metrics_local = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
    tracing::info!(%addr, tls = tls.is_some(), data_dir = %data_dir.display(), "relay listening");
    print_json(&json!({
        "listening": addr.to_string(),
        "tls": tls.is_some(),
        "metrics": metrics_local.map(|a| a.to_string()),
        "dataDir": data_dir.display().to_string(),
        "storageId": state.storage_id().as_str(),
    }));
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = metrics.map(|listener| {
        tokio::spawn(fieldchart_server::run_metrics(
            listener,
            state.clone(),
            async {
                let _ = metrics_stopped.await;
            },
        ))
    });
    let served = match tls {
        Some(files) => fieldchart_server::run_tls(listener, files, state, shutdown_signal()).await,
        None => fieldchart_server::run(listener, state, shutdown_signal()).await,
    };
    let _ = stop_metrics.send(());
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    drop(lock);
    served
}

/// `serve --database postgres://…`: one of possibly several relays on one PostgreSQL
/// database. No data-directory lock (the database serialises writers; see
/// `storage/postgres.rs`); a listener for other relays' document changes (`notify`).
async fn serve_postgres(
    url: &str,
    pool_size: usize,
    listen: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
    metrics_addr: Option<SocketAddr>,
    limits: Limits,
) -> Result<()> {
    let storage = PostgresStorage::connect(url, pool_size).await?;
    let tls = tls
        .map(|(cert, key)| fieldchart_server::tls::TlsFiles::load(&cert, &key))
        .transpose()?;
    let shared = Arc::new(storage.clone());
    let state = AppState::new(shared.clone(), limits).await?;
    state.attach_console(
        shared,
        console::ConsoleOptions {
            secure_cookies: tls.is_some(),
            ..console::ConsoleOptions::default()
        },
    );
    let listener_task = fieldchart_server::notify::spawn(&storage, state.clone());
    let listener = listen_socket(listen)?;
    let addr = listener.local_addr()?;
    let metrics = match metrics_addr {
        Some(metrics_addr) => Some(tokio::net::TcpListener::bind(metrics_addr).await?),
        None => None,
    };
    let metrics_local = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
    tracing::info!(%addr, tls = tls.is_some(), database = ?storage, "relay listening");
    print_json(&json!({
        "listening": addr.to_string(),
        "tls": tls.is_some(),
        "metrics": metrics_local.map(|a| a.to_string()),
        "database": "postgres",
        "storageId": state.storage_id().as_str(),
        "epoch": state.epoch(),
    }));
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = metrics.map(|listener| {
        tokio::spawn(fieldchart_server::run_metrics(
            listener,
            state.clone(),
            async {
                let _ = metrics_stopped.await;
            },
        ))
    });
    let served = match tls {
        Some(files) => fieldchart_server::run_tls(listener, files, state, shutdown_signal()).await,
        None => fieldchart_server::run(listener, state, shutdown_signal()).await,
    };
    listener_task.abort();
    let _ = stop_metrics.send(());
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    served
}

/// Ctrl-C, or SIGTERM (what service managers and container runtimes send).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

async fn run_admin<S: Storage + ConsoleStore>(
    storage: &S,
    ctx: &AdminContext,
    command: AdminCommand,
) -> Result<Value> {
    Ok(match command {
        AdminCommand::CreateAgency { name } => {
            let agency = admin::create_agency(storage, ctx, &name).await?;
            json!({ "agencyId": agency.id, "name": agency.name })
        }
        AdminCommand::CreateUser { agency, name, role } => {
            let role = parse_role(&role).ok_or_else(|| {
                Error::BadRequest("--role must be clinician, office or admin".into())
            })?;
            admin::user_json(
                &admin::create_user(storage, ctx, &AgencyId::new(agency), &name, role).await?,
            )
        }
        AdminCommand::CreateOfficeUser {
            agency,
            name,
            role,
            login,
            relay_url,
        } => {
            let role = match parse_role(&role) {
                Some(role @ (Role::Office | Role::Admin)) => role,
                _ => {
                    return Err(Error::BadRequest(
                        "--role must be office or admin (clinicians use the phone app)".into(),
                    ));
                }
            };
            // Checked before the user is made, so a bad name leaves nothing behind.
            console::auth::free_login(storage, &login).await?;
            let user =
                admin::create_user(storage, ctx, &AgencyId::new(agency), &name, role).await?;
            let token = console::auth::create_login(storage, ctx, &user, &login).await?;
            let url = console::auth::link_url(Some(&relay_url), &token);
            console::auth::login_json(&user, &login.trim().to_lowercase(), &url)
        }
        AdminCommand::ConsolePasswordLink { user, relay_url } => {
            let user = storage
                .user(UserId::new(user))
                .await?
                .ok_or(Error::NotFound("user"))?;
            let token = console::auth::reset_password_link(storage, ctx, &user).await?;
            json!({ "userId": user.id, "setPasswordLink": console::auth::link_url(Some(&relay_url), &token) })
        }
        AdminCommand::CreatePatient { agency, name } => admin::patient_json(
            &admin::create_patient(storage, ctx, &AgencyId::new(agency), &name).await?,
        ),
        AdminCommand::Assign { user, patient } => {
            let seq = admin::assign(
                storage,
                ctx,
                &UserId::new(user.clone()),
                &PatientId::new(patient.clone()),
            )
            .await?;
            json!({ "userId": user, "patientId": patient, "assigned": true, "seq": seq })
        }
        AdminCommand::Unassign { user, patient } => {
            let removed = admin::unassign(
                storage,
                ctx,
                &UserId::new(user.clone()),
                &PatientId::new(patient.clone()),
            )
            .await?;
            json!({ "userId": user, "patientId": patient, "removed": removed })
        }
        AdminCommand::IssueToken {
            user,
            device,
            ttl_days,
            expires_at,
        } => {
            let expires_at = match expires_at {
                Some(at) => parse_time(&at)?,
                None => admin::expiry_in_days(admin::token_ttl_days(ttl_days)?),
            };
            let (device, token) =
                admin::issue_token(storage, ctx, &UserId::new(user), &device, expires_at).await?;
            admin::token_json(&device, &token)
        }
        AdminCommand::Enroll {
            user,
            device,
            ttl_minutes,
            relay_url,
        } => {
            let issued =
                admin::enroll(storage, ctx, &UserId::new(user), &device, ttl_minutes).await?;
            admin::enrollment_json(&issued, relay_url.as_deref())
        }
        AdminCommand::RevokeDevice { device } => {
            let revoked =
                admin::revoke_device(storage, ctx, &DeviceId::new(device.clone())).await?;
            json!({ "deviceId": device, "revoked": revoked })
        }
        AdminCommand::DisableUser { user } => {
            let revoked = admin::disable_user(storage, ctx, &UserId::new(user.clone())).await?;
            json!({ "userId": user, "disabled": true, "devicesRevoked": revoked })
        }
        AdminCommand::ListDevices { user } => {
            let (user, disabled, devices) =
                admin::list_devices(storage, ctx, &UserId::new(user)).await?;
            admin::devices_json(&user, disabled, &devices)
        }
        AdminCommand::AdminLog {
            agency,
            target,
            by,
            after,
            limit,
        } => {
            let (rows, next) = admin::admin_log(
                storage,
                ctx,
                AdminLogQuery {
                    agency_id: agency.map(AgencyId::new),
                    target,
                    actor: by,
                    after_id: after,
                    limit,
                },
            )
            .await?;
            json!({
                "count": rows.len(),
                "rows": rows.iter().map(admin::admin_record_json).collect::<Vec<_>>(),
                "next": next,
                "more": next.is_some(),
            })
        }
        AdminCommand::Rekey { .. } => {
            return Err(Error::BadRequest(
                "rekey runs without an open database".into(),
            ));
        }
        AdminCommand::Audit {
            patient,
            user,
            from,
            to,
            format,
            output,
            after,
            limit,
        } => {
            let from = from.as_deref().map(parse_time).transpose()?.unwrap_or(0);
            let to = to
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or(i64::MAX);
            let patient = patient.map(PatientId::new);
            let user = user.map(UserId::new);
            let agency = match (&patient, &user) {
                (Some(p), _) => storage.patient(p.clone()).await?.map(|p| p.agency_id),
                (None, Some(u)) => storage.user(u.clone()).await?.map(|u| u.agency_id),
                (None, None) => None,
            };
            match output {
                // An export: every page, into the file; never cut off.
                Some(path) => {
                    let mut rows = Vec::new();
                    let mut cursor = after;
                    loop {
                        let page = admin::audit(
                            storage,
                            ctx,
                            agency.as_ref(),
                            patient.clone(),
                            user.clone(),
                            (from, to),
                            cursor.as_deref(),
                            Some(MAX_AUDIT_ROWS),
                        )
                        .await?;
                        rows.extend(page.rows);
                        match page.next {
                            Some(next) => cursor = Some(next),
                            None => break,
                        }
                    }
                    let text = match format {
                        AuditFormat::Csv => audit::to_csv(&rows),
                        AuditFormat::Json => serde_json::to_string_pretty(&Value::Array(
                            rows.iter().map(audit::to_json).collect(),
                        ))
                        .map_err(|e| Error::Storage(e.to_string()))?,
                    };
                    std::fs::write(&path, text)?;
                    json!({ "count": rows.len(), "output": path.display().to_string() })
                }
                None => {
                    let page = admin::audit(
                        storage,
                        ctx,
                        agency.as_ref(),
                        patient,
                        user,
                        (from, to),
                        after.as_deref(),
                        Some(limit),
                    )
                    .await?;
                    let body = match format {
                        AuditFormat::Json => {
                            Value::Array(page.rows.iter().map(audit::to_json).collect())
                        }
                        AuditFormat::Csv => Value::String(audit::to_csv(&page.rows)),
                    };
                    json!({
                        "count": page.rows.len(),
                        "rows": body,
                        "next": page.next,
                        "more": page.next.is_some(),
                    })
                }
            }
        }
    })
}

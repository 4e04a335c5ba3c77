//! `fieldchart-server`: the relay (`serve`) and its administration (`admin ...`).
//!
//! Every command prints exactly one JSON object on stdout (`serve` prints it once it listens:
//! `{"listening":"127.0.0.1:3030",...}`); logs go to stderr. Errors print `{"error": "..."}`
//! and exit with status 1.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use fieldchart_server::admin;
use fieldchart_server::clock::parse_time;
use fieldchart_server::config::{
    DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_TOKEN_TTL_DAYS, Limits, database_path,
};
use fieldchart_server::identity::{AgencyId, DeviceId, PatientId, UserId, parse_role};
use fieldchart_server::storage::SqliteStorage;
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
    /// Revoke a device: its token stops working and its open sessions close within a second.
    RevokeDevice {
        #[arg(long)]
        device: String,
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
        /// Write the rows (JSON or CSV) to this file instead of into the printed object.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuditFormat {
    Json,
    Csv,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, matches!(cli.command, Command::Serve { .. }));
    let result = match cli.command {
        Command::Serve { listen } => serve(&cli.data_dir, listen).await,
        Command::Admin(command) => match open_storage(&cli.data_dir).await {
            Ok(storage) => run_admin(&storage, command)
                .await
                .map(|output| print_json(&output)),
            Err(e) => Err(e),
        },
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

async fn open_storage(data_dir: &Path) -> Result<SqliteStorage> {
    let path = database_path(data_dir);
    tokio::task::spawn_blocking(move || SqliteStorage::open(&path)).await?
}

async fn serve(data_dir: &Path, listen: SocketAddr) -> Result<()> {
    // One relay process per data directory: each keeps documents in memory and relies on being
    // their only writer. (The admin CLI may run alongside; it never touches a loaded document.)
    std::fs::create_dir_all(data_dir)?;
    let lock = std::fs::File::create(data_dir.join(SERVE_LOCK_FILE))?;
    if lock.try_lock().is_err() {
        return Err(Error::Conflict(format!(
            "another `fieldchart-server serve` is running on {}",
            data_dir.display()
        )));
    }
    let storage = open_storage(data_dir).await?;
    let state = AppState::new(Arc::new(storage), Limits::default()).await?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %data_dir.display(), "relay listening");
    print_json(&json!({
        "listening": addr.to_string(),
        "dataDir": data_dir.display().to_string(),
        "storageId": state.storage_id().as_str(),
    }));
    let served = fieldchart_server::run(listener, state, shutdown_signal()).await;
    drop(lock);
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

async fn run_admin(storage: &SqliteStorage, command: AdminCommand) -> Result<Value> {
    Ok(match command {
        AdminCommand::CreateAgency { name } => {
            let agency = admin::create_agency(storage, &name).await?;
            json!({ "agencyId": agency.id, "name": agency.name })
        }
        AdminCommand::CreateUser { agency, name, role } => {
            let role = parse_role(&role).ok_or_else(|| {
                Error::BadRequest("--role must be clinician, office or admin".into())
            })?;
            admin::user_json(
                &admin::create_user(storage, &AgencyId::new(agency), &name, role).await?,
            )
        }
        AdminCommand::CreatePatient { agency, name } => admin::patient_json(
            &admin::create_patient(
                storage,
                &AgencyId::new(agency),
                &name,
                &admin::cli_actor(),
                None,
            )
            .await?,
        ),
        AdminCommand::Assign { user, patient } => {
            let seq = admin::assign(
                storage,
                &UserId::new(user.clone()),
                &PatientId::new(patient.clone()),
            )
            .await?;
            json!({ "userId": user, "patientId": patient, "assigned": true, "seq": seq })
        }
        AdminCommand::Unassign { user, patient } => {
            let removed = admin::unassign(
                storage,
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
                None => match ttl_days.unwrap_or(DEFAULT_TOKEN_TTL_DAYS) {
                    0 => return Err(Error::BadRequest("--ttl-days must be at least 1".into())),
                    days => admin::expiry_in_days(days),
                },
            };
            let (device, token) =
                admin::issue_token(storage, &UserId::new(user), &device, expires_at).await?;
            admin::token_json(&device, &token)
        }
        AdminCommand::RevokeDevice { device } => {
            let revoked = admin::revoke_device(storage, &DeviceId::new(device.clone())).await?;
            json!({ "deviceId": device, "revoked": revoked })
        }
        AdminCommand::Audit {
            patient,
            user,
            from,
            to,
            format,
            output,
        } => {
            let from = from.as_deref().map(parse_time).transpose()?.unwrap_or(0);
            let to = to
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or(i64::MAX);
            let rows = admin::audit(
                storage,
                patient.map(PatientId::new),
                user.map(UserId::new),
                from,
                to,
            )
            .await?;
            let count = rows.len();
            let body = match format {
                AuditFormat::Json => Value::Array(rows.iter().map(audit::to_json).collect()),
                AuditFormat::Csv => Value::String(audit::to_csv(&rows)),
            };
            match output {
                Some(path) => {
                    let text = match &body {
                        Value::String(csv) => csv.clone(),
                        other => serde_json::to_string_pretty(other)
                            .map_err(|e| Error::Storage(e.to_string()))?,
                    };
                    std::fs::write(&path, text)?;
                    json!({ "count": count, "output": path.display().to_string() })
                }
                None => json!({ "count": count, "rows": body }),
            }
        }
    })
}

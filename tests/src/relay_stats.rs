//! What a relay process costs, read from `/proc/<pid>`, and the relay processes the throughput
//! benchmarks (`storm`, `bootstrap`, `reconnect-storm`, `sessions`) run.
//!
//! [`ProcSample`] reads CPU time (`stat`: utime + stime), peak and current RSS (`status`:
//! `VmHWM`, `VmRSS`) and bytes written (`io`: `wchar`, everything passed to write(2)-like
//! calls; `write_bytes`, what reached the block layer). [`BenchRelay`] runs a
//! `fieldchart-server` binary (any build: `--server-bin` compares two in one run) on a data
//! directory (or, with `--database`, on PostgreSQL) and kills it on drop. [`CpuBudget`] caps a
//! relay process's CPU with a cgroup of its own (the scale-out benchmark gives every relay the
//! same budget, so one relay and two relays on one 2-core machine compare fairly), and
//! [`PgBackends`] reads the CPU time of the PostgreSQL backends serving one database.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// How long a relay may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// User + system CPU seconds so far.
    pub cpu_s: f64,
    /// Peak resident set (`VmHWM`), bytes.
    pub peak_rss: u64,
    /// Resident set now (`VmRSS`), bytes.
    pub rss: u64,
    /// Bytes passed to write calls (`wchar`).
    pub wchar: u64,
    /// Bytes sent to the block layer (`write_bytes`; 0 where the kernel does not account it).
    pub write_bytes: u64,
}

impl ProcSample {
    /// Read `/proc/<pid>/{stat,status,io}`.
    pub fn read(pid: u32) -> Result<ProcSample, String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
        // Fields after the command name (which may hold spaces) start at field 3 (state).
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or("unreadable /proc/<pid>/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64, String> {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .ok_or_else(|| format!("/proc/{pid}/stat: field {}", i + 3))
        };
        // utime is field 14, stime field 15 (1-based); `rest` starts at field 3.
        let cpu_s = (ticks(11)? + ticks(12)?) / clock_ticks();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |k| k * 1024)
        };
        let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .map_err(|e| format!("/proc/{pid}/io: {e}"))?;
        let io_field = |key: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(ProcSample {
            cpu_s,
            peak_rss: kib("VmHWM:"),
            rss: kib("VmRSS:"),
            wchar: io_field("wchar:"),
            write_bytes: io_field("write_bytes:"),
        })
    }

    /// The counters' growth from `before` to `self` (peak and current RSS are `self`'s).
    pub fn since(&self, before: &ProcSample) -> ProcSample {
        ProcSample {
            cpu_s: self.cpu_s - before.cpu_s,
            peak_rss: self.peak_rss,
            rss: self.rss,
            wchar: self.wchar.saturating_sub(before.wchar),
            write_bytes: self.write_bytes.saturating_sub(before.write_bytes),
        }
    }

    /// JSON fields for a report.
    pub fn to_json(&self) -> Value {
        json!({
            "relay_cpu_s": self.cpu_s,
            "relay_peak_rss_bytes": self.peak_rss,
            "relay_rss_bytes": self.rss,
            "relay_wchar_bytes": self.wchar,
            "relay_write_bytes": self.write_bytes,
        })
    }
}

/// Total size of the files under `dir` (recursively).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Raise this process's open-file limit to its hard limit (children inherit it): a thousand
/// device stores and sockets need more than the usual 1,024.
pub fn raise_fd_limit() -> Result<u64, String> {
    rlimit::increase_nofile_limit(u64::MAX).map_err(|e| format!("raise RLIMIT_NOFILE: {e}"))
}

/// A `fieldchart-server serve` child process on a data directory; killed on drop.
#[derive(Debug)]
pub struct BenchRelay {
    binary: PathBuf,
    child: Child,
    addr: String,
    data_dir: PathBuf,
    /// Its cgroup, removed after the process is killed (fields drop after `Drop::drop`).
    budget: Option<CpuBudget>,
}

impl BenchRelay {
    /// The binary: `explicit`, else the `fieldchart-server` of this build.
    pub fn binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
        match explicit {
            Some(path) if path.is_file() => Ok(path.to_owned()),
            Some(path) => Err(format!("no relay binary at {}", path.display())),
            None => crate::reconnect::server_binary(),
        }
    }

    /// Run an admin command of `binary` against `data_dir`; its JSON.
    pub fn admin(binary: &Path, data_dir: &Path, args: &[&str]) -> Result<Value, String> {
        Self::admin_on(binary, data_dir, None, args)
    }

    /// Run an admin command of `binary` against `data_dir`, or against the PostgreSQL
    /// `database` (`--database postgres://…`) when given; its JSON.
    pub fn admin_on(
        binary: &Path,
        data_dir: &Path,
        database: Option<&str>,
        args: &[&str],
    ) -> Result<Value, String> {
        let mut command = Command::new(binary);
        command.arg("--data-dir").arg(data_dir);
        if let Some(url) = database {
            command.arg("--database").arg(url);
        }
        let output = command
            .arg("admin")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run the admin CLI: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "`admin {}` failed: {stdout} {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        serde_json::from_str(stdout.trim()).map_err(|e| format!("admin output {stdout:?}: {e}"))
    }

    /// Start `binary serve` on `data_dir` at a free port of 127.0.0.1.
    pub fn start(binary: &Path, data_dir: &Path) -> Result<BenchRelay, String> {
        Self::start_with(binary, data_dir, &[], None)
    }

    /// Start `binary serve <serve_args>` (e.g. `--database postgres://…`) on `data_dir` at a
    /// free port of 127.0.0.1, inside `budget`'s cgroup when given (moved there right after
    /// it starts, before it listens).
    pub fn start_with(
        binary: &Path,
        data_dir: &Path,
        serve_args: &[String],
        budget: Option<CpuBudget>,
    ) -> Result<BenchRelay, String> {
        let mut child = Command::new(binary)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(serve_args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        if let Some(budget) = &budget
            && let Err(e) = budget.add(child.id())
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the relay did not report its address".into());
            }
        };
        let parsed: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let Some(addr) = parsed["listening"].as_str().map(str::to_owned) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("unexpected first line from the relay: {line:?}"));
        };
        Ok(BenchRelay {
            binary: binary.to_owned(),
            child,
            addr,
            data_dir: data_dir.to_owned(),
            budget,
        })
    }

    /// Its CPU budget's throttling so far, when it runs under one.
    pub fn throttling(&self) -> Option<Throttling> {
        self.budget.as_ref().and_then(CpuBudget::throttling)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://<addr>`.
    pub fn http_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://<addr>/v1/sync?token=…`.
    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/v1/sync?token={token}", self.addr)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The binary it runs.
    pub fn binary_path(&self) -> &Path {
        &self.binary
    }
}

impl Drop for BenchRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percentile `p` (0..=1) of sorted seconds.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Period of the CFS quota, microseconds (the kernel's default).
const CFS_PERIOD_US: u64 = 100_000;

/// Scheduling weight of a budgeted process's cgroup, as a multiple of the default (v1
/// `cpu.shares` 1024, v2 `cpu.weight` 100). The quota caps the process at its budget; the high
/// weight lets it reach the budget on a machine crowded with other work, so the budget is
/// what it gets, as on a machine of its own that size.
const BUDGET_WEIGHT_FACTOR: u64 = 8;

/// A CPU budget for one process: a cgroup of its own whose CFS quota allows `cpus` CPUs
/// (cgroup v1 `cpu.cfs_quota_us` under `/sys/fs/cgroup/cpu`, or cgroup v2 `cpu.max`) and whose
/// weight is [`BUDGET_WEIGHT_FACTOR`] times the default, removed on drop. Needs a writable
/// cgroup hierarchy (root, or a delegated subtree).
#[derive(Debug)]
pub struct CpuBudget {
    dir: PathBuf,
    cpus: f64,
    v2: bool,
}

/// How often, and for how long, a cgroup's quota stopped its processes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Throttling {
    /// CFS periods in which the cgroup ran.
    pub periods: u64,
    /// Periods in which it used up its quota and was stopped.
    pub throttled_periods: u64,
    /// Time its processes were stopped, seconds.
    pub throttled_s: f64,
}

impl Throttling {
    /// The growth from `before` to `self`.
    pub fn since(&self, before: &Throttling) -> Throttling {
        Throttling {
            periods: self.periods.saturating_sub(before.periods),
            throttled_periods: self
                .throttled_periods
                .saturating_sub(before.throttled_periods),
            throttled_s: self.throttled_s - before.throttled_s,
        }
    }
}

impl CpuBudget {
    /// A new cgroup named `name` allowing `cpus` CPUs (e.g. 0.5). `Err` says why when no
    /// writable cgroup CPU controller exists here.
    pub fn new(name: &str, cpus: f64) -> Result<CpuBudget, String> {
        if !(cpus.is_finite() && cpus >= 0.01) {
            return Err(format!(
                "a CPU budget must be at least 0.01 CPUs, not {cpus}"
            ));
        }
        let quota = (cpus * CFS_PERIOD_US as f64).round() as u64;
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_has_cpu = std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
        let (dir, is_v2) = if v1.join("cpu.cfs_quota_us").is_file() {
            (v1.join(name), false)
        } else if v2_has_cpu {
            (v2.join(name), true)
        } else {
            return Err(
                "no cgroup CPU controller here (neither /sys/fs/cgroup/cpu/cpu.cfs_quota_us \
                 nor `cpu` in /sys/fs/cgroup/cgroup.subtree_control): run without a CPU budget"
                    .into(),
            );
        };
        std::fs::create_dir(&dir).map_err(|e| {
            format!(
                "cannot create the cgroup {} ({e}): a CPU budget needs a writable cgroup \
                 hierarchy (run as root, or without a CPU budget)",
                dir.display()
            )
        })?;
        let budget = CpuBudget {
            dir,
            cpus,
            v2: is_v2,
        };
        let write = |file: &str, value: String| {
            std::fs::write(budget.dir.join(file), &value)
                .map_err(|e| format!("{}/{file} <- {value}: {e}", budget.dir.display()))
        };
        if is_v2 {
            write("cpu.max", format!("{quota} {CFS_PERIOD_US}"))?;
            write("cpu.weight", (100 * BUDGET_WEIGHT_FACTOR).to_string())?;
        } else {
            write("cpu.cfs_period_us", CFS_PERIOD_US.to_string())?;
            write("cpu.cfs_quota_us", quota.to_string())?;
            write("cpu.shares", (1024 * BUDGET_WEIGHT_FACTOR).to_string())?;
        }
        Ok(budget)
    }

    /// CPUs allowed.
    pub fn cpus(&self) -> f64 {
        self.cpus
    }

    /// Move process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .map_err(|e| format!("move {pid} into {}: {e}", self.dir.display()))
    }

    /// Throttling so far (`cpu.stat`).
    pub fn throttling(&self) -> Option<Throttling> {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        let field = |key: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let throttled_s = if self.v2 {
            field("throttled_usec")? as f64 / 1e6
        } else {
            field("throttled_time")? as f64 / 1e9
        };
        Some(Throttling {
            periods: field("nr_periods")?,
            throttled_periods: field("nr_throttled")?,
            throttled_s,
        })
    }
}

impl Drop for CpuBudget {
    fn drop(&mut self) {
        // Succeeds once its processes are gone (the relay is killed and reaped first).
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The PostgreSQL backend processes serving one database (`postgres: USER DB HOST(PORT) …` in
/// their process title, after the cluster name where one is set), found in `/proc`, and their CPU time. Counts only the backends of
/// this database (the relays' pooled and `LISTEN` connections); the server's shared processes
/// (WAL writer, checkpointer, background writer) serve every database and are not counted.
#[derive(Debug, Clone, Default)]
pub struct PgBackends {
    /// CPU seconds by backend pid.
    cpu_s: HashMap<u32, f64>,
}

impl PgBackends {
    /// Read every backend of `database` now.
    pub fn read(database: &str) -> PgBackends {
        let mut cpu_s = HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return PgBackends { cpu_s };
        };
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            // `postgres: [CLUSTER: ]USER DATABASE HOST(PORT) STATE`, NUL-padded.
            let cmdline = String::from_utf8_lossy(&cmdline);
            let mut words = cmdline.split(|c: char| c == '\0' || c.is_whitespace());
            if words.next() != Some("postgres:") || !words.any(|w| w == database) {
                continue;
            }
            if let Ok(sample) = ProcSample::read(pid) {
                cpu_s.insert(pid, sample.cpu_s);
            }
        }
        PgBackends { cpu_s }
    }

    /// Backends found.
    pub fn count(&self) -> usize {
        self.cpu_s.len()
    }

    /// CPU seconds the backends used from `before` to `self`: growth of those in both, all of
    /// those started since (a backend that exited in between is not counted).
    pub fn cpu_since(&self, before: &PgBackends) -> f64 {
        self.cpu_s
            .iter()
            .map(|(pid, now)| now - before.cpu_s.get(pid).copied().unwrap_or(0.0))
            .sum()
    }
}

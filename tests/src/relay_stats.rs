//! What a relay process costs, read from `/proc/<pid>`, and the relay processes the throughput
//! benchmarks (`storm`, `bootstrap`, `reconnect-storm`, `sessions`) run.
//!
//! [`ProcSample`] reads CPU time (`stat`: utime + stime), peak and current RSS (`status`:
//! `VmHWM`, `VmRSS`) and bytes written (`io`: `wchar`, everything passed to write(2)-like
//! calls; `write_bytes`, what reached the block layer). [`BenchRelay`] runs a
//! `fieldchart-server` binary (any build: `--server-bin` compares two in one run) on a data
//! directory and kills it on drop.

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
        let output = Command::new(binary)
            .arg("--data-dir")
            .arg(data_dir)
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
        let mut child = Command::new(binary)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
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
        })
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

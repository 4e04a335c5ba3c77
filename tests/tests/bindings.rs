//! The uniffi bindings of `fieldchart-mobile`, run from real foreign runtimes against a real
//! relay: the same nurse's-day scenario in Python, Kotlin (JVM) and Swift (Linux), sources in
//! `mobile-bindings/tests/foreign/`.
//!
//! Each test starts a relay on 127.0.0.1, provisions an agency (a nurse with two phones, an
//! office user, a patient, enrollment codes), generates the language's bindings from the
//! library this build made (`uniffi-bindgen` in library mode), runs the foreign program with
//! the ids in `FC_*` variables and checks its `N passed, M failed` line and exit code. The
//! program asks the relay to revoke a device by printing `REVOKE <device id>`; this harness
//! revokes it with the admin CLI and answers `revoked` on its stdin.
//!
//! Toolchains (installed by `.ci/run`): `python3` (3.11); Kotlin — `kotlinc` from the npm
//! package `kotlin-compiler` under `$FIELDCHART_KOTLIN_HOME` (default
//! `/opt/fieldchart/kotlin/node_modules/kotlin-compiler`), `java` and JNA
//! (`/usr/share/java/jna.jar`); Swift — a Debian trixie chroot with `swiftlang` at
//! `$FIELDCHART_SWIFT_ROOT` (default `/var/tmp/fieldchart-trixie`), entered as root. A missing
//! toolchain fails the test with the reason; nothing is skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use fieldchart_tests::relay_process::{Admin, RelayProcess};

/// Checks the scenario makes in every language (a program that stops early reports fewer).
const MIN_CHECKS: u32 = 45;
/// Open/close cycles of the leak measurement.
const CYCLES: &str = "1000";
/// Bound on one foreign program's whole run (compiling included), on a loaded 2-core machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

/// `target/<profile>`, found from the running test executable (`target/<profile>/deps/…`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .to_owned()
}

/// The library under test: the cdylib this build made. Built as a dependency of this crate it
/// stays in `deps/`; built as a workspace member it is also copied up. The newer one is it.
fn library() -> PathBuf {
    let name = "libfieldchart_mobile.so";
    [
        profile_dir().join("deps").join(name),
        profile_dir().join(name),
    ]
    .into_iter()
    .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p)
    .unwrap_or_else(|| {
        panic!(
            "{name} is missing: `cargo test --workspace` builds it (cdylib of fieldchart-mobile)"
        )
    })
}

/// Generate `language`'s bindings into `out`.
fn generate(language: &str, out: &Path) {
    let bindgen = profile_dir().join("uniffi-bindgen");
    assert!(
        bindgen.is_file(),
        "{} is missing: `cargo test --workspace` builds it (fieldchart-mobile's \
         generated_names test needs it), or run \
         `cargo build -p fieldchart-mobile --features bindgen --bin uniffi-bindgen`",
        bindgen.display()
    );
    let output = Command::new(&bindgen)
        .args(["generate", "--library"])
        .arg(library())
        .args(["--language", language, "--no-format", "--out-dir"])
        .arg(out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run uniffi-bindgen");
    assert!(
        output.status.success(),
        "uniffi-bindgen {language} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Source of a foreign test program.
fn foreign(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../mobile-bindings/tests/foreign")
        .join(path)
}

/// A relay with an agency provisioned for the scenario, and the `FC_*` variables describing it.
struct World {
    _relay: RelayProcess,
    admin: Admin,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
    work: PathBuf,
}

fn world() -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("relay");
    let relay = RelayProcess::start(&data);
    let admin = Admin::new(&data);
    let agency = admin.create_agency("Riverside Home Health");
    let nurse = admin.create_user(&agency, "Ana Ruiz", "clinician");
    let office = admin.create_user(&agency, "Office", "office");
    let (patient, chart) = admin.create_patient(&agency, "Grace Hopper");
    admin.assign(&nurse, &patient);
    admin.assign(&office, &patient);
    let (code_a, qr_a) = admin.enrollment_with_qr(&nurse, "nurse-a");
    let (code_b, _) = admin.enrollment_with_qr(&nurse, "nurse-b");
    let (code_office, _) = admin.enrollment_with_qr(&office, "office");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let env = [
        ("FC_RELAY_URL", relay.http_base()),
        ("FC_AGENCY_ID", agency),
        ("FC_NURSE_ID", nurse),
        ("FC_OFFICE_ID", office),
        ("FC_PATIENT_ID", patient),
        ("FC_CHART_ID", chart.to_string()),
        ("FC_CODE_NURSE_A", code_a),
        ("FC_QR_NURSE_A", qr_a),
        ("FC_CODE_NURSE_B", code_b),
        ("FC_CODE_OFFICE", code_office),
        ("FC_CYCLES", CYCLES.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    World {
        _relay: relay,
        admin,
        env,
        _dir: dir,
        work,
    }
}

/// What a foreign program reported.
#[derive(Debug)]
struct Outcome {
    passed: u32,
    failed: u32,
    success: bool,
    output: String,
}

/// Run `command` (its `FC_*` variables set), serving its revocation requests, and parse its
/// summary line. `work_dir` is `FC_WORK_DIR` as the program sees it.
fn run(mut command: Command, world: &World, work_dir: &str) -> Outcome {
    command
        .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("FC_WORK_DIR", work_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let errors = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut output = String::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(device) = line.strip_prefix("REVOKE ") {
                    world.admin.revoke_device(device.trim());
                    writeln!(stdin, "revoked").expect("answer the program");
                    stdin.flush().expect("answer the program");
                }
                output.push_str(&line);
                output.push('\n');
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{command:?} did not finish within {RUN_TIMEOUT:?}; output so far:\n{output}"
                );
            }
        }
    }
    let status = child.wait().expect("wait for the program");
    let errors = errors.join().unwrap_or_default();
    output.push_str(&errors);
    let summary = output
        .lines()
        .rev()
        .find_map(|l| {
            let (passed, rest) = l.split_once(" passed, ")?;
            let failed = rest.strip_suffix(" failed")?;
            Some((passed.trim().parse().ok()?, failed.trim().parse().ok()?))
        })
        .unwrap_or_else(|| panic!("no `N passed, M failed` line ({status}):\n{output}"));
    Outcome {
        passed: summary.0,
        failed: summary.1,
        success: status.success(),
        output,
    }
}

fn assert_scenario(language: &str, outcome: &Outcome) {
    eprintln!(
        "{language}: {} passed, {} failed",
        outcome.passed, outcome.failed
    );
    // The figures of the leak measurement, for the README.
    for line in outcome.output.lines().filter(|l| l.starts_with("MEASURE")) {
        eprintln!("{line}");
    }
    assert!(
        outcome.failed == 0 && outcome.success && outcome.passed >= MIN_CHECKS,
        "{language}: {} passed, {} failed (at least {MIN_CHECKS} checks expected):\n{}",
        outcome.passed,
        outcome.failed,
        outcome.output
    );
}

/// A tool's path, or the reason it is missing.
fn require(path: &Path, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} is missing at {} — `.ci/run` installs it",
        path.display()
    );
    path.to_owned()
}

#[test]
fn python_runs_the_full_scenario() {
    let world = world();
    let bindings = world.work.join("python");
    generate("python", &bindings);
    std::fs::copy(library(), bindings.join("libfieldchart_mobile.so")).expect("copy the library");
    let version = Command::new("python3")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for the Python bindings test: {e}"));
    assert!(version.status.success(), "python3 --version failed");
    let mut command = Command::new("python3");
    command
        .arg(foreign("python/test_scenario.py"))
        .env("FC_BINDINGS_DIR", &bindings)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let outcome = run(command, &world, &world.work.to_string_lossy());
    assert_scenario("python", &outcome);
}

/// The Kotlin compiler distribution (npm `kotlin-compiler`).
fn kotlin_home() -> PathBuf {
    std::env::var_os("FIELDCHART_KOTLIN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/fieldchart/kotlin/node_modules/kotlin-compiler"))
}

#[test]
fn kotlin_runs_the_full_scenario() {
    let world = world();
    let home = kotlin_home();
    let kotlinc = require(
        &home.join("bin/kotlinc"),
        "kotlinc (npm kotlin-compiler@2.4.20)",
    );
    let stdlib = require(&home.join("lib/kotlin-stdlib.jar"), "kotlin-stdlib.jar");
    let coroutines = require(
        &home.join("lib/kotlinx-coroutines-core-jvm.jar"),
        "kotlinx-coroutines-core-jvm.jar",
    );
    let jna = require(
        Path::new("/usr/share/java/jna.jar"),
        "JNA (Debian libjna-java)",
    );
    let bindings = world.work.join("kotlin");
    generate("kotlin", &bindings);
    let lib_dir = world.work.join("kotlin-lib");
    std::fs::create_dir_all(&lib_dir).expect("lib dir");
    std::fs::copy(library(), lib_dir.join("libfieldchart_mobile.so")).expect("copy the library");
    let jar = world.work.join("scenario.jar");
    let compile = Command::new(&kotlinc)
        .arg(bindings.join("org/fieldchart/fieldchart_mobile.kt"))
        .arg(foreign("kotlin/Scenario.kt"))
        .arg("-cp")
        .arg(format!("{}:{}", jna.display(), coroutines.display()))
        .args(["-nowarn", "-d"])
        .arg(&jar)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", kotlinc.display()));
    assert!(
        compile.status.success(),
        "kotlinc failed:\n{}{}",
        String::from_utf8_lossy(&compile.stdout),
        String::from_utf8_lossy(&compile.stderr)
    );
    let mut command = Command::new("java");
    command
        // A fixed, pre-touched heap: RSS growth in the leak measurement is then not the JVM
        // growing its own heap.
        .args(["-Xms128m", "-Xmx128m", "-XX:+AlwaysPreTouch"])
        .arg(format!("-Djna.library.path={}", lib_dir.display()))
        .arg("-cp")
        .arg(format!(
            "{}:{}:{}:{}",
            jar.display(),
            jna.display(),
            coroutines.display(),
            stdlib.display()
        ))
        .arg("ScenarioKt");
    let outcome = run(command, &world, &world.work.to_string_lossy());
    assert_scenario("kotlin", &outcome);
}

/// The Debian trixie chroot holding `swiftlang` (Swift for Debian 12 does not exist).
fn swift_root() -> PathBuf {
    std::env::var_os("FIELDCHART_SWIFT_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/fieldchart-trixie"))
}

/// `/proc` mounted in the chroot while the test needs it (swiftc cannot load its runtime
/// without it); unmounted again if this test mounted it.
struct ProcMount {
    proc_dir: PathBuf,
    mounted_here: bool,
}

impl ProcMount {
    fn new(root: &Path) -> ProcMount {
        let proc_dir = root.join("proc");
        let already = Command::new("mountpoint")
            .arg("-q")
            .arg(&proc_dir)
            .status()
            .is_ok_and(|s| s.success());
        if !already {
            let status = Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(&proc_dir)
                .status()
                .expect("run mount");
            assert!(
                status.success(),
                "cannot mount /proc in the Swift chroot (the test runs as root in CI)"
            );
        }
        ProcMount {
            proc_dir,
            mounted_here: !already,
        }
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = Command::new("umount").arg(&self.proc_dir).status();
        }
    }
}

/// The stage directory inside the chroot, removed afterwards.
struct Stage(PathBuf);

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn swift_runs_the_full_scenario() {
    let world = world();
    let root = swift_root();
    require(
        &root.join("usr/bin/swiftc"),
        "swiftc in the Debian trixie chroot (debootstrap + swiftlang)",
    );
    let inside = format!("/tmp/fieldchart-bindings-{}", std::process::id());
    let stage = Stage(root.join(inside.trim_start_matches('/')));
    std::fs::create_dir_all(stage.0.join("work")).expect("stage dir in the chroot");
    generate("swift", &stage.0);
    std::fs::copy(library(), stage.0.join("libfieldchart_mobile.so")).expect("copy the library");
    std::fs::copy(foreign("swift/main.swift"), stage.0.join("main.swift"))
        .expect("copy main.swift");
    let _proc = ProcMount::new(&root);
    let compile = Command::new("chroot")
        .arg(&root)
        .args(["swiftc", "-swift-version", "5", "-module-name", "Scenario"])
        .arg(format!("-I{inside}"))
        .arg("-Xcc")
        .arg(format!(
            "-fmodule-map-file={inside}/FieldchartFFI.modulemap"
        ))
        .arg(format!("{inside}/Fieldchart.swift"))
        .arg(format!("{inside}/main.swift"))
        .arg(format!("-L{inside}"))
        .arg("-lfieldchart_mobile")
        .args(["-Xlinker", "-rpath", "-Xlinker", &inside, "-o"])
        .arg(format!("{inside}/scenario"))
        .output()
        .expect("run swiftc in the chroot");
    assert!(
        compile.status.success(),
        "swiftc failed:\n{}{}",
        String::from_utf8_lossy(&compile.stdout),
        String::from_utf8_lossy(&compile.stderr)
    );
    let mut command = Command::new("chroot");
    command.arg(&root).arg(format!("{inside}/scenario"));
    let outcome = run(command, &world, &format!("{inside}/work"));
    assert_scenario("swift", &outcome);
}

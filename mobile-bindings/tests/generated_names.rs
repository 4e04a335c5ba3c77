//! The `uniffi-bindgen` binary of this crate generates all three languages from the built
//! library with the names `uniffi.toml` sets (Kotlin package `org.fieldchart`, Swift module
//! `Fieldchart` over `FieldchartFFI`, Python module `fieldchart_mobile`). Declaring this test
//! also makes `cargo test --workspace` build the binary, which `tests/tests/bindings.rs` uses.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The cdylib of this build (`target/<profile>/` or, built as a dependency, `deps/`).
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let name = "libfieldchart_mobile.so";
    [profile.join("deps").join(name), profile.join(name)]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("{name} is missing from {}", profile.display()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn generated_bindings_use_the_configured_names() {
    let out = tempfile::tempdir().expect("temp dir");
    for language in ["kotlin", "swift", "python"] {
        let output = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
            .args(["generate", "--library"])
            .arg(library())
            .args(["--language", language, "--no-format", "--out-dir"])
            .arg(out.path().join(language))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run uniffi-bindgen");
        assert!(
            output.status.success(),
            "{language}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let kotlin = read(
        &out.path()
            .join("kotlin/org/fieldchart/fieldchart_mobile.kt"),
    );
    assert!(kotlin.contains("package org.fieldchart"));
    assert!(kotlin.contains("sealed class FieldchartException"));
    assert!(kotlin.contains("fun `closeStore`()"));
    let swift = read(&out.path().join("swift/Fieldchart.swift"));
    assert!(swift.contains("import FieldchartFFI"));
    assert!(swift.contains("enum FieldchartError: Swift.Error"));
    let modulemap = read(&out.path().join("swift/FieldchartFFI.modulemap"));
    assert!(modulemap.contains("module FieldchartFFI"));
    let python = read(&out.path().join("python/fieldchart_mobile.py"));
    assert!(python.contains("class FieldchartError"));
}

//! The `cleave-tail` command line: help that explains, and a clear exit on a bad config.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cleave-tail");

#[test]
fn help_documents_every_option() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--bundle",
        "--listen",
        "--backend",
        "--max-frame-bytes",
        "--grace-seconds",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
}

#[test]
fn a_missing_bundle_exits_64_naming_the_manifest() {
    let out = Command::new(BIN)
        .args(["--bundle", "/nonexistent/bundle", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/bundle/manifest.toml"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_backend_is_refused_with_the_choices() {
    let out = Command::new(BIN)
        .args(["--bundle", ".", "--backend", "gpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tract") && stderr.contains("ort-cuda"),
        "{stderr}"
    );
}

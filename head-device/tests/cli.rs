//! The `cleave-head` command line: help, and clear errors before any frame is sent.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cleave-head");

fn bundle() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/efficientnet-lite0-split"
    )
    .to_string()
}

#[test]
fn help_documents_every_option() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--config",
        "--bundle",
        "--server",
        "--backend",
        "--window",
        "--max-pending",
        "--deadline-ms",
        "--on-link-down",
        "--connect-timeout-ms",
        "--keepalive-ms",
        "--reconnect-max-ms",
        "--scene-threshold",
        "--watch",
        "--replay",
        "--fps",
        "--loops",
        "--stdin-raw",
        "--metrics-listen",
        "--output",
        "INPUTS",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
}

#[test]
fn a_missing_input_is_named() {
    let out = Command::new(BIN)
        .args(["--bundle", &bundle(), "/nonexistent/picture.jpg"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/picture.jpg"), "{stderr}");
}

#[test]
fn an_unreachable_tail_is_named_in_every_frame_that_expired_waiting_for_it() {
    // Port 9 on loopback: nothing listens there in a test sandbox. The head is a daemon: it
    // keeps dialling rather than exiting, and each frame expires at its deadline.
    let samples = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/samples");
    let out = Command::new(BIN)
        .args([
            "--bundle",
            &bundle(),
            "--server",
            "http://127.0.0.1:9",
            "--deadline-ms",
            "300",
            samples,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        assert!(line.contains(r#""status":"expired""#), "{line}");
        assert!(line.contains("127.0.0.1:9"), "{line}");
    }
}

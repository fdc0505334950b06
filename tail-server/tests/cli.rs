//! The `cleave-tail` command line: help that explains, and a clear exit on a bad config.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cleave-tail");

#[test]
fn help_documents_every_option() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--config",
        "--bundle",
        "--repository",
        "--listen",
        "--http-listen",
        "--backend",
        "--instances",
        "--threads",
        "--max-batch-size",
        "--max-queue-delay-us",
        "--preferred-batch-sizes",
        "--max-queue-size",
        "--timeout-ms",
        "--full-model",
        "--max-frame-bytes",
        "--max-concurrent-streams",
        "--stream-window",
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

#[test]
fn a_bad_config_exits_64_naming_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("cleave-tail-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tail.toml");
    std::fs::write(&file, "[model_defaults.batching]\nmax_batch = 8\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", file.to_str().unwrap(), "--bundle", "."])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_batch") && stderr.contains("tail.toml"),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .args([
            "--bundle",
            ".",
            "--max-batch-size",
            "4",
            "--preferred-batch-sizes",
            "2,8",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("preferred batch size 8"), "{stderr}");

    let out = Command::new(BIN)
        .args(["--repository", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds no bundle"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_example_config_in_deploy_starts_a_server() {
    use std::io::{BufRead, BufReader};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new(BIN)
        .current_dir(&root)
        .args(["--config", "deploy/tail.toml"])
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.starts_with("listening on 127.0.0.1:"), "{first}");
    assert!(second.starts_with("http on 127.0.0.1:"), "{second}");
}

//! The README's first command, `cleave-bench demo`, on the bundled model and samples: it must
//! finish, classify every sample through the tail, and print the comparison table.

use std::process::Command;

#[test]
fn the_demo_runs_end_to_end_on_the_bundled_model() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(env!("CARGO_BIN_EXE_cleave-bench"))
        .arg("demo")
        .current_dir(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let samples = std::fs::read_dir(format!("{root}/models/samples"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "jpg")
        })
        .count();
    let rows = stdout
        .lines()
        .filter(|l| l.trim_end().ends_with(char::is_numeric))
        .count();
    assert!(rows >= samples, "expected a row per sample:\n{stdout}");
    assert!(
        stdout.contains("top-1 agreement") && stdout.contains("machine:"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAILED"), "{stdout}");
}

//! The files in `deploy/` are checked by the tools that will read them: systemd's own
//! analyzer for the head's unit (syntax, and its offline security exposure score).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use cleave_tests::{TempDir, binary, repo_root};

fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipping: systemd-analyze is not installed here");
    }
    found.then_some("systemd-analyze")
}

#[test]
fn the_head_unit_verifies_and_is_hardened() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let unit =
        std::fs::read_to_string(repo_root().join("deploy/systemd/cleave-head.service")).unwrap();
    // verify checks that ExecStart exists: point it at the binary just built.
    let unit = unit.replace(
        "/usr/local/bin/cleave-head",
        &binary("cleave-head").display().to_string(),
    );
    let dir = TempDir::new("unit");
    let path = dir.path().join("cleave-head.service");
    std::fs::write(&path, unit).unwrap();

    let verify = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{said}");
    assert!(
        !said.contains("cleave-head.service"),
        "systemd has remarks on the unit: {said}"
    );

    // Exposure 0 (locked down) to 10 (unprotected); 2.0 or less is "OK" in systemd's words.
    let security = Command::new(analyze)
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(security.status.success(), "exposure above 2.0:\n{report}");
}

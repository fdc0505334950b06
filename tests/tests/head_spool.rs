//! `--on-link-down spool`: frames that cannot be sent wait on disk and go out when a tail is
//! back, in the same run (through an emulated outage) or the next one (after a restart);
//! every frame still ends in exactly one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use cleave_tests::{
    HeadProcess, TailProcess, TempDir, default_bundle, resetting_link, sample_files, samples,
};
use serde_json::Value;

fn from_spool(line: &Value) -> bool {
    line["note"]
        .as_str()
        .is_some_and(|n| n.contains("sent from the on-disk spool"))
}

fn spooled_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "frame")
        })
        .count()
}

#[test]
fn frames_spooled_while_no_tail_runs_are_answered_after_a_restart() {
    let spool = TempDir::new("spool-restart");
    let dir = spool.path().display().to_string();
    // No tail at all: every frame goes to the spool, and none has a line yet.
    let first = HeadProcess::start(
        &[
            "--server",
            "http://127.0.0.1:9",
            "--on-link-down",
            "spool",
            "--spool-dir",
            &dir,
            "--reconnect-max-ms",
            "200",
        ],
        &sample_files(),
        Stdio::null(),
    );
    let (code, lines) = first.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(
        lines.is_empty(),
        "spooled frames have no line yet: {lines:?}"
    );
    assert_eq!(spooled_files(spool.path()), sample_files().len());

    // The next run, with a tail: the spooled frames are answered first, then its own.
    let tail = TailProcess::start(&default_bundle());
    let own = &sample_files()[..1];
    let second = HeadProcess::start(
        &[
            "--server",
            &tail.url(),
            "--on-link-down",
            "spool",
            "--spool-dir",
            &dir,
        ],
        own,
        Stdio::null(),
    );
    let (code, lines) = second.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    assert_eq!(lines.len(), sample_files().len() + 1, "{lines:#?}");
    assert!(
        lines.iter().all(|l| l["status"] == "answered"),
        "{lines:#?}"
    );
    let mut drained: Vec<String> = lines
        .iter()
        .filter(|l| from_spool(l))
        .map(|l| l["source"].as_str().unwrap().to_string())
        .collect();
    drained.sort();
    let mut expected: Vec<String> = sample_files()
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    expected.sort();
    assert_eq!(drained, expected, "each spooled frame answered once");
    assert_eq!(
        spooled_files(spool.path()),
        0,
        "answered frames leave the spool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_spools_frames_and_they_are_sent_when_the_link_returns() {
    let tail = TailProcess::start(&default_bundle());
    let link = resetting_link(tail.addr).await;
    let spool = TempDir::new("spool-outage");
    let server = format!("http://{}", link.local_addr());
    let (dir, replay) = (
        spool.path().display().to_string(),
        samples().display().to_string(),
    );
    let flags = [
        "--server",
        &server,
        "--replay",
        &replay,
        "--fps",
        "4",
        "--loops",
        "4",
        "--on-link-down",
        "spool",
        "--spool-dir",
        &dir,
        "--reconnect-max-ms",
        "300",
        "--deadline-ms",
        "60000",
    ];
    let head = HeadProcess::start(&flags, &[], Stdio::null());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    link.set_down(true);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    link.set_down(false);
    let (code, lines) = tokio::task::spawn_blocking(move || head.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{lines:?}");
    let frames = 4 * sample_files().len();
    assert_eq!(lines.len(), frames, "one line per frame: {lines:#?}");
    assert!(
        lines.iter().all(|l| l["status"] == "answered"),
        "{lines:#?}"
    );
    let spooled = lines.iter().filter(|l| from_spool(l)).count();
    assert!(spooled > 0, "some frames waited in the spool: {lines:#?}");
    assert_eq!(spooled_files(spool.path()), 0);
}

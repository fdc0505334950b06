//! The head daemon's sources and its scene gate, through the real `cleave-head` binary and a
//! real tail: raw frames on stdin, a watched folder that files appear in, and SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cleave_tests::{TailProcess, TempDir, binary, default_bundle, sample_files};
use serde_json::Value;

fn head(flags: &[&str], stdin: Stdio) -> (Child, mpsc::Receiver<Value>) {
    let mut child = Command::new(binary("cleave-head"))
        .arg("--bundle")
        .arg(default_bundle())
        .args(flags)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx
                .send(serde_json::from_str::<Value>(&line).unwrap())
                .is_err()
            {
                break;
            }
        }
    });
    (child, rx)
}

fn next(lines: &mpsc::Receiver<Value>) -> Value {
    lines
        .recv_timeout(Duration::from_secs(120))
        .expect("a line within 120 s")
}

/// A sample photograph as raw RGB, 320×240.
fn raw_frame(index: usize) -> Vec<u8> {
    let image = image::open(&sample_files()[index]).unwrap();
    image
        .resize_exact(320, 240, image::imageops::FilterType::Triangle)
        .to_rgb8()
        .into_raw()
}

#[test]
fn raw_frames_on_stdin_pass_the_scene_gate_only_when_the_scene_changes() {
    let tail = TailProcess::start(&default_bundle());
    let (mut child, lines) = head(
        &[
            "--server",
            &tail.url(),
            "--stdin-raw",
            "320x240",
            "--scene-threshold",
            "0.02",
        ],
        Stdio::piped(),
    );
    let mut stdin = child.stdin.take().unwrap();
    let (cat, rocket) = (raw_frame(1), raw_frame(5));
    for frame in [&cat, &cat, &rocket, &rocket, &cat] {
        stdin.write_all(frame).unwrap();
    }
    drop(stdin);
    let status = child.wait().unwrap();
    let lines: Vec<Value> = lines.iter().collect();
    let statuses: Vec<&str> = lines
        .iter()
        .map(|l| l["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["answered", "unchanged", "answered", "unchanged", "answered"],
        "{lines:?}"
    );
    assert_eq!(lines[1]["skipped"]["kind"], "unchanged");
    assert_eq!(
        lines[1]["bytes_sent"], 0,
        "an unchanged frame sends nothing"
    );
    assert_eq!(lines[0]["source"], "stdin#0");
    assert_eq!(
        lines[0]["top5"][0], lines[4]["top5"][0],
        "the same picture, the same class"
    );
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_watched_folder_is_served_as_files_appear_and_sigterm_ends_the_daemon_cleanly() {
    let tail = TailProcess::start(&default_bundle());
    let dir = TempDir::new("watch");
    let (mut child, lines) = head(
        &[
            "--server",
            &tail.url(),
            "--watch",
            &dir.path().display().to_string(),
            "--watch-poll-ms",
            "50",
        ],
        Stdio::null(),
    );
    let samples = sample_files();
    for (i, sample) in samples.iter().take(3).enumerate() {
        // Written under another name, then renamed: the way cameras and rsync deliver.
        let part = dir.path().join(format!("{i}.part"));
        std::fs::copy(sample, &part).unwrap();
        std::fs::rename(&part, dir.path().join(format!("frame-{i}.jpg"))).unwrap();
        let line = next(&lines);
        assert_eq!(line["status"], "answered", "{line}");
        assert!(
            line["source"]
                .as_str()
                .unwrap()
                .ends_with(&format!("frame-{i}.jpg")),
            "{line}"
        );
    }
    // Still running, waiting for more.
    assert!(child.try_wait().unwrap().is_none());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the daemon cleanly: {status:?}"
    );
    assert!(lines.try_recv().is_err(), "no frame reported twice");
}

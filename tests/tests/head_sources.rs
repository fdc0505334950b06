//! The head daemon's sources and its scene gate, through the real `cleave-head` binary and a
//! real tail: raw frames on stdin, a watched folder that files appear in, and SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use cleave_tests::{
    HeadProcess, TailProcess, TempDir, binary, default_bundle, http_get, sample_files,
};
use serde_json::Value;

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
    let dir = TempDir::new("output");
    let output = dir.path().join("frames.jsonl");
    // A line from an earlier run: --output appends.
    std::fs::write(&output, "{\"earlier\": true}\n").unwrap();
    let mut head = HeadProcess::start(
        &[
            "--server",
            &tail.url(),
            "--stdin-raw",
            "320x240",
            "--scene-threshold",
            "0.02",
            "--output",
            &output.display().to_string(),
        ],
        &[],
        Stdio::piped(),
    );
    let mut stdin = head.take_stdin();
    let (cat, rocket) = (raw_frame(1), raw_frame(5));
    for frame in [&cat, &cat, &rocket, &rocket, &cat] {
        stdin.write_all(frame).unwrap();
    }
    drop(stdin);
    let (code, stdout_lines) = head.finish();
    assert!(stdout_lines.is_empty(), "lines go to --output, not stdout");
    let written = std::fs::read_to_string(&output).unwrap();
    let mut lines: Vec<Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.remove(0)["earlier"], true, "{written}");
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
    assert_eq!(code, Some(0));
}

#[test]
fn a_watched_folder_is_served_as_files_appear_and_sigterm_ends_the_daemon_cleanly() {
    let tail = TailProcess::start(&default_bundle());
    let dir = TempDir::new("watch");
    let mut head = HeadProcess::start(
        &[
            "--server",
            &tail.url(),
            "--watch",
            &dir.path().display().to_string(),
            "--watch-poll-ms",
            "50",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
        Stdio::null(),
    );
    let metrics_addr = head.metrics_addr();
    let samples = sample_files();
    for (i, sample) in samples.iter().take(3).enumerate() {
        // Written under another name, then renamed: the way cameras and rsync deliver.
        let part = dir.path().join(format!("{i}.part"));
        std::fs::copy(sample, &part).unwrap();
        std::fs::rename(&part, dir.path().join(format!("frame-{i}.jpg"))).unwrap();
        let line = head.next_line();
        assert_eq!(line["status"], "answered", "{line}");
        assert!(
            line["source"]
                .as_str()
                .unwrap()
                .ends_with(&format!("frame-{i}.jpg")),
            "{line}"
        );
    }
    // Still running, waiting for more; its metrics say what happened.
    assert!(head.is_running());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, text) = runtime
        .block_on(http_get(metrics_addr, "/metrics"))
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert_eq!(
        value(r#"cleave_head_frames_total{status="answered",mode="split"}"#),
        3.0
    );
    assert!(value("cleave_head_sent_bytes_total") > 3000.0);
    assert_eq!(
        value("cleave_head_frame_duration_seconds_count{mode=\"split\"}"),
        3.0
    );
    head.signal_term();
    let (code, lines) = head.finish();
    assert_eq!(code, Some(0), "SIGTERM ends the daemon cleanly");
    assert_eq!(lines.len(), 3, "no frame reported twice: {lines:?}");
}

#[test]
fn a_config_file_sets_options_flags_override_it_and_typos_are_refused() {
    let dir = TempDir::new("config");
    let config = dir.path().join("head.toml");
    let dead = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    );
    std::fs::write(
        &config,
        format!(
            "server = [\"{dead}\"]\non_link_down = \"drop\"\nreplay = \"{}\"\nfps = 50\nloops = 1\n",
            cleave_tests::samples().display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let run = |extra: &[&str]| {
        let output = Command::new(binary("cleave-head"))
            .arg("--bundle")
            .arg(default_bundle())
            .args(["--config", &config])
            .args(extra)
            .output()
            .unwrap();
        let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (
            output.status.code(),
            lines,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let samples = sample_files().len();

    let (code, lines, stderr) = run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(lines.len(), samples);
    assert!(
        lines.iter().all(|l| l["status"] == "dropped"),
        "the file's policy: {lines:?}"
    );

    let (code, lines, stderr) = run(&["--on-link-down", "local"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        lines
            .iter()
            .all(|l| l["mode"] == "local" && l["status"] == "answered"),
        "the flag's policy: {lines:?}"
    );

    std::fs::write(dir.path().join("typo.toml"), "dedline_ms = 5\n").unwrap();
    let output = Command::new(binary("cleave-head"))
        .arg("--bundle")
        .arg(default_bundle())
        .arg("--config")
        .arg(dir.path().join("typo.toml"))
        .arg("x.jpg")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("typo.toml") && stderr.contains("`dedline_ms`"),
        "{stderr}"
    );
}

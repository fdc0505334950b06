//! The head's uplink when tails die: the real `cleave-head` binary against real `cleave-tail`
//! processes that are killed (SIGKILL, no drain) and restarted mid-run.
//!
//! Whatever happens to the link, every input ends in exactly one JSON line: answered by a
//! tail (perhaps after a resend), run locally, expired or dropped — each with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cleave_engine::{Backend, Bundle, Preprocessor, Role, Tensor, top_k};
use cleave_tests::{HeadProcess, TailProcess, default_bundle, sample_files};
use serde_json::Value;

/// `copies` passes over the sample photographs: enough frames to kill a tail in the middle.
fn inputs(copies: usize) -> Vec<PathBuf> {
    let files = sample_files();
    (0..copies).flat_map(|_| files.iter().cloned()).collect()
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every frame id from 0 to `n - 1` has exactly one line.
fn assert_each_frame_once(lines: &[Value], n: usize) {
    let ids: Vec<u64> = lines
        .iter()
        .map(|l| l["frame_id"].as_u64().unwrap())
        .collect();
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), n, "one line per frame: {ids:?}");
    assert_eq!(unique, (0..n as u64).collect(), "each frame once: {ids:?}");
}

fn statuses(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["status"].as_str().unwrap())
        .collect()
}

#[test]
fn a_tail_killed_mid_stream_and_restarted_loses_no_frame() {
    let bundle = default_bundle();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut tail = TailProcess::start_on(&bundle, &listen, &[]);
    let inputs = inputs(8);
    let server = format!("http://{listen}");
    let mut head = HeadProcess::start(
        &[
            "--server",
            &server,
            "--window",
            "4",
            "--reconnect-max-ms",
            "300",
            "--deadline-ms",
            "60000",
        ],
        &inputs,
        Stdio::null(),
    );
    head.wait_for_lines(6);
    // Frozen first, so the head fills its window with frames nobody answers; then killed,
    // so those frames are on a stream that resets.
    tail.pause();
    std::thread::sleep(Duration::from_secs(2));
    tail.kill();
    std::thread::sleep(Duration::from_millis(700));
    let _restarted = TailProcess::start_on(&bundle, &listen, &[]);
    let (code, lines) = head.finish();

    assert_each_frame_once(&lines, inputs.len());
    assert!(
        statuses(&lines).iter().all(|s| *s == "answered"),
        "every frame answered once the tail was back: {lines:?}"
    );
    assert_eq!(code, Some(0));
    // The frames on the stream when the tail died were sent again to the new process.
    let resent = lines
        .iter()
        .filter(|l| l["sends"].as_u64() > Some(1))
        .count();
    assert!(resent > 0, "no frame was resent: {lines:?}");
    // Answers are the model's, not artefacts of the resend: each photograph gets the same
    // class on every pass.
    let files = sample_files().len();
    for line in &lines {
        let id = line["frame_id"].as_u64().unwrap() as usize;
        assert_eq!(
            line["top5"][0]["index"],
            lines[id % files]["top5"][0]["index"],
            "{line}"
        );
    }
}

#[test]
fn when_one_of_two_tails_dies_the_head_fails_over_to_the_other() {
    let bundle = default_bundle();
    let mut first = TailProcess::start(&bundle);
    let second = TailProcess::start(&bundle);
    let inputs = inputs(6);
    let mut head = HeadProcess::start(
        &[
            "--server",
            &first.url(),
            "--server",
            &second.url(),
            "--deadline-ms",
            "60000",
        ],
        &inputs,
        Stdio::null(),
    );
    head.wait_for_lines(4);
    first.kill();
    let (code, lines) = head.finish();

    assert_each_frame_once(&lines, inputs.len());
    assert!(
        statuses(&lines).iter().all(|s| *s == "answered"),
        "{lines:?}"
    );
    assert_eq!(code, Some(0));
    let servers: Vec<&str> = lines
        .iter()
        .map(|l| l["server"].as_str().unwrap())
        .collect();
    assert_eq!(servers[0], first.url(), "the first server is preferred");
    assert_eq!(
        *servers.last().unwrap(),
        second.url(),
        "the rest went to the second tail: {servers:?}"
    );
}

/// A head whose only server never answers, with `--on-link-down POLICY`.
fn with_no_tail(policy: &str, deadline_ms: &str) -> (Option<i32>, Vec<Value>, String) {
    let server = format!("http://127.0.0.1:{}", free_port());
    let inputs = sample_files();
    let head = HeadProcess::start(
        &[
            "--server",
            &server,
            "--on-link-down",
            policy,
            "--deadline-ms",
            deadline_ms,
            "--reconnect-max-ms",
            "200",
        ],
        &inputs,
        Stdio::null(),
    );
    let (code, lines) = head.finish();
    assert_each_frame_once(&lines, inputs.len());
    (code, lines, server)
}

#[test]
fn with_the_link_down_the_policy_decides_and_every_line_says_so() {
    // drop: reported dropped, naming the server that could not be reached.
    let (code, lines, server) = with_no_tail("drop", "60000");
    assert!(
        statuses(&lines).iter().all(|s| *s == "dropped"),
        "{lines:?}"
    );
    for line in &lines {
        assert_eq!(line["error"]["kind"], "link_down", "{line}");
    }
    assert!(
        lines.iter().any(|l| l["error"]["message"]
            .as_str()
            .unwrap()
            .contains(server.trim_start_matches("http://"))),
        "the reason names the server: {lines:?}"
    );
    assert_eq!(code, Some(0), "dropping is what the policy asked for");

    // wait: held until the deadline, then expired.
    let (code, lines, _) = with_no_tail("wait", "400");
    assert!(
        statuses(&lines).iter().all(|s| *s == "expired"),
        "{lines:?}"
    );
    assert_eq!(code, Some(1));

    // local: the full model on the device answers, as the tail would have.
    let (code, lines, _) = with_no_tail("local", "60000");
    assert!(
        statuses(&lines).iter().all(|s| *s == "answered"),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l["mode"] == "local"), "{lines:?}");
    assert_eq!(code, Some(0));
    // It is the bundle's full model, run as a reference here.
    let bundle = Bundle::open(default_bundle()).unwrap();
    let model = bundle.load(Role::Full, &Backend::Tract).unwrap();
    let preprocessor = Preprocessor::new(&bundle.manifest().input);
    for (line, path) in lines.iter().zip(sample_files()) {
        let input = preprocessor.from_path(&path).unwrap();
        let logits = model.run(&Tensor::stack(&[&input])).unwrap();
        let best = top_k(&logits.data, 1).remove(0);
        assert_eq!(line["top5"][0]["index"], best.index, "{line}");
        let score = line["top5"][0]["score"].as_f64().unwrap();
        assert!((score - f64::from(best.score)).abs() < 1e-4, "{line}");
    }
}

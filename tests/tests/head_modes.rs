//! The head's modes over real processes and sockets: `offload` (a JPEG to a tail that runs
//! the full model), `local` (no server at all), and rate control against a latency target.
//! `auto` is in `head_auto.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;

use cleave_tests::{HeadProcess, TailProcess, default_bundle, sample_files};
use serde_json::Value;

fn run_head(flags: &[&str]) -> Vec<Value> {
    let head = HeadProcess::start(flags, &sample_files(), Stdio::null());
    let (code, lines) = head.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    lines
}

fn top1(line: &Value) -> &str {
    line["top5"][0]["label"].as_str().unwrap_or_default()
}

#[test]
fn offload_runs_the_full_model_on_the_server_and_local_needs_no_server() {
    let tail = TailProcess::start_with(&default_bundle(), &["--full-model"]);
    let server = tail.url();
    let offloaded = run_head(&["--server", &server, "--mode", "offload"]);
    let local = run_head(&["--mode", "local", "--server", "http://127.0.0.1:9"]);
    assert_eq!(offloaded.len(), sample_files().len());
    assert_eq!(local.len(), sample_files().len());
    let mut agree = 0;
    for (o, l) in offloaded.iter().zip(&local) {
        assert_eq!(o["status"], "answered", "{o}");
        assert_eq!(o["mode"], "offload", "{o}");
        assert_eq!(o["coding"], "jpeg q85", "{o}");
        let sent = o["bytes_sent"].as_u64().unwrap();
        assert!(sent > 1000, "{o}");
        assert_eq!(o["tail_received_bytes"].as_u64().unwrap(), sent, "{o}");
        assert_eq!(l["status"], "answered", "{l}");
        assert_eq!(l["mode"], "local", "{l}");
        assert_eq!(l["bytes_sent"], 0, "{l}");
        agree += usize::from(top1(o) == top1(l));
    }
    // The JPEG at quality 85 costs the server's full model little: the top class is the
    // device's on all but at most one photograph.
    assert!(agree + 1 >= local.len(), "{offloaded:?}\n{local:?}");

    // A tail that does not run the full model answers each frame with a clear error.
    let plain = TailProcess::start(&default_bundle());
    let refused = HeadProcess::start(
        &["--server", &plain.url(), "--mode", "offload"],
        &sample_files()[..2],
        Stdio::null(),
    );
    let (code, lines) = refused.finish();
    assert_eq!(code, Some(1));
    for line in &lines {
        assert_eq!(line["status"], "failed", "{line}");
        assert_eq!(line["error"]["kind"], "unsupported", "{line}");
        assert!(
            line["error"]["message"]
                .as_str()
                .unwrap()
                .contains("full_model"),
            "{line}"
        );
    }
}

#[test]
fn rate_control_steps_the_bit_depth_to_the_latency_target() {
    let tail = TailProcess::start(&default_bundle());
    let server = tail.url();
    let depths = |target: &str| -> Vec<String> {
        let lines = run_head(&[
            "--server",
            &server,
            "--window",
            "1",
            "--max-pending",
            "1",
            "--latency-target-ms",
            target,
        ]);
        assert!(lines.iter().all(|l| l["status"] == "answered"), "{lines:?}");
        // The first frame has nothing measured yet: the bundle's default depth.
        assert!(
            lines[0]["coding"].as_str().unwrap().starts_with("5-bit"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0]["choice"].as_str().unwrap().contains("default"),
            "{}",
            lines[0]
        );
        lines[1..]
            .iter()
            .map(|l| l["coding"].as_str().unwrap().to_string())
            .collect()
    };
    // A minute: everything fits, so the most faithful depth.
    let loose = depths("60000");
    assert!(loose.iter().all(|c| c.starts_with("8-bit")), "{loose:?}");
    // A millisecond: nothing fits, so the smallest frame.
    let tight = depths("1");
    assert!(tight.iter().all(|c| c.starts_with("2-bit")), "{tight:?}");
}

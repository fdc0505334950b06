//! The head daemon over an emulated link that breaks: the real `cleave-head` and
//! `cleave-tail` binaries with `cleave_link` between them, frames replayed at a fixed
//! rate, and outages of both kinds — connections reset, or every byte stalled.
//!
//! With `--on-link-down local`, the frames that come while no tail is reachable are run on
//! the device, and once the link is back the head returns to split computing by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use cleave_link::{LinkEmulator, LinkProfile, OutageMode, Shaping};
use cleave_tests::{HeadProcess, TailProcess, default_bundle, resetting_link, samples};
use serde_json::Value;

/// Replays the samples through `link` with `flags`; `outage` runs (on the test's runtime)
/// while the head works. Returns every line.
async fn replay_through(
    link: &LinkEmulator,
    flags: &[&str],
    outage: impl std::future::Future<Output = ()>,
) -> Vec<Value> {
    let server = format!("http://{}", link.local_addr());
    let samples = samples().display().to_string();
    let mut all = vec![
        "--server",
        &server,
        "--replay",
        &samples,
        "--fps",
        "4",
        "--loops",
        "5",
        "--on-link-down",
        "local",
        "--reconnect-max-ms",
        "400",
        "--deadline-ms",
        "60000",
    ];
    all.extend_from_slice(flags);
    let head = HeadProcess::start(&all, &[], Stdio::null());
    outage.await;
    let (code, lines) = tokio::task::spawn_blocking(move || head.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    lines
}

fn check_local_during_and_split_after(lines: &[Value]) {
    let ids: Vec<u64> = lines
        .iter()
        .map(|l| l["frame_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 30, "{lines:?}");
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>().len(), 30);
    assert!(
        lines.iter().all(|l| l["status"] == "answered"),
        "every frame answered, one way or the other: {lines:?}"
    );
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    let first_local = modes.iter().position(|m| *m == "local");
    let last_local = modes.iter().rposition(|m| *m == "local");
    let (Some(first_local), Some(last_local)) = (first_local, last_local) else {
        panic!("no frame ran locally during the outage: {modes:?}");
    };
    assert!(
        modes[..first_local].iter().all(|m| *m == "split"),
        "split before the outage: {modes:?}"
    );
    assert!(
        modes[last_local + 1..].len() >= 3 && modes[last_local + 1..].iter().all(|m| *m == "split"),
        "back to split once the link returned: {modes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_link_falls_back_to_the_device_and_returns_to_split() {
    let tail = TailProcess::start(&default_bundle());
    let link = resetting_link(tail.addr).await;
    let lines = replay_through(&link, &[], async {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        link.set_down(true);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        link.set_down(false);
    })
    .await;
    check_local_during_and_split_after(&lines);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_is_noticed_by_keepalive_and_deadlines_then_falls_back() {
    let tail = TailProcess::start(&default_bundle());
    // A slow, distant uplink that then goes silent: no reset, no FIN, bytes just stop.
    let shaping = Shaping {
        rate_bits_per_s: Some(2_000_000),
        delay: Duration::from_millis(20),
        ..Shaping::default()
    };
    let link = LinkEmulator::start(
        "127.0.0.1:0".parse().unwrap(),
        tail.addr,
        LinkProfile {
            up: shaping,
            down: shaping,
            outage_mode: OutageMode::Stall,
            ..LinkProfile::default()
        },
    )
    .await
    .unwrap();
    let flags = ["--keepalive-ms", "400", "--connect-timeout-ms", "500"];
    let lines = replay_through(&link, &flags, async {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        link.set_down(true);
        tokio::time::sleep(Duration::from_millis(3000)).await;
        link.set_down(false);
    })
    .await;
    check_local_during_and_split_after(&lines);
    // The frames caught on the stream when it went silent were not lost: they were answered
    // after a resend, or locally.
    assert!(link.stats().connections >= 2, "{:?}", link.stats());
}

//! `auto` choosing between modes under emulated links (`cleave_link` between the real
//! `cleave-head` and `cleave-tail`): offload on a fast link, split on a slow one (where local
//! is not allowed, or where it is clearly best), local when the link is gone.
//!
//! `auto` is only interesting when the server is faster than the device, as a GPU server
//! is faster than a Raspberry Pi. On one machine the stand-in is backends: the head runs
//! tract, the tail ONNX Runtime (several times faster here). The test needs ONNX Runtime
//! and skips without it, unless `CLEAVE_REQUIRE_ORT=1`. It is alone in its test binary: the
//! choices follow measured compute times, which other tests running beside it would skew.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use cleave_engine::{Backend, Bundle, EngineError, OrtDevice, Role};
use cleave_link::{LinkEmulator, LinkProfile, Shaping};
use cleave_tests::{
    HeadProcess, TailProcess, default_bundle, resetting_link, sample_files, samples,
};
use serde_json::Value;

fn run_head(flags: &[&str]) -> Vec<Value> {
    let head = HeadProcess::start(flags, &sample_files(), Stdio::null());
    let (code, lines) = head.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    lines
}

/// Whether ONNX Runtime can run here; `None` (and a message) when it cannot and the tests
/// may skip.
fn ort_available() -> Option<()> {
    let bundle = Bundle::open(default_bundle()).unwrap();
    match bundle.load(Role::Tail, &Backend::Ort(OrtDevice::Cpu)) {
        Ok(_) => Some(()),
        Err(EngineError::BackendUnavailable(why))
            if std::env::var("CLEAVE_REQUIRE_ORT").as_deref() != Ok("1") =>
        {
            eprintln!("skipping: ONNX Runtime is not available here ({why})");
            None
        }
        Err(other) => panic!("ONNX Runtime failed: {other}"),
    }
}

/// What one mode cost per frame on loopback: device ms, tail ms, bytes (medians).
#[derive(Debug, Clone, Copy)]
struct Cost {
    device_ms: f64,
    tail_ms: f64,
    bytes: f64,
}

impl Cost {
    /// Latency over a link of `mbit` Mbit/s and `rtt_ms`.
    fn latency(&self, mbit: f64, rtt_ms: f64) -> f64 {
        let link = if self.bytes > 0.0 {
            rtt_ms + self.bytes * 8.0 / (mbit * 1e3)
        } else {
            0.0
        };
        self.device_ms + self.tail_ms + link
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn cost_of(lines: &[Value]) -> Cost {
    let field = |name: &str| median(lines.iter().map(|l| l[name].as_f64().unwrap()).collect());
    Cost {
        device_ms: field("head_ms"),
        tail_ms: field("tail_ms"),
        bytes: field("bytes_sent"),
    }
}

/// `auto` through `link`: frames replayed one at a time. Returns the modes of the frames
/// it chose as the cheapest or held (not those exploring or probing).
async fn auto_through(link: &LinkEmulator, loops: &str, modes: &str) -> (Vec<String>, Vec<Value>) {
    let server = format!("http://{}", link.local_addr());
    let samples = samples().display().to_string();
    let flags = [
        "--auto-modes",
        modes,
        "--server",
        &server,
        "--mode",
        "auto",
        "--replay",
        &samples,
        "--fps",
        "3",
        "--loops",
        loops,
        "--window",
        "1",
        "--max-pending",
        "1",
        "--deadline-ms",
        "60000",
        "--reconnect-max-ms",
        "300",
        "--probe-every",
        "10",
    ];
    let head = HeadProcess::start(&flags, &[], Stdio::null());
    let (code, lines) = tokio::task::spawn_blocking(move || head.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(lines.iter().all(|l| l["status"] == "answered"), "{lines:?}");
    let steady = lines
        .iter()
        .filter(|l| {
            let choice = l["choice"].as_str().unwrap_or_default();
            // Startup (before the stream is up, everything is local), exploration and
            // probes say nothing of the steady choice; nor does the dwell after startup.
            !choice.contains("probe")
                && !choice.contains("not measured")
                && !choice.contains("only usable")
        })
        .skip(3)
        .map(|l| l["mode"].as_str().unwrap().to_string())
        .collect();
    (steady, lines)
}

fn share(modes: &[String], mode: &str) -> f64 {
    modes.iter().filter(|m| *m == mode).count() as f64 / modes.len().max(1) as f64
}

fn tally(modes: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for m in modes {
        *counts.entry(m.as_str()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_offloads_on_a_fast_link_splits_on_a_slow_one_and_runs_locally_without_one() {
    if ort_available().is_none() {
        return;
    }
    let tail = TailProcess::start_with(&default_bundle(), &["--backend", "ort", "--full-model"]);
    let server = tail.url();

    // What each mode costs here, one frame at a time on loopback.
    let mut costs = BTreeMap::new();
    for mode in ["split", "offload", "local"] {
        let lines = tokio::task::spawn_blocking({
            let server = server.clone();
            move || run_head(&["--server", &server, "--mode", mode, "--window", "1"])
        })
        .await
        .unwrap();
        costs.insert(mode, cost_of(&lines));
    }
    eprintln!("measured per frame: {costs:?}");

    // Fast: loopback through the emulator, unshaped.
    let fast = LinkEmulator::start(
        "127.0.0.1:0".parse().unwrap(),
        tail.addr,
        LinkProfile::default(),
    )
    .await
    .unwrap();
    let (modes, lines) = auto_through(&fast, "3", "split,local,offload").await;
    assert!(
        share(&modes, "offload") >= 0.7,
        "a fast link and a fast server: offload ({:?})\n{lines:#?}",
        tally(&modes)
    );

    // Slow, on a board too small for the full model (auto between split and offload): the
    // fastest link on which the JPEG is predicted to take 1.5x split's time.
    let rtt_ms = 10.0;
    let shaped = |mbit: f64| {
        let shaping = Shaping {
            rate_bits_per_s: Some((mbit * 1e6) as u64),
            delay: Duration::from_secs_f64(rtt_ms / 2e3),
            ..Shaping::default()
        };
        LinkEmulator::start(
            "127.0.0.1:0".parse().unwrap(),
            tail.addr,
            LinkProfile {
                up: shaping,
                down: shaping,
                ..LinkProfile::default()
            },
        )
    };
    let mbit = (0..=60)
        .map(|i| 20.0 / 1.12f64.powi(i))
        .find(|&mbit| {
            costs["offload"].latency(mbit, rtt_ms) >= 1.5 * costs["split"].latency(mbit, rtt_ms)
        })
        .expect("a JPEG several times the coded features makes split win on some link");
    let slow = shaped(mbit).await.unwrap();
    let (modes, lines) = auto_through(&slow, "2", "split,offload").await;
    eprintln!(
        "slow link, {mbit:.2} Mbit/s, split or offload: {:?}",
        tally(&modes)
    );
    assert!(
        share(&modes, "split") >= 0.7,
        "a slow link: split ({:?})\n{lines:#?}",
        tally(&modes)
    );

    // Slow, all three modes: the bandwidth at which split beats the other two by the
    // widest margin, from the costs measured above.
    let margin = |mbit: f64| {
        let split = costs["split"].latency(mbit, rtt_ms);
        let others = costs["offload"]
            .latency(mbit, rtt_ms)
            .min(costs["local"].latency(mbit, rtt_ms));
        others / split
    };
    let (mbit, best) = (0..=60)
        .map(|i| 0.05 * 1.12f64.powi(i))
        .map(|mbit| (mbit, margin(mbit)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let slow = shaped(mbit).await.unwrap();
    let (modes, _) = auto_through(&slow, "2", "split,local,offload").await;
    eprintln!(
        "slow link: {mbit:.2} Mbit/s, split predicted faster than the next by {best:.2}x; \
         auto chose {:?}",
        tally(&modes)
    );
    // Whatever wins here, auto must keep to the modes predicted within 25 % of the best.
    let latency: BTreeMap<&str, f64> = costs
        .iter()
        .map(|(mode, cost)| (*mode, cost.latency(mbit, rtt_ms)))
        .collect();
    let fastest = latency.values().copied().fold(f64::INFINITY, f64::min);
    let near: Vec<&str> = latency
        .iter()
        .filter(|(_, l)| **l <= 1.25 * fastest)
        .map(|(m, _)| *m)
        .collect();
    if near.len() == latency.len() {
        eprintln!("all three modes predicted within 25 % of each other here: nothing to check");
    } else {
        let kept = modes.iter().filter(|m| near.contains(&m.as_str())).count();
        assert!(
            kept as f64 >= 0.7 * modes.len() as f64,
            "predicted {latency:?}: expected mostly {near:?}, got {:?}",
            tally(&modes)
        );
    }
    if best >= 1.3 {
        assert!(share(&modes, "split") >= 0.7, "{:?}", tally(&modes));
    }

    // Gone: every connection reset; the head never reaches the tail.
    let gone = resetting_link(tail.addr).await;
    gone.set_down(true);
    let (modes, lines) = auto_through(&gone, "1", "split,local,offload").await;
    assert!(
        lines.iter().all(|l| l["mode"] == "local"),
        "no link: local ({:?})\n{lines:#?}",
        tally(&modes)
    );
}

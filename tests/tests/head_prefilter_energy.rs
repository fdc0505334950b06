//! The head's prefilter and energy accounting, through the real `cleave-head` binary.
//!
//! - `--prefilter`: a frame is dropped exactly when the bundle's prefilter, run here on the
//!   head's features with the engine directly, scores it under the threshold.
//! - `--power-profile`: every frame's line carries its modelled energy, says it is
//!   modelled and by which profile, and names what it could not price.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;

use cleave_engine::{Backend, Bundle, Preprocessor, Role, Tensor};
use cleave_tests::{HeadProcess, TailProcess, default_bundle, repo_root, sample_files};
use serde_json::Value;

/// The prefilter's score of each sample, computed without the daemon.
fn interests() -> Vec<f32> {
    let bundle = Bundle::open(default_bundle()).unwrap();
    let head = bundle.load(Role::Head, &Backend::Tract).unwrap();
    let prefilter = bundle.load_prefilter(&Backend::Tract).unwrap().unwrap();
    let preprocessor = Preprocessor::new(&bundle.manifest().input);
    sample_files()
        .iter()
        .map(|file| {
            let input = preprocessor.from_path(file).unwrap();
            let features = head.run(&Tensor::stack(&[&input])).unwrap();
            prefilter.run(&features).unwrap().data[0]
        })
        .collect()
}

fn run(flags: &[&str]) -> (Option<i32>, Vec<Value>) {
    HeadProcess::start(flags, &sample_files(), Stdio::null()).finish()
}

#[test]
fn the_prefilter_drops_exactly_the_frames_it_scores_under_its_threshold() {
    let scores = interests();
    // A threshold between the samples' scores, so both outcomes happen: the median.
    let mut sorted = scores.clone();
    sorted.sort_by(f32::total_cmp);
    let threshold = (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0;
    let tail = TailProcess::start(&default_bundle());
    let (code, lines) = run(&[
        "--server",
        &tail.url(),
        "--prefilter",
        "--prefilter-threshold",
        &threshold.to_string(),
    ]);
    assert_eq!(code, Some(0), "{lines:?}");
    assert_eq!(lines.len(), scores.len());
    let mut dropped = 0;
    for (line, score) in lines.iter().zip(&scores) {
        if *score < threshold {
            dropped += 1;
            assert_eq!(line["status"], "dropped", "{score} {line}");
            assert_eq!(line["skipped"]["kind"], "prefilter", "{line}");
            assert_eq!(line["bytes_sent"], 0, "nothing sent: {line}");
            let message = line["skipped"]["message"].as_str().unwrap();
            assert!(message.contains(&format!("{score:.3}")), "{score} {line}");
        } else {
            assert_eq!(line["status"], "answered", "{score} {line}");
        }
    }
    assert!(
        dropped > 0 && dropped < scores.len(),
        "{scores:?} {threshold}"
    );

    // The bundle's own threshold is the default.
    let (code, lines) = run(&["--server", &tail.url(), "--prefilter"]);
    assert_eq!(code, Some(0));
    let bundle = Bundle::open(default_bundle()).unwrap();
    let own = bundle.prefilter_spec().unwrap().threshold as f32;
    for (line, score) in lines.iter().zip(&scores) {
        let expected = if *score < own { "dropped" } else { "answered" };
        assert_eq!(line["status"], expected, "{score} vs {own}: {line}");
    }
}

#[test]
fn every_frame_carries_its_modelled_energy_and_what_it_could_not_price() {
    let profile = repo_root().join("deploy/profiles/raspberry-pi-4.toml");
    let profile = profile.display().to_string();
    let tail = TailProcess::start(&default_bundle());
    let (code, split) = run(&["--server", &tail.url(), "--power-profile", &profile]);
    assert_eq!(code, Some(0), "{split:?}");
    let (code, local) = run(&["--mode", "local", "--power-profile", &profile]);
    assert_eq!(code, Some(0), "{local:?}");
    for line in split.iter().chain(&local) {
        let energy = &line["energy"];
        assert_eq!(energy["how"], "modelled", "{line}");
        assert_eq!(energy["by"], "raspberry-pi-4", "{line}");
        let joules = energy["joules"].as_f64().unwrap();
        let total = energy["total_joules"].as_f64().unwrap();
        assert!(joules > 0.0 && total > joules, "{line}");
        // Above idle: (6.12 − 3.06) W over the frame's compute.
        let compute_s =
            (line["preprocess_ms"].as_f64().unwrap() + line["head_ms"].as_f64().unwrap()) / 1e3;
        assert!(
            (joules - 3.06 * compute_s).abs() < 1e-3,
            "{compute_s} {line}"
        );
    }
    // The profile has no radio figure: split frames say so; local frames used no radio.
    for line in &split {
        assert_eq!(line["energy"]["excludes"][0], "radio_tx", "{line}");
    }
    for line in &local {
        assert!(line["energy"].get("excludes").is_none(), "{line}");
    }

    // Choosing modes by energy without the radio's power is refused, with the reason.
    let refused = std::process::Command::new(cleave_tests::binary("cleave-head"))
        .args(["--bundle", &default_bundle().display().to_string()])
        .args([
            "--mode",
            "auto",
            "--objective",
            "energy",
            "--power-profile",
            &profile,
        ])
        .arg(&sample_files()[0])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("radio_tx"), "{stderr}");
}

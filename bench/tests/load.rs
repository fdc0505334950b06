//! `cleave-bench tail-load` in miniature: two heads against an unbatched and a batched tail
//! (tract) for half a second each. The report must have every table and both targets, and
//! every frame sent must have been answered without error. No timing is asserted: speed
//! targets live in the benchmark, not in tests.

use std::process::Command;

/// The cells of the server-table rows whose first cell is `setting`.
fn rows<'a>(stdout: &'a str, setting: &str) -> Vec<Vec<&'a str>> {
    stdout
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .filter(|cells| cells.len() == 12 && cells[0] == setting)
        .collect()
}

#[test]
fn tail_load_answers_every_frame_and_reports_both_targets() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let doc = std::env::temp_dir().join(format!("cleave-tail-load-{}.md", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_cleave-bench"))
        .args(["tail-load", "--backend", "tract", "--heads", "1,2"])
        .args(["--setting", "max=1", "--setting", "max=4,delay_us=1000"])
        .args(["--duration-s", "0.5", "--warmup-s", "0.2"])
        .args(["--floor-batches", "1", "--floor-s", "0.2"])
        .args(["--overhead-rounds", "2", "--overhead-block-s", "0.05"])
        .args([
            "--images",
            "models/samples/coffee.jpg",
            "models/samples/rocket.jpg",
        ])
        .arg("--out")
        .arg(&doc)
        .current_dir(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tail-load failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("## Server, tract, 1 model instance(s)"),
        "{stdout}"
    );

    for setting in ["unbatched", "max 4, delay 1000 µs"] {
        let rows = rows(&stdout, setting);
        assert_eq!(
            rows.len(),
            2,
            "{setting}: one row per number of heads:\n{stdout}"
        );
        for cells in rows {
            let (answered, sent) = cells[9].split_once('/').expect("answered/sent");
            let (answered, sent): (usize, usize) =
                (answered.parse().unwrap(), sent.parse().unwrap());
            assert!(sent > 0, "{setting}: no frame sent:\n{stdout}");
            assert_eq!(answered, sent, "{setting}: frames unanswered:\n{stdout}");
            assert_eq!(cells[10], "0", "{setting}: errors:\n{stdout}");
            let fps: f64 = cells[2].parse().expect("frames/s");
            let batch: f64 = cells[6].parse().expect("mean batch");
            assert!(
                fps > 0.0,
                "{setting}: nothing completed in the window:\n{stdout}"
            );
            assert!(
                (1.0..=4.0).contains(&batch),
                "{setting}: mean batch {batch}"
            );
            if setting == "unbatched" {
                assert_eq!(batch, 1.0, "the unbatched server ran batches:\n{stdout}");
            }
        }
    }
    assert!(stdout.contains("## Floor"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("| tract | 1 | 1 |")),
        "no tract floor at batch 1:\n{stdout}"
    );
    assert!(
        stdout.contains("| ort |"),
        "no ONNX Runtime floor line:\n{stdout}"
    );
    assert!(
        stdout.contains("**Throughput with dynamic batching"),
        "{stdout}"
    );
    assert!(
        stdout.contains("**Server overhead per frame at batch 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("- tract, 1 instance(s), 2 heads: best batched setting"),
        "{stdout}"
    );
    assert!(stdout.contains("- tract: paired, 2 rounds"), "{stdout}");

    let written = std::fs::read_to_string(&doc).expect("the --out document");
    let _ = std::fs::remove_file(&doc);
    assert!(written.starts_with("# Tail server under load"), "{written}");
    assert!(
        written.contains("Machine:") && written.contains("Load average"),
        "{written}"
    );
    assert!(
        written.ends_with(stdout.as_ref()),
        "the document holds the printed report"
    );
}

//! `cleave-bench rate-fidelity` on one view of one sample: the command that makes
//! `docs/rate-fidelity.md` must run, print a row for every coding and baseline, and its
//! numbers must keep the codec's promises (ANS near its bound, never worse than zstd).

use std::collections::HashMap;
use std::process::Command;

/// `(bytes per frame, bound)` of each `(features or input, codec)` row of the table.
type Rows = HashMap<(String, String), (f64, Option<f64>)>;

fn parse(stdout: &str) -> Rows {
    stdout
        .lines()
        .filter(|l| l.starts_with("| split") || l.starts_with("| offload"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 7, "{line}");
            let bytes = cells[2].parse().expect("bytes per frame");
            let bound = cells[4].parse().ok();
            ((cells[0].to_owned(), cells[1].to_owned()), (bytes, bound))
        })
        .collect()
}

#[test]
fn rate_fidelity_table_has_every_row_and_ans_beats_zstd() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(env!("CARGO_BIN_EXE_cleave-bench"))
        .args(["rate-fidelity", "--views", "1"])
        .args(["--images", "models/samples/coffee.jpg"])
        .current_dir(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rate-fidelity failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("machine:"), "{stdout}");
    let rows = parse(&stdout);
    let row = |label: &str, codec: &str| {
        *rows
            .get(&(label.to_owned(), codec.to_owned()))
            .unwrap_or_else(|| panic!("no row {label:?} {codec:?}:\n{stdout}"))
    };

    let mut previous = 0.0;
    for bits in 2..=8 {
        let label = format!("split, {bits} bits");
        let (ans, bound) = row(&label, "ans");
        let (zstd, _) = row(&label, "zstd");
        row(&label, "raw");
        assert!(ans > previous, "{bits} bits: ans {ans} B ≤ {previous} B");
        assert!(ans <= zstd, "{bits} bits: ans {ans} B > zstd {zstd} B");
        let bound = bound.expect("ans rows have a bound");
        assert!(
            ans >= bound && ans <= bound * 1.01 + 32.0,
            "{bits} bits: ans {ans} B vs bound {bound} B"
        );
        previous = ans;
    }
    let (learned, bound) = row("split, learned prior", "ans");
    let bound = bound.expect("the learned prior has a bound");
    assert!(learned >= bound && learned <= bound * 1.01 + 32.0);
    for quality in [10, 30, 50, 70, 90] {
        row(&format!("offload, JPEG q{quality}"), "jpeg");
        row(&format!("offload, WebP q{quality}"), "webp");
    }
}

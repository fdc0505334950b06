//! Frame decoding from hostile bytes, with the bundled model's real coding tables.
//!
//! Every input is decoded as it is. Because a random mutation almost never keeps the CRC-32
//! right, an input whose checksum does not match is decoded a second time with its last four
//! bytes replaced by the right checksum, so the payload decoders (raw, zstd, ANS under the
//! static and the learned priors) see mutated payloads too.
//!
//! What must hold: no panic, no allocation beyond `Limits`, and a frame that decodes restores
//! exactly one value per element of its shape.

#![no_main]

use std::sync::OnceLock;

use cleave_codec::{Coding, FrameDecoder, Limits, max_symbol};
use cleave_codec_fuzz::bundled_tables;
use libfuzzer_sys::fuzz_target;

fn decoder() -> &'static FrameDecoder {
    static DECODER: OnceLock<FrameDecoder> = OnceLock::new();
    DECODER.get_or_init(|| FrameDecoder::new(Some(bundled_tables()), Limits::default()))
}

fn check(bytes: &[u8]) {
    let Ok(frame) = decoder().decode(bytes) else {
        return;
    };
    let elements: usize = frame.header.shape.iter().product();
    assert_eq!(
        frame.symbols.len(),
        elements,
        "symbols vs shape {:?}",
        frame.header.shape
    );
    if let Coding::Inline { bits } | Coding::Calibrated { bits } = frame.header.coding {
        let top = max_symbol(bits);
        assert!(
            frame.symbols.iter().all(|&s| (0..=top).contains(&s)),
            "a {bits}-bit symbol out of range"
        );
    }
    let restored = frame
        .dequantize()
        .expect("a decoded frame's quantizer fits its shape");
    assert_eq!(
        restored.len(),
        elements,
        "dequantized vs shape {:?}",
        frame.header.shape
    );
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 4 {
        let (body, stored) = data.split_at(data.len() - 4);
        let crc = crc32fast::hash(body).to_le_bytes();
        if stored != crc {
            let mut fixed = data.to_vec();
            fixed[body.len()..].copy_from_slice(&crc);
            check(&fixed);
        }
    }
});

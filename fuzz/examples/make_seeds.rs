//! Writes the seed corpora: real-looking frames and ANS payloads made from the bundled
//! model's real bottleneck values and tables, one per coding the format has.
//!
//! Run from `fuzz/`: `cargo run --example make-seeds` (writes `seeds/decode_frame/*.bin` and
//! `seeds/ans_decode/*.bin`, replacing files of the same name).

use std::fs;
use std::path::Path;

use cleave_codec::{BundleId, Choice, Codec, FrameEncoder, Granularity, ans};
use cleave_codec_fuzz::{CHANNELS, CROP, bundled_tables, center_crop, feature_frame};

fn main() {
    let tables = bundled_tables();
    let bundle: BundleId = cleave_codec_fuzz::MANIFEST
        .lines()
        .find_map(|l| l.strip_prefix("id = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("the manifest has an id line")
        .parse()
        .expect("the manifest id is 64 hex digits");
    let encoder = FrameEncoder::new(bundle.tag(), Some(&tables));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let frames_dir = root.join("decode_frame");
    let ans_dir = root.join("ans_decode");
    fs::create_dir_all(&frames_dir).expect("create seeds/decode_frame");
    fs::create_dir_all(&ans_dir).expect("create seeds/ans_decode");

    // Three real views, central 4x4 windows: [12, 4, 4], 192 values.
    let crops: Vec<Vec<f32>> = (0..3).map(|f| center_crop(&feature_frame(f), 4)).collect();
    let shape = [CHANNELS, 4, 4];
    let mut written = 0usize;
    let mut bytes_total = 0usize;
    let mut write = |dir: &Path, name: String, bytes: &[u8]| {
        fs::write(dir.join(&name), bytes).expect("write seed");
        written += 1;
        bytes_total += bytes.len();
    };

    for (view, crop) in crops.iter().enumerate() {
        let mut choices = vec![Choice::Learned];
        for bits in 2..=8 {
            for codec in Codec::ALL {
                choices.push(Choice::Calibrated { bits, codec });
            }
        }
        if view == 0 {
            for bits in 2..=8 {
                for codec in [Codec::Raw, Codec::Zstd] {
                    for granularity in [Granularity::PerTensor, Granularity::PerChannel] {
                        choices.push(Choice::Inline {
                            bits,
                            granularity,
                            codec,
                        });
                    }
                }
            }
        }
        for choice in choices {
            let frame = encoder
                .encode(crop, &shape, choice)
                .expect("seed frame encodes");
            write(
                &frames_dir,
                format!("v{view}-{}.bin", name(choice)),
                &frame.bytes,
            );
        }
    }

    // Other ranks over the same values: [12, 16] and [12, 2, 2, 4].
    for (tag, other) in [("r2", vec![CHANNELS, 16]), ("r4", vec![CHANNELS, 2, 2, 4])] {
        for choice in [
            Choice::Learned,
            Choice::Calibrated {
                bits: 5,
                codec: Codec::Ans,
            },
        ] {
            let frame = encoder
                .encode(&crops[0], &other, choice)
                .expect("seed frame encodes");
            write(
                &frames_dir,
                format!("{tag}-{}.bin", name(choice)),
                &frame.bytes,
            );
        }
    }

    // The outlier frame (the first view scaled far out of range): the learned prior's
    // escapes, at [12, 4, 4] and as a full [12, 16, 16] crop.
    let outlier = feature_frame(3);
    let outlier_crop = center_crop(&outlier, 4);
    for (tag, tensor, shape) in [
        ("outlier4", &outlier_crop, vec![CHANNELS, 4, 4]),
        ("outlier16", &outlier, vec![CHANNELS, CROP, CROP]),
    ] {
        let frame = encoder
            .encode(tensor, &shape, Choice::Learned)
            .expect("seed frame encodes");
        write(&frames_dir, format!("{tag}-learned-ans.bin"), &frame.bytes);
    }

    // ANS payloads for ans_decode: selector byte (bit 0: 0 learned, 1 static 5-bit; bits
    // 1..=6: symbols per channel minus one), then the payload.
    let learned = tables.learned().expect("the bundle has a learned prior");
    let level = tables.level(5).expect("the bundle has a 5-bit level");
    for (tag, tensor) in [
        ("v0", &crops[0]),
        ("v1", &crops[1]),
        ("outlier", &outlier_crop),
    ] {
        let per_channel = tensor.len() / CHANNELS;
        let n_bits = ((per_channel - 1) as u8) << 1;
        for (prior_tag, selector, quantizer, prior) in [
            ("learned", n_bits, &learned.quantizer, &learned.prior),
            ("static5", n_bits | 1, &level.quantizer, &level.prior),
        ] {
            let symbols = quantizer.quantize(tensor, &shape).expect("crop quantizes");
            let mut seed = vec![selector];
            seed.extend(ans::encode(prior, &symbols).expect("crop codes"));
            write(&ans_dir, format!("{tag}-{prior_tag}.bin"), &seed);
        }
    }
    println!(
        "wrote {written} seeds, {bytes_total} bytes, under {}",
        root.display()
    );
}

fn name(choice: Choice) -> String {
    match choice {
        Choice::Learned => "learned-ans".to_owned(),
        Choice::Calibrated { bits, codec } => format!("cal{bits}-{}", codec.name()),
        Choice::Inline {
            bits,
            granularity,
            codec,
        } => {
            let g = match granularity {
                Granularity::PerTensor => "tensor",
                _ => "channel",
            };
            format!("inline{bits}-{g}-{}", codec.name())
        }
    }
}

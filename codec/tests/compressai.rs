//! The bundled model's learned prior against CompressAI itself.
//!
//! `codec/tests/data/compressai/` was written by `models/tools/make_bundle.py calibrate
//! --fixture` with compressai 1.2.8: real head outputs, the symbols CompressAI's
//! `EntropyBottleneck.compress` coded, its byte strings and its `decompress` output, all made
//! with the same tables the bundle's `priors.json` holds (`meta.json` names the priors'
//! sha256). Our quantizer must produce CompressAI's symbols exactly, our ANS coder must give
//! them back, and our bytes must be as small as CompressAI's.
//!
//! The bytes themselves cannot be exchanged: CompressAI codes with ryg's 64-bit rANS
//! (state kept in `[2^31, 2^63)`, flushed as two words), constriction's coder keeps its state
//! in `[2^32, 2^64)` and flushes only the state's significant words, so the same symbols give
//! different words. Symbols, escapes and their order are the same.

use std::path::PathBuf;

use cleave_codec::{CodingTables, ans};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/compressai")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn repo_file(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn words<T>(bytes: &[u8], from: fn([u8; 4]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(4)
        .map(|c| from([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn our_symbols_and_bytes_match_compressai() {
    let meta: serde_json::Value = serde_json::from_slice(&fixture("meta.json")).unwrap();
    let shape: Vec<usize> = serde_json::from_value(meta["shape"].clone()).unwrap();
    let priors = repo_file("models/efficientnet-lite0-split/priors.json");
    let sha = hex_sha256(priors.as_bytes());
    assert_eq!(
        meta["priors_sha256"].as_str(),
        Some(sha.as_str()),
        "the fixture was made with other tables; rerun make_bundle.py calibrate --fixture"
    );
    let channels = shape[1];
    let tables = CodingTables::new(channels, &[], Some(&priors)).unwrap();
    let learned = tables.learned().expect("the bundle has a learned prior");
    assert!(learned.source.contains("compressai"), "{}", learned.source);

    let features = words(&fixture("features.f32"), f32::from_le_bytes);
    let expected = words(&fixture("symbols.i32"), i32::from_le_bytes);
    let y_hat = words(&fixture("y_hat.f32"), f32::from_le_bytes);
    let strings = fixture("strings.bin");
    let lengths: serde_json::Value = serde_json::from_slice(&fixture("strings.json")).unwrap();
    let lengths: Vec<usize> = serde_json::from_value(lengths["lengths"].clone()).unwrap();
    // The last frame is an outlier made to exercise the escape path.
    assert!(
        meta["escapes"].as_u64().unwrap_or(0) > 0,
        "the fixture has no escapes"
    );
    let per_frame: usize = shape[1..].iter().product();
    let frame_shape = &shape[1..];
    let cleave_codec::Quantizer::Integer { gain, median } = &learned.quantizer else {
        panic!("the learned prior's quantizer is integer");
    };

    let mut offset = 0;
    for (frame, &compressai_bytes) in lengths.iter().enumerate() {
        let range = frame * per_frame..(frame + 1) * per_frame;
        let symbols = learned
            .quantizer
            .quantize(&features[range.clone()], frame_shape)
            .unwrap();
        assert_eq!(
            symbols,
            expected[range.clone()],
            "frame {frame}: symbols differ"
        );

        // CompressAI's decompress gives symbol + median (in the bottleneck's scaled units).
        let group = per_frame / channels;
        for (i, (&s, &y)) in symbols.iter().zip(&y_hat[range.clone()]).enumerate() {
            assert_eq!(s as f32 + median[i / group], y, "frame {frame} element {i}");
        }
        let restored = learned.quantizer.dequantize(&symbols, frame_shape).unwrap();
        for (i, (&x, &y)) in restored.iter().zip(&y_hat[range]).enumerate() {
            assert!((x - y / gain[i / group]).abs() <= 1e-6 * y.abs().max(1.0));
        }

        let ours = ans::encode(&learned.prior, &symbols).unwrap();
        assert_eq!(
            ans::decode(&learned.prior, &ours, per_frame).unwrap(),
            symbols
        );
        let bound = learned.prior.information_bits(&symbols) / 8.0;
        assert!(
            (ours.len() as f64) <= bound * 1.01 + 8.0,
            "frame {frame}: {} bytes, bound {bound:.1}",
            ours.len()
        );
        eprintln!(
            "frame {frame}: ours {} bytes, compressai {compressai_bytes}, bound {bound:.1}",
            ours.len()
        );
        assert!(
            ours.len() <= compressai_bytes + 8,
            "frame {frame}: ours {} bytes, compressai {compressai_bytes}",
            ours.len()
        );
        offset += compressai_bytes;
    }
    assert_eq!(offset, strings.len());
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

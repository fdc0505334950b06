//! The frame format from the outside: every coding and codec round-trips exactly at the
//! symbol level, and no damaged or hostile frame gets past the decoder.

use cleave_codec::{
    BundleId, Choice, Codec, Coding, CodingTables, FORMAT_VERSION, FrameDecoder, FrameEncoder,
    FrameError, Granularity, LevelRanges, Limits, MAGIC, PRECISION,
};
use proptest::prelude::*;

const CHANNELS: usize = 3;

/// A geometric-ish distribution over `len` entries, every entry positive, summing to 2^16.
fn pmf(len: usize, skew: usize) -> Vec<u32> {
    let mut pmf: Vec<u32> = (0..len)
        .map(|i| (1u32 << 12) >> ((i + skew) % len).min(11))
        .collect();
    let rest = (1u32 << PRECISION) - pmf.iter().sum::<u32>();
    pmf[skew % len] += rest;
    pmf
}

/// Tables for a 3-channel bottleneck: calibrated levels at every bit depth with ranges
/// [-4, 4], and a learned prior over -3..=3 with escape.
fn tables() -> CodingTables {
    let ranges: Vec<LevelRanges> = (2..=8)
        .map(|bits| LevelRanges {
            bits,
            low: vec![-4.0; CHANNELS],
            high: vec![4.0, 3.0, 5.0],
        })
        .collect();
    let statics: Vec<_> = (2..=8u8)
        .map(|bits| {
            let rows: Vec<_> = (0..CHANNELS).map(|c| pmf(1 << bits, c)).collect();
            serde_json::json!({ "bits": bits, "pmf": rows })
        })
        .collect();
    let cdf = |c: usize| {
        let mut cdf = vec![0u32];
        for p in pmf(8, c) {
            cdf.push(cdf.last().copied().unwrap_or(0) + p);
        }
        cdf
    };
    let json = serde_json::json!({
        "format": "cleave-priors", "version": 1, "precision": 16, "static": statics,
        "factorized": {
            "source": "test tables", "scale": [2.0, 1.0, 0.5], "medians": [0.25, -0.5, 0.0],
            "offset": [-3, -3, -3], "cdf_length": [9, 9, 9],
            "quantized_cdf": [cdf(0), cdf(1), cdf(2)],
        }
    });
    CodingTables::new(CHANNELS, &ranges, Some(&json.to_string())).expect("test tables are valid")
}

fn tensor(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37 + seed as f32).sin() * 3.0) + (i % 7) as f32 * 0.1)
        .collect()
}

fn every_choice() -> Vec<Choice> {
    let mut choices = vec![Choice::Learned];
    for bits in 2..=8 {
        for codec in Codec::ALL {
            choices.push(Choice::Calibrated { bits, codec });
            if codec != Codec::Ans {
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
    choices
}

fn sample(choice: Choice) -> Vec<u8> {
    let tables = tables();
    let encoder = FrameEncoder::new(BundleId::from_bytes([9; 32]).tag(), Some(&tables));
    encoder
        .encode(&tensor(CHANNELS * 25, 0), &[CHANNELS, 5, 5], choice)
        .expect("every choice encodes with the test tables")
        .bytes
}

fn decoder() -> FrameDecoder {
    FrameDecoder::new(Some(tables()), Limits::default())
}

#[test]
fn a_table_frame_spends_at_most_32_bytes_outside_its_payload() {
    // The bundled model's 12x28x28 bottleneck, 4-bit calibrated, ANS: the header is magic to
    // payload length; the rest is payload and the 4-byte checksum.
    let channels = 12;
    let ranges = [LevelRanges {
        bits: 4,
        low: vec![-4.0; channels],
        high: vec![4.0; channels],
    }];
    let json = serde_json::json!({
        "format": "cleave-priors", "version": 1, "precision": 16,
        "static": [{ "bits": 4, "pmf": vec![pmf(16, 0); channels] }],
    });
    let tables = CodingTables::new(channels, &ranges, Some(&json.to_string())).unwrap();
    let encoder = FrameEncoder::new(BundleId::from_bytes([1; 32]).tag(), Some(&tables));
    let shape = [channels, 28, 28];
    for codec in Codec::ALL {
        let frame = encoder
            .encode(
                &tensor(9408, 1),
                &shape,
                Choice::Calibrated { bits: 4, codec },
            )
            .unwrap();
        // Header and checksum together.
        let overhead = frame.bytes.len() - frame.payload_bytes;
        assert!(
            overhead <= 32,
            "{codec:?}: {overhead} bytes around the payload"
        );
    }
}

#[test]
fn every_choice_round_trips() {
    let decoder = decoder();
    for choice in every_choice() {
        let bytes = sample(choice);
        let frame = decoder.decode(&bytes).unwrap();
        assert_eq!(frame.header.version, FORMAT_VERSION);
        assert_eq!(frame.header.shape, vec![CHANNELS, 5, 5]);
        assert_eq!(frame.symbols.len(), CHANNELS * 25);
        let restored = frame.dequantize().unwrap();
        assert_eq!(restored.len(), CHANNELS * 25);
    }
}

#[test]
fn every_flipped_bit_is_an_error() {
    let decoder = decoder();
    for choice in [
        Choice::Learned,
        Choice::Calibrated {
            bits: 3,
            codec: Codec::Ans,
        },
        Choice::Inline {
            bits: 5,
            granularity: Granularity::PerChannel,
            codec: Codec::Zstd,
        },
    ] {
        let bytes = sample(choice);
        for i in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(
                decoder.decode(&damaged).is_err(),
                "{choice:?}: bit {i} not caught"
            );
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let decoder = decoder();
    let bytes = sample(Choice::Calibrated {
        bits: 8,
        codec: Codec::Raw,
    });
    for len in 0..bytes.len() {
        assert!(decoder.decode(&bytes[..len]).is_err(), "len {len}");
    }
}

/// A header up to and including the dims, for hand-made hostile frames.
fn header(flags: u8, codec: u8, bits: u8, table: u8, dims: &[u32]) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&[FORMAT_VERSION, flags, codec, bits, table]);
    bytes.extend_from_slice(&[0; 8]);
    bytes.push(dims.len() as u8);
    for &d in dims {
        let mut v = d;
        while v >= 0x80 {
            bytes.push((v as u8) | 0x80);
            v >>= 7;
        }
        bytes.push(v as u8);
    }
    bytes
}

#[test]
fn a_40_byte_frame_claiming_2_to_the_40_elements_is_refused_before_allocation() {
    let mut bytes = header(1, 1, 8, 0, &[1 << 20, 1 << 20]);
    bytes.resize(40, 0);
    assert!(matches!(
        decoder().decode(&bytes),
        Err(FrameError::TooManyElements { declared, .. }) if declared == 1 << 40
    ));
}

#[test]
fn many_channels_in_a_short_frame_are_refused() {
    let mut bytes = header(1, 1, 8, 0, &[1 << 23]);
    bytes.push(1);
    assert!(matches!(
        decoder().decode(&bytes),
        Err(FrameError::Truncated { .. })
    ));
}

#[test]
fn unknown_and_inconsistent_fields_are_named() {
    let decoder = decoder();
    let base = sample(Choice::Calibrated {
        bits: 4,
        codec: Codec::Ans,
    });
    let with = |at: usize, value: u8| {
        let mut bytes = base.clone();
        bytes[at] = value;
        decoder.decode(&bytes).unwrap_err()
    };
    assert_eq!(with(4, 9), FrameError::UnsupportedVersion(9));
    assert_eq!(with(4, 0), FrameError::UnsupportedVersion(0));
    assert_eq!(with(5, 0x82), FrameError::UnknownFlags(0x82));
    assert_eq!(with(6, 7), FrameError::UnknownCodec(7));
    assert_eq!(with(8, 5), FrameError::UnknownTable(5));
    assert!(matches!(with(7, 9), FrameError::Inconsistent(_)));
    assert!(matches!(with(5, 1), FrameError::Inconsistent(_)));
    // The message says what is unknown.
    assert!(with(6, 7).to_string().contains("unknown codec id 7"));
}

#[test]
fn a_frame_needing_tables_the_decoder_lacks_is_refused() {
    let bytes = sample(Choice::Learned);
    let err = FrameDecoder::new(None, Limits::default())
        .decode(&bytes)
        .unwrap_err();
    assert_eq!(err, FrameError::MissingTable(Coding::Learned));
    assert!(err.to_string().contains("learned prior"));
}

#[test]
fn the_encoder_refuses_what_no_decoder_could_read() {
    let tables = tables();
    let encoder = FrameEncoder::new(BundleId::from_bytes([4; 32]).tag(), Some(&tables));
    let calibrated = Choice::Calibrated {
        bits: 4,
        codec: Codec::Ans,
    };
    assert_eq!(
        encoder.encode(&[0.0; 32], &[1, 2, 2, 2, 2], calibrated),
        Err(FrameError::UnencodableShape(vec![1, 2, 2, 2, 2]))
    );
    // Tables for 3 channels do not code a 2-channel tensor.
    assert!(matches!(
        encoder.encode(&[0.0; 8], &[2, 4], calibrated),
        Err(FrameError::TableShape { .. })
    ));
    let inline_ans = Choice::Inline {
        bits: 4,
        granularity: Granularity::PerTensor,
        codec: Codec::Ans,
    };
    assert!(matches!(
        encoder.encode(&[0.0; 3], &[3], inline_ans),
        Err(FrameError::Inconsistent(_))
    ));
}

#[test]
fn a_decoder_for_one_bundle_refuses_another_before_the_payload() {
    let bytes = sample(Choice::Learned);
    let ours = BundleId::from_bytes([9; 32]).tag();
    let theirs = BundleId::from_bytes([8; 32]).tag();
    assert!(decoder().expecting(ours).decode(&bytes).is_ok());
    assert_eq!(
        decoder().expecting(theirs).decode(&bytes),
        Err(FrameError::BundleMismatch {
            frame: ours,
            expected: theirs
        })
    );
}

#[test]
fn limits_are_enforced() {
    let bytes = sample(Choice::Calibrated {
        bits: 8,
        codec: Codec::Raw,
    });
    let small = FrameDecoder::new(
        Some(tables()),
        Limits {
            max_frame_bytes: 50,
            ..Limits::default()
        },
    );
    assert!(matches!(
        small.decode(&bytes),
        Err(FrameError::TooLarge { .. })
    ));
    let few = FrameDecoder::new(
        Some(tables()),
        Limits {
            max_elements: CHANNELS * 25 - 1,
            ..Limits::default()
        },
    );
    assert!(matches!(
        few.decode(&bytes),
        Err(FrameError::TooManyElements { .. })
    ));
}

#[test]
fn rate_control_picks_the_highest_bit_depth_that_fits() {
    let tables = tables();
    let encoder = FrameEncoder::new(BundleId::from_bytes([3; 32]).tag(), Some(&tables));
    let data = tensor(CHANNELS * 400, 2);
    let shape = [CHANNELS, 20, 20];
    let sizes: Vec<usize> = (2..=8)
        .map(|bits| {
            let choice = Choice::Calibrated {
                bits,
                codec: Codec::Ans,
            };
            encoder.encode(&data, &shape, choice).unwrap().bytes.len()
        })
        .collect();
    // A budget between the 5- and 6-bit sizes gets 5 bits.
    let budget = (sizes[3] + sizes[4]) / 2;
    assert!(sizes[3] <= budget && budget < sizes[4], "{sizes:?}");
    let frame = encoder
        .encode_within(&data, &shape, budget, Codec::Ans)
        .unwrap();
    assert_eq!(frame.coding, Coding::Calibrated { bits: 5 });
    assert!(frame.bytes.len() <= budget);
    assert_eq!(
        encoder.encode_within(&data, &shape, 10, Codec::Ans),
        Err(FrameError::OverBudget {
            budget: 10,
            smallest: sizes[0]
        })
    );
}

proptest! {
    #[test]
    fn round_trip_is_exact_at_symbol_level(
        choice in proptest::sample::select(every_choice()),
        dims in proptest::collection::vec(1usize..6, 0..=3),
        values in proptest::collection::vec(-50.0f32..50.0, 1..64),
        id in any::<[u8; 32]>(),
    ) {
        let tables = tables();
        let mut shape = vec![CHANNELS];
        shape.extend(dims);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = values.iter().cycle().take(n).copied().collect();
        let tag = BundleId::from_bytes(id).tag();
        let encoder = FrameEncoder::new(tag, Some(&tables));
        let frame = encoder.encode(&data, &shape, choice).unwrap();
        let decoded = decoder().decode(&frame.bytes).unwrap();
        prop_assert_eq!(decoded.header.bundle_tag, tag);
        prop_assert_eq!(decoded.header.codec, frame.codec);
        prop_assert_eq!(decoded.header.coding, frame.coding);
        // The decoded symbols are the encoder's: requantizing the restored tensor with the
        // same quantizer gives them back.
        let again = decoded.quantizer.quantize(&decoded.dequantize().unwrap(), &shape).unwrap();
        prop_assert_eq!(&again, &decoded.symbols);
        let direct = decoded.quantizer.quantize(&data, &shape).unwrap();
        prop_assert_eq!(direct, decoded.symbols);
    }

    #[test]
    fn damaged_payloads_with_a_valid_checksum_never_panic(
        choice in proptest::sample::select(every_choice()),
        damage in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..8),
    ) {
        // Random damage rarely survives the CRC; fixing it up lets the payload decoders (raw,
        // zstd, ans under both priors) see hostile bytes, as the fuzz target does.
        let mut bytes = sample(choice);
        let body = bytes.len() - 4;
        for (at, flip) in damage {
            bytes[at % body] ^= flip;
        }
        let crc = crc32fast::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        if let Ok(frame) = decoder().decode(&bytes) {
            let elements: usize = frame.header.shape.iter().product();
            prop_assert_eq!(frame.symbols.len(), elements);
            prop_assert_eq!(frame.dequantize().unwrap().len(), elements);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decoder().decode(&bytes);
    }

    #[test]
    fn valid_header_with_garbage_after_never_panics(
        choice in proptest::sample::select(every_choice()),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
        cut in 0usize..200,
    ) {
        let mut bytes = sample(choice);
        bytes.truncate(cut.min(bytes.len()));
        bytes.extend_from_slice(&tail);
        let _ = decoder().decode(&bytes);
    }
}

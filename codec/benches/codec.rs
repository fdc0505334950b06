//! Codec benchmark on the bundled model's real bottleneck values and coding tables.
//!
//! Inputs: three full 12×28×28 frames of the bundled head's output on held-out photographs
//! (`benches/data/bottleneck-3x12x28x28.f32`, made as its README says).
//!
//! Before timing, one table row per configuration: bytes per frame, payload bytes, the
//! information bound of the symbols under the prior, the payload's overhead over that bound
//! and the header bytes. Then criterion times encode (`FrameEncoder::encode`) and decode
//! (`FrameDecoder::decode` + `dequantize`) per frame for every calibrated bit depth with
//! `ans`, `zstd` and `raw`, and for the learned prior; and constriction's range coder against
//! ANS on the 5-bit level with the same 16-bit models, which is what `ans.rs` claims ANS was
//! chosen by: `ans` is `cleave_codec::ans` (escapes, bytes), `ans-direct` constriction's
//! `DefaultAnsCoder` driven like the range coder, so the two coders compare like for like.
//!
//! `cargo bench -p cleave-codec --bench codec` (quick settings: 20 samples, 2 s each).

use std::hint::black_box;
use std::time::Duration;

use cleave_codec::{Choice, Codec, CodingTables, FrameDecoder, FrameEncoder, Limits, ans};
use constriction::stream::model::ContiguousCategoricalEntropyModel;
use constriction::stream::queue::{DefaultRangeDecoder, DefaultRangeEncoder};
use constriction::stream::stack::DefaultAnsCoder;
use constriction::stream::{Decode, Encode};
use criterion::{Criterion, criterion_group, criterion_main};

// Shared with fuzz/, which re-exports these items; here some are unused and none leave.
#[path = "support/bundled.rs"]
#[allow(unreachable_pub, dead_code)]
mod bundled;

use bundled::{PRIORS, bundle_id, bundled_tables};

const FEATURES: &[u8] = include_bytes!("data/bottleneck-3x12x28x28.f32");

const CHANNELS: usize = 12;
const SHAPE: [usize; 3] = [CHANNELS, 28, 28];
/// Frames in the input file.
const VIEWS: usize = 3;
/// The level the range coder is compared on (the bundle's default bit depth).
const COMPARE_BITS: u8 = 5;

type Model = ContiguousCategoricalEntropyModel<u32, Vec<u32>, 16>;

fn views() -> Vec<Vec<f32>> {
    let len: usize = SHAPE.iter().product();
    (0..VIEWS)
        .map(|v| {
            FEATURES[v * len * 4..(v + 1) * len * 4]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
        .collect()
}

/// The 16-bit range-coder models of the static prior at `bits`, straight from priors.json.
fn range_models(bits: u8) -> Vec<Model> {
    let priors: serde_json::Value = serde_json::from_str(PRIORS).expect("priors.json is JSON");
    let entry = priors["static"]
        .as_array()
        .expect("static priors")
        .iter()
        .find(|e| e["bits"] == u64::from(bits))
        .expect("a static prior at the compared bit depth");
    entry["pmf"]
        .as_array()
        .expect("pmf rows")
        .iter()
        .map(|row| {
            let pmf: Vec<u32> = row
                .as_array()
                .expect("a pmf row")
                .iter()
                .map(|p| p.as_u64().expect("an integer probability") as u32)
                .collect();
            Model::from_nonzero_fixed_point_probabilities(&pmf, false)
                .expect("a normalized 16-bit pmf")
        })
        .collect()
}

fn range_encode(models: &[Model], symbols: &[i32]) -> Vec<u32> {
    let group = symbols.len() / models.len();
    let mut coder = DefaultRangeEncoder::new();
    for (chunk, model) in symbols.chunks(group).zip(models) {
        for &s in chunk {
            coder
                .encode_symbol(s as usize, model)
                .expect("symbol in the table");
        }
    }
    coder.into_compressed().expect("a Vec backend cannot fail")
}

fn range_decode(models: &[Model], words: Vec<u32>, elements: usize) -> Vec<i32> {
    let group = elements / models.len();
    let mut coder = DefaultRangeDecoder::from_compressed(words).expect("range-coded words");
    let mut out = Vec::with_capacity(elements);
    for model in models {
        for _ in 0..group {
            out.push(coder.decode_symbol(model).expect("decodes") as i32);
        }
    }
    out
}

/// constriction's ANS coder driven directly with the same models as the range coder: what
/// the coder itself costs, apart from `ans.rs`'s escape handling and byte conversion.
fn direct_ans_encode(models: &[Model], symbols: &[i32]) -> Vec<u32> {
    let group = symbols.len() / models.len();
    let mut coder = DefaultAnsCoder::new();
    for (chunk, model) in symbols.chunks(group).zip(models).rev() {
        for &s in chunk.iter().rev() {
            coder
                .encode_symbol(s as usize, model)
                .expect("symbol in the table");
        }
    }
    coder.into_compressed().expect("a Vec backend cannot fail")
}

fn direct_ans_decode(models: &[Model], words: Vec<u32>, elements: usize) -> Vec<i32> {
    let group = elements / models.len();
    let mut coder = DefaultAnsCoder::from_compressed(words).expect("ANS words");
    let mut out = Vec::with_capacity(elements);
    for model in models {
        for _ in 0..group {
            out.push(coder.decode_symbol(model).expect("decodes") as i32);
        }
    }
    out
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores available")
}

/// Every configuration: each calibrated bit depth with each codec, then the learned prior.
fn choices(tables: &CodingTables) -> Vec<(String, Choice)> {
    let mut out = Vec::new();
    for level in tables.levels() {
        for codec in [Codec::Ans, Codec::Zstd, Codec::Raw] {
            let name = format!("{}b/{}", level.bits, codec.name());
            out.push((
                name,
                Choice::Calibrated {
                    bits: level.bits,
                    codec,
                },
            ));
        }
    }
    if tables.learned().is_some() {
        out.push(("learned/ans".to_owned(), Choice::Learned));
    }
    out
}

fn print_table(encoder: &FrameEncoder<'_>, choices: &[(String, Choice)], views: &[Vec<f32>]) {
    println!();
    println!("cleave-codec benchmark on {}", machine());
    println!(
        "inputs: {VIEWS} full {SHAPE:?} frames of the bundled head's output on held-out \
         photographs; figures are means over the frames"
    );
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>9} {:>7}",
        "bits/codec", "frame B", "payload", "bound B", "overhead", "header"
    );
    for (name, choice) in choices {
        let (mut frame, mut payload, mut bound, mut header) = (0.0, 0.0, 0.0, 0.0);
        let mut has_bound = true;
        for view in views {
            let f = encoder
                .encode(view, &SHAPE, *choice)
                .expect("bench frame encodes");
            frame += f.bytes.len() as f64;
            payload += f.payload_bytes as f64;
            header += (f.bytes.len() - f.payload_bytes - 4) as f64;
            match f.information_bits {
                Some(bits) => bound += bits / 8.0,
                None => has_bound = false,
            }
        }
        let n = views.len() as f64;
        let (frame, payload, bound, header) = (frame / n, payload / n, bound / n, header / n);
        let (bound, overhead) = if has_bound {
            (
                format!("{bound:.1}"),
                format!("{:+.2}%", (payload / bound - 1.0) * 100.0),
            )
        } else {
            ("-".to_owned(), "-".to_owned())
        };
        println!("{name:<12} {frame:>8.1} {payload:>8.1} {bound:>8} {overhead:>9} {header:>7.1}");
    }
    println!();
}

fn bench_frames(c: &mut Criterion) {
    let tables = bundled_tables();
    let encoder = FrameEncoder::new(bundle_id().tag(), Some(&tables));
    let decoder = FrameDecoder::new(Some(tables.clone()), Limits::default());
    let views = views();
    let choices = choices(&tables);
    print_table(&encoder, &choices, &views);

    let mut group = c.benchmark_group("encode");
    for (name, choice) in &choices {
        let mut i = 0;
        group.bench_function(name.as_str(), |b| {
            b.iter(|| {
                i = (i + 1) % views.len();
                encoder
                    .encode(black_box(&views[i]), &SHAPE, *choice)
                    .expect("bench frame encodes")
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode");
    for (name, choice) in &choices {
        let frames: Vec<Vec<u8>> = views
            .iter()
            .map(|v| {
                encoder
                    .encode(v, &SHAPE, *choice)
                    .expect("bench frame encodes")
                    .bytes
            })
            .collect();
        let mut i = 0;
        group.bench_function(name.as_str(), |b| {
            b.iter(|| {
                i = (i + 1) % frames.len();
                decoder
                    .decode(black_box(&frames[i]))
                    .expect("bench frame decodes")
                    .dequantize()
                    .expect("bench frame dequantizes")
            })
        });
    }
    group.finish();
}

fn bench_range_vs_ans(c: &mut Criterion) {
    let tables = bundled_tables();
    let level = tables
        .level(COMPARE_BITS)
        .expect("the bundle has the compared level");
    let models = range_models(COMPARE_BITS);
    let symbols: Vec<Vec<i32>> = views()
        .iter()
        .map(|v| level.quantizer.quantize(v, &SHAPE).expect("view quantizes"))
        .collect();
    let elements = symbols[0].len();
    let (mut ans_bytes, mut direct_bytes, mut range_bytes, mut bound) = (0.0, 0.0, 0.0, 0.0);
    for s in &symbols {
        let a = ans::encode(&level.prior, s).expect("ans encodes");
        assert_eq!(
            &ans::decode(&level.prior, &a, elements).expect("ans decodes"),
            s
        );
        let d = direct_ans_encode(&models, s);
        direct_bytes += (d.len() * 4) as f64;
        assert_eq!(
            &direct_ans_decode(&models, d, elements),
            s,
            "direct ANS round trip"
        );
        let r = range_encode(&models, s);
        range_bytes += (r.len() * 4) as f64;
        assert_eq!(
            &range_decode(&models, r, elements),
            s,
            "range coder round trip"
        );
        ans_bytes += a.len() as f64;
        bound += level.prior.information_bits(s) / 8.0;
    }
    let n = symbols.len() as f64;
    println!(
        "{COMPARE_BITS}-bit static prior, payload bytes per view (mean of {VIEWS}): \
         bound {:.1}, ans {:.1} ({:+.2}%), ans-direct {:.1} ({:+.2}%), range {:.1} ({:+.2}%)",
        bound / n,
        ans_bytes / n,
        (ans_bytes / bound - 1.0) * 100.0,
        direct_bytes / n,
        (direct_bytes / bound - 1.0) * 100.0,
        range_bytes / n,
        (range_bytes / bound - 1.0) * 100.0,
    );
    println!();

    let mut group = c.benchmark_group(format!("coder-{COMPARE_BITS}b"));
    let mut i = 0;
    group.bench_function("ans/encode", |b| {
        b.iter(|| {
            i = (i + 1) % symbols.len();
            ans::encode(&level.prior, black_box(&symbols[i])).expect("ans encodes")
        })
    });
    group.bench_function("range/encode", |b| {
        b.iter(|| {
            i = (i + 1) % symbols.len();
            range_encode(&models, black_box(&symbols[i]))
        })
    });
    let ans_payloads: Vec<Vec<u8>> = symbols
        .iter()
        .map(|s| ans::encode(&level.prior, s).expect("ans encodes"))
        .collect();
    let range_payloads: Vec<Vec<u32>> = symbols.iter().map(|s| range_encode(&models, s)).collect();
    group.bench_function("ans-direct/encode", |b| {
        b.iter(|| {
            i = (i + 1) % symbols.len();
            direct_ans_encode(&models, black_box(&symbols[i]))
        })
    });
    let direct_payloads: Vec<Vec<u32>> = symbols
        .iter()
        .map(|s| direct_ans_encode(&models, s))
        .collect();
    group.bench_function("ans/decode", |b| {
        b.iter(|| {
            i = (i + 1) % ans_payloads.len();
            ans::decode(&level.prior, black_box(&ans_payloads[i]), elements).expect("ans decodes")
        })
    });
    group.bench_function("ans-direct/decode", |b| {
        b.iter(|| {
            i = (i + 1) % direct_payloads.len();
            direct_ans_decode(&models, black_box(direct_payloads[i].clone()), elements)
        })
    });
    group.bench_function("range/decode", |b| {
        b.iter(|| {
            i = (i + 1) % range_payloads.len();
            // The decoder takes its words by value, as `ans::decode` builds its own.
            range_decode(&models, black_box(range_payloads[i].clone()), elements)
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_frames, bench_range_vs_ans
}
criterion_main!(benches);

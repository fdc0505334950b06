//! `cleave-bench rate-fidelity`: what each way of sending an image costs in bytes and in
//! fidelity, in one table, from one command.
//!
//! The bundle's manifest states rate and fidelity as `make_bundle.py` measured them in
//! Python; this measures them again through the Rust code that actually runs: every split row
//! is a real `FrameEncoder` → `FrameDecoder` round trip and a tail run on the dequantized
//! tensor, every offloading row a real JPEG or WebP encode and decode and a full-model run,
//! all against the full model on the same view. `docs/rate-fidelity.md` is its output.

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, ensure};
use clap::Args;
use cleave_codec::{Choice, Codec, FrameDecoder, FrameEncoder, Limits};
use cleave_engine::{Backend, Bundle, Preprocessor, Role, Tensor, top_k};
use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, RgbImage, imageops};

/// The views made of each image, in order; `--views N` takes the first `N`.
const VIEWS: [&str; 6] = [
    "centre",
    "flip",
    "top-left",
    "bottom-right",
    "top-right",
    "bottom-left",
];
/// Codecs measured at every calibrated bit depth.
const CODECS: [Codec; 3] = [Codec::Ans, Codec::Zstd, Codec::Raw];
/// JPEG and WebP qualities of the offloading baselines.
const QUALITIES: [u8; 5] = [10, 30, 50, 70, 90];

/// Options of `cleave-bench rate-fidelity`.
#[derive(Debug, Args)]
pub(crate) struct RateFidelityArgs {
    /// Bundle folder.
    #[arg(long, default_value = "models/efficientnet-lite0-split")]
    bundle: PathBuf,
    /// Images or folders of images (by default the bundle's held-out evaluation photographs).
    #[arg(long, num_args = 1.., default_value = "models/samples")]
    images: Vec<PathBuf>,
    /// Views per image, 1 to 6: centre crop, its horizontal flip, then off-centre crops
    /// (top-left, bottom-right, top-right, bottom-left).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=6))]
    views: u8,
    /// Backend for head, tail and full model: tract, ort, ort-cuda, ort-tensorrt.
    #[arg(long, default_value = "tract")]
    backend: Backend,
    /// Also write the table, with a preamble, as a markdown document to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// View `index` of a decoded image, before the engine's preprocessing (which then takes its
/// centred square of `crop_fraction` and resizes it): the image itself, its mirror image, or
/// the 80 % × 80 % region at one corner.
fn view(image: &RgbImage, index: usize) -> RgbImage {
    let (w, h) = image.dimensions();
    let (cw, ch) = ((w * 4 / 5).max(1), (h * 4 / 5).max(1));
    let (x, y) = match index {
        0 => return image.clone(),
        1 => return imageops::flip_horizontal(image),
        2 => (0, 0),
        3 => (w - cw, h - ch),
        4 => (w - cw, 0),
        _ => (0, h - ch),
    };
    imageops::crop_imm(image, x, y, cw, ch).to_image()
}

/// One way of sending one view: what it cost and the logits it led to.
struct Measured {
    label: String,
    codec: &'static str,
    bytes: usize,
    payload: Option<usize>,
    bound_bits: Option<f64>,
    logits: Vec<f32>,
}

impl Measured {
    /// A frame or file of `bytes` without payload or bound; logits come later.
    fn new(label: String, codec: &'static str, bytes: usize) -> Self {
        let (payload, bound_bits, logits) = (None, None, Vec::new());
        Self {
            label,
            codec,
            bytes,
            payload,
            bound_bits,
            logits,
        }
    }
}

/// A table row: sums over all views (`sum` starts as the first view's measurement).
struct Row {
    sum: Measured,
    n: usize,
    agree: usize,
    kl: f64,
}

/// The models, tables and settings every view is measured with.
struct Harness<'b> {
    bundle: &'b Bundle,
    pre: Preprocessor,
    full: cleave_engine::Model,
    head: cleave_engine::Model,
    tail: cleave_engine::Model,
    encoder: FrameEncoder<'b>,
    decoder: FrameDecoder,
}

pub(crate) fn run(args: RateFidelityArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let bundle = Bundle::open(&args.bundle)
        .with_context(|| format!("opening bundle {}", args.bundle.display()))?;
    let tables = bundle
        .coding_tables()
        .context("the bundle has no coding tables: calibrate it first (docs/coding-tables.md)")?;
    ensure!(
        !tables.levels().is_empty(),
        "the bundle has no calibrated levels"
    );
    let files = cleave_head::sources::expand_inputs(&args.images)?;
    eprintln!("bundle {}", bundle.describe());
    eprintln!("machine: {}", crate::machine::describe());
    let harness = Harness {
        bundle: &bundle,
        pre: Preprocessor::new(&bundle.manifest().input),
        full: bundle.load(Role::Full, &args.backend)?,
        head: bundle.load(Role::Head, &args.backend)?,
        tail: bundle.load(Role::Tail, &args.backend)?,
        encoder: FrameEncoder::new(bundle.id().tag(), Some(tables)),
        decoder: FrameDecoder::new(Some(tables.clone()), Limits::default()),
    };
    let views = usize::from(args.views);
    let mut rows: Vec<Row> = Vec::new();
    let mut timings: Vec<Timing> = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let image = Preprocessor::decode(&bytes)
            .with_context(|| format!("decoding {}", path.display()))?
            .to_rgb8();
        let image_started = Instant::now();
        for (v, name) in VIEWS.iter().enumerate().take(views) {
            let rgb = harness
                .pre
                .crop_resize(&DynamicImage::ImageRgb8(view(&image, v)));
            let (reference, measured, timing) = harness
                .measure(&rgb)
                .with_context(|| format!("{} ({name} view)", path.display()))?;
            accumulate(&mut rows, &reference, measured)?;
            timings.push(timing);
        }
        eprintln!(
            "[{}/{}] {}: {views} views in {:.1} s",
            i + 1,
            files.len(),
            path.display(),
            image_started.elapsed().as_secs_f64()
        );
    }
    let settings = Settings {
        args: &args,
        bundle: &bundle,
        images: files.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let report = report(&settings, &rows) + &cost_report(&bundle, &timings);
    print!("{report}");
    if let Some(out) = &args.out {
        let doc = format!("{}{report}", preamble(&settings));
        std::fs::write(out, doc).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

impl Harness<'_> {
    /// The full model's logits on one preprocessed view, and every way of sending it.
    fn measure(&self, rgb: &RgbImage) -> anyhow::Result<(Vec<f32>, Vec<Measured>, Timing)> {
        let input = self.pre.tensor(rgb);
        let shape = self.bundle.manifest().bottleneck.shape.clone();
        let head_started = Instant::now();
        let features = self.head.run(&Tensor::stack(&[&input]))?.data;
        let head_ms = head_started.elapsed().as_secs_f64() * 1e3;
        let timing = self.time_default_coding(&features, &shape, head_ms)?;
        let mut measured = Vec::new();
        // Tail inputs: one per bit depth (the three codecs restore the same tensor), the
        // learned prior, and the float features.
        let mut restored: Vec<Tensor> = Vec::new();
        let mut uses: Vec<usize> = Vec::new();
        let tables = self.bundle.coding_tables();
        let levels: Vec<u8> = tables
            .iter()
            .flat_map(|t| t.levels())
            .map(|l| l.bits)
            .collect();
        let learned = tables.is_some_and(|t| t.learned().is_some());
        let choices = levels
            .iter()
            .flat_map(|&bits| CODECS.map(|codec| Choice::Calibrated { bits, codec }))
            .chain(learned.then_some(Choice::Learned));
        for choice in choices {
            let frame = self.encoder.encode(&features, &shape, choice)?;
            let decoded = self.decoder.decode(&frame.bytes)?;
            ensure!(
                decoded.header.codec == frame.codec && decoded.header.coding == frame.coding,
                "frame header does not round-trip"
            );
            let tensor = Tensor::new(shape.clone(), decoded.dequantize()?);
            let label = match choice {
                Choice::Calibrated { bits, .. } => format!("split, {bits} bits"),
                _ => "split, learned prior".to_owned(),
            };
            // The same bit depth as the row before: the tail input must be identical.
            match restored.last() {
                Some(last) if measured.last().is_some_and(|m: &Measured| m.label == label) => {
                    ensure!(
                        *last == tensor,
                        "{label}: codecs restored different tensors"
                    );
                }
                _ => restored.push(tensor),
            }
            uses.push(restored.len() - 1);
            measured.push(Measured {
                payload: Some(frame.payload_bytes),
                bound_bits: frame.information_bits.filter(|_| frame.codec == Codec::Ans),
                ..Measured::new(label, frame.codec.name(), frame.bytes.len())
            });
        }
        uses.push(restored.len());
        restored.push(Tensor::new(shape, features));
        let float_bytes = 4 * restored[restored.len() - 1].data.len();
        measured.push(Measured::new(
            "split, float features".into(),
            "f32",
            float_bytes,
        ));
        let tail = self
            .tail
            .run(&Tensor::stack(&restored.iter().collect::<Vec<_>>()))?;
        for (m, &i) in measured.iter_mut().zip(&uses) {
            m.logits = tail.sample(i).data;
        }

        // Offloading: the 224×224 model input as JPEG and WebP, decoded, through the full
        // model, batched with the reference (the uncompressed input) as sample 0.
        let mut inputs = vec![input];
        let mut offload = Vec::new();
        for (name, codec) in [("JPEG", "jpeg"), ("WebP", "webp")] {
            for quality in QUALITIES {
                let (bytes, decoded) = if codec == "jpeg" {
                    jpeg(rgb, quality)?
                } else {
                    webp(rgb, quality)?
                };
                inputs.push(self.pre.tensor(&decoded));
                let label = format!("offload, {name} q{quality}");
                offload.push(Measured::new(label, codec, bytes));
            }
        }
        let full = self
            .full
            .run(&Tensor::stack(&inputs.iter().collect::<Vec<_>>()))?;
        for (i, m) in offload.iter_mut().enumerate() {
            m.logits = full.sample(i + 1).data;
        }
        measured.extend(offload);
        Ok((full.sample(0).data, measured, timing))
    }

    /// Encodes and decodes one frame the way the head does by default, timed on this thread
    /// (the models run on one thread too, so the comparison is on the same core).
    fn time_default_coding(
        &self,
        features: &[f32],
        shape: &[usize],
        head_ms: f64,
    ) -> anyhow::Result<Timing> {
        let q = &self.bundle.manifest().bottleneck.quantization;
        let codec = Codec::from_name(&q.codec).context("manifest codec")?;
        let choice = Choice::Calibrated {
            bits: q.bits,
            codec,
        };
        let started = Instant::now();
        let frame = self.encoder.encode(features, shape, choice)?;
        let encode_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        let restored = self.decoder.decode(&frame.bytes)?.dequantize()?;
        let decode_ms = started.elapsed().as_secs_f64() * 1e3;
        ensure!(
            restored.len() == features.len(),
            "default coding round trip"
        );
        Ok(Timing {
            head_ms,
            encode_ms,
            decode_ms,
        })
    }
}

/// Milliseconds of one view: the head model, and the default coding's encode and decode.
struct Timing {
    head_ms: f64,
    encode_ms: f64,
    decode_ms: f64,
}

/// The codec's cost beside the head model's, medians over the views.
fn cost_report(bundle: &Bundle, timings: &[Timing]) -> String {
    let median = |f: fn(&Timing) -> f64| {
        let mut values: Vec<f64> = timings.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    };
    let (head, encode, decode) = (
        median(|t| t.head_ms),
        median(|t| t.encode_ms),
        median(|t| t.decode_ms),
    );
    let q = &bundle.manifest().bottleneck.quantization;
    format!(
        "\nCodec cost at the default ({} bits, {}), medians over {} views of the full {:?} \
         bottleneck: encode {encode:.3} ms, decode + dequantize {decode:.3} ms, against \
         {head:.1} ms for the head model on the same core: the codec is {:.2} % of the head's \
         compute.\n",
        q.bits,
        q.codec,
        timings.len(),
        bundle.manifest().bottleneck.shape,
        100.0 * (encode + decode) / head.max(f64::MIN_POSITIVE)
    )
}

fn jpeg(rgb: &RgbImage, quality: u8) -> anyhow::Result<(usize, RgbImage)> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(Cursor::new(&mut bytes), quality).encode_image(rgb)?;
    let decoded = image::load_from_memory(&bytes)?.to_rgb8();
    Ok((bytes.len(), decoded))
}

fn webp(rgb: &RgbImage, quality: u8) -> anyhow::Result<(usize, RgbImage)> {
    let encoder = webp::Encoder::from_rgb(rgb.as_raw(), rgb.width(), rgb.height());
    let bytes = encoder
        .encode_simple(false, f32::from(quality))
        .map_err(|e| anyhow::anyhow!("WebP encoding failed: {e:?}"))?;
    let decoded = webp::Decoder::new(&bytes)
        .decode()
        .context("WebP decoding failed")?;
    ensure!(!decoded.is_alpha(), "WebP decoded with alpha");
    let image = RgbImage::from_raw(decoded.width(), decoded.height(), decoded.to_vec())
        .context("WebP decoded to the wrong size")?;
    Ok((bytes.len(), image))
}

/// Adds one view's measurements to the rows (made on the first view, in its order).
fn accumulate(
    rows: &mut Vec<Row>,
    reference: &[f32],
    measured: Vec<Measured>,
) -> anyhow::Result<()> {
    let best = top_k(reference, 1)[0].index;
    for (i, m) in measured.into_iter().enumerate() {
        let agree = usize::from(top_k(&m.logits, 1)[0].index == best);
        let kl = kl(reference, &m.logits);
        let Some(row) = rows.get_mut(i) else {
            rows.push(Row {
                sum: m,
                n: 1,
                agree,
                kl,
            });
            continue;
        };
        let sum = &mut row.sum;
        ensure!(
            sum.label == m.label && sum.codec == m.codec,
            "rows out of order"
        );
        sum.bytes += m.bytes;
        sum.payload = sum.payload.zip(m.payload).map(|(a, b)| a + b);
        sum.bound_bits = sum.bound_bits.zip(m.bound_bits).map(|(a, b)| a + b);
        (row.n, row.agree, row.kl) = (row.n + 1, row.agree + agree, row.kl + kl);
    }
    Ok(())
}

/// KL(softmax(p) ‖ softmax(q)) in nats, computed in f64 from logits.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = l.iter().map(|&x| (x as f64 - max).exp()).sum();
        l.iter()
            .map(|&x| x as f64 - max - sum.ln())
            .collect::<Vec<_>>()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

struct Settings<'a> {
    args: &'a RateFidelityArgs,
    bundle: &'a Bundle,
    images: usize,
    seconds: f64,
}

impl Settings<'_> {
    fn command(&self) -> String {
        let a = self.args;
        let images: Vec<String> = a.images.iter().map(|p| p.display().to_string()).collect();
        let mut command = format!(
            "cargo run --release -p cleave-bench -- rate-fidelity --bundle {} --images {} \
             --views {} --backend {}",
            a.bundle.display(),
            images.join(" "),
            a.views,
            a.backend
        );
        if let Some(out) = &a.out {
            command += &format!(" --out {}", out.display());
        }
        command
    }
}

fn report(s: &Settings<'_>, rows: &[Row]) -> String {
    let views = usize::from(s.args.views);
    let q = &s.bundle.manifest().bottleneck.quantization;
    let mut out = format!(
        "Bundle {}; {} image(s), {views} view(s) each ({}): {} views; backend {}; the head \
         sends {} bits with {} by default; one view is {:.1} points of top-1 agreement. \
         Measured in {:.0} s by\n`{}`.\n\n",
        s.bundle.describe(),
        s.images,
        VIEWS[..views].join(", "),
        s.images * views,
        s.args.backend,
        q.bits,
        q.codec,
        100.0 / (s.images * views).max(1) as f64,
        s.seconds,
        s.command()
    );
    out += "| features or input | codec | bytes / frame | payload | bound | top-1 agreement \
            | mean KL(full ‖ ·) |\n|---|---|---:|---:|---:|---:|---:|\n";
    for r in rows {
        let n = r.n.max(1) as f64;
        let mean = |x: Option<f64>| x.map_or("—".to_owned(), |x| format!("{:.0}", x / n));
        out += &format!(
            "| {} | {} | {:.0} | {} | {} | {:.1} % | {:.4} |\n",
            r.sum.label,
            r.sum.codec,
            r.sum.bytes as f64 / n,
            mean(r.sum.payload.map(|p| p as f64)),
            mean(r.sum.bound_bits.map(|b| b / 8.0)),
            100.0 * r.agree as f64 / n,
            r.kl / n
        );
    }
    out + &format!("\nmachine: {}\n", crate::machine::describe())
}

fn preamble(s: &Settings<'_>) -> String {
    format!(
        "# Rate and fidelity: split coding vs. offloading the image\n\n\
         Generated by `cleave-bench rate-fidelity` (`bench/src/rate_fidelity.rs`); do not \
         edit by hand, rerun:\n\n```sh\n{}\n```\n\n\
         Each image is decoded and made into views with the `image` crate (the photo, its \
         horizontal mirror, and the 80 % × 80 % region at each corner), and each view goes \
         through the engine's preprocessing (centre square of `crop_fraction`, resize to the \
         model input). On every view the **full model** gives the reference logits, and the \
         **head** gives the float bottleneck once. The rows:\n\n\
         - **split, N bits**: the bundle's calibrated level at N bits, coded with each codec \
         by `cleave_codec::FrameEncoder`, decoded by `FrameDecoder` (a real round trip), \
         dequantized and run through the **tail**. The three codecs are lossless over the \
         same symbols, so the tail output depends only on the bit depth: the tail runs once \
         per bit depth and its result serves all three codecs (the harness checks that the \
         three decoded tensors are identical). `zstd` is level 3 over one byte per symbol, \
         `raw` is bit-packed.\n\
         - **split, learned prior**: the bundle's factorized (CompressAI `EntropyBottleneck`) \
         prior, coded with ANS.\n\
         - **split, float features**: the tail on the unquantized bottleneck; bytes are its \
         `f32` size, for reference.\n\
         - **offload, JPEG/WebP qN**: the 224×224 model input (the preprocessed crop, before \
         normalization) as JPEG (`image` crate) or lossy WebP (libwebp 1.3.1 through the \
         `webp` crate, default method), decoded and run through the full model: what sending \
         the image to a server would cost.\n\n\
         Columns: **bytes / frame** is the mean whole frame (header included) or image file; \
         **payload** the mean coded payload alone; **bound** the mean information content \
         of the symbols under the prior (`EncodedFrame::information_bits` / 8, ANS rows \
         only), which no coder of those symbols beats on average; **top-1 agreement** how \
         often the top class equals the full model's on the same view; **mean KL** the mean \
         KL(full ‖ this) of the softmax outputs, in nats.\n\n\
         These views are not the ones the bundle's manifest reports fidelity on (the centre \
         crop and 11 random 35–100 % crops and flips per image), so agreement and KL differ \
         from its figures; byte counts are close to the manifest's.\n\n",
        s.command()
    )
}

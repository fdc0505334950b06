//! The end-to-end demo: a real tail on loopback, the head over the samples, the full model as
//! reference, and a table of classes, bytes and milliseconds.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use cleave_engine::{Backend, Bundle, Role, Tensor, top_k};
use cleave_head::{FrameReport, HeadEncoder, RunOptions, Session, SessionConfig, sources};
use cleave_tail::{TailConfig, TailServer};
use image::codecs::jpeg::JpegEncoder;

/// Options of `cleave-bench demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Bundle folder.
    #[arg(long, default_value = "models/efficientnet-lite0-split")]
    bundle: PathBuf,
    /// Images or folders of images.
    #[arg(default_value = "models/samples")]
    inputs: Vec<PathBuf>,
    /// Backend for head, tail and full model: tract, ort, ort-cuda, ort-tensorrt.
    #[arg(long, default_value = "tract")]
    backend: Backend,
    /// JPEG quality of the offloading baseline (the 224×224 model input as JPEG).
    #[arg(long, default_value_t = 90)]
    jpeg_quality: u8,
    /// Also write the per-frame reports as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Reference {
    label: String,
    score: f32,
    index: usize,
    ms: f64,
    jpeg_bytes: usize,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let bundle = Arc::new(
        Bundle::open(&args.bundle)
            .with_context(|| format!("opening bundle {}", args.bundle.display()))?,
    );
    let files = sources::expand_inputs(&args.inputs)?;
    eprintln!(
        "bundle {} — {}",
        bundle.describe(),
        bundle.manifest().description
    );
    eprintln!("machine: {}", crate::machine::describe());

    let mut config = TailConfig::new(&args.bundle);
    config.model_defaults.backend = args.backend;
    let tail = TailServer::build(&config)
        .await
        .context("starting the tail")?;
    let address = format!("http://{}", tail.local_addr());
    let serving = tail.spawn();
    eprintln!("tail listening on {address} ({})", args.backend);

    let encoder = Arc::new(HeadEncoder::new(bundle.clone(), &args.backend)?);
    // Window 1: frames one at a time, so each latency is that frame's alone.
    let session = Session::start(
        bundle.id(),
        SessionConfig {
            window: 1,
            ..SessionConfig::new(vec![address.clone()])
        },
    );
    let options = RunOptions {
        max_pending: 1,
        ..RunOptions::default()
    };
    let mut reports: Vec<FrameReport> = Vec::new();
    let mut json = match &args.json {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let frames = sources::start(sources::SourceSpec::Files(files.clone()), 1)?;
    cleave_head::run(
        encoder.clone(),
        Some(&session),
        frames,
        &options,
        |report| {
            if let Some(out) = json.as_mut() {
                cleave_head::write_json_line(out, report)?;
            }
            reports.push(report.clone());
            Ok(())
        },
    )
    .await?;
    serving
        .shutdown(std::time::Duration::from_secs(30))
        .await
        .context("tail server")?;

    let references = {
        let bundle = bundle.clone();
        let backend = args.backend;
        let quality = args.jpeg_quality;
        let files = files.clone();
        tokio::task::spawn_blocking(move || reference(&bundle, &backend, &files, quality))
            .await
            .context("reference task")??
    };
    print_table(&bundle, &reports, &references);
    if reports.iter().any(|r| r.top1().is_none()) {
        bail!("some frames failed (see the table)");
    }
    Ok(())
}

/// The full model run locally, and the size of the offloading baseline, for every file.
fn reference(
    bundle: &Bundle,
    backend: &Backend,
    files: &[PathBuf],
    quality: u8,
) -> anyhow::Result<Vec<Reference>> {
    let model = bundle.load(Role::Full, backend)?;
    let pre = cleave_engine::Preprocessor::new(&bundle.manifest().input);
    let labels = &bundle.manifest().labels.names;
    let mut out = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let image = cleave_engine::Preprocessor::decode(&bytes)?;
        let rgb = pre.crop_resize(&image);
        let mut jpeg = Vec::new();
        JpegEncoder::new_with_quality(Cursor::new(&mut jpeg), quality).encode_image(&rgb)?;
        let started = Instant::now();
        let input = pre.tensor(&rgb);
        let logits = model.run(&Tensor::stack(&[&input]))?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let best = top_k(&logits.data, 1).remove(0);
        out.push(Reference {
            label: labels.get(best.index).cloned().unwrap_or_default(),
            score: best.score,
            index: best.index,
            ms,
            jpeg_bytes: jpeg.len(),
        });
    }
    Ok(out)
}

fn print_table(bundle: &Bundle, reports: &[FrameReport], references: &[Reference]) {
    println!(
        "{:<12} {:<26} {:<26} {:>5} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "image",
        "split (head+tail)",
        "full model",
        "agree",
        "bytes",
        "jpeg",
        "ratio",
        "head",
        "uplink",
        "tail",
        "total",
        "full"
    );
    let mut agree = 0;
    let (mut bytes, mut jpeg) = (0usize, 0usize);
    for (report, reference) in reports.iter().zip(references) {
        let name = std::path::Path::new(&report.source)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let split = match report.top1() {
            Some(top) => format!("{} {:.2}", clip(&top.label, 20), top.score),
            None => "FAILED".to_string(),
        };
        let same = report
            .top1()
            .is_some_and(|t| t.index as usize == reference.index);
        agree += usize::from(same);
        bytes += report.bytes_sent;
        jpeg += reference.jpeg_bytes;
        println!(
            "{:<12} {:<26} {:<26} {:>5} {:>7} {:>7} {:>6.2} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>8.1}",
            clip(&name, 12),
            split,
            format!("{} {:.2}", clip(&reference.label, 20), reference.score),
            if same { "yes" } else { "no" },
            report.bytes_sent,
            reference.jpeg_bytes,
            report.bytes_sent as f64 / reference.jpeg_bytes.max(1) as f64,
            report.head_ms,
            report.uplink_ms,
            report.tail_ms,
            report.total_ms,
            reference.ms,
        );
    }
    let n = reports.len().max(1);
    let coding = reports
        .iter()
        .find_map(|r| r.coding.clone())
        .unwrap_or_else(|| "-".into());
    println!(
        "\ntop-1 agreement {agree}/{} | mean frame {} B ({coding}) vs JPEG q {} B | times in ms \
         (head = head model + codec, uplink = loopback gRPC, full = whole model locally)",
        reports.len(),
        bytes / n,
        jpeg / n
    );
    let q = &bundle.manifest().bottleneck.quantization;
    if let Some(level) = q.levels.iter().find(|l| l.bits == q.bits) {
        println!(
            "bundle fidelity at {} bits (from its manifest): top-1 agreement {:.1}%, mean KL {:.3}, \
             {} B payload",
            level.bits,
            level.top1_agreement * 100.0,
            level.mean_kl,
            level.payload_bytes
        );
    } else if let Some(f) = &bundle.manifest().fidelity {
        println!(
            "bundle fidelity (from its manifest): top-1 agreement {:.1}%, mean KL {:.3}, on {}",
            f.top1_agreement * 100.0,
            f.mean_kl,
            f.evaluated_on
        );
    }
    println!("machine: {}", crate::machine::describe());
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        text.chars().take(width - 1).collect::<String>() + "…"
    }
}

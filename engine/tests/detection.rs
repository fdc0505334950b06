//! Detection on a real pretrained detector: PP-OCRv4's text detector (PyPI
//! `rapidocr-onnxruntime`, Apache-2.0), split into a bundle by `make_bundle.py ppocr-det`,
//! run with tract and postprocessed by [`DbPostprocess`], against the boxes ONNX Runtime and
//! the numpy postprocessing found on the same image
//! (`tests/data/detection/text-coffee.toml`, written by `models/tools/detection_reference.py`).
//!
//! The bundle (about 10 MB) is not committed. Make it with
//! `python models/tools/make_bundle.py ppocr-det --out DIR` and point
//! `CLEAVE_DETECTION_BUNDLE` at `DIR`; without it these tests say so and skip, unless
//! `CLEAVE_REQUIRE_DETECTION=1` (CI sets both) makes that a failure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cleave_codec::{Choice, Codec, FrameDecoder, FrameEncoder, Granularity, Limits};
use cleave_engine::{
    Backend, Bundle, DbPostprocess, Detection, DetectionSpec, EngineError, Preprocessor, Role,
    Task, Tensor,
};
use serde::Deserialize;

/// Split boxes must agree with the full model's at least this well (F1 at IoU 0.5); the
/// bundle tool measured 0.89 on this image with the default 8-channel PCA bottleneck.
const SPLIT_MIN_F1: f64 = 0.8;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The detection bundle named by `CLEAVE_DETECTION_BUNDLE`, or `None` (with a message).
fn detection_bundle() -> Option<Bundle> {
    match std::env::var_os("CLEAVE_DETECTION_BUNDLE") {
        Some(dir) => Some(Bundle::open(&dir).unwrap_or_else(|e| {
            panic!("CLEAVE_DETECTION_BUNDLE={}: {e}", Path::new(&dir).display())
        })),
        None if std::env::var("CLEAVE_REQUIRE_DETECTION").as_deref() == Ok("1") => panic!(
            "CLEAVE_REQUIRE_DETECTION=1 but CLEAVE_DETECTION_BUNDLE is not set: make the \
             bundle with `python models/tools/make_bundle.py ppocr-det --out DIR`"
        ),
        None => {
            eprintln!(
                "skipping: CLEAVE_DETECTION_BUNDLE is not set (make the bundle with \
                 `python models/tools/make_bundle.py ppocr-det --out DIR`)"
            );
            None
        }
    }
}

#[derive(Debug, Deserialize)]
struct Fixture {
    image: String,
    full_sha256: String,
    onnxruntime: String,
    box_iou: f32,
    score_tolerance: f32,
    variants_rejected: Vec<String>,
    input: FixtureInput,
    detection: DetectionSpec,
    map: MapStats,
    split: SplitFigures,
    boxes: Vec<FixtureBox>,
}

#[derive(Debug, Deserialize)]
struct FixtureInput {
    width: usize,
    height: usize,
    crop_fraction: f32,
    resize: String,
    mean: [f32; 3],
    std: [f32; 3],
}

#[derive(Debug, Deserialize)]
struct MapStats {
    mean: f64,
    foreground: usize,
}

#[derive(Debug, Deserialize)]
struct SplitFigures {
    split_at: String,
    box_f1: f64,
}

#[derive(Debug, Deserialize)]
struct FixtureBox {
    x0: f32,
    y0: f32,
    x1: f32,
    y1: f32,
    score: f32,
    label: usize,
}

impl FixtureBox {
    fn detection(&self) -> Detection {
        Detection {
            x0: self.x0,
            y0: self.y0,
            x1: self.x1,
            y1: self.y1,
            score: self.score,
            label: self.label,
        }
    }
}

fn fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/detection/text-coffee.toml");
    let text = std::fs::read_to_string(&path).expect("the fixture is committed");
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture was made for this bundle's preprocessing and parameters; anything else is a
/// different experiment, said plainly rather than as mismatched boxes.
fn check_fixture_fits(bundle: &Bundle, fixture: &Fixture) {
    let input = &bundle.manifest().input;
    let fi = &fixture.input;
    assert!(
        (
            input.width,
            input.height,
            input.crop_fraction,
            &input.resize,
            input.mean,
            input.std
        ) == (
            fi.width,
            fi.height,
            fi.crop_fraction,
            &fi.resize,
            fi.mean,
            fi.std
        ),
        "the fixture was made for input {fi:?}, the bundle has {input:?}: remake it with \
         models/tools/detection_reference.py"
    );
    let mut spec = bundle
        .manifest()
        .detection
        .clone()
        .expect("a detection bundle has [detection]");
    spec.fidelity = None;
    assert_eq!(
        spec, fixture.detection,
        "the fixture's [detection] parameters differ from the bundle's"
    );
    let full = &bundle.manifest().models.full.sha256;
    if *full != fixture.full_sha256 {
        eprintln!(
            "note: full.onnx is {full}, the fixture was made from {} (ONNX Runtime {})",
            fixture.full_sha256, fixture.onnxruntime
        );
    }
}

/// The test's rule (as `detection_reference.py` checks it): as many boxes as expected, each
/// expected box matched one-to-one (best IoU first) by a found box with IoU at least
/// `min_iou` and a score within `tolerance`. Returns what went wrong.
fn unmatched(
    expected: &[Detection],
    found: &[Detection],
    min_iou: f32,
    tolerance: f32,
) -> Vec<String> {
    let mut problems = Vec::new();
    if expected.len() != found.len() {
        problems.push(format!(
            "{} boxes, expected {}",
            found.len(),
            expected.len()
        ));
    }
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (i, e) in expected.iter().enumerate() {
        for (j, f) in found.iter().enumerate() {
            pairs.push((e.iou(f), i, j));
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut used_e, mut used_f) = (vec![false; expected.len()], vec![false; found.len()]);
    for (iou, i, j) in pairs {
        let close = (expected[i].score - found[j].score).abs() <= tolerance;
        if used_e[i] || used_f[j] || iou < min_iou || !close {
            continue;
        }
        used_e[i] = true;
        used_f[j] = true;
    }
    for (e, used) in expected.iter().zip(&used_e) {
        if !used {
            let best = found
                .iter()
                .map(|f| (f.iou(e), f.score))
                .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
            problems.push(format!(
                "expected {e:?} unmatched (best IoU {:.3}, score {:.4})",
                best.0, best.1
            ));
        }
    }
    problems
}

/// F1 of `found` against `reference` with one-to-one matches at IoU 0.5 (as the bundle
/// tool measures it).
fn f1_at_half(reference: &[Detection], found: &[Detection]) -> f64 {
    if reference.is_empty() && found.is_empty() {
        return 1.0;
    }
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (i, r) in reference.iter().enumerate() {
        for (j, f) in found.iter().enumerate() {
            pairs.push((r.iou(f), i, j));
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut used_r, mut used_f) = (vec![false; reference.len()], vec![false; found.len()]);
    let mut matched = 0;
    for (iou, i, j) in pairs {
        if iou < 0.5 {
            break;
        }
        if !used_r[i] && !used_f[j] {
            used_r[i] = true;
            used_f[j] = true;
            matched += 1;
        }
    }
    2.0 * f64::from(matched) / (reference.len() + found.len()) as f64
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    eprintln!("{what}: {:.0} ms", started.elapsed().as_secs_f64() * 1e3);
    out
}

fn input(bundle: &Bundle, fixture: &Fixture) -> Tensor {
    let pre = Preprocessor::new(&bundle.manifest().input);
    let sample = pre
        .from_path(&repo_root().join(&fixture.image))
        .expect("the sample image decodes");
    Tensor::stack(&[&sample])
}

#[test]
fn full_model_boxes_match_onnx_runtime_and_numpy() {
    let Some(bundle) = detection_bundle() else {
        return;
    };
    assert_eq!(bundle.manifest().task, Task::Detection);
    let fixture = fixture();
    check_fixture_fits(&bundle, &fixture);
    let post = DbPostprocess::for_bundle(&bundle).expect("a DB detection bundle");
    let x = input(&bundle, &fixture);

    let full = timed("tract: load + optimize full", || {
        bundle.load(Role::Full, &Backend::Tract).unwrap()
    });
    let map = timed("tract: full, one frame", || full.run(&x).unwrap());
    assert_eq!(map.shape, vec![1, 1, 480, 480]);

    // The map itself first, so a model problem is not reported as a postprocessing one.
    let mean = map.data.iter().map(|&p| f64::from(p)).sum::<f64>() / map.data.len() as f64;
    let threshold = post.spec().binarize_threshold as f32;
    let foreground = map.data.iter().filter(|&&p| p > threshold).count();
    assert!(
        (mean - fixture.map.mean).abs() < 1e-4,
        "map mean {mean} vs ONNX Runtime's {}",
        fixture.map.mean
    );
    assert!(
        foreground.abs_diff(fixture.map.foreground) <= fixture.map.foreground / 200,
        "{foreground} foreground pixels vs ONNX Runtime's {}",
        fixture.map.foreground
    );

    let found = timed("detect.rs: postprocess", || {
        post.detect(&map.sample(0)).unwrap()
    });
    let expected: Vec<Detection> = fixture.boxes.iter().map(FixtureBox::detection).collect();
    assert!(!expected.is_empty(), "the fixture has boxes");
    let problems = unmatched(&expected, &found, fixture.box_iou, fixture.score_tolerance);
    assert!(
        problems.is_empty(),
        "tract + detect.rs disagree with ONNX Runtime + numpy: {problems:#?}\nfound: {found:#?}"
    );
    let worst = expected
        .iter()
        .map(|e| found.iter().map(|f| f.iou(e)).fold(0.0, f32::max))
        .fold(1.0, f32::min);
    eprintln!(
        "{} boxes, worst IoU with the fixture {worst:.4} (the fixture's rule rejects: {:?})",
        found.len(),
        fixture.variants_rejected
    );
}

#[test]
fn split_boxes_survive_the_codec() {
    let Some(bundle) = detection_bundle() else {
        return;
    };
    let fixture = fixture();
    check_fixture_fits(&bundle, &fixture);
    let post = DbPostprocess::for_bundle(&bundle).expect("a DB detection bundle");
    let x = input(&bundle, &fixture);
    let head = bundle.load(Role::Head, &Backend::Tract).unwrap();
    let tail = timed("tract: load + optimize tail", || {
        bundle.load(Role::Tail, &Backend::Tract).unwrap()
    });

    let features = timed("tract: head, one frame", || head.run(&x).unwrap());
    // Coded and decoded as the head and the tail would: the bundle's default coding.
    let q = &bundle.manifest().bottleneck.quantization;
    let shape = &bundle.manifest().bottleneck.shape;
    let tables = bundle.coding_tables();
    let codec = Codec::from_name(&q.codec).expect("Bundle::open checked the codec");
    let choice = match tables {
        Some(t) if t.level(q.bits).is_some() => Choice::Calibrated {
            bits: q.bits,
            codec,
        },
        _ => Choice::Inline {
            bits: q.bits,
            granularity: match q.granularity.as_str() {
                "per_tensor" => Granularity::PerTensor,
                _ => Granularity::PerChannel,
            },
            codec,
        },
    };
    let frame = FrameEncoder::new(bundle.id().tag(), tables)
        .encode(&features.data, shape, choice)
        .unwrap();
    let decoded = FrameDecoder::new(tables.cloned(), Limits::default())
        .expecting(bundle.id().tag())
        .decode(&frame.bytes)
        .unwrap();
    let mut tail_shape = vec![1];
    tail_shape.extend_from_slice(shape);
    let restored = Tensor::new(tail_shape, decoded.dequantize().unwrap());
    let map = timed("tract: tail, one frame", || tail.run(&restored).unwrap());
    let found = post.detect(&map.sample(0)).unwrap();

    let expected: Vec<Detection> = fixture.boxes.iter().map(FixtureBox::detection).collect();
    let f1 = f1_at_half(&expected, &found);
    eprintln!(
        "split at {} ({shape:?}), {:?}: {}-byte frame, {} boxes, F1@0.5 {f1:.3} against the \
         full model (ONNX Runtime measured {:.3} for {})",
        bundle.manifest().bottleneck.split_at,
        frame.coding,
        frame.bytes.len(),
        found.len(),
        fixture.split.box_f1,
        fixture.split.split_at,
    );
    assert!(
        f1 >= SPLIT_MIN_F1,
        "split boxes agree with the full model's at F1 {f1:.3} < {SPLIT_MIN_F1}: {found:#?}"
    );
}

#[test]
fn the_classifier_bundle_still_opens_as_a_classifier() {
    let bundle = Bundle::open(repo_root().join("models/efficientnet-lite0-split")).unwrap();
    assert_eq!(bundle.manifest().task, Task::Classification);
    assert!(bundle.manifest().detection.is_none());
    assert_eq!(bundle.output_shape(Role::Tail), vec![1000]);
    assert!(DbPostprocess::for_bundle(&bundle).is_none());
}

/// A minimal detection manifest (no model files: the task checks run before the files').
fn manifest(task: &str, extra: &str, labels: &str) -> String {
    let zero = "0".repeat(64);
    format!(
        "format = 1\nid = \"<id>\"\nname = \"t\"\nversion = \"1\"\ntask = \"{task}\"\n\n\
         [input]\nwidth = 64\nheight = 64\nlayout = \"NCHW\"\ncolor = \"RGB\"\n\
         resize = \"bilinear\"\ncrop_fraction = 1.0\nmean = [127.5, 127.5, 127.5]\n\
         std = [127.5, 127.5, 127.5]\n\n\
         [models.full]\npath = \"full.onnx\"\nsha256 = \"{zero}\"\ninput = \"image\"\n\
         output = \"probability\"\n\n\
         [models.head]\npath = \"head.onnx\"\nsha256 = \"{zero}\"\ninput = \"image\"\n\
         output = \"bottleneck\"\n\n\
         [models.tail]\npath = \"tail.onnx\"\nsha256 = \"{zero}\"\ninput = \"bottleneck\"\n\
         output = \"probability\"\n\n\
         [bottleneck]\nsplit_at = \"x\"\nfit = \"none\"\nshape = [8, 16, 16]\n\n\
         [bottleneck.quantization]\nbits = 8\ngranularity = \"per_channel\"\ncodec = \"zstd\"\n\n\
         {extra}\
         [labels]\nnames = [{labels}]\n"
    )
}

const DETECTION: &str = "[detection]\nkind = \"db\"\nbinarize_threshold = 0.3\n\
    box_threshold = 0.5\nunclip_ratio = 1.6\nnms_iou = 0.5\nmax_detections = 100\n\
    min_box_side = 3.0\n\n";

/// Opens a folder holding only `text` as its manifest (with the right id).
fn open_manifest(name: &str, text: &str) -> Result<Bundle, EngineError> {
    let dir = std::env::temp_dir().join(format!("cleave-detection-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let id = Bundle::id_of_manifest(text);
    std::fs::write(
        dir.join("manifest.toml"),
        text.replace("<id>", &id.to_string()),
    )
    .expect("the manifest is written");
    let result = Bundle::open(&dir);
    std::fs::remove_dir_all(&dir).expect("the temporary folder is removed");
    result
}

#[test]
fn detection_manifests_are_checked_at_open() {
    // Valid: the checks pass and opening goes on to the model files, which are absent here.
    let ok = open_manifest("ok", &manifest("detection", DETECTION, "\"text\""));
    assert!(matches!(ok, Err(EngineError::Missing { .. })), "{ok:?}");

    let cases = [
        (
            "no-table",
            manifest("detection", "", "\"text\""),
            "needs a [detection] table",
        ),
        (
            "on-a-classifier",
            manifest("classification", DETECTION, "\"text\""),
            "only for task = \"detection\"",
        ),
        (
            "two-labels",
            manifest("detection", DETECTION, "\"text\", \"logo\""),
            "finds one class",
        ),
        (
            "threshold",
            manifest(
                "detection",
                &DETECTION.replace("binarize_threshold = 0.3", "binarize_threshold = 1.5"),
                "\"text\"",
            ),
            "detection.binarize_threshold = 1.5",
        ),
        (
            "kind",
            manifest(
                "detection",
                &DETECTION.replace("\"db\"", "\"yolo\""),
                "\"text\"",
            ),
            "unknown variant `yolo`",
        ),
        (
            "unknown-key",
            manifest(
                "detection",
                &DETECTION.replace("nms_iou", "nms_overlap"),
                "\"text\"",
            ),
            "unknown field `nms_overlap`",
        ),
        (
            "classification-fidelity",
            manifest(
                "detection",
                &format!(
                    "[fidelity]\ntop1_agreement = 1.0\nmean_kl = 0.0\npayload_bytes = 1\n\
                     evaluated_on = \"x\"\n\n{DETECTION}"
                ),
                "\"text\"",
            ),
            "[detection.fidelity]",
        ),
    ];
    for (name, text, says) in cases {
        let error = open_manifest(name, &text).unwrap_err();
        assert!(
            matches!(error, EngineError::Manifest { .. }) && error.to_string().contains(says),
            "{name}: {error}"
        );
    }
}

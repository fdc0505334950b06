//! The bundled model's trained prefilter (`docs/prefilter.md`): it loads with tract, gives a
//! probability in [0, 1], and agrees with the values ONNX Runtime gave when
//! `models/tools/prefilter.py` trained it (`tests/data/prefilter/expected.toml`); and
//! manifests whose prefilter entries are wrong in one way each are refused with a message
//! that names the key.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use cleave_engine::{Backend, Bundle, EngineError, Preprocessor, Role, Tensor};
use serde::Deserialize;

/// tract against ONNX Runtime on the same bottleneck: float rounding only.
const SAME_INPUT_TOLERANCE: f32 = 1e-4;
/// tract after the engine's preprocessing (Rust `image`: JPEG decoder, triangle filter)
/// against ONNX Runtime after the tool's (Pillow): the two pipelines differ by a few grey
/// levels on some pixels, which moves the probability a little.
const PIPELINE_TOLERANCE: f32 = 0.03;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bundled() -> PathBuf {
    repo_root().join("models/efficientnet-lite0-split")
}

#[derive(Debug, Deserialize)]
struct Expected {
    threshold: f64,
    synthetic: f32,
    sample: Vec<Sample>,
}

#[derive(Debug, Deserialize)]
struct Sample {
    file: String,
    interest: f32,
}

fn expected() -> Expected {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/prefilter/expected.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The input `prefilter.py --fixture` used: `3 sin(0.37 i)` over the flat index `i`.
fn synthetic(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| (3.0 * (i as f64 * 0.37).sin()) as f32)
        .collect();
    let mut full = vec![1];
    full.extend_from_slice(shape);
    Tensor::new(full, data)
}

#[test]
fn the_bundled_prefilter_agrees_with_onnxruntime() {
    let bundle = Bundle::open(bundled()).unwrap();
    let expected = expected();
    let spec = bundle
        .prefilter_spec()
        .expect("the bundled model has a prefilter");
    assert_eq!(
        spec.threshold, expected.threshold,
        "the fixture is from another training run: rerun prefilter.py --fixture"
    );
    assert_eq!(bundle.prefilter_file().unwrap().input, "bottleneck");
    let prefilter = bundle.load_prefilter(&Backend::Tract).unwrap().unwrap();
    assert_eq!(prefilter.output_shape(), &[1]);

    let shape = bundle.manifest().bottleneck.shape.clone();
    let got = prefilter.run(&synthetic(&shape)).unwrap();
    assert_eq!(got.shape, vec![1, 1]);
    assert!(
        (got.data[0] - expected.synthetic).abs() <= SAME_INPUT_TOLERANCE,
        "synthetic bottleneck: tract {} vs onnxruntime {}",
        got.data[0],
        expected.synthetic
    );

    let head = bundle.load(Role::Head, &Backend::Tract).unwrap();
    let pre = Preprocessor::new(&bundle.manifest().input);
    let mut batch = Vec::new();
    for sample in &expected.sample {
        let image = pre
            .from_path(&repo_root().join("models/samples").join(&sample.file))
            .unwrap();
        let mut input_shape = vec![1];
        input_shape.extend_from_slice(&image.shape);
        let bottleneck = head
            .run(&Tensor::new(input_shape, image.data.clone()))
            .unwrap();
        let interest = prefilter.run(&bottleneck).unwrap().data[0];
        assert!(
            (0.0..=1.0).contains(&interest),
            "{}: {interest} is no probability",
            sample.file
        );
        assert!(
            (interest - sample.interest).abs() <= PIPELINE_TOLERANCE,
            "{}: tract {interest} vs onnxruntime {}",
            sample.file,
            sample.interest
        );
        // Far enough from the threshold, both pipelines make the same decision.
        if (f64::from(sample.interest) - spec.threshold).abs() > f64::from(PIPELINE_TOLERANCE) {
            assert_eq!(
                spec.keeps(interest),
                spec.keeps(sample.interest),
                "{}",
                sample.file
            );
        }
        batch.push((bottleneck, interest));
    }
    // A batch gives what one frame at a time gives.
    let mut data = Vec::new();
    for (bottleneck, _) in &batch {
        data.extend_from_slice(&bottleneck.data);
    }
    let mut batch_shape = vec![batch.len()];
    batch_shape.extend_from_slice(&shape);
    let together = prefilter.run(&Tensor::new(batch_shape, data)).unwrap();
    assert_eq!(together.shape, vec![batch.len(), 1]);
    for (i, (_, alone)) in batch.iter().enumerate() {
        assert!((together.data[i] - alone).abs() <= SAME_INPUT_TOLERANCE);
    }
}

/// A copy of the bundled model with its manifest edited (and its id recomputed), removed on
/// drop. Files are hard-linked where the file system allows, copied elsewhere.
struct Variant(PathBuf);

impl Variant {
    fn new(label: &str, edit: impl FnOnce(String) -> String) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cleave-engine-prefilter-{label}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let fail = |e: std::io::Error| -> ! { panic!("{}: {e}", dir.display()) };
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(e));
        for entry in std::fs::read_dir(bundled()).unwrap_or_else(|e| fail(e)) {
            let path = entry.unwrap_or_else(|e| fail(e)).path();
            let Some(name) = path.file_name() else {
                continue;
            };
            let to = dir.join(name);
            if path.is_file() && std::fs::hard_link(&path, &to).is_err() {
                std::fs::copy(&path, &to).unwrap_or_else(|e| fail(e));
            }
        }
        let manifest = dir.join("manifest.toml");
        let text = edit(std::fs::read_to_string(&manifest).unwrap_or_else(|e| fail(e)));
        let id = Bundle::id_of_manifest(&text);
        let lines: Vec<String> = text
            .split_inclusive('\n')
            .map(|l| {
                if l.starts_with("id = ") {
                    format!("id = \"{id}\"\n")
                } else {
                    l.to_string()
                }
            })
            .collect();
        // Hard-linked: remove before writing, or the original would change too.
        std::fs::remove_file(&manifest).unwrap_or_else(|e| fail(e));
        std::fs::write(&manifest, lines.concat()).unwrap_or_else(|e| fail(e));
        Self(dir)
    }
}

impl Drop for Variant {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The manifest without the `[name]` table (up to the next table).
fn without_table(text: &str, name: &str) -> String {
    let header = format!("[{name}]\n");
    let start = text
        .find(&header)
        .unwrap_or_else(|| panic!("no {header} in the manifest"));
    let rest = &text[start + header.len()..];
    let end = rest
        .find("\n[")
        .map_or(text.len(), |i| start + header.len() + i + 1);
    format!("{}{}", &text[..start], &text[end..])
}

fn manifest_error(variant: &Variant) -> String {
    match Bundle::open(&variant.0) {
        Err(error @ EngineError::Manifest { .. }) => error.to_string(),
        Err(error) => panic!("not a manifest error: {error}"),
        Ok(_) => panic!("{} opened", variant.0.display()),
    }
}

#[test]
fn a_bundle_without_a_prefilter_opens_and_has_none() {
    let variant = Variant::new("none", |m| {
        without_table(&without_table(&m, "models.prefilter"), "prefilter")
    });
    let bundle = Bundle::open(&variant.0).unwrap();
    assert!(bundle.prefilter_spec().is_none());
    assert!(bundle.prefilter_file().is_none());
    assert!(bundle.load_prefilter(&Backend::Tract).unwrap().is_none());
}

#[test]
fn a_bad_threshold_is_rejected_with_its_key() {
    for bad in ["1.5", "0.0", "1.0", "-0.25", "nan"] {
        let variant = Variant::new("threshold", |m| {
            let at = m.find("\nthreshold = ").unwrap() + 1;
            let end = at + m[at..].find('\n').unwrap();
            format!("{}threshold = {bad}{}", &m[..at], &m[end..])
        });
        let message = manifest_error(&variant);
        assert!(
            message.contains("prefilter.threshold") && message.contains("not in (0, 1)"),
            "{bad}: {message}"
        );
    }
}

#[test]
fn the_prefilter_must_read_the_head_output() {
    let variant = Variant::new("input", |m| {
        let table = m.find("[models.prefilter]").unwrap();
        let at = table + m[table..].find("input = \"bottleneck\"").unwrap();
        format!("{}input = \"image\"{}", &m[..at], &m[at + 20..])
    });
    let message = manifest_error(&variant);
    assert!(
        message.contains("models.prefilter.input") && message.contains("head's output"),
        "{message}"
    );
}

#[test]
fn a_prefilter_file_needs_its_table_and_the_table_its_file() {
    let variant = Variant::new("no-table", |m| without_table(&m, "prefilter"));
    assert!(manifest_error(&variant).contains("needs a [prefilter] table"));
    let variant = Variant::new("no-file", |m| without_table(&m, "models.prefilter"));
    assert!(manifest_error(&variant).contains("needs a [models.prefilter] file"));
}

#[test]
fn a_corrupt_prefilter_is_named() {
    let variant = Variant::new("corrupt", |m| m);
    let path = variant.0.join("prefilter.onnx");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let error = Bundle::open(&variant.0).unwrap_err();
    assert!(matches!(error, EngineError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("prefilter.onnx"), "{error}");
}

//! The ONNX Runtime backend against tract on the bundled model (cargo feature `ort`).
//!
//! Needs `libonnxruntime`: `ORT_DYLIB_PATH`, or `pip install onnxruntime`. Without it the
//! tests say so and skip, unless `CLEAVE_REQUIRE_ORT=1` (CI sets it) makes that a failure.
#![cfg(feature = "ort")]

use cleave_engine::{Backend, Bundle, EngineError, OrtDevice, Role, Tensor};

fn bundle() -> Bundle {
    Bundle::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/efficientnet-lite0-split"
    ))
    .expect("bundled model opens")
}

/// Loads with ONNX Runtime on CPU, or `None` (with a message) when it is not installed.
fn ort_model(bundle: &Bundle, role: Role) -> Option<cleave_engine::Model> {
    match bundle.load(role, &Backend::Ort(OrtDevice::Cpu)) {
        Ok(model) => Some(model),
        Err(EngineError::BackendUnavailable(why))
            if std::env::var("CLEAVE_REQUIRE_ORT").as_deref() != Ok("1") =>
        {
            eprintln!("skipping: ONNX Runtime is not available here ({why})");
            None
        }
        Err(other) => panic!("ONNX Runtime failed to load the model: {other}"),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data
        .iter()
        .zip(&b.data)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max)
}

fn input(batch: usize) -> Tensor {
    let n = batch * 3 * 224 * 224;
    Tensor::new(
        vec![batch, 3, 224, 224],
        (0..n).map(|i| ((i % 251) as f32 / 125.0) - 1.0).collect(),
    )
}

#[test]
fn ort_and_tract_agree_on_head_and_tail() {
    let bundle = bundle();
    let Some(ort_head) = ort_model(&bundle, Role::Head) else {
        return;
    };
    let tract_head = bundle.load(Role::Head, &Backend::Tract).unwrap();
    let x = input(2);
    let (a, b) = (ort_head.run(&x).unwrap(), tract_head.run(&x).unwrap());
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-3, "head outputs differ by {diff}");

    let ort_tail = ort_model(&bundle, Role::Tail).unwrap();
    let tract_tail = bundle.load(Role::Tail, &Backend::Tract).unwrap();
    let diff = max_abs_diff(&ort_tail.run(&a).unwrap(), &tract_tail.run(&a).unwrap());
    assert!(diff < 1e-2, "tail logits differ by {diff}");
}

#[test]
fn asking_for_a_gpu_that_is_not_there_is_an_error_not_a_cpu_fallback() {
    if std::env::var("CLEAVE_EXPECT_CUDA").as_deref() == Ok("1") {
        eprintln!("skipping: this machine is declared to have CUDA");
        return;
    }
    let bundle = bundle();
    if ort_model(&bundle, Role::Tail).is_none() {
        return;
    }
    for device in [OrtDevice::Cuda, OrtDevice::TensorRt] {
        let result = bundle.load(Role::Tail, &Backend::Ort(device));
        assert!(result.is_err(), "{device:?} loaded on a machine without it");
    }
}

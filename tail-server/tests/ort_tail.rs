//! The tail on ONNX Runtime (cargo feature `ort`): batched CPU instances answer as tract
//! does, and a GPU provider that is not there stops the server at start with exit 64.
//!
//! Needs `libonnxruntime` (`ORT_DYLIB_PATH`, or `pip install onnxruntime`); without it the
//! tests say so and skip, unless `CLEAVE_REQUIRE_ORT=1` (CI sets it).
#![cfg(feature = "ort")]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cleave_engine::{Backend, Bundle, EngineError, Model, OrtDevice, Role, Tensor};
use cleave_tail::{Batcher, BatchingConfig};

fn bundle_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/efficientnet-lite0-split")
}

fn ort_tail(bundle: &Bundle) -> Option<Model> {
    match bundle.load(Role::Tail, &Backend::Ort(OrtDevice::Cpu)) {
        Ok(model) => Some(model),
        Err(EngineError::BackendUnavailable(why))
            if std::env::var("CLEAVE_REQUIRE_ORT").as_deref() != Ok("1") =>
        {
            eprintln!("skipping: ONNX Runtime is not available here ({why})");
            None
        }
        Err(other) => panic!("ONNX Runtime failed to load the tail: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ort_instances_batch_and_agree_with_tract() {
    let bundle = Bundle::open(bundle_dir()).expect("the bundled model opens");
    let Some(first) = ort_tail(&bundle) else {
        return;
    };
    let second = ort_tail(&bundle).expect("a second instance loads");
    let batcher = Batcher::start(
        "lite0-ort",
        vec![first, second],
        BatchingConfig {
            max_batch_size: 4,
            max_queue_delay: Duration::from_millis(20),
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 64,
            default_timeout: None,
        },
    )
    .expect("the batcher starts");
    let tract = bundle
        .load(Role::Tail, &Backend::Tract)
        .expect("tract loads the tail");
    let shape = bundle.input_shape(Role::Tail);
    let n: usize = shape.iter().product();
    let input = |seed: usize| {
        let mut batched = vec![1];
        batched.extend(&shape);
        Tensor::new(
            batched,
            (0..n)
                .map(|i| (((i * 7 + seed * 131) % 97) as f32 / 97.0 - 0.5) * 3.0)
                .collect(),
        )
    };
    let requests: Vec<_> = (0..8)
        .map(|seed| {
            let batcher = batcher.clone();
            let x = input(seed);
            tokio::spawn(async move { batcher.infer(x, None).await })
        })
        .collect();
    let mut batched = 0;
    for (seed, request) in requests.into_iter().enumerate() {
        let answer = request.await.unwrap().unwrap();
        batched += usize::from(answer.batch_size > 1);
        let reference = tract.run(&input(seed)).unwrap();
        let worst = answer
            .output
            .data
            .iter()
            .zip(&reference.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-3,
            "request {seed}: ORT differs from tract by {worst}"
        );
    }
    assert!(batched > 0, "eight concurrent requests shared no batch");
}

#[test]
fn a_gpu_backend_without_a_gpu_stops_the_server_at_start() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!("skipping: this machine has a GPU");
        return;
    }
    for backend in ["ort-cuda", "ort-tensorrt"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cleave-tail"))
            .args(["--bundle", bundle_dir().to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--backend", backend])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("ORT_DYLIB_PATH")
            && std::env::var("CLEAVE_REQUIRE_ORT").as_deref() != Ok("1")
        {
            eprintln!("skipping: ONNX Runtime is not available here");
            return;
        }
        assert_eq!(out.status.code(), Some(64), "{backend}: {stderr}");
        let provider = if backend == "ort-cuda" {
            "CUDA"
        } else {
            "TensorRT"
        };
        assert!(stderr.contains(provider), "{backend}: {stderr}");
    }
}

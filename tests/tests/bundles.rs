//! Bundles that are wrong in one way each: the error names the file and the problem, and head
//! and tail that run different bundles refuse each other, naming both ids.

use std::sync::Arc;

use cleave_engine::{Backend, Bundle, EngineError, Role};
use cleave_head::{HeadEncoder, HeadError, Uplink};
use cleave_tests::{TailProcess, TempDir, bundle_variant, default_bundle};

#[test]
fn the_bundled_model_opens_and_its_id_is_stable() {
    let a = Bundle::open(default_bundle()).unwrap();
    let b = Bundle::open(default_bundle()).unwrap();
    assert_eq!(a.id(), b.id());
    assert_eq!(a.id().to_string(), a.manifest().id);
    assert_eq!(a.manifest().labels.names.len(), 1000);
}

#[test]
fn a_corrupt_model_file_is_named() {
    let dir = bundle_variant(&default_bundle(), "corrupt", |m| m);
    let head = dir.path().join("head.onnx");
    let mut bytes = std::fs::read(&head).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&head, bytes).unwrap();
    let error = Bundle::open(dir.path()).unwrap_err();
    assert!(matches!(error, EngineError::Corrupt { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("head.onnx") && message.contains("corrupt"),
        "{message}"
    );
}

#[test]
fn a_missing_model_file_is_named() {
    let dir = bundle_variant(&default_bundle(), "missing", |m| m);
    std::fs::remove_file(dir.path().join("tail.onnx")).unwrap();
    let message = Bundle::open(dir.path()).unwrap_err().to_string();
    assert!(
        message.contains("tail.onnx") && message.contains("missing"),
        "{message}"
    );
}

#[test]
fn an_edited_manifest_no_longer_matches_its_id() {
    let dir = bundle_variant(&default_bundle(), "edited", |m| m);
    let manifest = dir.path().join("manifest.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("version = \"", "version = \"9")).unwrap();
    let error = Bundle::open(dir.path()).unwrap_err();
    assert!(matches!(error, EngineError::IdMismatch { .. }), "{error}");
}

#[test]
fn an_empty_folder_says_the_manifest_is_missing() {
    let dir = TempDir::new("empty");
    let message = Bundle::open(dir.path()).unwrap_err().to_string();
    assert!(
        message.contains("manifest.toml") && message.contains("missing"),
        "{message}"
    );
}

#[test]
fn a_wrong_bottleneck_shape_is_caught_when_the_model_loads() {
    let bundle = Bundle::open(default_bundle()).unwrap();
    let shape = bundle.manifest().bottleneck.shape.clone();
    let dir = bundle_variant(&default_bundle(), "shape", |m| {
        m.replace(
            &format!("shape = {shape:?}"),
            &format!("shape = {:?}", [shape[0], shape[1] + 1, shape[2]]),
        )
    });
    let variant = Bundle::open(dir.path()).unwrap();
    let error = variant.load(Role::Head, &Backend::Tract).unwrap_err();
    assert!(matches!(error, EngineError::WrongShape { .. }), "{error}");
    assert!(error.to_string().contains("head.onnx"), "{error}");

    // A channel count that disagrees with the coding tables is caught when the bundle opens.
    let dir = bundle_variant(&default_bundle(), "channels", |m| {
        m.replace(
            &format!("shape = {shape:?}"),
            &format!("shape = {:?}", [shape[0] + 1, shape[1], shape[2]]),
        )
    });
    let message = Bundle::open(dir.path()).unwrap_err().to_string();
    assert!(message.contains("coding tables"), "{message}");
    assert!(
        message.contains(&format!("{} channels", shape[0] + 1)),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_tail_with_different_bundles_refuse_each_other() {
    let other = bundle_variant(&default_bundle(), "other", |m| {
        m.replace("version = \"", "version = \"other-")
    });
    let tail = TailProcess::start(other.path());
    let ours = Arc::new(Bundle::open(default_bundle()).unwrap());
    let theirs = Bundle::open(other.path()).unwrap();
    assert_ne!(ours.id(), theirs.id());

    let error = Uplink::connect(&tail.url(), ours.id()).await.unwrap_err();
    assert!(matches!(error, HeadError::BundleMismatch { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&ours.id().to_string()),
        "names the head's id: {message}"
    );
    assert!(
        message.contains(&theirs.id().to_string()),
        "names the tail's id: {message}"
    );

    // A frame coded for another bundle is refused per frame too, even on a unary call.
    let encoder = HeadEncoder::new(ours.clone(), &Backend::Tract).unwrap();
    let frame = encoder
        .encode_path(&cleave_tests::sample_files()[0])
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(tail.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = cleave_proto::v1::split_client::SplitClient::new(channel);
    let result = client
        .infer(cleave_proto::v1::FeatureFrame {
            frame_id: 1,
            frame: frame.bytes,
            deadline_ms: 0,
            image: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    match result.outcome {
        Some(cleave_proto::v1::frame_result::Outcome::Error(e)) => {
            assert_eq!(
                e.kind,
                cleave_proto::v1::frame_error::Kind::BundleMismatch as i32
            );
            // A frame carries the first 8 bytes of its bundle's id.
            let tag = ours.id().tag().to_string();
            assert!(e.message.contains(&tag), "{}", e.message);
            assert!(
                e.message.contains(&theirs.id().to_string()),
                "{}",
                e.message
            );
        }
        other => panic!("expected a bundle-mismatch error, got {other:?}"),
    }
}

#[test]
fn a_model_loaded_once_runs_any_batch_size() {
    let bundle = Bundle::open(default_bundle()).unwrap();
    let head = bundle.load(Role::Head, &Backend::Tract).unwrap();
    let pre = cleave_engine::Preprocessor::new(&bundle.manifest().input);
    let files = cleave_tests::sample_files();
    let inputs: Vec<cleave_engine::Tensor> = files[..3]
        .iter()
        .map(|f| pre.from_path(f).unwrap())
        .collect();
    let batch = head
        .run(&cleave_engine::Tensor::stack(
            &inputs.iter().collect::<Vec<_>>(),
        ))
        .unwrap();
    assert_eq!(batch.batch(), 3);
    for (i, input) in inputs.iter().enumerate() {
        let single = head.run(&cleave_engine::Tensor::stack(&[input])).unwrap();
        let diff = single
            .data
            .iter()
            .zip(&batch.sample(i).data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-4,
            "sample {i} differs by {diff} between batch 1 and batch 3"
        );
    }
}

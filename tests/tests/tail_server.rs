//! The tail as an operator runs it: a repository of bundles, KServe v2 beside `cleave.v1`,
//! HTTP probes and Prometheus metrics, limits that keep one bad client from hurting the
//! others, and a SIGTERM that drains. Real models, real sockets.

// The helpers below are test code too: a failure should stop the test where it happens.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_engine::{Backend, Bundle, Role, top_k};
use cleave_head::HeadEncoder;
use cleave_proto::BUNDLE_ID_METADATA;
use cleave_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use cleave_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use cleave_proto::inference::{
    ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest,
    ServerReadyRequest,
};
use cleave_proto::v1::split_client::SplitClient;
use cleave_proto::v1::{FeatureFrame, FrameResult, NegotiateRequest, frame_error, frame_result};
use cleave_tail::{ServingTail, TailConfig, TailServer};
use cleave_tests::{TailProcess, bundle_variant, default_bundle, http_get, sample_files};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

const MODEL: &str = "efficientnet-lite0-split";

/// An in-process tail, stopped on drop.
struct Tail {
    grpc: SocketAddr,
    http: Option<SocketAddr>,
    _serving: ServingTail,
}

async fn start(config: TailConfig) -> Tail {
    let serving = TailServer::build(&config).await.unwrap().spawn();
    Tail {
        grpc: serving.local_addr(),
        http: serving.http_addr(),
        _serving: serving,
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn frames(bundle: &Path, count: usize) -> Vec<Vec<u8>> {
    let encoder =
        HeadEncoder::new(Arc::new(Bundle::open(bundle).unwrap()), &Backend::Tract).unwrap();
    sample_files()
        .iter()
        .cycle()
        .take(count)
        .map(|f| encoder.encode_path(f).unwrap().bytes)
        .collect()
}

fn top1(result: &FrameResult) -> u32 {
    match &result.outcome {
        Some(frame_result::Outcome::Classification(c)) => c.top[0].index,
        other => panic!("frame {} not classified: {other:?}", result.frame_id),
    }
}

/// Sends `frames` on one stream with the bundle's id and collects every result.
async fn stream_all(addr: SocketAddr, bundle_id: &str, frames: &[Vec<u8>]) -> Vec<FrameResult> {
    let mut client = SplitClient::new(channel(addr).await);
    let messages: Vec<FeatureFrame> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| FeatureFrame {
            frame_id: i as u64,
            frame: f.clone(),
            deadline_ms: 0,
            image: Vec::new(),
        })
        .collect();
    let mut request = tonic::Request::new(tokio_stream::iter(messages));
    request
        .metadata_mut()
        .insert(BUNDLE_ID_METADATA, bundle_id.parse().unwrap());
    let mut results = client.stream(request).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(result) = results.message().await.unwrap() {
        out.push(result);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tail_serves_several_bundles_and_names_them_when_asked_for_another() {
    let other = bundle_variant(&default_bundle(), "second", |m| {
        m.replace(&format!("name = \"{MODEL}\""), "name = \"second-split\"")
    });
    let mut config = TailConfig::new(default_bundle());
    config.bundles.push(other.path().to_path_buf());
    let tail = start(config).await;
    let ours = Bundle::open(default_bundle()).unwrap();
    let theirs = Bundle::open(other.path()).unwrap();

    // Each head's bundle id picks its own tail, on the same port.
    let frames_ours = frames(&default_bundle(), 3);
    let frames_theirs = frames(other.path(), 3);
    let a = stream_all(tail.grpc, &ours.id().to_string(), &frames_ours).await;
    let b = stream_all(tail.grpc, &theirs.id().to_string(), &frames_theirs).await;
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    // Same weights under two names: the same answers.
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(top1(x), top1(y));
    }

    // An unknown id: NOT_FOUND, listing what is served.
    let stranger = bundle_variant(&default_bundle(), "stranger", |m| {
        m.replace("version = \"", "version = \"stranger-")
    });
    let stranger_id = Bundle::open(stranger.path()).unwrap().id().to_string();
    let mut client = SplitClient::new(channel(tail.grpc).await);
    let status = client
        .negotiate(NegotiateRequest {
            bundle_id: stranger_id.clone(),
            client: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let message = status.message();
    for expected in [
        &stranger_id,
        &ours.id().to_string(),
        &theirs.id().to_string(),
    ] {
        assert!(message.contains(expected.as_str()), "{message}");
    }
    assert!(
        message.contains(MODEL) && message.contains("second-split"),
        "{message}"
    );
}

fn frame_request(model: &str, frame: &[u8]) -> ModelInferRequest {
    let mut raw = (frame.len() as u32).to_le_bytes().to_vec();
    raw.extend_from_slice(frame);
    ModelInferRequest {
        model_name: model.into(),
        id: "req-1".into(),
        inputs: vec![InferInputTensor {
            name: "frame".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        outputs: vec![InferRequestedOutputTensor {
            name: "logits".into(),
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

fn logits_of(response: &cleave_proto::inference::ModelInferResponse) -> Vec<f32> {
    response.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_serves_frames_tensors_and_the_full_model() {
    let mut config = TailConfig::new(default_bundle());
    config.model_defaults.full_model = true;
    let tail = start(config).await;
    let bundle = Arc::new(Bundle::open(default_bundle()).unwrap());
    let mut client = GrpcInferenceServiceClient::new(channel(tail.grpc).await)
        .max_decoding_message_size(64 << 20);

    assert!(
        client
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str| ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };
    assert!(
        client
            .model_ready(ready(MODEL))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("nope"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let inputs: Vec<(&str, &str, &[i64])> = metadata
        .inputs
        .iter()
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(
        inputs,
        [
            ("frame", "BYTES", &[-1][..]),
            ("bottleneck", "FP32", &[-1, 12, 28, 28][..])
        ]
    );
    assert_eq!(metadata.outputs[0].shape, [-1, 1000]);

    // A coded frame as BYTES: the same answer the split protocol gives.
    let frame = frames(&default_bundle(), 1).remove(0);
    let response = client
        .model_infer(frame_request(MODEL, &frame))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.id, "req-1");
    assert_eq!(response.model_version, "1");
    assert_eq!(response.outputs[0].shape, [1, 1000]);
    let via_kserve = logits_of(&response);
    let split = stream_all(
        tail.grpc,
        &bundle.id().to_string(),
        std::slice::from_ref(&frame),
    )
    .await;
    assert_eq!(top_k(&via_kserve, 1)[0].index as u32, top1(&split[0]));

    // The dequantized tensor as FP32, two samples: the head's own float output goes in.
    let encoder = HeadEncoder::new(bundle.clone(), &Backend::Tract).unwrap();
    let pre = encoder.preprocessor();
    let head = bundle.load(Role::Head, &Backend::Tract).unwrap();
    let full = bundle.load(Role::Full, &Backend::Tract).unwrap();
    let images: Vec<_> = sample_files()[..2]
        .iter()
        .map(|f| pre.from_path(f).unwrap())
        .collect();
    let image_batch = cleave_engine::Tensor::stack(&images.iter().collect::<Vec<_>>());
    let features = head.run(&image_batch).unwrap();
    let tensor_request = |model: &str, name: &str, t: &cleave_engine::Tensor| ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        }],
        raw_input_contents: vec![t.data.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    };
    let response = client
        .model_infer(tensor_request(MODEL, "bottleneck", &features))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outputs[0].shape, [2, 1000]);
    let direct = bundle
        .load(Role::Tail, &Backend::Tract)
        .unwrap()
        .run(&features)
        .unwrap();
    let served = logits_of(&response);
    let worst = served
        .iter()
        .zip(&direct.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-3,
        "served logits differ from the model's by {worst}"
    );

    // The full model, image tensors in.
    let response = client
        .model_infer(tensor_request(
            &format!("{MODEL}-full"),
            "image",
            &image_batch,
        ))
        .await
        .unwrap()
        .into_inner();
    let reference = full.run(&image_batch).unwrap();
    let served = logits_of(&response);
    for i in 0..2 {
        let row = |d: &[f32]| top_k(&d[i * 1000..(i + 1) * 1000], 1)[0].index;
        assert_eq!(row(&served), row(&reference.data));
    }

    // Triton's streaming RPC: answers in order, a failed request does not end the stream.
    let requests = vec![
        frame_request(MODEL, &frame),
        frame_request("nope", &frame),
        frame_request(MODEL, &frame),
    ];
    let mut answers = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(answer) = answers.message().await.unwrap() {
        kinds.push(match answer.infer_response {
            Some(response) => {
                assert_eq!(
                    top_k(&logits_of(&response), 1)[0].index as u32,
                    top1(&split[0])
                );
                "ok".to_string()
            }
            None => answer.error_message,
        });
    }
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert_eq!(kinds[0], "ok");
    assert!(
        kinds[1].contains("nope") && kinds[1].contains(MODEL),
        "{kinds:?}"
    );
    assert_eq!(kinds[2], "ok");

    // Errors a client can act on.
    let status = client
        .model_infer(frame_request("nope", &frame))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.message().contains(MODEL), "{}", status.message());
    let mut wrong = features.clone();
    wrong.shape = vec![2, 12, 28 * 28];
    let status = client
        .model_infer(tensor_request(MODEL, "bottleneck", &wrong))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = client
        .model_infer(frame_request(MODEL, b"not a frame at all"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("magic"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probes_and_prometheus_metrics_count_what_happened() {
    let mut config = TailConfig::new(default_bundle());
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let tail = start(config).await;
    let http = tail.http.unwrap();
    assert_eq!(http_get(http, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(http, "/readyz").await.unwrap().0, 200);

    let bundle = Bundle::open(default_bundle()).unwrap();
    let mut sent = frames(&default_bundle(), 4);
    sent.push(b"garbage".to_vec());
    let results = stream_all(tail.grpc, &bundle.id().to_string(), &sent).await;
    assert_eq!(results.len(), 5);

    let (status, text) = http_get(http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let model = format!("model=\"{MODEL}\"");
    // Every series of ours carries the model label (other tests in this process serve other
    // models, and every model registers all its series, at 0, when it loads).
    let value = |name: &str, labels: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(&model) && l.contains(labels))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}{{{model},{labels}}} in:\n{text}"))
    };
    // Other tests in this process serve the same model, so counts are at least ours.
    assert!(value("cleave_inference_request_success_total", &model) >= 4.0);
    assert!(
        value(
            "cleave_inference_request_failure_total",
            "reason=\"bad_input\""
        ) >= 1.0
    );
    assert!(value("cleave_inference_count_total", &model) >= 4.0);
    assert!(value("cleave_inference_exec_count_total", &model) >= 1.0);
    assert!(value("cleave_inference_batch_size_count", &model) >= 1.0);
    assert!(value("cleave_inference_queue_duration_seconds_bucket", &model) >= 0.0);
    assert!(value("cleave_inference_compute_duration_seconds_sum", &model) > 0.0);
    let sent_bytes: usize = sent.iter().map(Vec::len).sum();
    assert!(value("cleave_received_bytes_total", &model) >= sent_bytes as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_and_a_garbage_client_do_not_starve_a_good_one() {
    let mut config = TailConfig::new(default_bundle());
    config.stream_window = 4;
    config.model_defaults.batching.max_queue_size = 16;
    let tail = start(config).await;
    let bundle = Bundle::open(default_bundle()).unwrap();
    let id = bundle.id().to_string();
    let good_frames = frames(&default_bundle(), 6);

    // Garbage on the gRPC port: not HTTP/2 at all.
    let mut garbage = tokio::net::TcpStream::connect(tail.grpc).await.unwrap();
    garbage.write_all(&[0xAB; 4096]).await.unwrap();

    // A client that sends 200 frames and never reads an answer.
    let mut stalled = SplitClient::new(channel(tail.grpc).await);
    let flood: Vec<FeatureFrame> = (0..200)
        .map(|i| FeatureFrame {
            frame_id: i,
            frame: good_frames[0].clone(),
            deadline_ms: 0,
            image: Vec::new(),
        })
        .collect();
    let mut request = tonic::Request::new(tokio_stream::iter(flood));
    request
        .metadata_mut()
        .insert(BUNDLE_ID_METADATA, id.parse().unwrap());
    let _never_read = stalled.stream(request).await.unwrap();

    // A client that opens a stream and sends nothing.
    let mut idle = SplitClient::new(channel(tail.grpc).await);
    let mut request = tonic::Request::new(tokio_stream::pending::<FeatureFrame>());
    request
        .metadata_mut()
        .insert(BUNDLE_ID_METADATA, id.parse().unwrap());
    let _idle = idle.stream(request).await.unwrap();

    // The good client is answered in full: the stalled one holds only its window of the
    // queue, so nothing is refused for lack of room.
    let results = stream_all(tail.grpc, &id, &good_frames).await;
    assert_eq!(results.len(), good_frames.len());
    for result in &results {
        top1(result);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_late_frames_get_their_own_errors() {
    let mut config = TailConfig::new(default_bundle());
    config.max_frame_bytes = 64 * 1024;
    // A long queue delay: a lone frame waits, so a short deadline passes first.
    config.model_defaults.batching.max_queue_delay = Duration::from_millis(500);
    let tail = start(config).await;
    let bundle = Bundle::open(default_bundle()).unwrap();
    let frame = frames(&default_bundle(), 1).remove(0);
    let mut client = SplitClient::new(channel(tail.grpc).await);
    let infer = |frame: Vec<u8>, deadline_ms| FeatureFrame {
        frame_id: 7,
        frame,
        deadline_ms,
        image: Vec::new(),
    };

    let late = client
        .infer(infer(frame.clone(), 50))
        .await
        .unwrap()
        .into_inner();
    match late.outcome {
        Some(frame_result::Outcome::Error(e)) => {
            assert_eq!(
                e.kind,
                frame_error::Kind::DeadlineExceeded as i32,
                "{}",
                e.message
            );
        }
        other => panic!("expected a deadline error, got {other:?}"),
    }
    let on_time = client
        .infer(infer(frame.clone(), 5000))
        .await
        .unwrap()
        .into_inner();
    top1(&on_time);

    // Above the frame limit but within the message limit: the frame's own error.
    let mut big = frame.clone();
    big.resize(70 * 1024, 0);
    let mut request = tonic::Request::new(infer(big, 0));
    request
        .metadata_mut()
        .insert(BUNDLE_ID_METADATA, bundle.id().to_string().parse().unwrap());
    let result = client.infer(request).await.unwrap().into_inner();
    match result.outcome {
        Some(frame_result::Outcome::Error(e)) => {
            assert_eq!(e.kind, frame_error::Kind::Malformed as i32);
            assert!(e.message.contains("exceeds the limit"), "{}", e.message);
        }
        other => panic!("expected a size error, got {other:?}"),
    }
    // Above the message limit: the call is refused before the frame is read.
    let mut huge = frame;
    huge.resize(4 << 20, 0);
    let status = client.infer(infer(huge, 0)).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_unready_finishes_in_flight_frames_and_exits_in_time() {
    let bundle = Bundle::open(default_bundle()).unwrap();
    let mut tail = TailProcess::start_with(
        &default_bundle(),
        &[
            "--http-listen",
            "127.0.0.1:0",
            // Frames wait up to 400 ms for company, so some are in flight at SIGTERM.
            "--max-queue-delay-us",
            "400000",
            "--grace-seconds",
            "20",
        ],
    );
    let http = tail.http.expect("the tail prints its HTTP address");
    assert_eq!(http_get(http, "/readyz").await.unwrap().0, 200);

    let mut client = SplitClient::new(channel(tail.addr).await);
    let (tx, rx) = tokio::sync::mpsc::channel::<FeatureFrame>(16);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(BUNDLE_ID_METADATA, bundle.id().to_string().parse().unwrap());
    let mut results = client.stream(request).await.unwrap().into_inner();
    let sent = frames(&default_bundle(), 3);
    for (i, frame) in sent.iter().enumerate() {
        tx.send(FeatureFrame {
            frame_id: i as u64,
            frame: frame.clone(),
            deadline_ms: 0,
            image: Vec::new(),
        })
        .await
        .unwrap();
    }
    // A head that keeps a stream open and idle must not hold the shutdown up.
    let mut idle = SplitClient::new(channel(tail.addr).await);
    let mut request = tonic::Request::new(tokio_stream::pending::<FeatureFrame>());
    request
        .metadata_mut()
        .insert(BUNDLE_ID_METADATA, bundle.id().to_string().parse().unwrap());
    let mut idle_results = idle.stream(request).await.unwrap().into_inner();

    // Let the frames reach the queue, then ask the tail to stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = Instant::now();
    tail.signal_term();
    // Readiness drops at once, so a balancer stops sending work.
    let mut unready = false;
    for _ in 0..50 {
        match http_get(http, "/readyz").await.map(|(status, _)| status) {
            Some(503) | None => {
                unready = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(unready, "/readyz still 200 after SIGTERM");
    // The frames in flight are answered; then the stream ends UNAVAILABLE (the tail reads
    // no more frames), so a head knows to send any unanswered ones elsewhere.
    let mut answered = 0;
    let ended = loop {
        match results.message().await {
            Ok(Some(result)) => {
                top1(&result);
                answered += 1;
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert_eq!(answered, sent.len(), "every in-flight frame was answered");
    let ended = ended.expect("the stream ends with a status");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    let idle_end = idle_results.message().await.unwrap_err();
    assert_eq!(idle_end.code(), tonic::Code::Unavailable, "{idle_end:?}");
    drop(tx);
    let status = tail.wait();
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited well within the 20 s grace period, idle stream and all: {:?}",
        signalled.elapsed()
    );
    // And nothing listens any more.
    assert!(tokio::net::TcpStream::connect(tail.addr).await.is_err());
}

/// NVIDIA's own client against the server: `tests/kserve/client_check.py` run by the Python
/// in `CLEAVE_KSERVE_PYTHON` (a venv with `tests/kserve/requirements.txt`; CI makes one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_drives_the_kserve_service() {
    let Some(python) = std::env::var_os("CLEAVE_KSERVE_PYTHON") else {
        assert!(
            std::env::var_os("CLEAVE_REQUIRE_KSERVE").is_none(),
            "CLEAVE_REQUIRE_KSERVE is set but CLEAVE_KSERVE_PYTHON is not"
        );
        eprintln!(
            "skipped: set CLEAVE_KSERVE_PYTHON to a Python with tests/kserve/requirements.txt"
        );
        return;
    };
    let tail = start(TailConfig::new(default_bundle())).await;
    let bundle = Arc::new(Bundle::open(default_bundle()).unwrap());
    let dir = cleave_tests::TempDir::new("kserve");
    let frame = frames(&default_bundle(), 1).remove(0);
    let frame_path = dir.path().join("frame.bin");
    std::fs::write(&frame_path, &frame).unwrap();
    let split = stream_all(tail.grpc, &bundle.id().to_string(), &[frame]).await;
    // The head's float output, sent as FP32 by tritonclient.
    let image = HeadEncoder::new(bundle.clone(), &Backend::Tract)
        .unwrap()
        .preprocessor()
        .from_path(&sample_files()[1])
        .unwrap();
    let features = bundle
        .load(Role::Head, &Backend::Tract)
        .unwrap()
        .run(&cleave_engine::Tensor::stack(&[&image]))
        .unwrap();
    let logits = bundle
        .load(Role::Tail, &Backend::Tract)
        .unwrap()
        .run(&features)
        .unwrap();
    let expected_bottleneck_top1 = top_k(&logits.data, 1)[0].index;
    let bottleneck_path = dir.path().join("bottleneck.raw");
    let raw: Vec<u8> = features.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&bottleneck_path, raw).unwrap();

    let script = cleave_tests::repo_root().join("tests/kserve/client_check.py");
    let grpc = tail.grpc;
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args(["--url", &grpc.to_string(), "--model", MODEL])
            .arg("--frame")
            .arg(&frame_path)
            .arg("--bottleneck")
            .arg(&bottleneck_path)
            .args(["--bottleneck-shape", "1,12,28,28"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client_check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let top = |i: usize| report["infers"][i]["top1"][0].as_u64().unwrap() as usize;
    assert_eq!(
        top(0) as u32,
        top1(&split[0]),
        "tritonclient and cleave.v1 agree"
    );
    assert_eq!(
        top(1),
        expected_bottleneck_top1,
        "tritonclient's FP32 tensor path"
    );
}

/// The detection bundle CI makes (`make_bundle.py ppocr-det`), named by
/// `CLEAVE_DETECTION_BUNDLE`; `None` (with a message) when unset, unless required.
fn detection_bundle() -> Option<std::path::PathBuf> {
    match std::env::var_os("CLEAVE_DETECTION_BUNDLE") {
        Some(dir) => Some(dir.into()),
        None => {
            assert!(
                std::env::var_os("CLEAVE_REQUIRE_DETECTION").is_none(),
                "CLEAVE_REQUIRE_DETECTION is set but CLEAVE_DETECTION_BUNDLE is not"
            );
            eprintln!(
                "skipped: set CLEAVE_DETECTION_BUNDLE to a bundle made by \
                 `python models/tools/make_bundle.py ppocr-det --out DIR`"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detection_bundle_answers_with_boxes_that_match_the_full_model() {
    use cleave_engine::DbPostprocess;
    let Some(dir) = detection_bundle() else {
        return;
    };
    let bundle = Arc::new(Bundle::open(&dir).unwrap());
    let mut config = TailConfig::new(&dir);
    // A 480x480 map per sample: keep the warm-up short.
    config.model_defaults.batching.max_batch_size = 2;
    let tail = start(config).await;
    let image = cleave_tests::samples().join("detection/text-coffee.png");
    let encoder = HeadEncoder::new(bundle.clone(), &Backend::Tract).unwrap();
    let frame = encoder.encode_path(&image).unwrap().bytes;
    let results = stream_all(tail.grpc, &bundle.id().to_string(), &[frame]).await;
    let served = match &results[0].outcome {
        Some(frame_result::Outcome::Detections(d)) => d.boxes.clone(),
        other => panic!("expected boxes, got {other:?}"),
    };
    assert!(!served.is_empty(), "the sample has text: boxes expected");
    assert!(served.iter().all(|b| b.label == "text" && b.score > 0.0));
    assert!(
        served.windows(2).all(|w| w[0].score >= w[1].score),
        "best first"
    );

    // The full model on the same image, postprocessed by the same rules.
    let full = bundle.load(Role::Full, &Backend::Tract).unwrap();
    let input = encoder.preprocessor().from_path(&image).unwrap();
    let map = full.run(&cleave_engine::Tensor::stack(&[&input])).unwrap();
    let reference = DbPostprocess::for_bundle(&bundle)
        .unwrap()
        .detect_batch(&map)
        .unwrap()
        .remove(0);
    let iou = |a: &cleave_proto::v1::DetectedBox, b: &cleave_engine::Detection| {
        let w = (a.x1.min(b.x1) - a.x0.max(b.x0)).max(0.0);
        let h = (a.y1.min(b.y1) - a.y0.max(b.y0)).max(0.0);
        let inter = w * h;
        let union = (a.x1 - a.x0) * (a.y1 - a.y0) + b.area() - inter;
        inter / union
    };
    let matched = reference
        .iter()
        .filter(|r| served.iter().any(|s| iou(s, r) >= 0.5))
        .count();
    let precision = matched as f64 / served.len() as f64;
    let recall = matched as f64 / reference.len() as f64;
    let f1 = 2.0 * precision * recall / (precision + recall).max(1e-9);
    eprintln!(
        "detection through the tail: {} boxes, full model {}, F1 at IoU 0.5 = {f1:.3}",
        served.len(),
        reference.len()
    );
    assert!(f1 >= 0.8, "split boxes vs the full model's: F1 {f1:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gets_no_more_streams_than_the_limit() {
    let mut config = TailConfig::new(default_bundle());
    config.max_concurrent_streams = 1;
    let tail = start(config).await;
    let id = Bundle::open(default_bundle()).unwrap().id().to_string();
    let frame = frames(&default_bundle(), 1).remove(0);
    // Both clients share one connection (one channel).
    let shared = channel(tail.grpc).await;
    let (hold_tx, hold_rx) = tokio::sync::mpsc::channel::<FeatureFrame>(1);
    let mut first = SplitClient::new(shared.clone());
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(hold_rx));
    request
        .metadata_mut()
        .insert(BUNDLE_ID_METADATA, id.parse().unwrap());
    let first_results = first.stream(request).await.unwrap();

    let mut second = SplitClient::new(shared);
    let message = FeatureFrame {
        frame_id: 1,
        frame,
        deadline_ms: 0,
        image: Vec::new(),
    };
    let mut second_request = tonic::Request::new(tokio_stream::iter(vec![message]));
    second_request
        .metadata_mut()
        .insert(BUNDLE_ID_METADATA, id.parse().unwrap());
    let second_call = tokio::spawn(async move {
        let mut results = second.stream(second_request).await.unwrap().into_inner();
        results.message().await.unwrap()
    });
    // While the first stream is open, the second waits for a slot.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !second_call.is_finished(),
        "a second stream ran beside the first"
    );
    drop(hold_tx);
    drop(first_results);
    let answer = tokio::time::timeout(Duration::from_secs(30), second_call)
        .await
        .expect("the second stream ran once the first ended")
        .unwrap()
        .expect("an answer");
    top1(&answer);
}

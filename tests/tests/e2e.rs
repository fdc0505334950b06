//! End to end: the real `cleave-tail` binary on an ephemeral port, the real `cleave-head`
//! binary over the sample photographs, a byte-counting relay between them, and the full model
//! run locally as the reference.

use std::process::Command;
use std::sync::Arc;

use cleave_engine::{Backend, Bundle, Preprocessor, Role, Tensor, top_k};
use cleave_head::{HeadEncoder, Outcome, Uplink};
use cleave_tests::{CountingRelay, TailProcess, binary, default_bundle, json_lines, sample_files};

/// Top-1 classes of the full model on the samples, with their probabilities.
fn full_model_top1() -> Vec<(usize, f32)> {
    let bundle = Bundle::open(default_bundle()).expect("bundle opens");
    let model = bundle
        .load(Role::Full, &Backend::Tract)
        .expect("full model loads");
    let pre = Preprocessor::new(&bundle.manifest().input);
    sample_files()
        .iter()
        .map(|path| {
            let input = pre.from_path(path).expect("sample decodes");
            let logits = model
                .run(&Tensor::stack(&[&input]))
                .expect("full model runs");
            let best = top_k(&logits.data, 1).remove(0);
            (best.index, best.score)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_tail_binaries_agree_with_the_full_model_and_count_every_byte() {
    let tail = TailProcess::start(&default_bundle());
    let relay = CountingRelay::start(tail.addr).await.unwrap();
    let files = sample_files();
    assert!(
        files.len() >= 4,
        "expected the sample photographs in models/samples"
    );

    let head = binary("cleave-head");
    let bundle_arg = default_bundle().display().to_string();
    let server = format!("http://{}", relay.addr);
    let samples = cleave_tests::samples().display().to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(head)
            .args(["--bundle", &bundle_arg, "--server", &server, &samples])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "cleave-head failed: {stderr}");
    let reports = json_lines(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(reports.len(), files.len(), "one line per image");

    // Every frame classified, in input order, with sane timings.
    for (i, (report, file)) in reports.iter().zip(&files).enumerate() {
        assert_eq!(report["frame_id"], i as u64);
        assert_eq!(report["source"], file.display().to_string());
        let top5 = report["top5"]
            .as_array()
            .unwrap_or_else(|| panic!("no top5: {report}"));
        assert_eq!(top5.len(), 5);
        for key in ["head_ms", "uplink_ms", "tail_ms", "total_ms"] {
            assert!(report[key].as_f64().unwrap() >= 0.0, "{key} in {report}");
        }
        assert!(report["total_ms"].as_f64().unwrap() >= report["head_ms"].as_f64().unwrap());
        assert_eq!(
            report["coding"], "5-bit calibrated, ans",
            "the bundle's default"
        );
    }

    // The bytes the head counts are the bytes the tail received ...
    let mut wire_total = 0u64;
    for report in &reports {
        let sent = report["bytes_sent"].as_u64().unwrap();
        assert!(sent > 0);
        assert_eq!(
            report["tail_received_bytes"].as_u64().unwrap(),
            sent,
            "{report}"
        );
        let wire = report["wire_bytes"].as_u64().unwrap();
        assert!(
            wire > sent && wire <= sent + 32,
            "gRPC message {wire} for a {sent}-byte frame"
        );
        wire_total += wire;
    }
    // ... and the bytes that crossed the socket: the frames plus HTTP/2 and gRPC overhead
    // (connection preface, settings, headers, the negotiation call, 9-byte frame headers).
    let crossed = relay.bytes_up();
    let overhead = crossed.saturating_sub(wire_total);
    assert!(
        crossed >= wire_total,
        "{crossed} bytes crossed, head counted {wire_total}"
    );
    assert!(
        overhead < 2048 + 64 * reports.len() as u64,
        "{overhead} bytes of overhead for {} frames ({crossed} crossed, {wire_total} counted)",
        reports.len()
    );

    // Split results agree with the full model where the bundle's fidelity says they should:
    // on every image where the full model is confident (p >= 0.7), and overall at least as
    // often as the bundle's measured agreement allows on six images (with binomial slack).
    // The measured agreement is the calibrated level's the head sends by default.
    let bundle = Bundle::open(default_bundle()).unwrap();
    let q = &bundle.manifest().bottleneck.quantization;
    let stated = q
        .levels
        .iter()
        .find(|level| level.bits == q.bits)
        .expect("the bundle's default bit depth is calibrated")
        .top1_agreement;
    let reference = full_model_top1();
    let mut agree = 0;
    for (report, &(index, score)) in reports.iter().zip(&reference) {
        let split = report["top5"][0]["index"].as_u64().unwrap() as usize;
        agree += usize::from(split == index);
        if score >= 0.7 {
            assert_eq!(
                split, index,
                "confident full-model class lost by the split: {report}"
            );
        }
    }
    let rate = agree as f64 / reports.len() as f64;
    let floor = stated - 0.35;
    assert!(
        rate >= floor,
        "agreement {rate:.2} below the bundle's {stated:.2}"
    );

    let status = tail.stop();
    assert!(
        status.success(),
        "cleave-tail exits cleanly on SIGTERM: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_frame_on_a_live_stream_gets_its_own_error_and_the_stream_lives_on() {
    let tail = TailProcess::start(&default_bundle());
    let bundle = Arc::new(Bundle::open(default_bundle()).unwrap());
    let encoder = HeadEncoder::new(bundle.clone(), &Backend::Tract).unwrap();
    let files = sample_files();
    let good_a = encoder.encode_path(&files[0]).unwrap().bytes;
    let good_b = encoder.encode_path(&files[1]).unwrap().bytes;
    let mut flipped = good_a.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let mut uplink = Uplink::connect(&tail.url(), bundle.id()).await.unwrap();
    let (sender, mut results) = uplink.open_stream(8).await.unwrap();
    let frames: Vec<(u64, Vec<u8>)> = vec![
        (10, good_a),
        (11, flipped),
        (12, b"definitely not a frame".to_vec()),
        (13, Vec::new()),
        (14, good_b),
    ];
    for (id, bytes) in frames {
        sender.send(id, bytes).await.unwrap();
    }
    drop(sender);
    let mut answers = Vec::new();
    while let Some(result) = results.next().await.unwrap() {
        answers.push(result);
    }
    let ids: Vec<u64> = answers.iter().map(|a| a.frame_id).collect();
    assert_eq!(
        ids,
        vec![10, 11, 12, 13, 14],
        "one answer per frame, in order"
    );
    let failure = |i: usize| match &answers[i].outcome {
        Outcome::Failed { error } => (error.kind.clone(), error.message.clone()),
        other => panic!("frame {i} should have failed: {other:?}"),
    };
    assert!(matches!(answers[0].outcome, Outcome::Classified { .. }));
    for i in 1..4 {
        let (kind, message) = failure(i);
        assert_eq!(kind, "malformed", "{message}");
    }
    assert!(failure(1).1.contains("checksum"));
    assert!(failure(2).1.contains("magic"));
    assert!(
        matches!(answers[4].outcome, Outcome::Classified { .. }),
        "the stream carried on after bad frames"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_reports_serving_on_grpc_health() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let tail = TailProcess::start(&default_bundle());
    let channel = tonic::transport::Endpoint::from_shared(tail.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "cleave.v1.Split", "inference.GRPCInferenceService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_input_gets_its_own_failure_line_and_the_others_go_through() {
    let tail = TailProcess::start(&default_bundle());
    let files = sample_files();
    let not_an_image = cleave_tests::samples().join("README.md");
    let args: Vec<String> = vec![
        "--bundle".into(),
        default_bundle().display().to_string(),
        "--server".into(),
        tail.url(),
        files[0].display().to_string(),
        not_an_image.display().to_string(),
        files[1].display().to_string(),
    ];
    let head = binary("cleave-head");
    let output =
        tokio::task::spawn_blocking(move || Command::new(head).args(&args).output().unwrap())
            .await
            .unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit 1 when some frames failed"
    );
    let reports = json_lines(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(reports.len(), 3, "one line per input: {reports:?}");
    assert!(reports[0]["top5"].is_array());
    assert_eq!(reports[1]["error"]["kind"], "input", "{}", reports[1]);
    assert!(
        reports[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("README.md")
    );
    assert!(reports[2]["top5"].is_array());
}

/// Runs `cleave-head` with extra flags over two samples against `tail`; its JSON lines.
fn head_lines(tail: &TailProcess, flags: &[&str]) -> Vec<serde_json::Value> {
    let files = sample_files();
    let mut command = Command::new(binary("cleave-head"));
    command
        .arg("--bundle")
        .arg(default_bundle())
        .args(["--server", &format!("http://{}", tail.addr)])
        .args(flags)
        .args(&files[..2]);
    let output = command.output().expect("cleave-head runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "cleave-head {flags:?} failed: {stderr}"
    );
    let lines = json_lines(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(lines.len(), 2, "{flags:?}");
    for line in &lines {
        assert!(line["top5"].is_array(), "{flags:?}: {line}");
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_coding_the_head_offers_is_understood_by_the_tail() {
    let tail = TailProcess::start(&default_bundle());
    let lines = tokio::task::spawn_blocking(move || {
        let learned = head_lines(&tail, &["--learned-prior"]);
        let budget = head_lines(&tail, &["--byte-budget", "4200"]);
        let raw = head_lines(&tail, &["--bits", "3", "--codec", "raw"]);
        let zstd = head_lines(&tail, &["--codec", "zstd"]);
        (learned, budget, raw, zstd)
    })
    .await
    .unwrap();
    let (learned, budget, raw, zstd) = lines;
    for line in &learned {
        assert_eq!(line["coding"], "learned prior, ans");
    }
    for line in &budget {
        // Rate control: the highest depth that fits, and it fits.
        assert!(line["bytes_sent"].as_u64().unwrap() <= 4200, "{line}");
        let coding = line["coding"].as_str().unwrap();
        assert!(coding.ends_with("-bit calibrated, ans"), "{coding}");
        let bits: u64 = coding.split('-').next().unwrap().parse().unwrap();
        assert!((2..=4).contains(&bits), "{coding}");
    }
    for line in &raw {
        assert_eq!(line["coding"], "3-bit calibrated, raw");
        // 9 408 symbols of 3 bits, plus 27 bytes of header and checksum.
        assert_eq!(line["bytes_sent"], 9408 * 3 / 8 + 27);
    }
    for line in &zstd {
        assert_eq!(line["coding"], "5-bit calibrated, zstd");
    }
}

//! The dynamic batcher on the bundled tail model: batches form as configured, batched
//! outputs equal one-by-one outputs, a full queue refuses at once, late requests are
//! dropped before compute, and closing still runs what is queued.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cleave_engine::{Backend, Bundle, Model, Role, Tensor};
use cleave_tail::{BatchError, Batcher, BatchingConfig};

fn bundle() -> Bundle {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/efficientnet-lite0-split");
    Bundle::open(dir).expect("the bundled model opens")
}

fn tail(bundle: &Bundle) -> Model {
    bundle
        .load(Role::Tail, &Backend::Tract)
        .expect("its tail loads")
}

/// A bottleneck-shaped input whose values depend on `seed`, so outputs differ per request.
fn input(bundle: &Bundle, seed: usize) -> Tensor {
    let shape = bundle.input_shape(Role::Tail);
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| (((i * 31 + seed * 977) % 113) as f32 / 113.0 - 0.5) * 4.0)
        .collect();
    let mut batched = vec![1];
    batched.extend(shape);
    Tensor::new(batched, data)
}

fn config(max_batch_size: usize, delay: Duration, queue: usize) -> BatchingConfig {
    BatchingConfig {
        max_batch_size,
        max_queue_delay: delay,
        preferred_batch_sizes: Vec::new(),
        max_queue_size: queue,
        default_timeout: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_batches_and_get_their_own_rows() {
    let bundle = bundle();
    let reference = tail(&bundle);
    // A long delay: batches form only because they fill up (4 of the 8 requests each).
    let batcher = Batcher::start(
        "lite0",
        vec![tail(&bundle)],
        config(4, Duration::from_secs(5), 64),
    )
    .unwrap();
    let requests: Vec<_> = (0..8)
        .map(|seed| {
            let batcher = batcher.clone();
            let input = input(&bundle, seed);
            tokio::spawn(async move { batcher.infer(input, None).await })
        })
        .collect();
    for (seed, request) in requests.into_iter().enumerate() {
        let answer = request.await.unwrap().unwrap();
        assert_eq!(answer.batch_size, 4, "request {seed} ran in a full batch");
        let alone = reference.run(&input(&bundle, seed)).unwrap();
        assert_eq!(answer.output.shape, alone.shape);
        let worst = answer
            .output
            .data
            .iter()
            .zip(&alone.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "request {seed}: batched differs by {worst}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_sizes_run_without_waiting_out_the_delay() {
    let bundle = bundle();
    let mut settings = config(8, Duration::from_secs(30), 64);
    settings.preferred_batch_sizes = vec![2];
    let batcher = Batcher::start("lite0", vec![tail(&bundle)], settings).unwrap();
    let started = Instant::now();
    let a = batcher.infer(input(&bundle, 1), None);
    let b = batcher.infer(input(&bundle, 2), None);
    let (a, b) = tokio::join!(a, b);
    assert_eq!(a.unwrap().batch_size, 2);
    assert_eq!(b.unwrap().batch_size, 2);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a preferred batch ran before the 30 s delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_late_requests_expire_and_closing_runs_the_rest() {
    let bundle = bundle();
    // Nothing runs until the delay passes or the queue closes: the queue fills.
    let batcher = Batcher::start(
        "lite0",
        vec![tail(&bundle)],
        config(8, Duration::from_secs(60), 3),
    )
    .unwrap();
    let patient: Vec<_> = (0..2)
        .map(|seed| {
            let batcher = batcher.clone();
            let input = input(&bundle, seed);
            tokio::spawn(async move { batcher.infer(input, None).await })
        })
        .collect();
    let hurried = {
        let batcher = batcher.clone();
        let input = input(&bundle, 9);
        let deadline = Instant::now() + Duration::from_millis(100);
        let answer = tokio::spawn(async move {
            let result = batcher.infer(input, Some(deadline)).await;
            (result, Instant::now())
        });
        (answer, deadline)
    };
    while batcher.queued() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = batcher.infer(input(&bundle, 5), None).await.unwrap_err();
    assert!(
        matches!(refused, BatchError::QueueFull { capacity: 3, .. }),
        "{refused}"
    );

    let (hurried, deadline) = hurried;
    match hurried.await.unwrap() {
        (Err(BatchError::DeadlineExceeded { waited, .. }), answered) => {
            assert!(answered >= deadline, "answered before its deadline");
            assert!(
                waited > Duration::from_millis(50),
                "{waited:?} in the queue"
            );
        }
        other => panic!("expected the deadline to pass, got {other:?}"),
    }
    assert_eq!(batcher.queued(), 2, "the expired request left the queue");

    batcher.close();
    for request in patient {
        let answer = request.await.unwrap().unwrap();
        assert_eq!(
            answer.batch_size, 2,
            "closing ran what was queued, together"
        );
    }
    let after = batcher.infer(input(&bundle, 7), None).await.unwrap_err();
    assert!(matches!(after, BatchError::Stopped(_)), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_before_they_queue() {
    let bundle = bundle();
    let batcher =
        Batcher::start("lite0", vec![tail(&bundle)], config(2, Duration::ZERO, 8)).unwrap();
    let wrong = Tensor::new(vec![1, 3, 4], vec![0.0; 12]);
    let error = batcher.infer(wrong, None).await.unwrap_err();
    assert!(
        matches!(&error, BatchError::BadRequest(m) if m.contains("[N, 12, 28, 28]")),
        "{error}"
    );
    let one = input(&bundle, 0);
    let mut shape = one.shape.clone();
    shape[0] = 3;
    let three = Tensor::new(shape, one.data.repeat(3));
    let error = batcher.infer(three, None).await.unwrap_err();
    assert!(
        matches!(&error, BatchError::BadRequest(m) if m.contains("max batch size 2")),
        "{error}"
    );
}

//! `cleave-tail` behind a real load balancer: nginx, configured from
//! `deploy/nginx/cleave-tail.conf`, in front of two `cleave-tail` processes. Heads on their
//! own connections negotiate and stream through it and get the answers a tail gives
//! directly; both tails take a share of the streams; and when one tail drains (SIGTERM)
//! while heads stream, the frames it holds are answered, its streams end `UNAVAILABLE`, and
//! what the heads send again or start afterwards is answered by the other tail, none lost.
//!
//! nginx is `CLEAVE_NGINX`, else `nginx` on `PATH`, else `/usr/sbin/nginx` (Debian's `nginx`
//! package). Without it the tests say so and pass, unless `CLEAVE_REQUIRE_NGINX` is set (CI
//! sets it). nginx runs as a child process with everything it writes (pid file, logs,
//! temporary files) in a temporary folder, listens on 127.0.0.1 only and is killed on drop.

// The helpers below are test code too: a failure should stop the test where it happens.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_engine::{Backend, Bundle, BundleId, top_k};
use cleave_head::{FrameSender, HeadEncoder, HeadError, Outcome, ResultReceiver, Uplink};
use cleave_proto::BUNDLE_ID_METADATA;
use cleave_proto::inference::ModelInferRequest;
use cleave_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use cleave_proto::inference::model_infer_request::InferInputTensor;
use cleave_proto::v1::split_client::SplitClient;
use cleave_proto::v1::{FeatureFrame, frame_error, frame_result};
use cleave_tests::{TailProcess, TempDir, default_bundle, http_get, repo_root, sample_files};
use tokio::sync::{Barrier, watch};
use tonic::transport::Channel;

const MODEL: &str = "efficientnet-lite0-split";
/// The operator's template, relative to the repository root.
const TEMPLATE: &str = "deploy/nginx/cleave-tail.conf";
/// The tail's default `--max-frame-bytes`, which the template's body limits assume.
const MAX_FRAME_BYTES: usize = 4 << 20;
/// Frames of a head's stream in flight.
const WINDOW: usize = 8;
/// The bound on anything the test waits for: generous, only there so a hang fails.
const PATIENCE: Duration = Duration::from_secs(60);
/// A frame that is not one: the tail answers it with a per-frame error.
const GARBAGE: usize = usize::MAX;

// ---------------------------------------------------------------------------------------
// nginx

/// The nginx binary, or `None` (with a message) when there is none and none is required.
fn nginx_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CLEAVE_NGINX") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "CLEAVE_NGINX={} is not a file",
            path.display()
        );
        return Some(path);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("nginx"))
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|candidate| candidate.is_file());
    if on_path.is_none() {
        assert!(
            std::env::var_os("CLEAVE_REQUIRE_NGINX").is_none(),
            "CLEAVE_REQUIRE_NGINX is set but there is no nginx: install it \
             (`apt-get install nginx`) or name it in CLEAVE_NGINX"
        );
        eprintln!(
            "skipped: no nginx (install Debian's `nginx` package, or set CLEAVE_NGINX to the \
             binary)"
        );
    }
    on_path
}

/// The template with its upstream `server` lines replaced by `tails` (keeping their
/// parameters), its `listen` address by `listen`, and its log folder by `log_dir`.
///
/// # Panics
///
/// If the template no longer has the lines this edits, so a change there fails here first.
fn render(
    template: &str,
    tails: Option<&[SocketAddr]>,
    listen: Option<SocketAddr>,
    log_dir: &Path,
) -> String {
    let mut out = Vec::new();
    let (mut servers, mut listens) = (0, 0);
    for line in template.lines() {
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let words: Vec<&str> = code.split_whitespace().collect();
        // `server HOST:PORT params;` in the upstream (not `server {`, not a comment).
        let rest = || match words.get(2..) {
            Some(rest) if !rest.is_empty() => format!(" {}", rest.join(" ")),
            _ => ";".to_string(),
        };
        if words.first() == Some(&"server") && words.get(1).is_some_and(|w| w.contains(':')) {
            servers += 1;
            if let Some(tails) = tails {
                if servers == 1 {
                    for tail in tails {
                        out.push(format!("{indent}server {tail}{}", rest()));
                    }
                }
                continue;
            }
        } else if words.first() == Some(&"listen") {
            listens += 1;
            if let Some(listen) = listen {
                out.push(format!("{indent}listen {listen}{}", rest()));
                continue;
            }
        }
        out.push(line.to_string());
    }
    assert!(
        servers >= 2 && listens == 1,
        "{TEMPLATE}: expected upstream `server HOST:PORT ...;` lines and one `listen` line"
    );
    let text = out.join("\n") + "\n";
    assert_eq!(
        text.matches("/var/log/nginx/").count(),
        1,
        "{TEMPLATE}: expected one log path under /var/log/nginx/"
    );
    text.replace("/var/log/nginx/", &format!("{}/", log_dir.display()))
}

/// The main config around the rendered template: one process in the foreground, and every
/// path nginx writes inside `dir`.
fn main_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# Written by tests/tests/load_balancer.rs.\n\
         master_process off;\n\
         daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   include {d}/cleave-tail.conf;\n\
         }}\n"
    )
}

/// nginx running the template in front of some tails; killed on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    // Dropped after the process is gone (fields drop in order, after `Drop::drop`).
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx on a free port of 127.0.0.1 and waits until it accepts connections.
    fn start(binary: &Path, tails: &[SocketAddr]) -> Self {
        let template = std::fs::read_to_string(repo_root().join(TEMPLATE)).unwrap();
        let mut failure = String::new();
        // The free port is found by binding and letting go: someone may take it meanwhile.
        for _ in 0..3 {
            let dir = TempDir::new("nginx");
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap();
            let config = render(&template, Some(tails), Some(addr), dir.path());
            std::fs::write(dir.path().join("cleave-tail.conf"), config).unwrap();
            std::fs::write(dir.path().join("nginx.conf"), main_config(dir.path())).unwrap();
            let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
            let child = Command::new(binary)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
            let mut nginx = Self { child, addr, dir };
            match nginx.wait_until_listening() {
                Ok(()) => return nginx,
                Err(why) => failure = why,
            }
            if !failure.contains("Address already in use") {
                break;
            }
        }
        panic!("nginx did not start:\n{failure}");
    }

    fn wait_until_listening(&mut self) -> Result<(), String> {
        let started = Instant::now();
        while started.elapsed() < PATIENCE {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("nginx exited ({status}):\n{}", self.logs()));
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "nginx not listening on {}:\n{}",
            self.addr,
            self.logs()
        ))
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// What nginx wrote to stderr and its error log.
    fn logs(&self) -> String {
        format!("{}{}", self.read("stderr.log"), self.read("error.log"))
    }

    /// The access log: one line per finished call (the template's `cleave_grpc` format).
    fn access_log(&self) -> String {
        self.read("cleave-tail.access.log")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Tails, probes and metrics

/// Starts a tail whose lone frames wait half a second for company (so frames are still
/// queued when it is told to stop), and batches of 4 run at once.
fn start_tail() -> TailProcess {
    TailProcess::start_with(
        &default_bundle(),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--max-batch-size",
            "4",
            "--max-queue-delay-us",
            "500000",
            "--grace-seconds",
            "30",
        ],
    )
}

/// The value of a tail's metric `name` for the model (0 before it is first counted).
async fn metric(tail: &TailProcess, name: &str) -> f64 {
    let (status, text) = http_get(tail.http.unwrap(), "/metrics")
        .await
        .expect("the tail answers /metrics");
    assert_eq!(status, 200, "{text}");
    let model = format!("model=\"{MODEL}\"");
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&model))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Frames the tail answered with an output, all time.
async fn successes(tail: &TailProcess) -> usize {
    metric(tail, "cleave_inference_request_success_total").await as usize
}

/// Waits for `condition`, polling; panics with `what` after [`PATIENCE`].
async fn wait_for<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let started = Instant::now();
    while !condition().await {
        assert!(started.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Frames and heads

/// A coded frame of every sample photograph, and the top-1 class a tail gives each when
/// asked directly (no balancer in between).
struct Samples {
    frames: Vec<Vec<u8>>,
    expected: Vec<(u32, String)>,
}

impl Samples {
    async fn new(bundle: &Arc<Bundle>, direct: &TailProcess) -> Arc<Self> {
        let encoder = HeadEncoder::new(bundle.clone(), &Backend::Tract).unwrap();
        let frames: Vec<Vec<u8>> = sample_files()
            .iter()
            .map(|f| encoder.encode_path(f).unwrap().bytes)
            .collect();
        let mut uplink = Uplink::connect(&direct.url(), bundle.id()).await.unwrap();
        let (sender, mut results) = uplink.open_stream(frames.len()).await.unwrap();
        for (i, frame) in frames.iter().enumerate() {
            sender.send(i as u64, frame.clone()).await.unwrap();
        }
        drop(sender);
        let mut expected = Vec::new();
        while let Some(result) = results.next().await.unwrap() {
            match result.outcome {
                Outcome::Classified { top5 } => {
                    expected.push((top5[0].index, top5[0].label.clone()));
                }
                other => panic!(
                    "sample {} not classified directly: {other:?}",
                    result.frame_id
                ),
            }
        }
        assert_eq!(expected.len(), frames.len());
        Arc::new(Self { frames, expected })
    }

    fn bytes(&self, sample: usize) -> Vec<u8> {
        if sample == GARBAGE {
            b"not a feature frame".to_vec()
        } else {
            self.frames[sample].clone()
        }
    }
}

/// One answer a head got.
struct Answer {
    frame_id: u64,
    sample: usize,
    /// Which of the head's streams it came on (0: the first).
    stream: usize,
    outcome: Outcome,
}

/// A head on its own connection to the balancer, streaming as a head must behind one: when
/// a stream ends with an error (its tail drains: `UNAVAILABLE`), the frames it left without
/// an answer were not run, so they go again on a new stream, which the balancer sends to a
/// tail that takes it. New streams wait for `gate` to open.
struct Head {
    name: String,
    samples: Arc<Samples>,
    uplink: Uplink,
    sender: Option<FrameSender>,
    results: ResultReceiver,
    /// Sent on the current stream, not answered yet, oldest first: (frame id, sample).
    unanswered: VecDeque<(u64, usize)>,
    next_id: u64,
    streams: usize,
    answers: Vec<Answer>,
    /// Why each stream that broke did.
    breaks: Vec<String>,
    gate: watch::Receiver<bool>,
}

impl Head {
    /// Connects (negotiating the bundle) and opens a stream.
    async fn connect(
        name: String,
        url: &str,
        bundle: BundleId,
        samples: Arc<Samples>,
        gate: watch::Receiver<bool>,
    ) -> Self {
        let mut uplink = Uplink::connect(url, bundle)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (sender, results) = uplink
            .open_stream(WINDOW)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        Self {
            name,
            samples,
            uplink,
            sender: Some(sender),
            results,
            unanswered: VecDeque::new(),
            next_id: 0,
            streams: 1,
            answers: Vec::new(),
            breaks: Vec::new(),
            gate,
        }
    }

    /// Sends the frame of `sample` (or garbage) on the current stream. If the stream has
    /// closed the frame stays unanswered and goes again on the next one.
    async fn send(&mut self, sample: usize) {
        let id = self.next_id;
        self.next_id += 1;
        self.unanswered.push_back((id, sample));
        if let Some(sender) = &self.sender {
            let _ = sender.send(id, self.samples.bytes(sample)).await;
        }
    }

    /// The next answer: `Ok(true)` got one, `Ok(false)` the stream ended, `Err` it broke.
    async fn next(&mut self) -> Result<bool, String> {
        let next = tokio::time::timeout(PATIENCE, self.results.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no answer within {PATIENCE:?}", self.name));
        match next {
            Ok(Some(result)) => {
                let (id, sample) = self
                    .unanswered
                    .pop_front()
                    .unwrap_or_else(|| panic!("{}: an answer to no frame", self.name));
                assert_eq!(result.frame_id, id, "{}: answers in frame order", self.name);
                self.answers.push(Answer {
                    frame_id: id,
                    sample,
                    stream: self.streams - 1,
                    outcome: result.outcome,
                });
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(HeadError::Uplink { reason, .. }) => Err(reason),
            Err(other) => Err(other.to_string()),
        }
    }

    /// After a break: waits for the gate, opens a new stream and sends the unanswered
    /// frames again, in order.
    async fn reopen(&mut self, reason: String) {
        self.breaks.push(reason);
        assert!(
            self.breaks.len() <= 5,
            "{}: streams keep breaking: {:?}",
            self.name,
            self.breaks
        );
        self.gate.wait_for(|open| *open).await.unwrap();
        let (sender, results) = self
            .uplink
            .open_stream(WINDOW)
            .await
            .unwrap_or_else(|e| panic!("{}: reopening: {e}", self.name));
        self.streams += 1;
        self.results = results;
        for (id, sample) in self.unanswered.clone() {
            sender
                .send(id, self.samples.bytes(sample))
                .await
                .unwrap_or_else(|e| panic!("{}: resending: {e}", self.name));
        }
        self.sender = Some(sender);
    }

    /// Reads until `count` answers in all, reopening broken streams.
    async fn answered(&mut self, count: usize) {
        while self.answers.len() < count {
            match self.next().await {
                Ok(true) => {}
                Ok(false) => panic!("{}: stream ended with frames unanswered", self.name),
                Err(reason) => self.reopen(reason).await,
            }
        }
    }

    /// Closes the stream and reads every answer still due, reopening broken streams.
    async fn finish(&mut self) {
        loop {
            self.sender = None;
            match self.next().await {
                Ok(true) => {}
                Ok(false) if self.unanswered.is_empty() => return,
                Ok(false) => panic!("{}: stream ended with frames unanswered", self.name),
                Err(reason) => self.reopen(reason).await,
            }
        }
    }

    /// Every frame sent got exactly one answer, in order, and each is what a tail says
    /// directly: the same top-1 class, or a per-frame error for garbage.
    fn check(&self) {
        let ids: Vec<u64> = self.answers.iter().map(|a| a.frame_id).collect();
        let sent: Vec<u64> = (0..self.next_id).collect();
        assert_eq!(ids, sent, "{}: one answer per frame, none lost", self.name);
        for answer in &self.answers {
            match (&answer.outcome, answer.sample) {
                (Outcome::Failed { error }, GARBAGE) => {
                    assert_eq!(error.kind, "malformed", "{}: {}", self.name, error.message);
                }
                (Outcome::Classified { top5 }, sample) if sample != GARBAGE => {
                    let (index, label) = &self.samples.expected[sample];
                    assert_eq!(
                        (top5[0].index, &top5[0].label),
                        (*index, label),
                        "{}: frame {} (sample {sample}) through nginx vs directly",
                        self.name,
                        answer.frame_id
                    );
                }
                (other, sample) => panic!(
                    "{}: frame {} (sample {sample}): unexpected {other:?}",
                    self.name, answer.frame_id
                ),
            }
        }
    }

    /// Frames answered with an output, from answer number `from` on, on streams that
    /// `on` picks.
    fn outputs_since(&self, from: usize, on: impl Fn(usize) -> bool) -> usize {
        self.answers[from.min(self.answers.len())..]
            .iter()
            .filter(|a| on(a.stream) && matches!(a.outcome, Outcome::Classified { .. }))
            .count()
    }
}

/// An open gate: heads reopen streams at once.
fn open_gate() -> watch::Receiver<bool> {
    watch::channel(true).1
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn the_template_is_a_valid_nginx_config() {
    let Some(nginx) = nginx_binary() else {
        return;
    };
    let dir = TempDir::new("nginx-t");
    let template = std::fs::read_to_string(repo_root().join(TEMPLATE)).unwrap();
    // As shipped, but for the log folder (nginx -t opens the logs).
    std::fs::write(
        dir.path().join("cleave-tail.conf"),
        render(&template, None, None, dir.path()),
    )
    .unwrap();
    std::fs::write(dir.path().join("nginx.conf"), main_config(dir.path())).unwrap();
    let output = Command::new(&nginx)
        .arg("-t")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "nginx -t rejects {TEMPLATE}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_through_nginx_are_answered_spread_over_tails_and_survive_a_drain() {
    let Some(nginx_bin) = nginx_binary() else {
        return;
    };
    let started = Instant::now();
    let bundle = Arc::new(Bundle::open(default_bundle()).unwrap());
    let id = bundle.id();
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(start_tail),
        tokio::task::spawn_blocking(start_tail)
    );
    let tails = [a.unwrap(), b.unwrap()];
    let samples = Samples::new(&bundle, &tails[0]).await;
    let n = samples.frames.len();
    let nginx = Nginx::start(&nginx_bin, &[tails[0].addr, tails[1].addr]);
    let url = nginx.url();
    eprintln!(
        "tails on {} and {}, nginx on {} ({:.1} s)",
        tails[0].addr,
        tails[1].addr,
        nginx.addr,
        started.elapsed().as_secs_f64()
    );

    // --- Unary calls through nginx: health, errors with their metadata, KServe, limits.
    {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let serving = HealthClient::new(channel(&url).await)
            .check(HealthCheckRequest {
                service: "cleave.v1.Split".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(serving, ServingStatus::Serving as i32);

        // A head with a bundle nobody serves: the tail's NOT_FOUND, names and all.
        let stranger: BundleId = "ab".repeat(32).parse().unwrap();
        match Uplink::connect(&url, stranger).await {
            Err(HeadError::BundleMismatch { head, tail, .. }) => {
                assert_eq!(head, stranger.to_string());
                assert!(tail.contains(&id.to_string()), "{tail}");
            }
            other => panic!("expected a bundle mismatch, got {other:?}"),
        }

        // KServe v2: a frame as BYTES, the same class as the split protocol gives.
        let mut raw = (samples.frames[0].len() as u32).to_le_bytes().to_vec();
        raw.extend_from_slice(&samples.frames[0]);
        let response = GrpcInferenceServiceClient::new(channel(&url).await)
            .model_infer(ModelInferRequest {
                model_name: MODEL.into(),
                inputs: vec![InferInputTensor {
                    name: "frame".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    ..Default::default()
                }],
                raw_input_contents: vec![raw],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let logits: Vec<f32> = response.raw_output_contents[0]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(top_k(&logits, 1)[0].index as u32, samples.expected[0].0);

        // Limits: nginx's body limit sits above the tail's message limit, so the tail's own
        // answers come back — a per-frame error for a frame over --max-frame-bytes, a
        // status for a message over the limit.
        let mut split = SplitClient::new(channel(&url).await).max_encoding_message_size(64 << 20);
        let infer = |size: usize| {
            let mut frame = samples.frames[0].clone();
            frame.resize(size, 0);
            let mut request = tonic::Request::new(FeatureFrame {
                frame_id: 9,
                frame,
                deadline_ms: 0,
                image: Vec::new(),
            });
            request
                .metadata_mut()
                .insert(BUNDLE_ID_METADATA, id.to_string().parse().unwrap());
            request
        };
        let result = split
            .infer(infer(MAX_FRAME_BYTES + 16 * 1024))
            .await
            .unwrap()
            .into_inner();
        match result.outcome {
            Some(frame_result::Outcome::Error(e)) => {
                assert_eq!(e.kind, frame_error::Kind::Malformed as i32, "{}", e.message);
                assert!(e.message.contains("exceeds the limit"), "{}", e.message);
            }
            other => panic!("expected a size error, got {other:?}"),
        }
        let status = split
            .infer(infer(MAX_FRAME_BYTES + 96 * 1024))
            .await
            .unwrap_err();
        assert!(
            matches!(
                status.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "the tail's status through nginx: {status:?}"
        );
    }

    // --- (a), (b): heads on their own connections stream at once; every frame is answered
    // as a tail answers it directly, and both tails take a share.
    let before = [successes(&tails[0]).await, successes(&tails[1]).await];
    const HEADS: usize = 4;
    const FRAMES: usize = 8;
    let barrier = Arc::new(Barrier::new(HEADS));
    let mut tasks = Vec::new();
    for h in 0..HEADS {
        let (url, samples, barrier) = (url.clone(), samples.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut head = Head::connect(format!("head {h}"), &url, id, samples, open_gate()).await;
            // Each stream is open and has an answer before any head sends the rest, so the
            // balancer sees them all at once.
            head.send(h % n).await;
            head.answered(1).await;
            barrier.wait().await;
            for i in 1..FRAMES {
                // One head sends garbage in the middle: its own error, the stream lives on.
                let sample = if h == 0 && i == 3 {
                    GARBAGE
                } else {
                    (h + i) % n
                };
                head.send(sample).await;
            }
            head.finish().await;
            head
        }));
    }
    let mut heads = Vec::new();
    for task in tasks {
        heads.push(task.await.unwrap());
    }
    for head in &heads {
        head.check();
        assert_eq!(head.answers.len(), FRAMES);
        assert!(head.breaks.is_empty(), "{}: {:?}", head.name, head.breaks);
    }
    let after = [successes(&tails[0]).await, successes(&tails[1]).await];
    let served = [after[0] - before[0], after[1] - before[1]];
    eprintln!(
        "{HEADS} heads, {FRAMES} frames each: tail 0 answered {}, tail 1 answered {}",
        served[0], served[1]
    );
    assert_eq!(
        served[0] + served[1],
        HEADS * FRAMES - 1,
        "every good frame answered by one tail or the other"
    );
    assert!(
        served[0] > 0 && served[1] > 0,
        "both tails take a share: {served:?}"
    );
    drop(heads);

    // --- (c) Drain. Four heads open streams one by one; the tail of each is read off the
    // tails' counters.
    let (gate_open, gate) = watch::channel(false);
    let mut old = Vec::new();
    let mut on = Vec::new();
    for h in 0..4 {
        let counts = [successes(&tails[0]).await, successes(&tails[1]).await];
        let mut head = Head::connect(
            format!("old head {h}"),
            &url,
            id,
            samples.clone(),
            gate.clone(),
        )
        .await;
        for i in 0..4 {
            head.send((h + i) % n).await;
        }
        head.answered(4).await;
        let grew = [
            successes(&tails[0]).await - counts[0],
            successes(&tails[1]).await - counts[1],
        ];
        let tail = match grew {
            [4, 0] => 0,
            [0, 4] => 1,
            other => panic!("old head {h}: answers by tail {other:?}"),
        };
        on.push(tail);
        old.push(head);
    }
    let x = on[0];
    let y = 1 - x;
    assert!(
        on.contains(&y),
        "least_conn spreads open streams over both tails: {on:?}"
    );
    eprintln!("old heads' streams on tails {on:?}; draining tail {x}");

    let [t0, t1] = tails;
    let (mut x_tail, y_tail) = if x == 0 { (t0, t1) } else { (t1, t0) };
    let y_before = successes(&y_tail).await;
    let mark: Vec<usize> = old.iter().map(|h| h.answers.len()).collect();
    // Traffic continues: the first head on the draining tail sends three frames, which wait
    // in its queue for company (a batch is 4); the heads on the other tail send too.
    for _ in 0..3 {
        old[0].send(1).await;
    }
    for (h, head) in old.iter_mut().enumerate() {
        if on[h] == y {
            head.send(2).await;
            head.send(3).await;
        }
    }
    let draining = &x_tail;
    wait_for(
        "three frames queued on the draining tail",
        move || async move { metric(draining, "cleave_inference_pending_requests").await >= 3.0 },
    )
    .await;

    // SIGTERM while they wait.
    x_tail.signal_term();
    // The heads keep sending on the streams they have (the draining tail may still read
    // these, if they beat the signal).
    for head in &mut old {
        for i in 0..2 {
            head.send(i % n).await;
        }
    }
    // The draining tail turns unready and stops listening; new streams are opened from then
    // on (heads would back off and retry; the gate makes that wait exact).
    let x_http = x_tail.http.unwrap();
    wait_for("the draining tail to turn unready", move || async move {
        !matches!(http_get(x_http, "/readyz").await, Some((200, _)))
    })
    .await;
    let x_grpc = x_tail.addr;
    wait_for("the draining tail to stop listening", move || async move {
        tokio::net::TcpStream::connect(x_grpc).await.is_err()
    })
    .await;
    // And after it stopped listening: its streams take no more frames, so the heads there
    // have these answered only by sending them again.
    for head in &mut old {
        for i in 2..4 {
            head.send(i % n).await;
        }
    }
    gate_open.send(true).unwrap();

    // New heads, while the old ones finish and resend.
    let mut tasks = Vec::new();
    for h in 0..3 {
        let (url, samples) = (url.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            let mut head =
                Head::connect(format!("new head {h}"), &url, id, samples, open_gate()).await;
            for i in 0..4 {
                head.send((h + i) % n).await;
            }
            head.finish().await;
            head
        }));
    }
    let mut old_tasks = Vec::new();
    for mut head in old {
        old_tasks.push(tokio::spawn(async move {
            head.finish().await;
            head
        }));
    }
    let mut new = Vec::new();
    for task in tasks {
        new.push(task.await.unwrap());
    }
    let mut old = Vec::new();
    for task in old_tasks {
        old.push(task.await.unwrap());
    }

    // The draining tail exits, cleanly, once its streams are done.
    let status = tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || x_tail.wait()))
        .await
        .expect("the draining tail exits")
        .unwrap();
    assert!(status.success(), "draining tail: {status:?}");

    // And heads that come after it is gone: nginx leaves it out (it refused before) and
    // sends them to the other.
    let mut late = Vec::new();
    for h in 0..2 {
        let mut head = Head::connect(
            format!("late head {h}"),
            &url,
            id,
            samples.clone(),
            open_gate(),
        )
        .await;
        for i in 0..4 {
            head.send((h + i) % n).await;
        }
        head.finish().await;
        late.push(head);
    }

    for head in old.iter().chain(&new).chain(&late) {
        head.check();
    }
    for (h, head) in old.iter().enumerate() {
        if on[h] == x {
            // Its stream ended with the tail's own UNAVAILABLE, through nginx's trailers.
            assert!(
                !head.breaks.is_empty() && head.breaks.iter().all(|r| r.contains("shutting down")),
                "{}: {:?}",
                head.name,
                head.breaks
            );
        } else {
            assert!(head.breaks.is_empty(), "{}: {:?}", head.name, head.breaks);
        }
    }
    for head in new.iter().chain(&late) {
        assert!(head.breaks.is_empty(), "{}: {:?}", head.name, head.breaks);
    }
    // The frames queued on the draining tail at SIGTERM were answered there.
    let in_flight = old[0].outputs_since(mark[0], |s| s == 0);
    assert!(
        in_flight >= 3,
        "the draining tail answered its queued frames: {in_flight}"
    );
    // Everything else since: the other tail, exactly.
    let expected_y: usize = old
        .iter()
        .enumerate()
        .map(|(h, head)| {
            if on[h] == y {
                head.outputs_since(mark[h], |_| true)
            } else {
                head.outputs_since(mark[h], |s| s > 0)
            }
        })
        .chain(
            new.iter()
                .chain(&late)
                .map(|head| head.outputs_since(0, |_| true)),
        )
        .sum();
    let y_served = successes(&y_tail).await - y_before;
    eprintln!(
        "after SIGTERM: the draining tail answered {} frames on its open streams, the other \
         {y_served}; {} frames resent",
        old.iter()
            .enumerate()
            .filter(|(h, _)| on[*h] == x)
            .map(|(h, head)| head.outputs_since(mark[h], |s| s == 0))
            .sum::<usize>(),
        old.iter()
            .filter(|head| head.streams > 1)
            .map(|head| head.outputs_since(0, |s| s > 0))
            .sum::<usize>()
    );
    assert_eq!(
        y_served, expected_y,
        "after SIGTERM, every frame not answered by the draining tail was answered by the other"
    );

    // nginx itself failed no call: on every line of its access log the last tail it tried
    // answered (a refused connection shows as "502, 200": the next tail took the call).
    let access = nginx.access_log();
    let field = |line: &str, name: &str| {
        line.split(&format!(" {name}="))
            .nth(1)
            .map(|rest| {
                rest.split(" request-time=")
                    .next()
                    .unwrap_or(rest)
                    .to_string()
            })
            .unwrap_or_default()
    };
    let failed: Vec<&str> = access
        .lines()
        .filter(|l| !field(l, "upstream-status").ends_with("200"))
        .collect();
    eprintln!(
        "nginx: {} calls, {} moved on from a refusing tail; its error log:\n{}",
        access.lines().count(),
        access
            .lines()
            .filter(|l| field(l, "upstream-status").contains(", "))
            .count(),
        nginx.logs()
    );
    assert!(failed.is_empty(), "calls nginx failed itself: {failed:#?}");

    // With no tail left, nginx answers in gRPC, as the template tells it to: UNAVAILABLE,
    // which a head retries, not an HTML page it could only call INTERNAL.
    drop(y_tail);
    match Uplink::connect(&url, id).await {
        Err(HeadError::Uplink { reason, .. }) => assert!(
            reason.contains("unavailable")
                && reason.contains("no cleave-tail replica could take the call"),
            "{reason}"
        ),
        other => panic!("expected UNAVAILABLE from nginx, got {other:?}"),
    }
    eprintln!("test took {:.1} s", started.elapsed().as_secs_f64());
}

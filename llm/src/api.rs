//! The OpenAI-compatible HTTP API of `cleave-llm master`.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/chat/completions` | messages, rendered with the model's chat template |
//! | `POST /v1/completions` | a prompt (text, or token ids) completed as it is |
//! | `GET /v1/models` | the one model served |
//! | `GET /health` | 200 with the engine's state; 503 while the decoder is broken |
//!
//! Both generation routes answer whole or, with `"stream": true`, as Server-Sent Events in
//! OpenAI's chunk format ending with `data: [DONE]`. The handlers parse and check the
//! request and tokenize it here, on the async workers (cheap); generation runs on the
//! [`Engine`]'s own thread, one sequence at a time, with a bounded queue before it.
//!
//! Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`): a bad
//! request is 400, a body over the limit 413, a full queue 503 with `Retry-After`, a
//! decoder (cluster) failure 502 — the next request re-forms the cluster. A stream that
//! fails after it began ends with an `error` event instead of `[DONE]`. A client that
//! disconnects stops its generation at the next token.

mod engine;
mod openai;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

pub use engine::{Engine, EngineOptions, Health};
use engine::{Event, Job, Refused, unix_time};
pub use openai::ApiError;
use openai::{Answer, Endpoint, Generation, Prompt, json_body};

use crate::chat::text_prompt_ids;
use crate::engine::Limits;

/// How the HTTP side behaves.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
        }
    }
}

/// The routes, over `engine`.
pub fn router(engine: Arc<Engine>, options: &ApiOptions) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .with_state(engine)
}

/// Serves the API on `listener` until `shutdown` completes.
///
/// # Errors
///
/// The I/O error that stopped the server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    options: &ApiOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(engine, options))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such route: this server has POST /v1/chat/completions, POST /v1/completions, \
         GET /v1/models and GET /health",
    )
}

fn model_object(engine: &Engine) -> Value {
    json!({
        "id": engine.name(),
        "object": "model",
        "created": engine.started(),
        "owned_by": "cleave-llm",
    })
}

async fn models(State(engine): State<Arc<Engine>>) -> Response {
    json_body(&json!({"object": "list", "data": [model_object(&engine)]}))
}

async fn model(
    State(engine): State<Arc<Engine>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == engine.name() {
        json_body(&model_object(&engine))
    } else {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model {id:?} is not served here; {:?} is",
                engine.name()
            ),
        )
        .code("model_not_found")
        .into_response()
    }
}

async fn health(State(engine): State<Arc<Engine>>) -> Response {
    let h = engine.health();
    let body = json!({
        "status": if h.broken.is_some() { "broken" } else { "ok" },
        "error": h.broken,
        "model": engine.name(),
        "context": engine.capacity(),
        "running": h.running,
        "waiting": h.waiting,
        "queue": h.queue,
        "served": h.served,
    });
    let status = if h.broken.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, json_body(&body)).into_response()
}

/// The body, or the error that says why it could not be read (too large, most likely).
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let error = ApiError::new(status, "invalid_request_error", rejection.body_text());
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            error.code("request_too_large")
        } else {
            error
        }
    })
}

async fn chat_completions(
    State(engine): State<Arc<Engine>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    let (messages, generation) = openai::chat_request(&bytes)?;
    let template = engine.template().ok_or_else(|| {
        ApiError::invalid(
            "the model has no chat template: use /v1/completions",
            Some("messages"),
        )
    })?;
    let prompt = template
        .prompt_ids(engine.tokenizer(), &messages)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    run(&engine, Endpoint::Chat, prompt, generation).await
}

async fn completions(
    State(engine): State<Arc<Engine>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    let (prompt, generation) = openai::completion_request(&bytes)?;
    let prompt = match prompt {
        Prompt::Text(text) => text_prompt_ids(engine.tokenizer(), &text),
        Prompt::Ids(ids) => {
            let vocab = engine.tokenizer().vocab_size();
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(ApiError::invalid(
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                    Some("prompt"),
                ));
            }
            ids
        }
    };
    run(&engine, Endpoint::Completion, prompt, generation).await
}

/// A request id, unique in this process.
fn next_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    format!("{prefix}-{:x}{n:04x}", unix_time())
}

/// Checks the prompt's length, queues the request and answers it.
async fn run(
    engine: &Engine,
    endpoint: Endpoint,
    prompt: Vec<u32>,
    generation: Generation,
) -> Result<Response, ApiError> {
    let capacity = engine.capacity();
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    if prompt.len() >= capacity {
        return Err(ApiError::invalid(
            format!(
                "the prompt has {} tokens; this server takes at most {capacity} per sequence, \
                 prompt and answer together",
                prompt.len()
            ),
            Some(match endpoint {
                Endpoint::Chat => "messages",
                Endpoint::Completion => "prompt",
            }),
        )
        .code("context_length_exceeded"));
    }
    let room = capacity - prompt.len();
    let answer = Answer {
        endpoint,
        id: next_id(endpoint),
        created: unix_time(),
        model: engine.name().to_string(),
    };
    let job = Job {
        label: answer.id.clone(),
        prompt,
        limits: Limits {
            max_tokens: generation.max_tokens.unwrap_or(room).min(room),
            stop: generation.stop.clone(),
        },
        sampling: generation.sampling,
    };
    let mut events = engine.submit(job).map_err(|refused| match refused {
        Refused::Full => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "the server is busy: {} requests are already waiting; retry in a moment",
                engine.health().queue
            ),
        )
        .code("queue_full")
        .retry_after(1),
        Refused::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine has stopped",
        ),
    })?;
    // Wait for the first event before answering, so that a failure at the start (the
    // cluster could not be re-formed) is a 502 even for a stream.
    let first = events.recv().await;
    if !generation.stream {
        let mut next = first;
        loop {
            match next {
                Some(Event::Text(_)) => next = events.recv().await,
                Some(Event::Done(outcome)) => return Ok(json_body(&answer.full(&outcome))),
                Some(Event::Failed(why)) => return Err(decoder_failed(why)),
                None => return Err(decoder_failed("the engine stopped".into())),
            }
        }
    }
    match first {
        Some(Event::Failed(why)) => Err(decoder_failed(why)),
        None => Err(decoder_failed("the engine stopped".into())),
        Some(first) => {
            Ok(Sse::new(stream(answer, first, events, generation.include_usage)).into_response())
        }
    }
}

fn decoder_failed(why: String) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        format!("generation failed: {why}"),
    )
    .code("decoder_failed")
}

/// The state of a stream: the events still to send, and the engine's receiver.
struct Streaming {
    answer: Answer,
    events: UnboundedReceiver<Event>,
    ready: std::collections::VecDeque<SseEvent>,
    ended: bool,
    include_usage: bool,
}

impl Streaming {
    fn add(&mut self, event: Option<Event>) {
        let data = |value: &Value| SseEvent::default().data(value.to_string());
        match event {
            Some(Event::Text(text)) => self.ready.push_back(data(&self.answer.delta(&text))),
            Some(Event::Done(outcome)) => {
                for chunk in self.answer.closing(&outcome, self.include_usage) {
                    self.ready.push_back(data(&chunk));
                }
                self.ready.push_back(SseEvent::default().data("[DONE]"));
                self.ended = true;
            }
            Some(Event::Failed(why)) => {
                self.ready.push_back(data(&decoder_failed(why).body()));
                self.ended = true;
            }
            None => {
                self.ready
                    .push_back(data(&decoder_failed("the engine stopped".into()).body()));
                self.ended = true;
            }
        }
    }
}

/// The Server-Sent Events of a streamed answer. Dropping the stream (the client went
/// away) drops the receiver, which stops the generation.
fn stream(
    answer: Answer,
    first: Event,
    events: UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let mut state = Streaming {
        ready: answer
            .opening()
            .map(|chunk| SseEvent::default().data(chunk.to_string()))
            .into_iter()
            .collect(),
        answer,
        events,
        ended: false,
        include_usage,
    };
    state.add(Some(first));
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.ready.pop_front() {
                return Some((Ok(event), state));
            }
            if state.ended {
                return None;
            }
            let next = state.events.recv().await;
            state.add(next);
        }
    })
}

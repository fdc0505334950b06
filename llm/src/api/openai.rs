//! OpenAI's wire shapes: the request bodies of `/v1/chat/completions` and
//! `/v1/completions` and what is checked in them, the answers and stream chunks, and the
//! error object `{"error": {"message", "type", "param", "code"}}`.
//!
//! Fields this server does not know are ignored, as OpenAI's own server ignores what a
//! newer client sends; fields it knows but cannot honour (`n` > 1, `logprobs`, tools) are
//! refused with a 400 that names them rather than silently dropped.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::chat::Message;
use crate::engine::{Finish, Outcome};
use crate::sampling::SamplingParams;

/// Most stop texts a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// An error as OpenAI's clients expect it.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after_s: Option<u64>,
}

impl ApiError {
    /// A 400 about `param` (when one field is at fault).
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after_s: None,
        }
    }

    /// Another status and type.
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// With OpenAI's `code`.
    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// With a `Retry-After` header.
    pub(crate) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The body, `{"error": {...}}`.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, json_body(&self.body())).into_response();
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A JSON body with its content type.
pub(crate) fn json_body(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// `stop`: one text or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The options both endpoints share.
#[derive(Debug, Default, Deserialize)]
struct Options {
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Not OpenAI's, but common among compatible servers (vLLM, llama.cpp).
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Value>,
    tools: Option<Value>,
}

/// What a request asks of the generation, checked.
#[derive(Debug, Clone)]
pub(crate) struct Generation {
    /// `max_tokens` or `max_completion_tokens`; `None`: as many as the sequence holds.
    pub(crate) max_tokens: Option<usize>,
    pub(crate) sampling: SamplingParams,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
}

impl Options {
    fn check(self) -> Result<Generation, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                format!("n = {n}: this server generates one choice per request (n = 1)"),
                Some("n"),
            ));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
        {
            return Err(ApiError::invalid(
                "logprobs are not supported by this server",
                Some("logprobs"),
            ));
        }
        if self
            .tools
            .as_ref()
            .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid(
                "tools are not supported by this server",
                Some("tools"),
            ));
        }
        let (max, param) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        };
        let max_tokens = match max {
            None => None,
            Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            Some(m) => {
                return Err(ApiError::invalid(
                    format!("{param} = {m}: it must be at least 1"),
                    Some(param),
                ));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("temperature = {temperature}: it must be between 0 and 2"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("top_p = {top_p}: it must be above 0 and at most 1"),
                Some("top_p"),
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("top_k = {k}: it must be 0 (no limit) or more"),
                    Some("top_k"),
                ));
            }
        };
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                format!(
                    "{} stop texts: at most {MAX_STOPS} are accepted",
                    stop.len()
                ),
                Some("stop"),
            ));
        }
        Ok(Generation {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
                // Negative seeds are as good as any: their bits are the seed.
                seed: self.seed.map(|s| s as u64),
            },
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.unwrap_or_default().include_usage,
        })
    }
}

/// A message's `content`: text, or parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    options: Options,
}

/// `POST /v1/completions`'s `prompt`: a text, or token ids, alone or as a batch of one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    Batch(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: PromptField,
    echo: Option<bool>,
    suffix: Option<String>,
    #[serde(flatten)]
    options: Options,
}

/// A completion's prompt, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!("the request body is not a valid request: {e}"),
            None,
        )
    })
}

/// A chat request: its messages (roles checked) and options.
pub(crate) fn chat_request(body: &[u8]) -> Result<(Vec<Message>, Generation), ApiError> {
    let body: ChatBody = parse(body)?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages is empty: give at least one message",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "messages[{i}].role = {other:?}: this server takes system, developer, \
                         user and assistant messages"
                    ),
                    Some(&format!("messages[{i}].role")),
                ));
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!(
                                    "messages[{i}].content[{j}] is of type {kind:?}: this \
                                     server reads text parts only"
                                ),
                                Some(&format!("messages[{i}].content")),
                            ));
                        }
                    }
                }
                text
            }
        };
        messages.push(Message::new(role, content));
    }
    Ok((messages, body.options.check()?))
}

/// A completion request: its prompt and options.
pub(crate) fn completion_request(body: &[u8]) -> Result<(Prompt, Generation), ApiError> {
    let body: CompletionBody = parse(body)?;
    if body.echo == Some(true) {
        return Err(ApiError::invalid(
            "echo is not supported by this server",
            Some("echo"),
        ));
    }
    if body.suffix.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix is not supported by this server",
            Some("suffix"),
        ));
    }
    let batch = |n: usize| {
        ApiError::invalid(
            format!("a batch of {n} prompts: this server completes one prompt per request"),
            Some("prompt"),
        )
    };
    let prompt = match body.prompt {
        PromptField::Text(t) => Prompt::Text(t),
        PromptField::Ids(ids) => Prompt::Ids(ids),
        PromptField::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
        PromptField::Batch(mut v) if v.len() == 1 => Prompt::Ids(v.remove(0)),
        PromptField::Texts(v) => return Err(batch(v.len())),
        PromptField::Batch(v) => return Err(batch(v.len())),
    };
    Ok((prompt, body.options.check()?))
}

/// Which endpoint answers: the shapes of its answers and chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completion,
}

/// What every answer and chunk of one request carries.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) endpoint: Endpoint,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
}

fn usage(outcome: &Outcome) -> Value {
    json!({
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.tokens.len(),
        "total_tokens": outcome.prompt_tokens + outcome.tokens.len(),
    })
}

/// OpenAI's `finish_reason` (a cancelled generation is never answered).
fn finish_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "stop",
        Finish::Length | Finish::Cancelled => "length",
    }
}

impl Answer {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// The whole answer (no stream).
    pub(crate) fn full(&self, outcome: &Outcome) -> Value {
        let finish = finish_reason(outcome.finish);
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": outcome.text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": outcome.text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        let mut answer = self.envelope(false, json!([choice]));
        answer["usage"] = usage(outcome);
        answer
    }

    /// The chunk that opens a chat stream (the role), if the endpoint has one.
    pub(crate) fn opening(&self) -> Option<Value> {
        (self.endpoint == Endpoint::Chat).then(|| {
            self.envelope(
                true,
                json!([{
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                }]),
            )
        })
    }

    /// A chunk of text.
    pub(crate) fn delta(&self, text: &str) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "delta": {"content": text},
                "logprobs": null,
                "finish_reason": null,
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": null,
            }),
        };
        self.envelope(true, json!([choice]))
    }

    /// The chunk that ends a stream (the finish reason), and the usage chunk when asked.
    pub(crate) fn closing(&self, outcome: &Outcome, include_usage: bool) -> Vec<Value> {
        let finish = finish_reason(outcome.finish);
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "delta": {},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": "",
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        let mut chunks = vec![self.envelope(true, json!([choice]))];
        if include_usage {
            let mut last = self.envelope(true, json!([]));
            last["usage"] = usage(outcome);
            chunks.push(last);
        }
        chunks
    }
}

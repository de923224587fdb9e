//! Handlers for `/v1/chat/completions`, `/v1/completions` and `/v1/models`.
//!
//! A handler turns the request into a [`Plan`] (validated parameters after the output
//! policy), queues a scheduler job and spawns a *driver* task that owns the request's
//! life: it collects tokens, streams them (SSE) or assembles the response, records the
//! usage event — committed before the response's last byte or `[DONE]` goes out — and,
//! if the client goes away, cancels the sequences and records a partial event.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use isotope_engine::{ChatMessage, FinishReason, Model};
use isotope_sampling::{Sampled, Sampler, SamplingParams, TokenId};
use isotope_store::UsageEvent;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::auth::{now_ms, Caller};
use crate::error::ApiError;
use crate::logprobs;
use crate::openai::{self, Content, Prompt, Usage};
use crate::policy::ReasoningPolicy;
use crate::policy::{self, Applied, Shape};
use crate::reasoning::{self, ReasoningFilter, Segment};
use crate::scheduler::{Job, JobEvent, SubmitError};
use crate::{AppState, Engine};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// Client facts recorded on the usage event.
struct Client {
    addr: Option<String>,
    user_agent: Option<String>,
}

fn client(caller: &Caller, headers: &HeaderMap) -> Client {
    Client {
        addr: caller.client_addr.clone(),
        user_agent: headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// Everything the driver needs, validated.
struct Plan {
    endpoint: Endpoint,
    id: String,
    created: i64,
    model_name: String,
    /// One prompt, or several (batched `/v1/completions`): choice `i` answers prompt
    /// `i / n`, as OpenAI numbers them.
    prompts: Vec<Vec<TokenId>>,
    /// Logged prompt (messages as JSON for chat, the text for completions, a JSON
    /// array of texts for batched prompts).
    prompt_log: String,
    turns: u32,
    params: SamplingParams,
    max_tokens: u32,
    requested_max_tokens: Option<u32>,
    stop: Vec<String>,
    applied: Applied,
    stream: bool,
    include_usage: bool,
    /// Completions `echo`, one per prompt: the prompt text to prepend, and its scored
    /// tokens when log-probs were asked for (first token has none).
    echo: Option<Vec<Echo>>,
    user: Option<String>,
    temperature: Option<f32>,
}

struct Echo {
    text: String,
    tokens: Vec<TokenId>,
    scores: Option<Vec<isotope_engine::TokenScore>>,
}

fn body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(format!("Could not read the request body: {e}"))
        }
    })
}

fn engine(app: &AppState) -> Result<&Arc<Engine>, ApiError> {
    app.engine
        .get()
        .ok_or_else(|| ApiError::unavailable("The model is still loading; retry shortly."))
}

fn check_model(app: &AppState, model: &str) -> Result<(), ApiError> {
    if model == app.model_name {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

fn request_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let a = RandomState::new().hash_one(now_ms());
    let b = RandomState::new().hash_one(std::thread::current().id());
    format!("{prefix}-{a:016x}{b:08x}")
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw, app.cfg.max_body_bytes)?;
    let mut req: openai::ChatRequest = openai::parse_body(&raw)?;
    let knobs = req.knobs();
    let engine = engine(&app)?;
    check_model(&app, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must contain at least one message.",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!(
                        "Unsupported role `{other}`; use system, developer, user or assistant."
                    ),
                ))
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid_param(
                                &format!("messages[{i}].content"),
                                "Only text content parts are supported by this model.",
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage::new(role, content));
    }
    let turns = messages.iter().filter(|m| m.role == "user").count() as u32;
    let prompt = engine
        .model
        .chat_tokens(&messages)
        .map_err(|e| ApiError::invalid_param("messages", format!("{e}")))?;
    let prompt_log = serde_json::to_string(
        &messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    let logprobs = req.logprobs.unwrap_or(false);
    if req.top_logprobs.is_some_and(|k| k > 0) && !logprobs {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "`top_logprobs` requires `logprobs` to be true.",
        ));
    }
    let top = req.top_logprobs.unwrap_or(0);
    let plan = plan(
        &app,
        engine,
        &caller,
        Endpoint::Chat,
        vec![prompt],
        prompt_log,
        turns,
        req.max_completion_tokens.or(req.max_tokens),
        logprobs,
        top,
        "top_logprobs",
        knobs,
        None,
    )?;
    let client = client(&caller, &headers);
    run(app.clone(), engine.clone(), caller, client, plan).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw, app.cfg.max_body_bytes)?;
    let mut req: openai::CompletionRequest = openai::parse_body(&raw)?;
    let knobs = req.knobs();
    let engine = engine(&app)?;
    check_model(&app, &req.model)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported by this model.",
        ));
    }
    if req.best_of.is_some_and(|b| b != knobs.n.unwrap_or(1)) {
        return Err(ApiError::invalid_param(
            "best_of",
            "`best_of` different from `n` is not supported.",
        ));
    }
    let model = &engine.model;
    let batch: Vec<(Vec<TokenId>, String)> = match req.prompt {
        Prompt::Text(t) => vec![(model.tokenize(&t, true, false), t)],
        Prompt::Texts(v) => v
            .into_iter()
            .map(|t| (model.tokenize(&t, true, false), t))
            .collect(),
        Prompt::Tokens(ids) => vec![(ids.clone(), model.detokenize(&ids))],
        Prompt::TokenLists(v) => v
            .into_iter()
            .map(|ids| {
                let text = model.detokenize(&ids);
                (ids, text)
            })
            .collect(),
    };
    if batch.is_empty() {
        return Err(ApiError::invalid_param("prompt", "`prompt` is empty."));
    }
    let max_prompts = app.cfg.max_prompts as usize;
    if batch.len() > max_prompts {
        return Err(ApiError::invalid_param(
            "prompt",
            format!(
                "At most {max_prompts} prompts per request; got {}.",
                batch.len()
            ),
        ));
    }
    // A policy's cap on `n` caps the choices of a request, batched prompts included
    // (else a capped key would batch its way around it).
    if let Some(cap) = caller.policy.n {
        let n = knobs.n.unwrap_or(1) as usize;
        if batch.len() > 1 && batch.len() * n > cap.max(1) as usize {
            return Err(ApiError::invalid_param(
                "prompt",
                format!(
                    "At most {} completions per request for this API key.",
                    cap.max(1)
                ),
            ));
        }
    }
    for (i, (ids, _)) in batch.iter().enumerate() {
        let param = if batch.len() == 1 {
            "prompt".to_string()
        } else {
            format!("prompt[{i}]")
        };
        if ids.is_empty() {
            return Err(ApiError::invalid_param(&param, "`prompt` is empty."));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= model.n_vocab()) {
            return Err(ApiError::invalid_param(
                &param,
                format!(
                    "Token id {bad} is outside the vocabulary (size {}).",
                    model.n_vocab()
                ),
            ));
        }
    }
    let k = req.logprobs;
    let echo = req.echo.unwrap_or(false);
    let mut echo_data = None;
    if echo {
        if k.is_some() {
            if !app.cfg.allow_echo_logprobs {
                return Err(ApiError::invalid_param(
                    "echo",
                    "`echo` together with `logprobs` is disabled on this server.",
                ));
            }
            if caller.policy.refuse_echo {
                return Err(ApiError::invalid_param(
                    "echo",
                    "`echo` together with `logprobs` is not available for this API key.",
                ));
            }
        }
        let mut echoes = Vec::with_capacity(batch.len());
        for (ids, text) in &batch {
            let scores = match k {
                Some(top) => Some(echo_scores(&app, engine, &caller, ids, top as usize).await?),
                None => None,
            };
            echoes.push(Echo {
                text: text.clone(),
                tokens: ids.clone(),
                scores,
            });
        }
        echo_data = Some(echoes);
    }
    let prompt_log = if batch.len() == 1 {
        batch[0].1.clone()
    } else {
        serde_json::to_string(&batch.iter().map(|(_, t)| t).collect::<Vec<_>>()).unwrap_or_default()
    };
    let prompts: Vec<Vec<TokenId>> = batch.into_iter().map(|(ids, _)| ids).collect();
    // Completions default to 16 tokens, as OpenAI's do.
    let max_tokens = Some(req.max_tokens.unwrap_or(16));
    let plan = plan(
        &app,
        engine,
        &caller,
        Endpoint::Completions,
        prompts,
        prompt_log,
        1,
        max_tokens,
        k.is_some(),
        k.unwrap_or(0),
        "logprobs",
        knobs,
        echo_data,
    )?;
    let client = client(&caller, &headers);
    run(app.clone(), engine.clone(), caller, client, plan).await
}

/// The teacher's log-probs of an echoed prompt (`top` alternatives per token), with
/// the caller's log-prob treatment applied as to generated tokens.
async fn echo_scores(
    app: &AppState,
    engine: &Engine,
    caller: &Caller,
    ids: &[TokenId],
    top: usize,
) -> Result<Vec<isotope_engine::TokenScore>, ApiError> {
    let m = Arc::clone(&engine.model);
    let owned = ids.to_vec();
    let threads = app.cfg.threads;
    let scores = tokio::task::spawn_blocking(move || m.score(&owned, top, threads))
        .await
        .map_err(|e| ApiError::internal("scoring the prompt", e))?
        .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?;
    let how = logprobs::Obscure {
        decimals: caller.policy.logprob_decimals,
        noise: caller.policy.logprob_noise,
    };
    if how.is_identity() {
        return Ok(scores);
    }
    let mut noise = logprobs::Noise::fresh();
    Ok(scores
        .into_iter()
        .map(|sc| {
            let as_sampled = Sampled {
                token: sc.token,
                logprob: sc.logprob,
                top_logprobs: sc.top,
            };
            let o = logprobs::obscure(&as_sampled, top, how, &mut noise);
            isotope_engine::TokenScore {
                token: o.token,
                logprob: o.logprob,
                top: o.top_logprobs,
            }
        })
        .collect())
}

/// `GET /v1/models`.
pub async fn models(State(app): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.model_name,
            "object": "model",
            "created": app.started_at / 1000,
            "owned_by": "isotope",
        }]
    }))
}

#[allow(clippy::too_many_arguments)]
fn plan(
    app: &AppState,
    engine: &Engine,
    caller: &Caller,
    endpoint: Endpoint,
    prompts: Vec<Vec<TokenId>>,
    prompt_log: String,
    turns: u32,
    max_tokens: Option<u32>,
    logprobs: bool,
    top_logprobs: u32,
    top_param: &str,
    knobs: openai::Knobs,
    echo: Option<Vec<Echo>>,
) -> Result<Plan, ApiError> {
    let cfg = &app.cfg;
    let ctx = engine.scheduler.ctx_per_slot();
    // Every prompt must fit with the completion: the longest decides.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest >= ctx {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {ctx} tokens, but the prompt has {} \
             tokens. Shorten the prompt.",
            longest
        )));
    }
    if top_logprobs > cfg.max_top_logprobs {
        return Err(ApiError::invalid_param(
            top_param,
            format!(
                "`{top_param}` must be between 0 and {}; got {top_logprobs}.",
                cfg.max_top_logprobs
            ),
        ));
    }
    let n = knobs.n.unwrap_or(1);
    if n == 0 || n > cfg.max_n {
        return Err(ApiError::invalid_param(
            "n",
            format!("`n` must be between 1 and {}; got {n}.", cfg.max_n),
        ));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "`max_tokens` must be at least 1.",
        ));
    }
    let room = (ctx - longest) as u32;
    let requested = Shape {
        max_tokens: max_tokens.unwrap_or(room),
        n,
        logprobs,
        top_logprobs,
    };
    let applied = policy::apply(caller.level, &caller.policy, requested);
    if applied.granted.max_tokens > room {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {} \
             tokens ({} in the messages, {} in the completion). Reduce the length of the \
             messages or the completion.",
            longest as u32 + applied.granted.max_tokens,
            longest,
            applied.granted.max_tokens
        )));
    }
    let stop = knobs.stop.map(openai::Stop::into_vec).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::invalid_param(
            "stop",
            "At most 4 stop sequences are allowed.",
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "Stop sequences must not be empty.",
        ));
    }
    let seed = knobs.seed.map(|s| s as u64).unwrap_or_else(|| {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(now_ms())
    });
    let params = SamplingParams {
        temperature: knobs.temperature.unwrap_or(1.0),
        top_p: knobs.top_p.unwrap_or(1.0),
        top_k: knobs.top_k.unwrap_or(0),
        min_p: knobs.min_p.unwrap_or(0.0),
        repetition_penalty: knobs.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: knobs.frequency_penalty.unwrap_or(0.0),
        presence_penalty: knobs.presence_penalty.unwrap_or(0.0),
        seed,
        ..SamplingParams::default()
    };
    if params.temperature > 2.0 {
        return Err(ApiError::invalid_param(
            "temperature",
            "`temperature` must be between 0 and 2.",
        ));
    }
    params
        .validate()
        .map_err(|e| ApiError::invalid_param(e.param, e.to_string()))?;
    let (id_prefix, include_usage) = (
        match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        },
        knobs
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    );
    Ok(Plan {
        endpoint,
        id: request_id(id_prefix),
        created: now_ms() / 1000,
        model_name: app.model_name.clone(),
        prompts,
        prompt_log,
        turns,
        params,
        max_tokens: applied.granted.max_tokens,
        requested_max_tokens: max_tokens,
        stop,
        stream: knobs.stream.unwrap_or(false),
        include_usage,
        applied,
        echo,
        user: knobs.user,
        temperature: knobs.temperature,
    })
}

/// One choice as it accumulates.
#[derive(Default)]
struct ChoiceState {
    /// The text returned (after the reasoning policy).
    text: String,
    /// Tokens whose log-probs are returned (all, unless the reasoning policy hid some).
    tokens: Vec<Sampled>,
    /// Tokens generated (usage counts these, hidden reasoning included).
    generated: usize,
    finish: Option<FinishReason>,
    error: Option<String>,
    /// Characters of text before each returned token (completions `text_offset`).
    offsets: Vec<usize>,
    chars: usize,
    /// The reasoning-trace filter, unless the policy returns reasoning whole.
    filter: Option<ReasoningFilter>,
}

impl ChoiceState {
    fn done(&self) -> bool {
        self.finish.is_some() || self.error.is_some()
    }
}

/// Where the driver sends output.
enum Sink {
    Stream(mpsc::Sender<Result<SseEvent, Infallible>>),
    Whole(oneshot::Sender<Result<Value, ApiError>>),
}

async fn run(
    app: AppState,
    engine: Arc<Engine>,
    caller: Caller,
    client: Client,
    plan: Plan,
) -> Result<Response, ApiError> {
    let n = plan.applied.granted.n as usize;
    let total = n * plan.prompts.len();
    let greedy = plan.params.is_greedy();
    let mut scheme_applied = None;
    // Antidistillation before the watermark: the stage reshapes the teacher's
    // distribution, the watermark then biases whatever is left (so detection is
    // unchanged), and the returned log-probs describe the distribution actually
    // sampled from.
    let lambda = plan.applied.treatment.antidistill_lambda;
    let mut sampler_for = |choice: usize| {
        let mut sampler = Sampler::new(plan.params.clone(), choice as u64);
        if let (Some(lambda), Some(defence)) = (lambda, &engine.defence) {
            sampler = sampler.with_adjust(Box::new(defence.stage_with_lambda(lambda)));
        }
        if !app.cfg.watermark {
            return sampler;
        }
        let hook = app.watermark.hook(&engine.excluded, greedy);
        scheme_applied.get_or_insert_with(|| hook.scheme().to_string());
        sampler.with_hook(Box::new(hook))
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let granted = &plan.applied.granted;
    // One job per prompt, choices numbered prompt-major on one channel. If the queue
    // fills half-way, dropping the receiver (the `?` below) cancels what was queued.
    for (p, prompt) in plan.prompts.iter().enumerate() {
        let job = Job {
            prompt: prompt.clone(),
            samplers: (p * n..(p + 1) * n).map(&mut sampler_for).collect(),
            first_choice: p * n,
            max_tokens: plan.max_tokens as usize,
            stop: plan.stop.clone(),
            top_logprobs: if granted.logprobs {
                granted.top_logprobs as usize
            } else {
                0
            },
            events: events_tx.clone(),
        };
        engine.scheduler.submit(job).map_err(|e| match e {
            SubmitError::Overloaded => ApiError::unavailable(
                "The server is overloaded (the request queue is full); retry with backoff.",
            ),
            SubmitError::Stopped => ApiError::unavailable("The engine has stopped."),
        })?;
    }
    drop(events_tx);
    // A template (or a completions prompt) that opens a reasoning section means the
    // answer starts inside it.
    let reasoning = plan.applied.treatment.reasoning != ReasoningPolicy::Whole;
    let opens_section: Vec<bool> = plan
        .prompts
        .iter()
        .map(|prompt| {
            reasoning && {
                let tail = &prompt[prompt.len().saturating_sub(8)..];
                ReasoningFilter::prompt_opens_section(&engine.model.detokenize(tail))
            }
        })
        .collect();
    let driver = Driver {
        app: app.clone(),
        model: Arc::clone(&engine.model),
        caller,
        client,
        scheme: scheme_applied,
        started: Instant::now(),
        started_ms: now_ms(),
        choices: (0..total)
            .map(|i| ChoiceState {
                filter: reasoning.then(|| ReasoningFilter::new(opens_section[i / n.max(1)])),
                ..ChoiceState::default()
            })
            .collect(),
        plan,
        noise: logprobs::Noise::fresh(),
    };
    if driver.plan.stream {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(driver.drive(events_rx, Sink::Stream(tx)));
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut resp = Sse::new(stream).into_response();
        let h = resp.headers_mut();
        h.insert("cache-control", "no-cache".parse().expect("static header"));
        h.insert("x-accel-buffering", "no".parse().expect("static header"));
        Ok(resp)
    } else {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(driver.drive(events_rx, Sink::Whole(tx)));
        match rx.await {
            Ok(Ok(v)) => Ok(Json(v).into_response()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::internal("driver", "the request task ended early")),
        }
    }
}

struct Driver {
    app: AppState,
    model: Arc<Model>,
    caller: Caller,
    client: Client,
    /// The scheme applied (`None` only when the operator disabled the watermark).
    scheme: Option<String>,
    started: Instant,
    started_ms: i64,
    choices: Vec<ChoiceState>,
    plan: Plan,
    /// Noise for returned log-probabilities (policy), fresh per request.
    noise: logprobs::Noise,
}

impl Driver {
    async fn drive(mut self, mut events: mpsc::UnboundedReceiver<JobEvent>, sink: Sink) {
        let mut first = true;
        let mut partial = false;
        while !self.choices.iter().all(ChoiceState::done) {
            let closed = async {
                match &sink {
                    Sink::Stream(tx) => tx.closed().await,
                    Sink::Whole(tx) => {
                        // `oneshot::Sender::closed` needs `&mut`; poll by sleeping on a
                        // cheap check instead.
                        while !tx.is_closed() {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            };
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = closed => { partial = true; break; }
            };
            let Some(ev) = ev else {
                for c in &mut self.choices {
                    if !c.done() {
                        c.error = Some("the engine stopped".into());
                    }
                }
                break;
            };
            if first {
                first = false;
                metrics::histogram!("isotope_time_to_first_token_seconds")
                    .record(self.started.elapsed().as_secs_f64());
                if let Sink::Stream(tx) = &sink {
                    if self.plan.endpoint == Endpoint::Chat {
                        for i in 0..self.choices.len() {
                            let delta = json!({"role": "assistant", "content": ""});
                            if tx
                                .send(Ok(self.chat_chunk(i, delta, None, None)))
                                .await
                                .is_err()
                            {
                                partial = true;
                            }
                        }
                    } else if let Some(echoes) = &self.plan.echo {
                        for i in 0..self.choices.len() {
                            let echo = &echoes[self.prompt_of(i)];
                            let lp = self.echo_logprobs(echo);
                            let chunk = self.completion_chunk(i, &echo.text, lp, None);
                            if tx.send(Ok(chunk)).await.is_err() {
                                partial = true;
                            }
                        }
                    }
                    if partial {
                        break;
                    }
                }
            }
            let out = self.absorb(ev).await;
            if let Sink::Stream(tx) = &sink {
                for chunk in out {
                    if tx.send(Ok(chunk)).await.is_err() {
                        partial = true;
                        break;
                    }
                }
                if partial {
                    break;
                }
            }
        }
        // Dropping the receiver cancels whatever is still decoding.
        drop(events);
        let failed = self.choices.iter().find_map(|c| c.error.clone());
        let status = if partial {
            499
        } else if failed.is_some() {
            500
        } else {
            200
        };
        let usage = self.usage();
        let event = self.usage_event(status, partial);
        let for_sentinel = self.app.sentinel.as_ref().map(|s| (s, event.clone()));
        let committed = self.app.writer.record(event).await;
        if let (Some((sentinel, event)), Ok(())) = (for_sentinel, &committed) {
            sentinel.observe(event);
        }
        let _ = self
            .app
            .store
            .rate_consume(
                &self.caller.api_key_id,
                now_ms(),
                0,
                u64::from(usage.total_tokens),
            )
            .await;
        metrics::counter!("isotope_requests_completed_total",
            "endpoint" => self.plan.endpoint.path(), "status" => status.to_string())
        .increment(1);
        metrics::histogram!("isotope_request_duration_seconds", "endpoint" => self.plan.endpoint.path())
            .record(self.started.elapsed().as_secs_f64());
        if let Err(e) = &committed {
            tracing::error!("usage event not stored: {e}");
        }
        if partial {
            return;
        }
        match sink {
            Sink::Stream(tx) => {
                if let Some(message) = failed.or_else(|| {
                    committed
                        .as_ref()
                        .err()
                        .map(|_| "the usage record could not be stored".to_string())
                }) {
                    let e = ApiError::internal("generation", message);
                    let _ = tx
                        .send(Ok(SseEvent::default().data(e.body_json().to_string())))
                        .await;
                    return;
                }
                for i in 0..self.choices.len() {
                    let reason = self.choices[i].finish.map(finish_str);
                    let chunk = match self.plan.endpoint {
                        Endpoint::Chat => self.chat_chunk(i, json!({}), None, reason),
                        Endpoint::Completions => self.completion_chunk(i, "", None, reason),
                    };
                    let _ = tx.send(Ok(chunk)).await;
                }
                if self.plan.include_usage {
                    let mut v = self.chunk_base();
                    v["choices"] = json!([]);
                    v["usage"] = json!(usage);
                    let _ = tx.send(Ok(SseEvent::default().data(v.to_string()))).await;
                }
                let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
            }
            Sink::Whole(tx) => {
                let result = if let Some(message) = failed {
                    Err(ApiError::internal("generation", message))
                } else if let Err(e) = committed {
                    Err(ApiError::internal("usage record", e))
                } else {
                    Ok(self.whole(usage))
                };
                let _ = tx.send(result);
            }
        }
    }

    /// Fold one engine event into the state; returns the SSE chunks to send (none
    /// when not streaming).
    async fn absorb(&mut self, ev: JobEvent) -> Vec<SseEvent> {
        match ev {
            JobEvent::Token {
                choice,
                sampled,
                text,
            } => {
                let granted = &self.plan.applied.granted;
                let want_lp = granted.logprobs;
                let sampled = if want_lp {
                    let t = &self.plan.applied.treatment;
                    let how = logprobs::Obscure {
                        decimals: t.logprob_decimals,
                        noise: t.logprob_noise,
                    };
                    logprobs::obscure(
                        &sampled,
                        granted.top_logprobs as usize,
                        how,
                        &mut self.noise,
                    )
                } else {
                    sampled
                };
                let c = &mut self.choices[choice];
                c.generated += 1;
                let (segments, hidden) = match &mut c.filter {
                    None => (vec![Segment::Text(text)], false),
                    Some(f) => {
                        let out = f.push(&text);
                        (out.segments, out.hidden)
                    }
                };
                // The token's log-prob entry goes out with its first visible text (or
                // alone when it has none yet), never for a hidden token.
                let mut entry = (!hidden).then_some(sampled);
                let mut out = Vec::new();
                for seg in segments {
                    let text = self.segment_text(seg).await;
                    out.extend(self.emit(choice, &text, entry.take()));
                }
                if entry.is_some() {
                    out.extend(self.emit(choice, "", entry));
                }
                out
            }
            JobEvent::Finished {
                choice,
                reason,
                text,
                ..
            } => {
                let mut segments = Vec::new();
                match &mut self.choices[choice].filter {
                    None => segments.push(Segment::Text(text)),
                    Some(f) => {
                        segments.extend(f.push(&text).segments);
                        segments.extend(f.finish());
                    }
                }
                let mut out = Vec::new();
                for seg in segments {
                    let text = self.segment_text(seg).await;
                    out.extend(self.emit(choice, &text, None));
                }
                self.choices[choice].finish = Some(reason);
                out
            }
            JobEvent::Failed { choice, message } => {
                self.choices[choice].error = Some(message);
                Vec::new()
            }
        }
    }

    /// Append `text` (and a returned token) to a choice; the SSE chunk for it when
    /// streaming and there is something to send.
    fn emit(&mut self, choice: usize, text: &str, token: Option<Sampled>) -> Option<SseEvent> {
        let c = &mut self.choices[choice];
        let offset = c.chars;
        c.chars += text.chars().count();
        c.text.push_str(text);
        let want_lp = self.plan.applied.granted.logprobs;
        let lp_token = token.filter(|_| want_lp);
        if let Some(t) = &lp_token {
            c.offsets.push(offset);
            c.tokens.push(t.clone());
        }
        if !self.plan.stream || (text.is_empty() && lp_token.is_none()) {
            return None;
        }
        Some(match self.plan.endpoint {
            Endpoint::Chat => {
                let lp = lp_token
                    .as_ref()
                    .map(|s| json!({"content": [self.token_logprob(s)]}));
                self.chat_chunk(choice, json!({"content": text}), lp, None)
            }
            Endpoint::Completions => {
                let lp = lp_token
                    .as_ref()
                    .map(|s| self.completion_logprobs(std::slice::from_ref(s), &[offset]));
                self.completion_chunk(choice, text, lp, None)
            }
        })
    }

    /// The text a filtered segment becomes under the reasoning policy.
    async fn segment_text(&self, seg: Segment) -> String {
        match seg {
            Segment::Text(t) => t,
            Segment::Section(reasoning) => match self.plan.applied.treatment.reasoning {
                ReasoningPolicy::Whole => {
                    format!("{}{reasoning}{}", reasoning::OPEN, reasoning::CLOSE)
                }
                ReasoningPolicy::Withhold => String::new(),
                ReasoningPolicy::Summarise => match self.summarise(&reasoning).await {
                    Ok(summary) => {
                        format!("{}{}{}", reasoning::OPEN, summary.trim(), reasoning::CLOSE)
                    }
                    Err(e) => {
                        // Failing closed: a summary that cannot be written is withheld.
                        tracing::warn!("reasoning summary failed, withheld instead: {e}");
                        metrics::counter!("isotope_reasoning_summary_failures_total").increment(1);
                        String::new()
                    }
                },
            },
        }
    }

    /// The second pass of `summarise`: the model condenses its own reasoning, through
    /// the same scheduler (batched with everything else) and watermarked like any
    /// other output. Its tokens are the provider's cost, not counted in `usage`.
    async fn summarise(&self, reasoning: &str) -> Result<String, String> {
        const SUMMARY_TOKENS: usize = 64;
        let engine = self
            .app
            .engine
            .get()
            .ok_or_else(|| "the engine is not loaded".to_string())?;
        let model = &engine.model;
        // Keep the end of a long section: the conclusion is what a summary needs.
        let budget = engine
            .scheduler
            .ctx_per_slot()
            .saturating_sub(SUMMARY_TOKENS + 96);
        let mut ids = model.tokenize(reasoning, false, false);
        if ids.len() > budget {
            ids.drain(..ids.len() - budget);
        }
        let tail = model.detokenize(&ids);
        let messages = [
            ChatMessage::new(
                "system",
                "You summarise reasoning briefly. Do not solve anything new.".to_string(),
            ),
            ChatMessage::new(
                "user",
                format!("Summarise this reasoning in at most two sentences:\n\n{tail}"),
            ),
        ];
        let prompt = model.chat_tokens(&messages).map_err(|e| e.to_string())?;
        if prompt.len() + SUMMARY_TOKENS >= engine.scheduler.ctx_per_slot() {
            return Err("the reasoning does not fit the context".into());
        }
        let params = SamplingParams {
            temperature: 0.7,
            seed: self.plan.params.seed ^ 0x5eed_5a11,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params, 0);
        if self.app.cfg.watermark {
            sampler = sampler.with_hook(Box::new(self.app.watermark.hook(&engine.excluded, false)));
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        engine
            .scheduler
            .submit(Job {
                prompt,
                samplers: vec![sampler],
                first_choice: 0,
                max_tokens: SUMMARY_TOKENS,
                stop: Vec::new(),
                top_logprobs: 0,
                events: tx,
            })
            .map_err(|e| format!("{e:?}"))?;
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                JobEvent::Token { text: t, .. } => text.push_str(&t),
                JobEvent::Finished { text: t, .. } => {
                    text.push_str(&t);
                    return Ok(text);
                }
                JobEvent::Failed { message, .. } => return Err(message),
            }
        }
        Err("the engine stopped".into())
    }

    /// Prompt tokens of the request (all prompts of a batch).
    fn prompt_tokens(&self) -> usize {
        self.plan.prompts.iter().map(Vec::len).sum()
    }

    /// The prompt choice `i` answers.
    fn prompt_of(&self, choice: usize) -> usize {
        choice / (self.plan.applied.granted.n.max(1) as usize)
    }

    fn usage(&self) -> Usage {
        let completion: usize = self.choices.iter().map(|c| c.generated).sum();
        Usage::new(self.prompt_tokens(), completion)
    }

    fn chunk_base(&self) -> Value {
        let object = match self.plan.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        json!({
            "id": self.plan.id,
            "object": object,
            "created": self.plan.created,
            "model": self.plan.model_name,
            "system_fingerprint": null,
        })
    }

    fn with_usage_null(&self, mut v: Value) -> SseEvent {
        if self.plan.include_usage {
            v["usage"] = Value::Null;
        }
        SseEvent::default().data(v.to_string())
    }

    fn chat_chunk(
        &self,
        index: usize,
        delta: Value,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> SseEvent {
        let mut v = self.chunk_base();
        v["choices"] = json!([{
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
        }]);
        self.with_usage_null(v)
    }

    fn completion_chunk(
        &self,
        index: usize,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> SseEvent {
        let mut v = self.chunk_base();
        v["choices"] = json!([{
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
        }]);
        self.with_usage_null(v)
    }

    fn token_logprob(&self, s: &Sampled) -> Value {
        let top: Vec<Value> = s
            .top_logprobs
            .iter()
            .take(self.plan.applied.granted.top_logprobs as usize)
            .map(|&(t, lp)| {
                json!({"token": self.model.token_text(t), "logprob": lp, "bytes": self.model.token_bytes(t)})
            })
            .collect();
        json!({
            "token": self.model.token_text(s.token),
            "logprob": s.logprob,
            "bytes": self.model.token_bytes(s.token),
            "top_logprobs": top,
        })
    }

    /// The `/v1/completions` logprobs object for some tokens.
    fn completion_logprobs(&self, tokens: &[Sampled], offsets: &[usize]) -> Value {
        let k = self.plan.applied.granted.top_logprobs as usize;
        let mut toks = Vec::new();
        let mut lps = Vec::new();
        let mut tops = Vec::new();
        for s in tokens {
            toks.push(self.model.token_text(s.token));
            lps.push(json!(s.logprob));
            let mut m = BTreeMap::new();
            for &(t, lp) in s.top_logprobs.iter().take(k) {
                m.entry(self.model.token_text(t)).or_insert(lp);
            }
            tops.push(json!(m));
        }
        json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }

    fn echo_logprobs(&self, echo: &Echo) -> Option<Value> {
        let scores = echo.scores.as_ref()?;
        let mut toks = Vec::new();
        let mut lps = Vec::new();
        let mut tops = Vec::new();
        let mut offsets = Vec::new();
        let mut chars = 0usize;
        for (i, &t) in echo.tokens.iter().enumerate() {
            let text = self.model.token_text(t);
            offsets.push(chars);
            chars += text.chars().count();
            toks.push(text);
            if i == 0 {
                lps.push(Value::Null);
                tops.push(Value::Null);
            } else {
                let s = &scores[i - 1];
                lps.push(json!(s.logprob));
                let mut m = BTreeMap::new();
                for &(t, lp) in &s.top {
                    m.entry(self.model.token_text(t)).or_insert(lp);
                }
                tops.push(json!(m));
            }
        }
        Some(
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}),
        )
    }

    /// The non-streamed response body.
    fn whole(&self, usage: Usage) -> Value {
        let want_lp = self.plan.applied.granted.logprobs;
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let finish = c.finish.map(finish_str);
                match self.plan.endpoint {
                    Endpoint::Chat => {
                        let lp = want_lp.then(|| {
                            json!({"content": c.tokens.iter().map(|s| self.token_logprob(s)).collect::<Vec<_>>()})
                        });
                        json!({
                            "index": i,
                            "message": {"role": "assistant", "content": c.text, "refusal": null},
                            "logprobs": lp,
                            "finish_reason": finish,
                        })
                    }
                    Endpoint::Completions => {
                        let (mut text, mut lp) = (String::new(), None);
                        let mut shift = 0;
                        if let Some(echoes) = &self.plan.echo {
                            let echo = &echoes[self.prompt_of(i)];
                            text.push_str(&echo.text);
                            shift = echo.text.chars().count();
                            lp = self.echo_logprobs(echo);
                        }
                        text.push_str(&c.text);
                        if want_lp {
                            let offsets: Vec<usize> = c.offsets.iter().map(|o| o + shift).collect();
                            let gen = self.completion_logprobs(&c.tokens, &offsets);
                            lp = Some(match lp {
                                Some(mut e) => {
                                    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                                        if let (Some(a), Some(b)) = (e[key].as_array_mut(), gen[key].as_array()) {
                                            a.extend(b.iter().cloned());
                                        }
                                    }
                                    e
                                }
                                None => gen,
                            });
                        }
                        json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
                    }
                }
            })
            .collect();
        let object = match self.plan.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completions => "text_completion",
        };
        json!({
            "id": self.plan.id,
            "object": object,
            "created": self.plan.created,
            "model": self.plan.model_name,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage,
        })
    }

    fn usage_event(&self, status: u16, partial: bool) -> UsageEvent {
        let completion = if self.choices.len() == 1 {
            self.choices[0].text.clone()
        } else {
            serde_json::to_string(&self.choices.iter().map(|c| &c.text).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let store = self.app.cfg.store_texts;
        let finish = self.choices.iter().find_map(|c| c.finish).map(finish_str);
        UsageEvent {
            id: 0,
            request_id: self.plan.id.clone(),
            account_id: self.caller.account_id,
            api_key_id: self.caller.api_key_id.clone(),
            created_at_ms: self.started_ms,
            endpoint: self.plan.endpoint.path().to_owned(),
            model: self.plan.model_name.clone(),
            prompt_hash: sha256_hex(&self.plan.prompt_log),
            prompt_text: store.then(|| self.plan.prompt_log.clone()),
            turns: self.plan.turns,
            completion_hash: Some(sha256_hex(&completion)),
            completion_text: store.then_some(completion),
            prompt_tokens: self.prompt_tokens() as u32,
            completion_tokens: self.usage().completion_tokens,
            n: self.plan.applied.requested.n,
            logprobs: self.plan.applied.requested.logprobs,
            top_logprobs: Some(self.plan.applied.requested.top_logprobs),
            max_tokens: self.plan.requested_max_tokens,
            temperature: self.plan.temperature,
            watermark_scheme: self.scheme.clone(),
            watermark_key_id: self
                .scheme
                .is_some()
                .then(|| self.app.watermark.key.id().to_owned()),
            latency_ms: self.started.elapsed().as_millis().min(u32::MAX as u128) as u32,
            status,
            finish_reason: finish.map(str::to_owned),
            client_addr: self.client.addr.clone(),
            user_agent: self.client.user_agent.clone(),
            user: self.plan.user.clone(),
            policy: (!self.plan.applied.unchanged()
                || self.plan.applied.level != policy::Level::Observe)
                .then(|| serde_json::to_string(&self.plan.applied).unwrap_or_default()),
            partial,
        }
    }
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

//! Harvesting a teacher through its OpenAI-compatible API: prompts in, one JSONL
//! record per (prompt, sample) out — the attacker's side of distillation.
//!
//! - **Prompts** ([`read_prompts`]): JSONL lines with `prompt`, or the data/ formats —
//!   self-instruct `instruction` (with `input`, or the first of `instances[].input`)
//!   and GSM8K `question`. Bad lines are reported with their line number and skipped.
//! - **Requests**: non-streaming `POST /v1/chat/completions`, at most `concurrency`
//!   in flight and at most `rps` started per second. 429, 5xx, timeouts and connection
//!   errors are retried with exponential backoff and jitter; a `retry-after` header
//!   (seconds) is honoured and pauses *every* request, not only the one that got it.
//!   401/403 and an exhausted quota (`insufficient_quota`) stop the run; another 4xx
//!   fails only its own record.
//! - **Resumable output**: the output is append-only JSONL. Every record has a stable
//!   `id` = `"{prompt_index}-{sample}"`; on start the ids already in the file are
//!   skipped, so a killed run continues with no duplicates and no losses. A record is
//!   one `write_all` of a whole line followed by a flush; a trailing partial line left
//!   by a kill is cut off on the next start. A record whose prompt differs from the
//!   prompt file at its index stops the run (the file belongs to other prompts).
//!
//! A record (the training loader, [`crate::load_jsonl`], reads it as is):
//!
//! ```json
//! {"id": "3-0", "prompt_index": 3, "sample": 0, "line": 4, "prompt": "...",
//!  "response": "...", "finish_reason": "stop", "model": "...", "seed": 7,
//!  "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
//!  "logprobs": {"content": [{"token": "...", "logprob": -0.1, "bytes": [..],
//!                            "top_logprobs": [...]}, ...]}}
//! ```
//!
//! `logprobs` is the API's object, stored as is (only with `top_logprobs > 0`). The
//! API gives no token ids; the loader maps the `token`/`bytes` of each position to the
//! student tokenizer's ids.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::data::LineWarning;
use crate::error::{io_err, DistillError, Result};

/// One prompt of the prompt file.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// 0-based index among the usable prompts (the first half of a record's id).
    pub index: usize,
    /// 1-based line in the prompt file.
    pub line: usize,
    pub text: String,
}

/// Read prompts from JSONL text: `prompt`, self-instruct `instruction` (+ `input` or
/// the first non-empty `instances[].input`), or GSM8K `question`. Bad lines become
/// warnings with their line numbers.
pub fn parse_prompts(text: &str) -> (Vec<Prompt>, Vec<LineWarning>) {
    let mut prompts = Vec::new();
    let mut warnings = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match prompt_of_line(line) {
            Ok(text) => prompts.push(Prompt {
                index: prompts.len(),
                line: line_no,
                text,
            }),
            Err(message) => warnings.push(LineWarning {
                line: line_no,
                message,
            }),
        }
    }
    (prompts, warnings)
}

/// [`parse_prompts`] on a file.
pub fn read_prompts(path: &Path) -> Result<(Vec<Prompt>, Vec<LineWarning>)> {
    let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
    Ok(parse_prompts(&text))
}

fn prompt_of_line(line: &str) -> std::result::Result<String, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let text = |key: &str| -> std::result::Result<Option<String>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("`{key}` is not a string")),
        }
    };
    let prompt = if let Some(p) = text("prompt")? {
        p
    } else if let Some(instr) = text("instruction")? {
        let input = match text("input")? {
            Some(i) => Some(i),
            None => obj
                .get("instances")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .filter_map(|x| x.get("input").and_then(Value::as_str))
                        .find(|s| !s.trim().is_empty())
                })
                .map(str::to_owned),
        };
        match input {
            Some(i) if !i.trim().is_empty() => format!("{instr}\n\n{i}"),
            _ => instr,
        }
    } else if let Some(q) = text("question")? {
        q
    } else {
        return Err("no `prompt`, `instruction` or `question` field".into());
    };
    if prompt.trim().is_empty() {
        return Err("empty prompt".into());
    }
    Ok(prompt)
}

/// How to harvest.
#[derive(Clone, Debug)]
pub struct HarvestConfig {
    /// Base URL (`http://host:port`, `…/v1`) or the full `…/chat/completions` URL.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer …`.
    pub api_key: Option<String>,
    /// Model name; `None`: the first model `GET /v1/models` lists.
    pub model: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Most requests started per second (retries included); `None`: unlimited.
    pub rps: Option<f64>,
    pub max_tokens: u32,
    /// Top log-probabilities per position (`0`: do not ask for log-probabilities).
    pub top_logprobs: u32,
    pub samples_per_prompt: usize,
    /// `None`: the server's default.
    pub temperature: Option<f32>,
    /// Base seed; record (p, s) asks for `seed + p * samples_per_prompt + s`, so a
    /// rerun asks for exactly the same samples. `None`: no seed is sent.
    pub seed: Option<u64>,
    /// System message sent before every prompt (`None`: none).
    pub system: Option<String>,
    /// Retries per record before it counts as failed.
    pub max_retries: u32,
    /// First backoff; it doubles per retry (with jitter) up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Stop after this many new records (for tests and dry runs); `None`: all.
    pub limit: Option<usize>,
    /// Start no new record after this long (records in flight still finish; the
    /// rest stay missing, and a rerun continues with them): a harvest sized by the
    /// time it may take rather than by its prompt count. `None`: no limit.
    pub time_limit: Option<Duration>,
}

impl Default for HarvestConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:8080".into(),
            api_key: None,
            model: None,
            concurrency: 4,
            rps: None,
            max_tokens: 256,
            top_logprobs: 0,
            samples_per_prompt: 1,
            temperature: None,
            seed: None,
            system: None,
            max_retries: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(600),
            limit: None,
            time_limit: None,
        }
    }
}

/// Counters, as the progress callback sees them after every record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HarvestProgress {
    /// Records wanted in total (prompts × samples).
    pub total: usize,
    /// Records already in the file at start.
    pub existing: usize,
    /// Records written by this run.
    pub written: usize,
    /// Records given up on in this run.
    pub failed: usize,
    /// Retries so far (all causes).
    pub retries: u64,
    /// 429 responses so far.
    pub rate_limited: u64,
    pub completion_tokens: u64,
}

/// The outcome of [`harvest`]; the CLI's `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct HarvestReport {
    pub out: PathBuf,
    pub model: String,
    pub prompts: usize,
    /// Prompt-file lines skipped.
    pub prompt_lines_skipped: usize,
    pub samples_per_prompt: usize,
    /// Records wanted in total.
    pub total: usize,
    /// Records already in the file when this run started (skipped).
    pub existing: usize,
    /// Records written by this run.
    pub written: usize,
    /// Records that failed for good in this run (a rerun retries them).
    pub failed: usize,
    /// Records still missing from the file.
    pub missing: usize,
    /// HTTP requests sent (retries included).
    pub requests: u64,
    pub retries: u64,
    /// 429 responses.
    pub rate_limited: u64,
    /// 5xx responses.
    pub server_errors: u64,
    /// Timeouts and connection errors.
    pub connection_errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub elapsed_secs: f64,
    pub records_per_sec: f64,
    pub completion_tokens_per_sec: f64,
    /// Bytes of a partial last line (from a killed run) cut off at start.
    pub truncated_bytes: u64,
    /// The last error of a failed record, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The time limit stopped the run before every record was started.
    pub time_limited: bool,
}

/// One line of the output file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HarvestRecord {
    pub id: String,
    pub prompt_index: usize,
    pub sample: usize,
    pub line: usize,
    pub prompt: String,
    pub response: String,
    pub finish_reason: Option<String>,
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    pub usage: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
}

/// The stable id of record (prompt `index`, `sample`).
pub fn record_id(index: usize, sample: usize) -> String {
    format!("{index}-{sample}")
}

/// What an existing output file already holds.
#[derive(Debug, Default)]
pub struct Existing {
    pub ids: HashSet<String>,
    /// Bytes of a trailing partial line that were cut off.
    pub truncated_bytes: u64,
    /// Lines that could not be read as records (kept in the file, not counted).
    pub bad_lines: Vec<usize>,
}

/// Open (creating) the output file for appending after scanning it: the ids of its
/// complete records, and a trailing partial line cut off. Checks that each record's
/// prompt is the prompt at its index.
pub fn open_output(path: &Path, prompts: &[Prompt]) -> Result<(File, Existing)> {
    let mut file = OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("opening", path))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    let mut existing = Existing::default();
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if complete < bytes.len() {
        existing.truncated_bytes = (bytes.len() - complete) as u64;
        file.set_len(complete as u64)
            .map_err(io_err("truncating a partial last line of", path))?;
        file.seek(SeekFrom::End(0))
            .map_err(io_err("seeking in", path))?;
    }
    // `prompts` may be a subset of a prompt file (e.g. the prompts another harvest
    // got), so records are matched by their prompt's index, not by position.
    let by_index: HashMap<usize, &Prompt> = prompts.iter().map(|p| (p.index, p)).collect();
    for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        #[derive(Deserialize)]
        struct Head {
            id: String,
            prompt_index: usize,
            prompt: String,
        }
        match serde_json::from_slice::<Head>(line) {
            Ok(h) => {
                if let Some(p) = by_index.get(&h.prompt_index) {
                    if p.text != h.prompt {
                        return Err(DistillError::Harvest(format!(
                            "`{}` line {}: record {} has a different prompt than line {} of the \
                             prompt file — the output belongs to other prompts; use another --out",
                            path.display(),
                            i + 1,
                            h.id,
                            p.line
                        )));
                    }
                }
                existing.ids.insert(h.id);
            }
            Err(_) => existing.bad_lines.push(i + 1),
        }
    }
    Ok((file, existing))
}

/// The chat-completions URL and the models URL of an endpoint.
pub fn endpoint_urls(endpoint: &str) -> (String, String) {
    let e = endpoint.trim_end_matches('/');
    if let Some(base) = e.strip_suffix("/chat/completions") {
        return (e.to_owned(), format!("{base}/models"));
    }
    let base = if e.ends_with("/v1") {
        e.to_owned()
    } else {
        format!("{e}/v1")
    };
    (format!("{base}/chat/completions"), format!("{base}/models"))
}

/// Shared request pacing: at most `rps` starts per second, and a global pause after a
/// `retry-after`.
struct Pacer {
    interval: Option<Duration>,
    state: tokio::sync::Mutex<(tokio::time::Instant, tokio::time::Instant)>,
}

impl Pacer {
    fn new(rps: Option<f64>) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            interval: rps
                .filter(|r| *r > 0.0 && r.is_finite())
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            state: tokio::sync::Mutex::new((now, now)),
        }
    }

    /// Wait for this request's turn.
    async fn acquire(&self) {
        let at = {
            let mut st = self.state.lock().await;
            let (next, pause) = &mut *st;
            let now = tokio::time::Instant::now();
            let at = now.max(*next).max(*pause);
            if let Some(iv) = self.interval {
                *next = at + iv;
            }
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// Nobody starts a request before `d` from now.
    async fn pause(&self, d: Duration) {
        let mut st = self.state.lock().await;
        let until = tokio::time::Instant::now() + d;
        if until > st.1 {
            st.1 = until;
        }
    }
}

struct Shared {
    client: reqwest::Client,
    url: String,
    api_key: Option<String>,
    model: String,
    cfg: HarvestConfig,
    pacer: Pacer,
    out: Mutex<File>,
    out_path: PathBuf,
    abort: AtomicBool,
    fatal: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    requests: AtomicU64,
    retries: AtomicU64,
    rate_limited: AtomicU64,
    server_errors: AtomicU64,
    connection_errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    jitter: Mutex<u64>,
}

impl Shared {
    /// A factor in [0.5, 1.0) (splitmix64 of a counter seeded from the clock).
    fn jitter(&self) -> f64 {
        let mut s = self.jitter.lock().expect("jitter lock");
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        0.5 + 0.5 * (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.cfg.initial_backoff.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
        Duration::from_secs_f64(base.min(self.cfg.max_backoff.as_secs_f64()) * self.jitter())
    }

    fn write_record(&self, rec: &HarvestRecord) -> Result<()> {
        let mut line = serde_json::to_string(rec).expect("a record serializes");
        line.push('\n');
        let mut f = self.out.lock().expect("output lock");
        f.write_all(line.as_bytes())
            .and_then(|()| f.flush())
            .map_err(io_err("writing", &self.out_path))
    }
}

enum Outcome {
    Done(Box<HarvestRecord>),
    Failed(String),
}

/// Statuses worth asking again for: rate limited (429), timed out (408), or the
/// server's own failure (5xx). Anything else (400, 401, 403, 404, …) answers the
/// same the next time. Shared by the harvester and the echo reader.
pub(crate) fn retryable_status(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 408) || status.is_server_error()
}

pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite())
        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0)))
}

pub(crate) fn error_message(body: &str) -> String {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let msg = v
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| body.chars().take(300).collect());
    msg
}

fn is_quota(body: &str) -> bool {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let field = |p: &str| {
        v.as_ref()
            .and_then(|v| v.pointer(p))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    field("/error/code").as_deref() == Some("insufficient_quota")
        || field("/error/type").as_deref() == Some("insufficient_quota")
}

async fn fetch_one(sh: &Shared, prompt: &Prompt, sample: usize) -> Outcome {
    let cfg = &sh.cfg;
    let seed = cfg.seed.map(|s| {
        let idx = (prompt.index as u64)
            .wrapping_mul(cfg.samples_per_prompt as u64)
            .wrapping_add(sample as u64);
        (s.wrapping_add(idx) & (i64::MAX as u64)) as i64
    });
    let mut messages = Vec::new();
    if let Some(sys) = &cfg.system {
        messages.push(json!({"role": "system", "content": sys}));
    }
    messages.push(json!({"role": "user", "content": prompt.text}));
    let mut body = json!({
        "model": sh.model,
        "messages": messages,
        "max_tokens": cfg.max_tokens,
        "stream": false,
    });
    if let Some(t) = cfg.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(s) = seed {
        body["seed"] = json!(s);
    }
    if cfg.top_logprobs > 0 {
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(cfg.top_logprobs);
    }
    let mut attempt = 0u32;
    loop {
        if sh.abort.load(Ordering::Relaxed) {
            return Outcome::Failed("run aborted".into());
        }
        sh.pacer.acquire().await;
        sh.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = sh.client.post(&sh.url).json(&body);
        if let Some(k) = &sh.api_key {
            req = req.bearer_auth(k);
        }
        // Err((message, retryable, wait hint))
        let result: std::result::Result<Value, (String, bool, Option<Duration>)> =
            match req.send().await {
                Err(e) => {
                    sh.connection_errors.fetch_add(1, Ordering::Relaxed);
                    Err((format!("request failed: {e}"), true, None))
                }
                Ok(resp) => {
                    let status = resp.status();
                    let wait = retry_after(resp.headers());
                    let text = resp.text().await;
                    match text {
                        Err(e) => {
                            sh.connection_errors.fetch_add(1, Ordering::Relaxed);
                            Err((format!("reading the response: {e}"), true, None))
                        }
                        Ok(text) if status.is_success() => serde_json::from_str(&text)
                            .map_err(|e| (format!("invalid JSON response: {e}"), false, None)),
                        Ok(text) => {
                            let msg = format!("HTTP {}: {}", status.as_u16(), error_message(&text));
                            if status.as_u16() == 429 {
                                sh.rate_limited.fetch_add(1, Ordering::Relaxed);
                                if is_quota(&text) {
                                    sh.fatal(msg.clone());
                                    return Outcome::Failed(msg);
                                }
                                Err((msg, true, wait))
                            } else if retryable_status(status) {
                                if status.is_server_error() {
                                    sh.server_errors.fetch_add(1, Ordering::Relaxed);
                                }
                                Err((msg, true, wait))
                            } else if matches!(status.as_u16(), 401 | 403 | 404) {
                                sh.fatal(msg.clone());
                                return Outcome::Failed(msg);
                            } else {
                                Err((msg, false, None))
                            }
                        }
                    }
                }
            };
        match result {
            Ok(v) => return parse_completion(sh, prompt, sample, seed, &v),
            Err((msg, retryable, wait)) => {
                if !retryable || attempt >= cfg.max_retries {
                    return Outcome::Failed(msg);
                }
                let mut delay = sh.backoff(attempt);
                if let Some(w) = wait {
                    // Honour the server's hint for everyone; a little jitter spreads
                    // the restart.
                    sh.pacer.pause(w).await;
                    delay = w + Duration::from_secs_f64(0.25 * sh.jitter());
                }
                attempt += 1;
                sh.retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("retry {attempt} of {} in {delay:?}: {msg}", prompt.index);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl Shared {
    fn fatal(&self, msg: String) {
        self.abort.store(true, Ordering::Relaxed);
        let mut f = self.fatal.lock().expect("fatal lock");
        f.get_or_insert(msg);
    }
}

fn parse_completion(
    sh: &Shared,
    prompt: &Prompt,
    sample: usize,
    seed: Option<i64>,
    v: &Value,
) -> Outcome {
    let Some(choice) = v.pointer("/choices/0") else {
        return Outcome::Failed("response without choices".into());
    };
    let Some(response) = choice.pointer("/message/content").and_then(Value::as_str) else {
        return Outcome::Failed("response without choices[0].message.content".into());
    };
    let usage = v.get("usage").cloned();
    if let Some(u) = &usage {
        let get = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        sh.prompt_tokens
            .fetch_add(get("prompt_tokens"), Ordering::Relaxed);
        sh.completion_tokens
            .fetch_add(get("completion_tokens"), Ordering::Relaxed);
    }
    let logprobs = choice.get("logprobs").filter(|l| !l.is_null()).cloned();
    Outcome::Done(Box::new(HarvestRecord {
        id: record_id(prompt.index, sample),
        prompt_index: prompt.index,
        sample,
        line: prompt.line,
        prompt: prompt.text.clone(),
        response: response.to_owned(),
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        model: v.get("model").and_then(Value::as_str).map(str::to_owned),
        seed,
        usage,
        logprobs,
    }))
}

/// The first model `GET /v1/models` lists.
pub(crate) async fn default_model(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
) -> Result<String> {
    let mut req = client.get(url);
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let err = |m: String| {
        DistillError::Harvest(format!(
            "finding the model name at {url} ({m}); name the model to ask for: `--model`, \
             or `--suspect-model` in `audit model`"
        ))
    };
    let resp = req.send().await.map_err(|e| err(e.to_string()))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| err(e.to_string()))?;
    if !status.is_success() {
        return Err(err(format!(
            "HTTP {}: {}",
            status.as_u16(),
            error_message(&text)
        )));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    v.pointer("/data/0/id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| err("no models listed".into()))
}

/// Harvest `prompts` × `samples_per_prompt` completions into `out` (appending, and
/// skipping the ids already there). `progress` is called after every finished record.
/// Records that fail for good are counted in the report, not written: a rerun tries
/// them again. Stops early, with an error, on 401/403/404 or an exhausted quota.
pub async fn harvest(
    cfg: &HarvestConfig,
    prompts: &[Prompt],
    out: &Path,
    progress: &mut (dyn FnMut(&HarvestProgress) + Send),
) -> Result<HarvestReport> {
    if cfg.concurrency == 0 || cfg.samples_per_prompt == 0 || cfg.max_tokens == 0 {
        return Err(DistillError::Config(
            "concurrency, samples_per_prompt and max_tokens must be at least 1".into(),
        ));
    }
    let start = Instant::now();
    let (file, existing) = open_output(out, prompts)?;
    if existing.truncated_bytes > 0 {
        tracing::warn!(
            "{}: cut off a partial last line ({} bytes) left by an interrupted run",
            out.display(),
            existing.truncated_bytes
        );
    }
    let (url, models_url) = endpoint_urls(&cfg.endpoint);
    let client = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| DistillError::Harvest(format!("building the HTTP client: {e}")))?;
    let mut todo: Vec<(usize, usize)> = Vec::new();
    // (position in `prompts`, sample): positions, because `prompts` may be a subset
    for (pos, p) in prompts.iter().enumerate() {
        for s in 0..cfg.samples_per_prompt {
            if !existing.ids.contains(&record_id(p.index, s)) {
                todo.push((pos, s));
            }
        }
    }
    let total = prompts.len() * cfg.samples_per_prompt;
    let already = total - todo.len();
    if let Some(l) = cfg.limit {
        todo.truncate(l);
    }
    let model = match (&cfg.model, todo.is_empty()) {
        (Some(m), _) => m.clone(),
        (None, true) => String::new(),
        (None, false) => default_model(&client, &models_url, cfg.api_key.as_deref()).await?,
    };
    let seed0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let shared = Arc::new(Shared {
        client,
        url,
        api_key: cfg.api_key.clone(),
        model: model.clone(),
        cfg: cfg.clone(),
        pacer: Pacer::new(cfg.rps),
        out: Mutex::new(file),
        out_path: out.to_path_buf(),
        abort: AtomicBool::new(false),
        fatal: Mutex::new(None),
        last_error: Mutex::new(None),
        requests: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        rate_limited: AtomicU64::new(0),
        server_errors: AtomicU64::new(0),
        connection_errors: AtomicU64::new(0),
        prompt_tokens: AtomicU64::new(0),
        completion_tokens: AtomicU64::new(0),
        jitter: Mutex::new(seed0),
    });
    let mut prog = HarvestProgress {
        total,
        existing: already,
        ..HarvestProgress::default()
    };
    progress(&prog);
    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let mut tasks: JoinSet<Result<bool>> = JoinSet::new();
    let prompts: Arc<Vec<Prompt>> = Arc::new(prompts.to_vec());
    let mut write_error = None;
    let mut finished = |res: std::result::Result<Result<bool>, tokio::task::JoinError>,
                        prog: &mut HarvestProgress,
                        write_error: &mut Option<DistillError>| {
        match res {
            Ok(Ok(true)) => prog.written += 1,
            Ok(Ok(false)) => prog.failed += 1,
            Ok(Err(e)) => {
                prog.failed += 1;
                write_error.get_or_insert(e);
            }
            Err(e) => {
                prog.failed += 1;
                write_error.get_or_insert(DistillError::Harvest(format!("a task died: {e}")));
            }
        }
        prog.retries = shared.retries.load(Ordering::Relaxed);
        prog.rate_limited = shared.rate_limited.load(Ordering::Relaxed);
        prog.completion_tokens = shared.completion_tokens.load(Ordering::Relaxed);
        progress(prog);
    };
    let out_of_time = || cfg.time_limit.is_some_and(|l| start.elapsed() >= l);
    let mut time_limited = false;
    for (pi, s) in todo {
        if shared.abort.load(Ordering::Relaxed) || write_error.is_some() {
            break;
        }
        let permit = loop {
            // Report finished tasks while waiting for a slot.
            tokio::select! {
                p = sem.clone().acquire_owned() => break p.expect("semaphore open"),
                Some(res) = tasks.join_next() => finished(res, &mut prog, &mut write_error),
            }
        };
        // Checked after the wait for a slot: that wait is where the time goes.
        if out_of_time() {
            time_limited = true;
            break;
        }
        let sh = shared.clone();
        let prompts = prompts.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let prompt = &prompts[pi];
            match fetch_one(&sh, prompt, s).await {
                Outcome::Done(rec) => {
                    sh.write_record(&rec)?;
                    Ok(true)
                }
                Outcome::Failed(msg) => {
                    tracing::warn!(
                        "prompt {} (line {}) sample {s}: {msg}",
                        prompt.index,
                        prompt.line
                    );
                    *sh.last_error.lock().expect("lock") = Some(msg);
                    Ok(false)
                }
            }
        });
    }
    while let Some(res) = tasks.join_next().await {
        finished(res, &mut prog, &mut write_error);
    }
    if let Some(e) = write_error {
        return Err(e);
    }
    if let Some(msg) = shared.fatal.lock().expect("lock").take() {
        return Err(DistillError::Harvest(format!(
            "stopped: {msg} ({} records written this run; rerun to continue)",
            prog.written
        )));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let completion_tokens = shared.completion_tokens.load(Ordering::Relaxed);
    let last_error = shared.last_error.lock().expect("lock").take();
    Ok(HarvestReport {
        out: out.to_path_buf(),
        model,
        prompts: prompts.len(),
        prompt_lines_skipped: 0,
        samples_per_prompt: cfg.samples_per_prompt,
        total,
        existing: already,
        written: prog.written,
        failed: prog.failed,
        missing: total - already - prog.written,
        requests: shared.requests.load(Ordering::Relaxed),
        retries: shared.retries.load(Ordering::Relaxed),
        rate_limited: shared.rate_limited.load(Ordering::Relaxed),
        server_errors: shared.server_errors.load(Ordering::Relaxed),
        connection_errors: shared.connection_errors.load(Ordering::Relaxed),
        prompt_tokens: shared.prompt_tokens.load(Ordering::Relaxed),
        completion_tokens,
        elapsed_secs: elapsed,
        records_per_sec: prog.written as f64 / elapsed.max(1e-9),
        completion_tokens_per_sec: completion_tokens as f64 / elapsed.max(1e-9),
        truncated_bytes: existing.truncated_bytes,
        last_error,
        time_limited,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_formats_and_bad_lines() {
        let text = concat!(
            r#"{"prompt": "plain"}"#,
            "\n",
            r#"{"instruction": "Sort", "instances": [{"input": "", "output": ""}, {"input": "3 1 2", "output": "1 2 3"}]}"#,
            "\n",
            "\n",
            "{broken\n",
            "{\"question\": \"2+2?\", \"answer\": \"#### 4\"}",
            "\n",
            r#"{"instruction": "Hi", "input": "there"}"#,
            "\n",
            r#"{"text": "no prompt"}"#,
            "\n",
            r#"{"prompt": 3}"#,
            "\n",
            r#"{"prompt": "  "}"#,
            "\n",
        );
        let (p, w) = parse_prompts(text);
        let texts: Vec<&str> = p.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["plain", "Sort\n\n3 1 2", "2+2?", "Hi\n\nthere"]);
        assert_eq!(p.iter().map(|p| p.line).collect::<Vec<_>>(), [1, 2, 5, 6]);
        assert_eq!(p.iter().map(|p| p.index).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(w.iter().map(|w| w.line).collect::<Vec<_>>(), [4, 7, 8, 9]);
    }

    #[test]
    fn endpoint_forms() {
        for e in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/chat/completions",
        ] {
            assert_eq!(
                endpoint_urls(e),
                (
                    "http://h:1/v1/chat/completions".into(),
                    "http://h:1/v1/models".into()
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn output_scan_cuts_partial_line_and_checks_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let prompts = parse_prompts("{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n").0;
        std::fs::write(
            &path,
            "{\"id\":\"0-0\",\"prompt_index\":0,\"prompt\":\"a\"}\n{\"id\":\"1-0\",\"prompt_in",
        )
        .unwrap();
        let (mut f, ex) = open_output(&path, &prompts).unwrap();
        assert_eq!(ex.ids.len(), 1);
        assert!(ex.ids.contains("0-0"));
        assert_eq!(ex.truncated_bytes, r#"{"id":"1-0","prompt_in"#.len() as u64);
        f.write_all(b"x\n").unwrap();
        drop(f);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("\"a\"}\nx\n"), "{text}");
        // A file made from other prompts is refused.
        let other = parse_prompts("{\"prompt\": \"z\"}\n").0;
        std::fs::write(
            &path,
            "{\"id\":\"0-0\",\"prompt_index\":0,\"prompt\":\"a\"}\n",
        )
        .unwrap();
        assert!(open_output(&path, &other).is_err());
    }
}

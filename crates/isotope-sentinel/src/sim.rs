//! Traffic simulator: benign personas and harvesting strategies as usage events, with
//! ground-truth labels.
//!
//! Benign and harvesting accounts draw on the *same* prompt sources (GSM8K questions,
//! Self-Instruct tasks) — they differ in how they ask: pacing, follow-ups, templates,
//! paraphrases, request options, volume. Hard benign cases are built in on purpose:
//! developers who use logprobs and iterate on one prompt (template reuse, near
//! duplicates), students who always ask for step-by-step reasoning, and benign batch
//! jobs that send thousands of templated requests at a machine-regular pace.
//!
//! Prompts are split by item index ([`PromptSplit`]) so tuning and evaluation never
//! see the same questions. Completion token counts are synthesised (no model).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use isotope_store::UsageEvent;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Which items of the prompt sources a scenario may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSplit {
    /// Items with `index % 5 < 2` (40%): for training and threshold calibration.
    Tune,
    /// The other 60%: for evaluation.
    Eval,
    /// Everything.
    All,
}

impl PromptSplit {
    fn keeps(self, item: usize) -> bool {
        match self {
            PromptSplit::Tune => item % 5 < 2,
            PromptSplit::Eval => item % 5 >= 2,
            PromptSplit::All => true,
        }
    }
}

/// A harvesting strategy (the label of its accounts is [`Strategy::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fast, raw dataset prompts, long answers, often soft labels.
    Bulk,
    /// One or two prompt templates swept over many topics.
    TopicSweep,
    /// Each item asked several times in paraphrase, for diverse outputs.
    Paraphrase,
    /// Under the rate limits, around the clock, no logprobs.
    SlowLow,
    /// One harvest split across many keys (shared or rotating addresses).
    Sybil,
    /// Harvest requests mixed into an ordinary chat user's traffic.
    Cover,
    /// Soft labels on the cheap: short answers (`max_tokens` 1–64) with
    /// `logprobs` and `top_logprobs` 5–20 on nearly every request, raw dataset prompts,
    /// human-like pacing in waking hours. Little text, many distributions.
    SoftLabel,
    /// An ordinary chat user's account that also runs a slow soft-label harvest
    /// (short answers, top-k logprobs) a few requests an hour.
    SoftCover,
    /// A short, intense harvest by a script: a templated sweep or raw dataset items at
    /// 0.3–3 requests a second, hundreds to a few thousand requests, done within
    /// minutes to a few hours at any hour; usually with top-k logprobs, short-to-medium
    /// answers (`max_tokens` 16–512). Little persistence, much volume per minute.
    Burst,
}

impl Strategy {
    /// All strategies.
    pub const ALL: [Strategy; 9] = [
        Strategy::Bulk,
        Strategy::TopicSweep,
        Strategy::Paraphrase,
        Strategy::SlowLow,
        Strategy::Sybil,
        Strategy::Cover,
        Strategy::SoftLabel,
        Strategy::SoftCover,
        Strategy::Burst,
    ];

    /// The label string.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Bulk => "bulk",
            Strategy::TopicSweep => "topic_sweep",
            Strategy::Paraphrase => "paraphrase",
            Strategy::SlowLow => "slow_low",
            Strategy::Sybil => "sybil",
            Strategy::Cover => "cover",
            Strategy::SoftLabel => "soft_label",
            Strategy::SoftCover => "soft_cover",
            Strategy::Burst => "burst",
        }
    }
}

/// Benign population.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct BenignMix {
    /// People chatting: sessions, follow-ups, think times, diurnal.
    pub chat_users: usize,
    /// API developers: bursts of prompt iteration in working hours, some logprobs.
    pub developers: usize,
    /// Maths students: GSM8K questions, step by step, follow-ups.
    pub students: usize,
    /// Benign batch jobs: daily templated runs of hundreds of requests.
    pub batch_jobs: usize,
    /// Researchers running benchmark evaluations (GSM8K, Self-Instruct): bursts of
    /// short-answer requests, often with `logprobs`/`top_logprobs` (up to 20) or `n > 1`
    /// — benign accounts that look like soft-label harvesting for a while.
    pub evaluators: usize,
    /// Share of benign accounts behind a shared office address (groups of 3–30).
    pub office_share: f64,
}

impl Default for BenignMix {
    fn default() -> Self {
        BenignMix {
            chat_users: 960,
            developers: 150,
            students: 150,
            batch_jobs: 20,
            evaluators: 30,
            office_share: 0.08,
        }
    }
}

/// One harvesting population.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HarvestSpec {
    /// Strategy.
    pub strategy: Strategy,
    /// Accounts (for `sybil`: groups).
    pub accounts: usize,
    /// Keys (accounts) per Sybil group.
    #[serde(default = "default_keys")]
    pub keys_per_group: usize,
    /// Requests per account (per group for `sybil`), drawn uniformly in `[lo, hi]`.
    pub budget: [u32; 2],
    /// Requests per hour, drawn uniformly in `[lo, hi]`.
    pub rate_per_hour: [f64; 2],
}

fn default_keys() -> usize {
    20
}

/// A traffic scenario (TOML or JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Scenario {
    /// Name, for reports.
    pub name: String,
    /// Simulated duration.
    pub hours: f64,
    /// Start (ms since the epoch; midnight UTC keeps diurnal patterns readable).
    pub start_ms: i64,
    /// Which prompt items to use.
    pub prompt_split: PromptSplit,
    /// Data directory (default: `$ISOTOPE_DATA` or the workspace's `data/`).
    pub data_dir: Option<PathBuf>,
    /// Benign population.
    pub benign: BenignMix,
    /// Harvesters.
    pub harvest: Vec<HarvestSpec>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario::default_mixed()
    }
}

impl Scenario {
    /// The default mixed scenario over 48 hours on the evaluation prompt split:
    /// 1,310 benign accounts (about 1,050 active in the window) and nine harvesting
    /// strategies (124 harvesting accounts, 60 of them three Sybil groups of 20 keys).
    /// For a tight Clopper–Pearson bound on FPR, evaluate `scaled(3.0)` (about 3,150
    /// active benign accounts).
    pub fn default_mixed() -> Self {
        let h = |strategy, accounts, budget: [u32; 2], rate: [f64; 2]| HarvestSpec {
            strategy,
            accounts,
            keys_per_group: 20,
            budget,
            rate_per_hour: rate,
        };
        Scenario {
            name: "default_mixed".into(),
            hours: 48.0,
            start_ms: 1_699_920_000_000,
            prompt_split: PromptSplit::Eval,
            data_dir: None,
            benign: BenignMix::default(),
            harvest: vec![
                h(Strategy::Bulk, 8, [1500, 3000], [200.0, 1200.0]),
                h(Strategy::TopicSweep, 8, [1000, 2500], [100.0, 500.0]),
                h(Strategy::Paraphrase, 8, [800, 2000], [80.0, 300.0]),
                h(Strategy::SlowLow, 8, [300, 1500], [8.0, 30.0]),
                h(Strategy::Sybil, 3, [2000, 4000], [200.0, 800.0]),
                h(Strategy::Cover, 8, [60, 160], [2.0, 5.0]),
                h(Strategy::SoftLabel, 8, [400, 2000], [20.0, 90.0]),
                h(Strategy::SoftCover, 8, [100, 600], [4.0, 20.0]),
                h(Strategy::Burst, 8, [200, 3000], [1000.0, 10000.0]),
            ],
        }
    }

    /// The same mix on the tuning split: what the default model is trained and
    /// calibrated on (with other seeds than evaluation uses).
    pub fn training() -> Self {
        Scenario {
            name: "training".into(),
            prompt_split: PromptSplit::Tune,
            ..Scenario::default_mixed()
        }
    }

    /// A smaller copy (`factor` of the accounts, harvest budgets kept) for tests.
    pub fn scaled(mut self, factor: f64) -> Self {
        let s = |x: usize| ((x as f64 * factor).round() as usize).max(1);
        self.benign.chat_users = s(self.benign.chat_users);
        self.benign.developers = s(self.benign.developers);
        self.benign.students = s(self.benign.students);
        self.benign.batch_jobs = s(self.benign.batch_jobs);
        self.benign.evaluators = s(self.benign.evaluators);
        for h in &mut self.harvest {
            h.accounts = s(h.accounts);
        }
        self.name = format!("{}x{factor}", self.name);
        self
    }

    /// Parses TOML (or JSON when the text starts with `{`).
    pub fn parse(text: &str) -> Result<Self, SimError> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| SimError::Scenario(e.to_string()))
        } else {
            toml::from_str(text).map_err(|e| SimError::Scenario(e.to_string()))
        }
    }
}

/// Simulator errors.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A data file is missing or malformed.
    #[error("cannot read {path}: {why} (set ISOTOPE_DATA to the data directory)")]
    Data {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The scenario text is invalid.
    #[error("invalid scenario: {0}")]
    Scenario(String),
}

/// Events (in time order) and the ground truth per account: `"benign"` or a
/// strategy name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Simulated {
    /// Usage events, sorted by time.
    pub events: Vec<UsageEvent>,
    /// Account id → label.
    pub labels: BTreeMap<i64, String>,
}

/// One line of an events file: `{"event": UsageEvent, "label": "benign"|strategy}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabelledEvent {
    /// The usage event.
    pub event: UsageEvent,
    /// Ground truth of its account.
    pub label: String,
}

impl Simulated {
    /// The JSONL events file (one [`LabelledEvent`] per line).
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            let line = LabelledEvent {
                event: e.clone(),
                label: self.labels.get(&e.account_id).cloned().unwrap_or_default(),
            };
            out.push_str(&serde_json::to_string(&line).expect("events serialise"));
            out.push('\n');
        }
        out
    }

    /// Reads a JSONL events file; every account must carry one label.
    pub fn from_jsonl(text: &str) -> Result<Self, String> {
        let mut events = Vec::new();
        let mut labels = BTreeMap::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let le: LabelledEvent =
                serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
            if let Some(old) = labels.insert(le.event.account_id, le.label.clone()) {
                if old != le.label {
                    return Err(format!(
                        "line {}: account {} labelled both {old} and {}",
                        i + 1,
                        le.event.account_id,
                        le.label
                    ));
                }
            }
            events.push(le.event);
        }
        events.sort_by(|a, b| {
            (a.created_at_ms, a.account_id, &a.request_id).cmp(&(
                b.created_at_ms,
                b.account_id,
                &b.request_id,
            ))
        });
        Ok(Simulated { events, labels })
    }
}

// ---------------------------------------------------------------------------------
// prompt sources

#[derive(Clone, Debug)]
struct Pools {
    math: Vec<String>,
    tasks: Vec<String>,
    /// Self-Instruct instance inputs and GSM8K questions: raw material for batch jobs.
    inputs: Vec<String>,
}

#[derive(Deserialize)]
struct Gsm8k {
    question: String,
}

#[derive(Deserialize)]
struct Task {
    instruction: String,
    #[serde(default)]
    instances: Vec<Instance>,
}

#[derive(Deserialize)]
struct Instance {
    #[serde(default)]
    input: String,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, SimError> {
    let err = |why: String| SimError::Data {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| err(format!("line {}: {e}", i + 1))))
        .collect()
}

/// The data directory: `$ISOTOPE_DATA`, else the workspace's `data/`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("ISOTOPE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data")))
}

fn load_pools(dir: &Path, split: PromptSplit) -> Result<Pools, SimError> {
    let mut math = Vec::new();
    let mut inputs = Vec::new();
    for f in ["train", "test"] {
        let rows: Vec<Gsm8k> = read_jsonl(&dir.join("gsm8k").join(format!("{f}.jsonl")))?;
        for (i, r) in rows.into_iter().enumerate() {
            if split.keeps(i) {
                math.push(r.question);
            }
        }
    }
    let mut tasks = Vec::new();
    for f in ["user_oriented_instructions", "seed_tasks"] {
        let rows: Vec<Task> = read_jsonl(&dir.join("self-instruct").join(format!("{f}.jsonl")))?;
        for (i, r) in rows.into_iter().enumerate() {
            if !split.keeps(i) {
                continue;
            }
            let input = r
                .instances
                .first()
                .map(|x| x.input.trim().to_owned())
                .unwrap_or_default();
            if input.is_empty() {
                tasks.push(r.instruction.trim().to_owned());
            } else {
                tasks.push(format!("{}\n\n{}", r.instruction.trim(), input));
                inputs.push(input);
            }
        }
    }
    inputs.extend(math.iter().take(2000).cloned());
    Ok(Pools {
        math,
        tasks,
        inputs,
    })
}

// ---------------------------------------------------------------------------------
// randomness

struct Rng(ChaCha8Rng);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(stream);
        Rng(r)
    }
    fn f64(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.f64() * n as f64) as usize % n.max(1)
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }
    fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(1e-300);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).ln()
    }
    fn poisson(&mut self, lambda: f64) -> usize {
        let l = (-lambda).exp();
        let mut k = 0;
        let mut p = 1.0;
        loop {
            p *= self.f64();
            if p <= l || k > 1000 {
                return k;
            }
            k += 1;
        }
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

// ---------------------------------------------------------------------------------
// vocabulary of behaviours

const BROWSER_UAS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 Chrome/124.0 Mobile Safari/537.36",
];

const SDK_UAS: &[&str] = &[
    "OpenAI/Python 1.35.3",
    "OpenAI/Python 1.40.0",
    "OpenAI/NodeJS 4.52.0",
    "curl/8.5.0",
    "python-requests/2.31.0",
    "python-httpx/0.27.0",
];

const REASONING_SUFFIXES: &[&str] = &[
    "Please explain step by step.",
    "Show your work.",
    "Can you walk me through it?",
    "Let's think step by step.",
    "Explain your reasoning.",
];

/// Short-answer formats: benchmark evaluations use them, and so do soft-label
/// harvesters (a few tokens, each with its top-k distribution).
const SHORT_SUFFIXES: &[&str] = &[
    "Answer with the final number only.",
    "Reply with just the answer.",
    "Answer in one word.",
    "Give only the final answer, no explanation.",
    "Respond with a single short phrase.",
];

const FOLLOW_UPS: &[&str] = &[
    "Can you make it shorter?",
    "Thanks! Could you give me another example?",
    "Why is that?",
    "I don't get the second part, can you explain it differently?",
    "Can you rewrite that in a more formal tone?",
    "What if the numbers were doubled?",
    "ok and how would I do that in practice",
    "Can you explain that step by step?",
    "Is there a simpler way?",
    "great, now put it in a table",
    "Can you check my answer? I got 42.",
    "hmm that doesn't look right to me",
    "Translate that into Spanish please",
    "Summarize the above in two sentences.",
];

const DEV_EDITS: &[&str] = &[
    "",
    " Be concise.",
    " Answer in JSON.",
    " Use bullet points.",
    " Respond in under 50 words.",
    " You are a helpful assistant.",
    " Do not add explanations.",
];

const BATCH_TEMPLATES: &[(&str, [u32; 2])] = &[
    (
        "Classify the following message into one of: billing, technical, account, other. Reply with the label only.\n\n{x}",
        [2, 6],
    ),
    ("Summarize the following text in one sentence.\n\nText: {x}", [20, 60]),
    (
        "Extract every number mentioned in the text below and return them as a JSON list.\n\n{x}",
        [8, 40],
    ),
    ("Translate the following text into French.\n\n{x}", [40, 200]),
    (
        "Rate the difficulty of this problem from 1 to 5. Answer with a single digit.\n\n{x}",
        [1, 3],
    ),
];

const SWEEP_TEMPLATES: &[&str] = &[
    "You are a world-class expert. Give a thorough, detailed, high-quality answer to the following task, showing your reasoning step by step.\n\nTask: {x}",
    "Provide a comprehensive and well-structured response to the request below. Include explanations and examples.\n\n### Request\n{x}\n\n### Response",
    "Answer the following as an expert tutor would, explaining every step in detail:\n{x}",
    "Write an excellent, complete answer to this prompt. Be detailed and precise.\nPrompt: {x}",
    "{x}\n\nThink carefully and explain your reasoning in full before giving the final answer.",
];

const PARA_PREFIXES: &[&str] = &[
    "",
    "Could you help me with this? ",
    "Please answer: ",
    "Quick question. ",
    "I need help with the following. ",
    "Hey, ",
    "Can you solve this for me: ",
];

const SYNONYMS: &[(&str, &str)] = &[
    ("how many", "what number of"),
    ("explain", "describe"),
    ("write", "compose"),
    ("give", "provide"),
    ("make", "create"),
    ("find", "determine"),
    ("total", "overall"),
    ("each", "every"),
    ("buys", "purchases"),
    ("help", "assist"),
    ("short", "brief"),
    ("big", "large"),
    ("small", "little"),
    ("money", "cash"),
    ("friends", "pals"),
    ("wants", "would like"),
];

// ---------------------------------------------------------------------------------
// event construction

struct Req<'a> {
    chat: Option<&'a [(String, String)]>,
    plain: Option<&'a str>,
    max_tokens: Option<u32>,
    logprobs: bool,
    top_logprobs: Option<u32>,
    n: u32,
    temperature: Option<f32>,
    completion: u32,
}

struct Account {
    id: i64,
    key: String,
    addr: String,
    ua: String,
    user: Option<String>,
}

struct Builder {
    events: Vec<UsageEvent>,
    counter: u64,
    seed: u64,
}

impl Builder {
    fn push(&mut self, acc: &Account, t: f64, addr: Option<&str>, r: Req) {
        self.counter += 1;
        let (prompt, endpoint, turns, prompt_chars) = match (r.chat, r.plain) {
            (Some(msgs), _) => {
                let v: Vec<serde_json::Value> = msgs
                    .iter()
                    .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                    .collect();
                let chars: usize = msgs.iter().map(|(_, c)| c.len()).sum();
                let turns = msgs.iter().filter(|(r, _)| r == "user").count() as u32;
                (
                    serde_json::Value::Array(v).to_string(),
                    "/v1/chat/completions",
                    turns,
                    chars,
                )
            }
            (None, Some(p)) => (p.to_owned(), "/v1/completions", 1, p.len()),
            (None, None) => unreachable!("a request has a prompt"),
        };
        let completion = match r.max_tokens {
            Some(m) => r.completion.min(m),
            None => r.completion.min(4096),
        }
        .max(1);
        let prompt_hash = hex::encode(Sha256::digest(prompt.as_bytes()));
        self.events.push(UsageEvent {
            id: 0,
            request_id: format!("req_{:x}_{}", self.seed, self.counter),
            account_id: acc.id,
            api_key_id: acc.key.clone(),
            created_at_ms: t.round() as i64,
            endpoint: endpoint.into(),
            model: "smollm2-135m-instruct".into(),
            prompt_text: Some(prompt),
            prompt_hash,
            turns,
            completion_text: None,
            completion_hash: None,
            prompt_tokens: (prompt_chars / 4 + 8) as u32,
            completion_tokens: completion,
            n: r.n,
            logprobs: r.logprobs,
            top_logprobs: r.top_logprobs,
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            watermark_scheme: Some("kgw".into()),
            watermark_key_id: None,
            latency_ms: 20 + completion * 8,
            status: 200,
            finish_reason: Some("stop".into()),
            client_addr: Some(addr.unwrap_or(&acc.addr).to_owned()),
            user_agent: Some(acc.ua.clone()),
            user: acc.user.clone(),
            policy: None,
            partial: false,
        });
    }
}

/// Synthetic answer length: lognormal around a median that grows with requests for
/// reasoning or detail.
fn answer_len(rng: &mut Rng, median: f64) -> u32 {
    rng.lognormal(median, 0.5).clamp(1.0, 8192.0) as u32
}

const HOUR: f64 = 3_600_000.0;
const DAY: f64 = 86_400_000.0;

/// Relative weight of starting a session at each local hour: humans sleep.
const DIURNAL: [f64; 24] = [
    0.3, 0.15, 0.08, 0.05, 0.05, 0.1, 0.3, 0.7, 1.0, 1.2, 1.3, 1.3, 1.2, 1.3, 1.3, 1.2, 1.2, 1.1,
    1.1, 1.3, 1.4, 1.4, 1.1, 0.7,
];

fn diurnal_hour(rng: &mut Rng, weights: &[f64; 24]) -> f64 {
    let total: f64 = weights.iter().sum();
    let mut x = rng.f64() * total;
    for (h, w) in weights.iter().enumerate() {
        if x < *w {
            return h as f64 + rng.f64();
        }
        x -= w;
    }
    23.5
}

/// Session start times over the horizon for a person in time zone `tz` (hours).
fn session_starts(
    rng: &mut Rng,
    sc: &Scenario,
    per_day: f64,
    tz: f64,
    weights: &[f64; 24],
) -> Vec<f64> {
    let days = (sc.hours / 24.0).ceil() as usize + 1;
    let end = sc.start_ms as f64 + sc.hours * HOUR;
    let mut out = Vec::new();
    for d in 0..days {
        for _ in 0..rng.poisson(per_day) {
            let local = diurnal_hour(rng, weights);
            let t = sc.start_ms as f64 + d as f64 * DAY + (local - tz) * HOUR;
            if t >= sc.start_ms as f64 && t < end {
                out.push(t);
            }
        }
    }
    out.sort_by(|a, b| a.total_cmp(b));
    out
}

fn with_reasoning(rng: &mut Rng, q: &str) -> String {
    format!("{q} {}", rng.pick(REASONING_SUFFIXES))
}

fn paraphrase(rng: &mut Rng, text: &str) -> String {
    let mut s = text.to_owned();
    for (a, b) in SYNONYMS {
        if rng.chance(0.6) {
            s = s.replace(a, b);
        }
    }
    if rng.chance(0.3) {
        s = s.to_lowercase();
    }
    if rng.chance(0.3) {
        s = s.replace(['?', '.'], "");
    }
    format!("{}{s}", rng.pick(PARA_PREFIXES))
}

// ---------------------------------------------------------------------------------
// personas

#[derive(Clone, Copy, PartialEq)]
enum Persona {
    Chat,
    Developer,
    Student,
    Batch,
    Evaluator,
}

struct Ctx<'a> {
    sc: &'a Scenario,
    pools: &'a Pools,
}

impl Ctx<'_> {
    fn end(&self) -> f64 {
        self.sc.start_ms as f64 + self.sc.hours * HOUR
    }

    /// A personal subset of the pool: people return to a few topics.
    fn interests(&self, rng: &mut Rng, math_share: f64, size: usize) -> Vec<String> {
        (0..size)
            .map(|_| {
                if rng.chance(math_share) {
                    rng.pick(&self.pools.math).clone()
                } else {
                    rng.pick(&self.pools.tasks).clone()
                }
            })
            .collect()
    }
}

/// Request options some chat front-ends set: alternatives (`n > 1`) or token
/// confidences (`logprobs`).
#[derive(Default)]
struct ChatExtras {
    /// Share of requests asking for 2–3 alternatives.
    p_n: f64,
    /// Share of requests asking for logprobs (when `top_logprobs` is set).
    p_logprobs: f64,
    /// `top_logprobs` asked for.
    top_logprobs: Option<u32>,
}

/// A conversation session: a first question, then follow-ups after think times.
#[allow(clippy::too_many_arguments)]
fn chat_session(
    b: &mut Builder,
    rng: &mut Rng,
    acc: &Account,
    mut t: f64,
    first: String,
    follow_ups: usize,
    max_tokens: Option<u32>,
    median_answer: f64,
    end: f64,
    extras: &ChatExtras,
) -> f64 {
    let mut msgs = vec![("user".to_string(), first)];
    for i in 0..=follow_ups {
        if t >= end {
            break;
        }
        let completion = answer_len(rng, median_answer);
        let lp = extras.top_logprobs.is_some() && rng.chance(extras.p_logprobs);
        let n = if rng.chance(extras.p_n) {
            2 + rng.below(2) as u32
        } else {
            1
        };
        b.push(
            acc,
            t,
            None,
            Req {
                chat: Some(&msgs),
                plain: None,
                max_tokens,
                logprobs: lp,
                top_logprobs: if lp { extras.top_logprobs } else { None },
                n,
                temperature: Some(0.7),
                completion,
            },
        );
        // read the answer, think, type
        t += 2_000.0 + completion as f64 * 60.0 + rng.lognormal(35_000.0, 0.8);
        if i < follow_ups {
            msgs.push(("assistant".into(), "…".into()));
            msgs.push(("user".into(), rng.pick(FOLLOW_UPS).to_string()));
        }
    }
    t
}

fn benign_account(ctx: &Ctx, b: &mut Builder, rng: &mut Rng, acc: &Account, persona: Persona) {
    let end = ctx.end();
    let tz = (rng.below(18) as f64) - 8.0;
    match persona {
        Persona::Chat | Persona::Student => {
            let student = persona == Persona::Student;
            let math_share = if student { 0.9 } else { rng.uniform(0.0, 0.4) };
            let interests = ctx.interests(rng, math_share, 40);
            let per_day = rng
                .lognormal(if student { 1.2 } else { 1.0 }, 0.7)
                .min(10.0);
            let p_reason = if student { 0.6 } else { rng.uniform(0.0, 0.2) };
            // some people want long-form writing: large max_tokens, long answers
            let long_form = !student && rng.chance(0.1);
            let max_tokens = if long_form {
                *rng.pick(&[Some(2048), Some(4096), None])
            } else if rng.chance(0.4) {
                Some(*rng.pick(&[256, 512, 1024, 2048, 4096]))
            } else {
                None
            };
            // front-ends that show alternatives (n > 1) or token confidences (logprobs)
            let extras = ChatExtras {
                p_n: if rng.chance(0.08) {
                    rng.uniform(0.1, 0.6)
                } else {
                    0.0
                },
                p_logprobs: rng.uniform(0.3, 1.0),
                top_logprobs: rng.chance(0.03).then(|| *rng.pick(&[1, 3, 5])),
            };
            let mut weights = DIURNAL;
            if student {
                for w in weights.iter_mut().skip(16) {
                    *w *= 1.8;
                }
            }
            for start in session_starts(rng, ctx.sc, per_day, tz, &weights) {
                let mut t = start;
                let conversations = 1 + rng.poisson(0.4);
                for _ in 0..conversations {
                    let q = rng.pick(&interests).clone();
                    let q = if rng.chance(p_reason) {
                        with_reasoning(rng, &q)
                    } else {
                        q
                    };
                    let k = (rng.exp(if student { 2.0 } else { 1.3 }) as usize).min(8);
                    let median = if student {
                        220.0
                    } else if long_form {
                        550.0
                    } else {
                        180.0
                    };
                    t = chat_session(b, rng, acc, t, q, k, max_tokens, median, end, &extras);
                    t += rng.lognormal(60_000.0, 1.0);
                }
            }
        }
        Persona::Developer => {
            let interests = ctx.interests(rng, 0.2, 12);
            let uses_logprobs = rng.chance(0.35);
            let uses_n = rng.chance(0.15);
            let per_day = rng.lognormal(1.0, 0.6).min(6.0);
            let mut weights = [0.05; 24];
            weights.iter_mut().take(19).skip(9).for_each(|w| *w = 1.0);
            for start in session_starts(rng, ctx.sc, per_day, tz, &weights) {
                let mut t = start;
                let base = rng.pick(&interests).clone();
                let iterations = 3 + rng.below(28);
                let max_tokens = Some(*rng.pick(&[128, 256, 512, 1024, 2048]));
                for _ in 0..iterations {
                    if t >= end {
                        break;
                    }
                    let prompt = format!("{base}{}", rng.pick(DEV_EDITS));
                    let lp = uses_logprobs && rng.chance(0.6);
                    let chat = rng.chance(0.5);
                    let msgs = [("user".to_string(), prompt.clone())];
                    b.push(
                        acc,
                        t,
                        None,
                        Req {
                            chat: chat.then_some(&msgs[..]),
                            plain: (!chat).then_some(prompt.as_str()),
                            max_tokens,
                            logprobs: lp,
                            top_logprobs: lp.then(|| *rng.pick(&[1, 3, 5, 10, 20])),
                            n: if uses_n && rng.chance(0.3) {
                                2 + rng.below(3) as u32
                            } else {
                                1
                            },
                            temperature: Some(*rng.pick(&[0.0, 0.2, 0.7, 1.0])),
                            completion: answer_len(rng, 150.0),
                        },
                    );
                    t += rng.lognormal(40_000.0, 0.9);
                }
            }
        }
        Persona::Batch => {
            let (template, len) = *rng.pick(BATCH_TEMPLATES);
            let hour = rng.uniform(0.0, 24.0);
            let items = 150 + rng.below(1200);
            let logprobs = rng.chance(0.3);
            let gap = rng.uniform(1_000.0, 4_000.0);
            let offset = rng.below(ctx.pools.inputs.len());
            let mut day = 0.0;
            loop {
                let mut t = ctx.sc.start_ms as f64 + day * DAY + hour * HOUR;
                if t >= end {
                    break;
                }
                for i in 0..items {
                    if t >= end {
                        break;
                    }
                    let x = &ctx.pools.inputs[(offset + i) % ctx.pools.inputs.len()];
                    let prompt = template.replace("{x}", x);
                    b.push(
                        acc,
                        t,
                        None,
                        Req {
                            chat: None,
                            plain: Some(&prompt),
                            max_tokens: Some(if len[1] > 100 { 512 } else { 64 }),
                            logprobs,
                            top_logprobs: logprobs.then_some(5),
                            n: 1,
                            temperature: Some(0.0),
                            completion: rng.uniform(len[0] as f64, len[1] as f64 + 1.0) as u32,
                        },
                    );
                    t += gap * rng.uniform(0.8, 1.2);
                }
                day += 1.0;
            }
        }
        Persona::Evaluator => {
            // benchmark runs: a contiguous slice of one source in one prompt format,
            // started in working hours, sent sequentially by a script
            let math = rng.chance(0.7);
            let pool = if math {
                &ctx.pools.math
            } else {
                &ctx.pools.tasks
            };
            let cot = rng.chance(0.3);
            let suffix = if cot {
                *rng.pick(REASONING_SUFFIXES)
            } else {
                *rng.pick(SHORT_SUFFIXES)
            };
            let max_tokens = if cot {
                *rng.pick(&[256, 512, 1024])
            } else {
                *rng.pick(&[1, 4, 8, 16, 32, 64])
            };
            let top_k = rng.chance(0.5).then(|| *rng.pick(&[1, 5, 10, 20]));
            let n = if rng.chance(0.15) {
                *rng.pick(&[4, 5, 8])
            } else {
                1
            };
            let items = 50 + rng.below(450);
            let runs = 1 + rng.below(3);
            let same_items = rng.chance(0.5);
            let gap = rng.uniform(300.0, 4_000.0);
            let chat = rng.chance(0.6);
            let days = (ctx.sc.hours / 24.0).ceil().max(1.0) as usize;
            let mut offset = rng.below(pool.len());
            for _ in 0..runs {
                let local = rng.uniform(9.0, 20.0);
                let mut t = ctx.sc.start_ms as f64
                    + rng.below(days) as f64 * DAY
                    + (local - tz).rem_euclid(24.0) * HOUR;
                for i in 0..items {
                    if t >= end {
                        break;
                    }
                    let prompt = format!("{}\n\n{suffix}", pool[(offset + i) % pool.len()]);
                    let msgs = [("user".to_string(), prompt.clone())];
                    let completion = if cot {
                        answer_len(rng, 200.0)
                    } else {
                        answer_len(rng, 6.0)
                    };
                    b.push(
                        acc,
                        t,
                        None,
                        Req {
                            chat: chat.then_some(&msgs[..]),
                            plain: (!chat).then_some(prompt.as_str()),
                            max_tokens: Some(max_tokens),
                            logprobs: top_k.is_some(),
                            top_logprobs: top_k,
                            n,
                            temperature: Some(if n > 1 { 0.7 } else { 0.0 }),
                            completion,
                        },
                    );
                    t += rng.lognormal(gap, 0.3) + completion as f64 * 8.0;
                }
                if !same_items {
                    offset = rng.below(pool.len());
                }
            }
        }
    }
}

/// Per-account harvester parameters.
struct Harvest {
    rate: f64,
    budget: usize,
    logprobs: bool,
    top_k: u32,
    n: u32,
    templates: Vec<&'static str>,
    max_tokens: Option<u32>,
    /// Share of requests dressed up as a follow-up in a conversation.
    fake_turns: f64,
    /// (burst) prompts go through the templates rather than raw.
    templated: bool,
}

impl Harvest {
    fn draw(rng: &mut Rng, spec: &HarvestSpec) -> Self {
        let soft = matches!(spec.strategy, Strategy::SoftLabel | Strategy::SoftCover);
        let logprobs = match spec.strategy {
            Strategy::Bulk => rng.chance(0.5),
            Strategy::TopicSweep | Strategy::Paraphrase | Strategy::Sybil => rng.chance(0.3),
            Strategy::SlowLow | Strategy::Cover => false,
            Strategy::SoftLabel | Strategy::SoftCover => true,
            Strategy::Burst => rng.chance(0.7),
        };
        let templates = (0..1 + rng.below(2))
            .map(|_| *rng.pick(SWEEP_TEMPLATES))
            .collect();
        // burst: a templated sweep or raw items (drawn only for bursts, so the other
        // strategies' random streams are unchanged)
        let templated = spec.strategy == Strategy::Burst && rng.chance(0.5);
        Harvest {
            rate: rng.uniform(spec.rate_per_hour[0], spec.rate_per_hour[1]),
            budget: rng.uniform(spec.budget[0] as f64, spec.budget[1] as f64 + 1.0) as usize,
            logprobs,
            top_k: if soft || spec.strategy == Strategy::Burst {
                *rng.pick(&[5, 10, 20, 20])
            } else {
                *rng.pick(&[5, 10, 20])
            },
            n: if spec.strategy == Strategy::Bulk && rng.chance(0.2) {
                4
            } else {
                1
            },
            templates,
            // many harvesters leave max_tokens unset (the server default applies)
            max_tokens: if soft {
                Some(*rng.pick(&[1, 2, 4, 8, 16, 32, 64]))
            } else if spec.strategy == Strategy::Burst {
                Some(*rng.pick(&[16, 32, 64, 64, 128, 256, 512]))
            } else if rng.chance(if spec.strategy == Strategy::SlowLow {
                0.5
            } else {
                0.3
            }) {
                None
            } else {
                Some(*rng.pick(&[1024, 2048, 4096]))
            },
            fake_turns: if matches!(spec.strategy, Strategy::SlowLow | Strategy::SoftLabel) {
                rng.uniform(0.0, 0.3)
            } else if spec.strategy == Strategy::Burst {
                // a script at 0.3–3 requests a second does not fake conversations (and
                // "a follow-up seconds after the answer" would give it away at once)
                0.0
            } else {
                rng.uniform(0.0, 0.2)
            },
            templated,
        }
    }

    /// The `i`-th harvest prompt (strategy-specific), drawn from the pool in order.
    fn prompt(
        &self,
        rng: &mut Rng,
        strategy: Strategy,
        pools: &Pools,
        i: usize,
        order: &[usize],
    ) -> (String, f64) {
        let total = pools.math.len() + pools.tasks.len();
        let idx = order[i % order.len()] % total;
        let item = if idx < pools.math.len() {
            pools.math[idx].clone()
        } else {
            pools.tasks[idx - pools.math.len()].clone()
        };
        let is_math = idx < pools.math.len();
        match strategy {
            Strategy::TopicSweep => {
                let t = self.templates[i % self.templates.len()];
                (t.replace("{x}", &item), 520.0)
            }
            Strategy::Burst if self.templated => {
                let t = self.templates[i % self.templates.len()];
                (t.replace("{x}", &item), 520.0)
            }
            Strategy::Sybil if self.templates.len() > 1 => {
                (self.templates[0].replace("{x}", &item), 520.0)
            }
            // raw items, half of them with a short-answer instruction; the answer is
            // cut at max_tokens anyway
            Strategy::SoftLabel | Strategy::SoftCover => {
                if rng.chance(0.5) {
                    (format!("{item}\n\n{}", rng.pick(SHORT_SUFFIXES)), 40.0)
                } else {
                    (item, 250.0)
                }
            }
            _ => {
                let q = if is_math && rng.chance(0.5) {
                    with_reasoning(rng, &item)
                } else {
                    item
                };
                (
                    q,
                    if strategy == Strategy::Bulk {
                        420.0
                    } else {
                        320.0
                    },
                )
            }
        }
    }
}

fn harvest_account(ctx: &Ctx, b: &mut Builder, rng: &mut Rng, acc: &Account, spec: &HarvestSpec) {
    let h = Harvest::draw(rng, spec);
    let end = ctx.end();
    let total = ctx.pools.math.len() + ctx.pools.tasks.len();
    let offset = rng.below(total);
    let order: Vec<usize> = (0..total).map(|i| (offset + i * 7919) % total).collect();
    let mut t = ctx.sc.start_ms as f64 + rng.uniform(0.0, 0.4) * ctx.sc.hours * HOUR;
    let mean_gap = HOUR / h.rate.max(0.1);
    match spec.strategy {
        Strategy::Cover | Strategy::SoftCover => {
            // an ordinary chat user…
            benign_account(ctx, b, rng, acc, Persona::Chat);
            // …who also harvests a few requests an hour in waking hours
            let style = if spec.strategy == Strategy::Cover {
                Strategy::Bulk
            } else {
                Strategy::SoftLabel
            };
            let mut i = 0;
            while t < end && i < h.budget {
                let local = ((t - ctx.sc.start_ms as f64) / HOUR).rem_euclid(24.0);
                if (7.0..23.0).contains(&local) {
                    let (p, median) = h.prompt(rng, style, ctx.pools, i, &order);
                    let msgs = vec![("user".to_string(), p)];
                    b.push(acc, t, None, harvest_req(rng, &h, &msgs, true, median));
                    i += 1;
                }
                t += rng.exp(mean_gap);
            }
        }
        _ => {
            let mut i = 0;
            let active_hours = match spec.strategy {
                Strategy::SlowLow => rng.uniform(14.0, 24.0),
                // a person at a keyboard (or a script made to look like one)
                Strategy::SoftLabel => rng.uniform(10.0, 18.0),
                _ => 24.0,
            };
            let sleep_from = rng.uniform(0.0, 24.0);
            while t < end && i < h.budget {
                let local = ((t - ctx.sc.start_ms as f64) / HOUR - sleep_from).rem_euclid(24.0);
                if local >= active_hours {
                    t += (24.0 - local) * HOUR + 60_000.0;
                    continue;
                }
                let (p, median) = h.prompt(
                    rng,
                    spec.strategy,
                    ctx.pools,
                    i / para_repeats(spec.strategy),
                    &order,
                );
                let p = if spec.strategy == Strategy::Paraphrase {
                    paraphrase(rng, &p)
                } else {
                    p
                };
                let msgs = dress(rng, &h, p);
                let chat = msgs.len() > 1 || rng.chance(0.7);
                b.push(acc, t, None, harvest_req(rng, &h, &msgs, chat, median));
                i += 1;
                t += match spec.strategy {
                    // human-looking jitter around the mean
                    Strategy::SlowLow => rng.lognormal(mean_gap, 0.6),
                    Strategy::SoftLabel => rng.lognormal(mean_gap, 0.8),
                    _ => mean_gap * rng.uniform(0.5, 1.5),
                };
            }
        }
    }
}

/// A harvest prompt, sometimes wrapped as the second turn of a made-up conversation
/// (so "never multi-turn" is not a giveaway).
fn dress(rng: &mut Rng, h: &Harvest, p: String) -> Vec<(String, String)> {
    if rng.chance(h.fake_turns) {
        vec![
            ("user".to_string(), "Hi!".to_string()),
            (
                "assistant".to_string(),
                "Hello! How can I help?".to_string(),
            ),
            ("user".to_string(), p),
        ]
    } else {
        vec![("user".to_string(), p)]
    }
}

fn para_repeats(s: Strategy) -> usize {
    if s == Strategy::Paraphrase {
        3
    } else {
        1
    }
}

fn harvest_req<'a>(
    rng: &mut Rng,
    h: &Harvest,
    msgs: &'a [(String, String)],
    chat: bool,
    median: f64,
) -> Req<'a> {
    let lp = h.logprobs && rng.chance(0.9);
    Req {
        chat: chat.then_some(msgs),
        plain: (!chat).then_some(msgs[0].1.as_str()),
        max_tokens: h.max_tokens,
        logprobs: lp,
        top_logprobs: lp.then_some(h.top_k),
        n: h.n,
        temperature: Some(*rng.pick(&[0.0, 0.7, 1.0])),
        completion: answer_len(rng, median),
    }
}

fn sybil_group(ctx: &Ctx, b: &mut Builder, rng: &mut Rng, accs: &[Account], spec: &HarvestSpec) {
    let h = Harvest::draw(rng, spec);
    let end = ctx.end();
    let total = ctx.pools.math.len() + ctx.pools.tasks.len();
    let offset = rng.below(total);
    let order: Vec<usize> = (0..total).map(|i| (offset + i * 7919) % total).collect();
    let rotating = rng.chance(0.5);
    let net = format!(
        "{}.{}.{}",
        20 + rng.below(200),
        rng.below(256),
        rng.below(256)
    );
    let shared: Vec<String> = (0..3).map(|i| format!("{net}.{}", 10 + i)).collect();
    let mut t = ctx.sc.start_ms as f64 + rng.uniform(0.0, 0.4) * ctx.sc.hours * HOUR;
    let mean_gap = HOUR / h.rate.max(0.1);
    let mut i = 0;
    while t < end && i < h.budget {
        let acc = &accs[rng.below(accs.len())];
        let addr = if rotating {
            format!("{net}.{}", 1 + rng.below(254))
        } else {
            rng.pick(&shared).clone()
        };
        let (p, median) = h.prompt(rng, Strategy::Sybil, ctx.pools, i, &order);
        let msgs = dress(rng, &h, p);
        let chat = msgs.len() > 1 || rng.chance(0.7);
        b.push(
            acc,
            t,
            Some(&addr),
            harvest_req(rng, &h, &msgs, chat, median),
        );
        i += 1;
        t += mean_gap * rng.uniform(0.5, 1.5);
    }
}

/// Simulates a scenario. The same `(scenario, seed)` always gives the same events.
pub fn simulate(sc: &Scenario, seed: u64) -> Result<Simulated, SimError> {
    let dir = sc.data_dir.clone().unwrap_or_else(default_data_dir);
    let pools = load_pools(&dir, sc.prompt_split)?;
    if pools.math.is_empty() || pools.tasks.is_empty() {
        return Err(SimError::Scenario(
            "the prompt split left no prompts".into(),
        ));
    }
    let ctx = Ctx { sc, pools: &pools };
    let mut rng = Rng::new(seed, 0);
    let mut b = Builder {
        events: Vec::new(),
        counter: 0,
        seed,
    };
    let mut labels = BTreeMap::new();

    // account slots: (persona or strategy), shuffled ids so ids carry no label
    enum Who {
        Benign(Persona),
        Harvest(usize),
        Sybil(usize),
    }
    let mut who = Vec::new();
    for (p, n) in [
        (Persona::Chat, sc.benign.chat_users),
        (Persona::Developer, sc.benign.developers),
        (Persona::Student, sc.benign.students),
        (Persona::Batch, sc.benign.batch_jobs),
        (Persona::Evaluator, sc.benign.evaluators),
    ] {
        who.extend((0..n).map(|_| Who::Benign(p)));
    }
    for (hi, h) in sc.harvest.iter().enumerate() {
        if h.strategy == Strategy::Sybil {
            who.extend((0..h.accounts * h.keys_per_group.max(1)).map(|_| Who::Sybil(hi)));
        } else {
            who.extend((0..h.accounts).map(|_| Who::Harvest(hi)));
        }
    }
    let mut ids: Vec<i64> = (1..=who.len() as i64).collect();
    for i in (1..ids.len()).rev() {
        let j = rng.below(i + 1);
        ids.swap(i, j);
    }
    let mk = |rng: &mut Rng, id: i64, ua: String| Account {
        id,
        key: format!(
            "ik_{:012x}",
            crate::sketch::mix64(id as u64 ^ seed) & 0xffff_ffff_ffff
        ),
        addr: format!(
            "{}.{}.{}.{}",
            1 + rng.below(223),
            rng.below(256),
            rng.below(256),
            1 + rng.below(254)
        ),
        ua,
        user: None,
    };
    // offices: groups of benign accounts behind one address with one browser build
    let mut office: Option<(String, String, usize)> = None;
    let mut sybil_members: BTreeMap<usize, Vec<Account>> = BTreeMap::new();
    for (k, w) in who.iter().enumerate() {
        let id = ids[k];
        let mut arng = Rng::new(seed, 1 + k as u64);
        match w {
            Who::Benign(p) => {
                let ua = match p {
                    Persona::Developer | Persona::Evaluator => arng.pick(SDK_UAS).to_string(),
                    Persona::Batch => arng.pick(&SDK_UAS[3..]).to_string(),
                    _ => arng.pick(BROWSER_UAS).to_string(),
                };
                let mut acc = mk(&mut arng, id, ua);
                if *p != Persona::Batch && arng.chance(sc.benign.office_share) {
                    let o = office.get_or_insert_with(|| {
                        (acc.addr.clone(), acc.ua.clone(), 3 + arng.below(28))
                    });
                    acc.addr = o.0.clone();
                    acc.ua = o.1.clone();
                    o.2 -= 1;
                    if o.2 == 0 {
                        office = None;
                    }
                }
                benign_account(&ctx, &mut b, &mut arng, &acc, *p);
                labels.insert(id, "benign".to_string());
            }
            Who::Harvest(hi) => {
                let spec = &sc.harvest[*hi];
                let browser = match spec.strategy {
                    Strategy::Cover | Strategy::SoftCover => 1.0,
                    Strategy::SoftLabel => 0.4,
                    _ => 0.3,
                };
                let ua = if arng.chance(browser) {
                    arng.pick(BROWSER_UAS).to_string()
                } else {
                    arng.pick(SDK_UAS).to_string()
                };
                let acc = mk(&mut arng, id, ua);
                harvest_account(&ctx, &mut b, &mut arng, &acc, spec);
                labels.insert(id, spec.strategy.as_str().to_string());
            }
            Who::Sybil(hi) => {
                let members = sybil_members.entry(*hi).or_default();
                let group = members.len() / sc.harvest[*hi].keys_per_group.max(1);
                let mut grng = Rng::new(seed ^ 0x5b11, (*hi * 1000 + group) as u64);
                let ua = if grng.chance(0.5) {
                    format!("python-httpx/0.{}.{}", 20 + grng.below(8), grng.below(10))
                } else {
                    grng.pick(SDK_UAS).to_string()
                };
                members.push(mk(&mut arng, id, ua));
                labels.insert(id, Strategy::Sybil.as_str().to_string());
            }
        }
    }
    for (hi, members) in sybil_members {
        let spec = &sc.harvest[hi];
        for (g, group) in members.chunks(spec.keys_per_group.max(1)).enumerate() {
            let mut grng = Rng::new(seed ^ 0x5b12, (hi * 1000 + g) as u64);
            sybil_group(&ctx, &mut b, &mut grng, group, spec);
        }
    }
    let end = sc.start_ms + (sc.hours * HOUR) as i64;
    let mut events: Vec<UsageEvent> = b
        .events
        .into_iter()
        .filter(|e| e.created_at_ms < end)
        .collect();
    events.sort_by(|a, b| {
        (a.created_at_ms, a.account_id, &a.request_id).cmp(&(
            b.created_at_ms,
            b.account_id,
            &b.request_id,
        ))
    });
    // accounts with no events in the window carry no label
    let active: std::collections::HashSet<i64> = events.iter().map(|e| e.account_id).collect();
    labels.retain(|id, _| active.contains(id));
    Ok(Simulated { events, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_round_trips_through_toml_and_json() {
        let sc = Scenario::default_mixed();
        let t = toml::to_string(&sc).unwrap();
        let back = Scenario::parse(&t).unwrap();
        assert_eq!(back.harvest.len(), sc.harvest.len());
        let j = serde_json::to_string(&sc).unwrap();
        assert_eq!(Scenario::parse(&j).unwrap().benign.chat_users, 960);
        assert!(Scenario::parse("hours = 'x'").is_err());
    }

    #[test]
    fn splits_are_disjoint() {
        for i in 0..100 {
            assert_ne!(PromptSplit::Tune.keeps(i), PromptSplit::Eval.keeps(i));
        }
    }
}

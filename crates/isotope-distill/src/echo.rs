//! A model's top-1 prediction along a given text, read through an OpenAI-compatible
//! API: legacy `/v1/completions` with `echo` and `logprobs` returns, at every
//! position of the prompt, the model's most likely next tokens given the prompt so
//! far. That is exactly what a reading-mode audit asks of a suspect whose weights it
//! does not have — so a suspect that exposes prompt log-probs (vLLM, llama.cpp's
//! server, `isotope serve --allow-echo-logprobs`, …) can be audited with
//! reading-mode power rather than black-box power.
//!
//! The prompt is sent as token ids (no re-tokenization: the audit's windows are the
//! ids it sent) followed by one filler token, so that the echoed top list at the
//! filler gives the prediction after the last real token — the engine's white-box
//! reader uses the same trick. Returned pieces are mapped back to ids with a
//! [`PieceMap`]; a piece several ids share, or one the map does not know, gives no
//! prediction (the audit spends that window and scores nothing).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{DistillError, Result};
use crate::harvest::{default_model, endpoint_urls, error_message, retry_after, retryable_status};

/// The filler token sent after each piece (its own log-prob is never read). Id 0
/// exists in every vocabulary.
pub const FILLER: u32 = 0;

/// Token pieces as an API prints them, back to token ids.
pub struct PieceMap {
    texts: Vec<String>,
    ids: HashMap<String, Option<u32>>,
}

impl PieceMap {
    /// `texts[id]`: how the API prints token `id` (for `isotope serve` and llama.cpp's
    /// server, the token's piece decoded lossily as UTF-8).
    pub fn new(texts: Vec<String>) -> Self {
        let mut ids: HashMap<String, Option<u32>> = HashMap::with_capacity(texts.len());
        for (id, t) in texts.iter().enumerate() {
            ids.entry(t.clone())
                .and_modify(|v| *v = None)
                .or_insert(Some(id as u32));
        }
        Self { texts, ids }
    }

    /// The id a printed piece stands for: `None` when no token or several print so.
    /// vLLM's `token_id:N` form (`return_tokens_as_token_ids`) is read as id `N`.
    pub fn id(&self, piece: &str) -> Option<u32> {
        if let Some(n) = piece.strip_prefix("token_id:") {
            return n
                .parse()
                .ok()
                .filter(|&n: &u32| (n as usize) < self.texts.len());
        }
        self.ids.get(piece).copied().flatten()
    }

    /// Whether `piece` is how token `id` prints.
    fn matches(&self, piece: &str, id: u32) -> bool {
        match piece.strip_prefix("token_id:") {
            Some(n) => n.parse::<u32>().ok() == Some(id),
            None => self.texts.get(id as usize).is_some_and(|t| t == piece),
        }
    }
}

/// What one echoed response says about a piece of text.
#[derive(Clone, Debug, PartialEq)]
pub struct EchoReading {
    /// Entry `i`: the model's top-1 after `piece[..=i]`; `None` when the API's top
    /// piece does not name one id.
    pub predictions: Vec<Option<u32>>,
    /// Entry `i`: every entry of the API's top list after `piece[..=i]` that names one
    /// id, with its natural-log probability (the mass reading's candidates), in the
    /// order printed.
    pub top: Vec<Vec<(u32, f32)>>,
    /// Tokens the API prepended to the prompt (e.g. a BOS): 0 or 1.
    pub offset: usize,
}

/// Read the top-1 predictions for `piece` out of a completions response to the prompt
/// `piece + [FILLER]` sent with `echo` and `logprobs ≥ 1`. Errors (as text) when the
/// response has no prompt log-probs, or when its echoed tokens are not the ones sent —
/// the suspect then tokenizes differently, and its predictions would be about other
/// windows.
pub fn parse_echo(
    body: &Value,
    piece: &[u32],
    map: &PieceMap,
) -> std::result::Result<EchoReading, String> {
    let lp = body
        .pointer("/choices/0/logprobs")
        .filter(|v| !v.is_null())
        .ok_or("the response has no `logprobs` (does the API support `echo` with `logprobs`?)")?;
    let tokens = lp
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or("the response's `logprobs` has no `tokens`")?;
    let tops = lp
        .get("top_logprobs")
        .and_then(Value::as_array)
        .ok_or("the response's `logprobs` has no `top_logprobs`")?;
    let sent: Vec<u32> = piece.iter().copied().chain([FILLER]).collect();
    // Which offset lines the echoed tokens up with the ones sent (a server may prepend
    // a BOS); the best of 0 and 1, and it must account for nearly every token (a
    // server may print a piece that is not valid UTF-8 its own way).
    let agree = |offset: usize| {
        sent.iter()
            .enumerate()
            .filter(|&(i, &id)| {
                tokens
                    .get(offset + i)
                    .and_then(Value::as_str)
                    .is_some_and(|p| map.matches(p, id))
            })
            .count()
    };
    let (offset, matched) = [0, 1]
        .into_iter()
        .map(|o| (o, agree(o)))
        .max_by_key(|&(o, n)| (n, std::cmp::Reverse(o)))
        .expect("two offsets");
    if matched * 100 < sent.len() * 95 {
        return Err(format!(
            "the echoed prompt is not the {} tokens sent (only {matched} agree): the suspect \
             does not use the watermarking model's tokenizer, or does not echo token-id prompts",
            sent.len()
        ));
    }
    if tops.len() < offset + sent.len() {
        return Err(format!(
            "the response has {} `top_logprobs` entries for a prompt of {} tokens (does the \
             API return prompt log-probs with `echo`?)",
            tops.len(),
            sent.len()
        ));
    }
    let predictions = (0..piece.len())
        .map(|i| top1(&tops[offset + i + 1], map))
        .collect();
    let top = (0..piece.len())
        .map(|i| listed(&tops[offset + i + 1], map))
        .collect();
    Ok(EchoReading {
        predictions,
        top,
        offset,
    })
}

/// Every entry of one `top_logprobs` object that names one id, with its log-prob.
fn listed(entry: &Value, map: &PieceMap) -> Vec<(u32, f32)> {
    let Some(obj) = entry.as_object() else {
        return Vec::new();
    };
    obj.iter()
        .filter_map(|(p, v)| Some((map.id(p)?, v.as_f64()? as f32)))
        .collect()
}

/// The id of the most likely entry of one `top_logprobs` object (ties: the lowest id,
/// the white-box readers' rule); `None` if it is empty, null, or names no single id.
fn top1(entry: &Value, map: &PieceMap) -> Option<u32> {
    let obj = entry.as_object()?;
    let best = obj
        .values()
        .filter_map(Value::as_f64)
        .fold(f64::NEG_INFINITY, f64::max);
    if !best.is_finite() {
        return None;
    }
    let ids = obj
        .iter()
        .filter(|(_, v)| v.as_f64() == Some(best))
        .map(|(p, _)| map.id(p));
    // Every piece at the top must name an id; of those, the lowest.
    let mut low: Option<u32> = None;
    for id in ids {
        let id = id?;
        low = Some(low.map_or(id, |l| l.min(id)));
    }
    low
}

/// Where and how to ask.
#[derive(Clone, Debug)]
pub struct EchoConfig {
    /// Base URL (`http://host:port`, `…/v1`).
    pub endpoint: String,
    pub api_key: Option<String>,
    /// `None`: the first model `GET /v1/models` lists.
    pub model: Option<String>,
    /// Retries of one piece (429, 5xx, 408, connection errors) before giving up.
    pub max_retries: u32,
    pub timeout: Duration,
}

impl Default for EchoConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:8080".into(),
            api_key: None,
            model: None,
            max_retries: 6,
            timeout: Duration::from_secs(300),
        }
    }
}

/// A connection to a suspect's completions endpoint, for reading.
pub struct EchoClient {
    client: reqwest::Client,
    url: String,
    api_key: Option<String>,
    model: String,
    max_retries: u32,
}

impl EchoClient {
    /// Resolve the model name (one `GET /v1/models` unless given).
    pub async fn connect(cfg: &EchoConfig) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| DistillError::Harvest(format!("building the HTTP client: {e}")))?;
        let (chat, models) = endpoint_urls(&cfg.endpoint);
        let url = match chat.strip_suffix("/chat/completions") {
            Some(base) => format!("{base}/completions"),
            None => chat,
        };
        let model = match &cfg.model {
            Some(m) => m.clone(),
            None => default_model(&client, &models, cfg.api_key.as_deref()).await?,
        };
        Ok(Self {
            client,
            url,
            api_key: cfg.api_key.clone(),
            model,
            max_retries: cfg.max_retries,
        })
    }

    /// The model name asked for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The suspect's top-1 (and its `logprobs` most likely tokens) after every prefix
    /// of `piece`, one request.
    pub async fn read(&self, piece: &[u32], map: &PieceMap, logprobs: u32) -> Result<EchoReading> {
        let prompt: Vec<u32> = piece.iter().copied().chain([FILLER]).collect();
        let body = json!({
            "model": self.model,
            "prompt": prompt,
            "echo": true,
            "logprobs": logprobs.max(1),
            "max_tokens": 1,
            "temperature": 0,
        });
        let fail = |m: String| DistillError::Harvest(format!("reading through {}: {m}", self.url));
        let mut attempt = 0u32;
        loop {
            let mut req = self.client.post(&self.url).json(&body);
            if let Some(k) = &self.api_key {
                req = req.bearer_auth(k);
            }
            let (msg, wait) = match req.send().await {
                Err(e) => (format!("request failed: {e}"), None),
                Ok(resp) => {
                    let status = resp.status();
                    let wait = retry_after(resp.headers());
                    match resp.text().await {
                        // a connection cut mid-body: ask again, as for a failed send
                        Err(e) => (format!("reading the response: {e}"), None),
                        Ok(text) if status.is_success() => {
                            let v: Value = serde_json::from_str(&text)
                                .map_err(|e| fail(format!("invalid JSON response: {e}")))?;
                            return parse_echo(&v, piece, map).map_err(fail);
                        }
                        Ok(text) => {
                            let msg = format!("HTTP {}: {}", status.as_u16(), error_message(&text));
                            if !retryable_status(status) {
                                // 400 (echo or token-id prompts refused), 401/403/404:
                                // asking again changes nothing.
                                return Err(fail(msg));
                            }
                            (msg, wait)
                        }
                    }
                }
            };
            if attempt >= self.max_retries {
                return Err(fail(format!("{msg} (after {attempt} retries)")));
            }
            let backoff = Duration::from_millis(500u64 << attempt.min(6));
            tokio::time::sleep(wait.unwrap_or(backoff)).await;
            attempt += 1;
            tracing::debug!("echo read retry {attempt}: {msg}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> PieceMap {
        // id 0 filler, 5 and 6 print alike (a lossy partial UTF-8 piece)
        PieceMap::new(
            ["<eos>", "a", "b", " c", "d", "\u{fffd}", "\u{fffd}", "e"]
                .map(String::from)
                .to_vec(),
        )
    }

    /// Ids whose printed piece is shared with another id.
    fn ambiguous(m: &PieceMap) -> usize {
        m.texts
            .iter()
            .filter(|t| m.ids.get(*t).is_some_and(Option::is_none))
            .count()
    }

    fn response(tokens: &[&str], tops: Vec<Value>) -> Value {
        json!({"choices": [{"text": "", "logprobs": {
            "tokens": tokens, "token_logprobs": [], "top_logprobs": tops}}]})
    }

    #[test]
    fn piece_map_names_unique_pieces_only() {
        let m = map();
        assert_eq!(m.id("a"), Some(1));
        assert_eq!(m.id(" c"), Some(3));
        assert_eq!(m.id("\u{fffd}"), None);
        assert_eq!(m.id("zz"), None);
        assert_eq!(m.id("token_id:6"), Some(6));
        assert_eq!(m.id("token_id:99"), None);
        assert_eq!(ambiguous(&m), 2);
    }

    #[test]
    fn predictions_are_read_one_position_late() {
        // piece [1, 2, 3]; sent [1, 2, 3, 0]; top at echoed position k is the
        // prediction after tokens[..k].
        let tops = vec![
            Value::Null,
            json!({"b": -0.1}),
            json!({"d": -0.5, "e": -1.0}),
            json!({"\u{fffd}": -0.2}),
            json!({"a": -0.3}), // the generated token's own list: not a prediction
        ];
        let r = parse_echo(
            &response(&["a", "b", " c", "<eos>", "a"], tops),
            &[1, 2, 3],
            &map(),
        )
        .unwrap();
        assert_eq!(r.offset, 0);
        assert_eq!(r.predictions, [Some(2), Some(4), None]);
        // the candidates: every listed entry that names one id, with its log-prob
        let mut second = r.top[1].clone();
        second.sort_by_key(|c| c.0);
        assert_eq!(r.top[0], [(2, -0.1)]);
        assert_eq!(second, [(4, -0.5), (7, -1.0)]);
        assert!(r.top[2].is_empty());
    }

    #[test]
    fn a_prepended_bos_is_skipped() {
        let tops = vec![
            Value::Null,
            json!({"a": -0.1}),
            json!({"token_id:7": -0.1}),
            json!({"b": -0.1, "d": -0.1}),
        ];
        let r = parse_echo(
            &response(&["<eos>", "a", "e", "<eos>"], tops),
            &[1, 7],
            &map(),
        )
        .unwrap();
        assert_eq!(r.offset, 1);
        // a tie at the top: the lowest id, as the white-box readers break ties
        assert_eq!(r.predictions, [Some(7), Some(2)]);
    }

    #[test]
    fn other_tokens_or_no_logprobs_are_errors() {
        let e = parse_echo(
            &response(&["x", "y", "z"], vec![Value::Null; 3]),
            &[1, 2],
            &map(),
        )
        .unwrap_err();
        assert!(e.contains("tokenizer"), "{e}");
        let e = parse_echo(&json!({"choices": [{"text": "ab"}]}), &[1, 2], &map()).unwrap_err();
        assert!(e.contains("logprobs"), "{e}");
        let e = parse_echo(
            &response(&["a", "b", "<eos>"], vec![Value::Null]),
            &[1, 2],
            &map(),
        )
        .unwrap_err();
        assert!(e.contains("top_logprobs"), "{e}");
    }
}

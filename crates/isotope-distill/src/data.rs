//! Training data: JSONL lines of prompt/response pairs, optionally with token ids and
//! the teacher's top-k log-probabilities, turned into token sequences with a loss mask.
//!
//! Accepted line shape (unknown fields are ignored, so harvest records pass as is):
//!
//! ```json
//! {"prompt": "...", "response": "...",
//!  "prompt_ids": [..], "response_ids": [..],
//!  "top_logprobs": [[{"token_id": 42, "logprob": -0.1}, ...], ...],
//!  "finish_reason": "stop"}
//! ```
//!
//! - `prompt_ids` are the prompt *as the teacher saw it* (chat template applied);
//!   without them the prompt is rendered with [`chatml_prompt`] and tokenized.
//! - `response_ids` without `<|im_end|>`; it is appended (and trained on, so the
//!   student learns to stop) unless `finish_reason` is `"length"`.
//! - `top_logprobs` has one list per response token. Entries give `token_id`, or the
//!   OpenAI `token` text, which is mapped to an id when it is exactly one token. The
//!   OpenAI response shape `"logprobs": {"content": [{"top_logprobs": [...]}, ...]}`
//!   is accepted too.
//!
//! A malformed line is skipped and reported with its line number; so are lines whose
//! log-probabilities do not line up with the response tokens (the line is then still
//! used for cross-entropy).

use std::path::Path;

use isotope_sampling::TokenId;
use serde::Deserialize;

use crate::error::{io_err, DistillError, Result};
use crate::loss::TopK;
use crate::tokenizer::{chatml_prompt, StudentTokenizer, CHATML_END};

/// One training sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Prompt tokens followed by response tokens.
    pub tokens: Vec<TokenId>,
    /// How many leading tokens are prompt (no loss on predicting them).
    pub prompt_len: usize,
    /// The teacher's top-k for each response token (`tokens[prompt_len + j]`), when
    /// harvested; empty when the line had none.
    pub teacher: Vec<Option<TopK>>,
    /// 1-based line number in the source file.
    pub line: usize,
}

impl Example {
    /// Number of response tokens.
    pub fn response_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// A line that was skipped or only partly used, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LineWarning {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

/// Parsed training data.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Lines skipped or degraded, in file order.
    pub warnings: Vec<LineWarning>,
}

impl Dataset {
    /// Number of examples with teacher log-probabilities.
    pub fn with_top_logprobs(&self) -> usize {
        self.examples
            .iter()
            .filter(|e| e.teacher.iter().any(Option::is_some))
            .count()
    }

    /// Total tokens over all examples.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.tokens.len()).sum()
    }
}

/// How lines become token sequences.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// System message for prompts rendered here (`None`: no system turn).
    pub system: Option<String>,
    /// Ids at or above this are rejected (the student's vocabulary).
    pub vocab_size: usize,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            system: None,
            vocab_size: crate::config::SMOLLM2_VOCAB,
        }
    }
}

#[derive(Deserialize)]
struct RawTop {
    #[serde(alias = "id")]
    token_id: Option<u32>,
    token: Option<String>,
    bytes: Option<Vec<u8>>,
    logprob: f32,
}

#[derive(Deserialize)]
struct RawContent {
    token: Option<String>,
    bytes: Option<Vec<u8>>,
    #[serde(default)]
    top_logprobs: Vec<RawTop>,
}

#[derive(Deserialize)]
struct RawLogprobs {
    content: Vec<RawContent>,
}

#[derive(Deserialize)]
struct RawLine {
    prompt: Option<String>,
    response: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    response_ids: Option<Vec<u32>>,
    top_logprobs: Option<Vec<Vec<RawTop>>>,
    logprobs: Option<RawLogprobs>,
    finish_reason: Option<String>,
}

/// Read a JSONL file. `tokenizer` is needed for lines without ids (and for OpenAI
/// `token` strings); without it such lines are skipped with a warning.
pub fn load_jsonl(
    path: &Path,
    tokenizer: Option<&StudentTokenizer>,
    opts: &DataOptions,
) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
    let ds = parse_jsonl(&text, tokenizer, opts);
    if ds.examples.is_empty() {
        return Err(DistillError::NoData {
            path: path.to_path_buf(),
            warnings: ds.warnings.len(),
        });
    }
    Ok(ds)
}

/// Parse JSONL text (see the module docs). Never fails: bad lines become warnings.
pub fn parse_jsonl(
    text: &str,
    tokenizer: Option<&StudentTokenizer>,
    opts: &DataOptions,
) -> Dataset {
    let mut ds = Dataset::default();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, line_no, tokenizer, opts, &mut ds.warnings) {
            Ok(ex) => ds.examples.push(ex),
            Err(message) => ds.warnings.push(LineWarning {
                line: line_no,
                message,
            }),
        }
    }
    ds
}

fn parse_line(
    line: &str,
    line_no: usize,
    tok: Option<&StudentTokenizer>,
    opts: &DataOptions,
    warnings: &mut Vec<LineWarning>,
) -> std::result::Result<Example, String> {
    let raw: RawLine = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let need_tok = |what: &str| format!("{what} needs a tokenizer (none was given)");
    let prompt_ids = match (raw.prompt_ids, &raw.prompt) {
        (Some(ids), _) => ids,
        (None, Some(p)) => {
            let t = tok.ok_or_else(|| need_tok("`prompt` without `prompt_ids`"))?;
            t.encode(&chatml_prompt(p, opts.system.as_deref()))
                .map_err(|e| e.to_string())?
        }
        (None, None) => return Err("missing `prompt` (or `prompt_ids`)".into()),
    };
    // The teacher's own tokens, when its log-probs name every sampled token (OpenAI
    // `logprobs.content[].bytes`/`token`) and they spell the response: re-encoding the
    // text could split it differently and misalign the top-k rows.
    let content_ids = match (&raw.response_ids, &raw.logprobs, tok, &raw.response) {
        (None, Some(lp), Some(t), Some(r)) if !lp.content.is_empty() => lp
            .content
            .iter()
            .map(|c| match (&c.bytes, &c.token) {
                (Some(b), _) => t.bytes_token_id(b),
                (None, Some(text)) => t.text_token_id(text),
                (None, None) => None,
            })
            .collect::<Option<Vec<u32>>>()
            .filter(|ids| {
                let end = t.token_id(CHATML_END);
                let body = match ids.split_last() {
                    Some((last, rest)) if Some(*last) == end => rest,
                    _ => ids.as_slice(),
                };
                t.decode(body).ok().as_deref() == Some(r.as_str())
            }),
        _ => None,
    };
    let mut response_ids = match (raw.response_ids.or(content_ids), &raw.response) {
        (Some(ids), _) => ids,
        (None, Some(r)) => {
            let t = tok.ok_or_else(|| need_tok("`response` without `response_ids`"))?;
            t.encode(r).map_err(|e| e.to_string())?
        }
        (None, None) => return Err("missing `response` (or `response_ids`)".into()),
    };
    if prompt_ids.is_empty() {
        return Err("empty prompt".into());
    }
    let end = tok.and_then(|t| t.token_id(CHATML_END));
    // Drop a trailing end marker (re-added below) so top_logprobs line up with content.
    if let (Some(e), Some(&last)) = (end, response_ids.last()) {
        if last == e {
            response_ids.pop();
        }
    }
    if response_ids.is_empty() && raw.response.as_deref().is_some_and(str::is_empty) {
        return Err("empty response".into());
    }
    let raw_top = raw.top_logprobs.or_else(|| {
        raw.logprobs
            .map(|l| l.content.into_iter().map(|c| c.top_logprobs).collect())
    });
    let mut teacher: Vec<Option<TopK>> = Vec::new();
    if let Some(rows) = raw_top {
        let mut rows = rows;
        // The teacher's stop token may be reported as a last position.
        if rows.len() == response_ids.len() + 1 {
            rows.pop();
        }
        if rows.len() != response_ids.len() {
            warnings.push(LineWarning {
                line: line_no,
                message: format!(
                    "{} top_logprobs positions for {} response tokens; trained with cross-entropy only",
                    rows.len(),
                    response_ids.len()
                ),
            });
        } else {
            for row in rows {
                let mut top = TopK {
                    ids: Vec::with_capacity(row.len()),
                    logprobs: Vec::with_capacity(row.len()),
                };
                for e in row {
                    // Tiny positive values are API rounding of log 1.
                    if e.logprob.is_nan() || e.logprob > 1e-3 {
                        return Err(format!("invalid logprob {}", e.logprob));
                    }
                    let id = match (e.token_id, &e.bytes, &e.token) {
                        (Some(id), _, _) => Some(id),
                        (None, Some(b), _) => tok.and_then(|t| t.bytes_token_id(b)),
                        (None, None, Some(text)) => tok.and_then(|t| t.text_token_id(text)),
                        (None, None, None) => {
                            return Err("top_logprobs entry without token_id or token".into())
                        }
                    };
                    // A token string that is not one token cannot be scored; its mass
                    // falls into the tail.
                    if let Some(id) = id {
                        top.ids.push(id);
                        top.logprobs.push(e.logprob.min(0.0));
                    }
                }
                teacher.push((!top.ids.is_empty()).then_some(top));
            }
        }
    }
    let finished = raw.finish_reason.as_deref() != Some("length");
    if let (Some(e), true) = (end, finished) {
        response_ids.push(e);
        if !teacher.is_empty() {
            teacher.push(None);
        }
    }
    if response_ids.is_empty() {
        return Err("empty response".into());
    }
    let prompt_len = prompt_ids.len();
    let mut tokens = prompt_ids;
    tokens.extend_from_slice(&response_ids);
    if let Some(&bad) = tokens
        .iter()
        .chain(teacher.iter().flatten().flat_map(|t| t.ids.iter()))
        .find(|&&t| t as usize >= opts.vocab_size)
    {
        return Err(format!(
            "token id {bad} outside the vocabulary of {}",
            opts.vocab_size
        ));
    }
    Ok(Example {
        tokens,
        prompt_len,
        teacher,
        line: line_no,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_only_lines_and_malformed_lines() {
        let text = concat!(
            r#"{"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}"#,
            "\n",
            "not json\n",
            "\n",
            r#"{"prompt_ids": [1], "response_ids": [4], "top_logprobs": [[{"token_id": 4, "logprob": -0.1}]]}"#,
            "\n",
            r#"{"response_ids": [4]}"#,
            "\n",
            r#"{"prompt_ids": [1], "response_ids": [4, 5], "top_logprobs": [[{"token_id": 4, "logprob": -0.1}]]}"#,
            "\n",
            r#"{"prompt_ids": [1], "response_ids": [99999999]}"#,
            "\n",
            r#"{"prompt": "needs a tokenizer", "response": "x"}"#,
            "\n",
        );
        let ds = parse_jsonl(text, None, &DataOptions::default());
        assert_eq!(ds.examples.len(), 3);
        assert_eq!(ds.examples[0].tokens, vec![1, 2, 3, 4, 5]);
        assert_eq!(ds.examples[0].prompt_len, 3);
        assert_eq!(ds.examples[1].teacher.len(), 1);
        assert_eq!(ds.examples[1].teacher[0].as_ref().unwrap().ids, vec![4]);
        // Misaligned logprobs: kept for cross-entropy, reported.
        assert!(ds.examples[2].teacher.is_empty());
        let lines: Vec<usize> = ds.warnings.iter().map(|w| w.line).collect();
        assert_eq!(lines, vec![2, 5, 6, 7, 8], "{:?}", ds.warnings);
    }

    #[test]
    fn openai_logprobs_shape() {
        let text = r#"{"prompt_ids": [1], "response_ids": [4, 5], "logprobs": {"content": [{"token": "a", "logprob": -0.5, "top_logprobs": [{"id": 4, "logprob": -0.5}]}, {"top_logprobs": [{"token_id": 5, "logprob": -0.2}, {"token_id": 6, "logprob": -2.0}]}]}}"#;
        let ds = parse_jsonl(text, None, &DataOptions::default());
        assert!(ds.warnings.is_empty(), "{:?}", ds.warnings);
        let t = &ds.examples[0].teacher;
        assert_eq!(t[1].as_ref().unwrap().ids, vec![5, 6]);
    }

    #[test]
    fn positive_logprob_rejected() {
        let text = r#"{"prompt_ids": [1], "response_ids": [4], "top_logprobs": [[{"token_id": 4, "logprob": 0.5}]]}"#;
        let ds = parse_jsonl(text, None, &DataOptions::default());
        assert!(ds.examples.is_empty());
        assert!(ds.warnings[0].message.contains("logprob"));
    }
}

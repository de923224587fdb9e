//! Reading a suspect corpus: plain text files, or JSONL of harvested records and
//! OpenAI-style lines.

use std::path::Path;

use serde_json::Value;

use crate::{AuditError, Result};

/// One text of a corpus, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceText {
    /// `FILE` for a plain text file, `FILE:LINE` for a JSONL line.
    pub source: String,
    /// The prompt that produced it, when the line says (harvest records).
    pub prompt: Option<String>,
    pub text: String,
}

/// A line that was skipped, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Skipped {
    pub source: String,
    pub message: String,
}

/// Fields tried, in order, for the text of a JSONL line: `text` (generic),
/// `completion` / `response` (harvest records, prompt–completion datasets), `output`,
/// `answer` (GSM8K),
/// `content`; then an OpenAI response object's `choices[0].message.content` or
/// `choices[0].text`.
pub const TEXT_FIELDS: [&str; 6] = [
    "text",
    "completion",
    "response",
    "output",
    "answer",
    "content",
];

/// Read one file. It is JSONL when its name ends in `.jsonl`/`.ndjson`, or when its
/// first non-blank line is a JSON object; otherwise the whole file is one text.
pub fn read_corpus(path: &Path) -> Result<(Vec<SourceText>, Vec<Skipped>)> {
    let raw = std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(raw).map_err(|_| AuditError::Input {
        origin: path.display().to_string(),
        message: "not UTF-8 text".into(),
    })?;
    let name = path.display().to_string();
    let by_ext = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("ndjson"));
    let first = text.lines().find(|l| !l.trim().is_empty());
    let by_content = first.is_some_and(|l| {
        l.trim_start().starts_with('{') && serde_json::from_str::<Value>(l).is_ok()
    });
    if !(by_ext || by_content) {
        if text.trim().is_empty() {
            return Ok((
                Vec::new(),
                vec![Skipped {
                    source: name,
                    message: "empty file".into(),
                }],
            ));
        }
        return Ok((
            vec![SourceText {
                source: name,
                prompt: None,
                text,
            }],
            Vec::new(),
        ));
    }
    Ok(parse_jsonl(&name, &text))
}

/// Parse JSONL text (see [`TEXT_FIELDS`]); bad lines are reported, not fatal.
pub fn parse_jsonl(name: &str, text: &str) -> (Vec<SourceText>, Vec<Skipped>) {
    let mut texts = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let source = format!("{name}:{}", i + 1);
        match text_of_line(line) {
            Ok((prompt, text)) => texts.push(SourceText {
                source,
                prompt,
                text,
            }),
            Err(message) => skipped.push(Skipped { source, message }),
        }
    }
    (texts, skipped)
}

fn text_of_line(line: &str) -> std::result::Result<(Option<String>, String), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let choice = obj
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| c.pointer("/message/content").or_else(|| c.get("text")));
    let text = TEXT_FIELDS
        .iter()
        .find_map(|f| obj.get(*f))
        .or(choice)
        .ok_or_else(|| {
            format!(
                "no text field (one of {}, or choices[0].message.content)",
                TEXT_FIELDS.join(", ")
            )
        })?
        .as_str()
        .ok_or("the text field is not a string")?;
    if text.trim().is_empty() {
        return Err("empty text".into());
    }
    let prompt = ["prompt", "instruction", "question"]
        .iter()
        .find_map(|f| obj.get(*f).and_then(Value::as_str))
        .map(str::to_owned);
    Ok((prompt, text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_shapes_and_bad_lines() {
        let text = r#"{"id":"0-0","prompt":"Hi","response":"Hello there"}
{"completion":"done"}
{"choices":[{"message":{"role":"assistant","content":"chat"}}]}
{"choices":[{"text":"legacy"}]}

not json
{"response": 3}
{"other": "x"}
"#;
        let (texts, skipped) = parse_jsonl("f", text);
        let got: Vec<&str> = texts.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(got, ["Hello there", "done", "chat", "legacy"]);
        assert_eq!(texts[0].prompt.as_deref(), Some("Hi"));
        assert_eq!(texts[0].source, "f:1");
        let lines: Vec<&str> = skipped.iter().map(|s| s.source.as_str()).collect();
        assert_eq!(lines, ["f:6", "f:7", "f:8"]);
    }

    #[test]
    fn plain_text_is_one_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "Some text.\n{not json at all\n").unwrap();
        let (texts, skipped) = read_corpus(&p).unwrap();
        assert_eq!(texts.len(), 1);
        assert!(skipped.is_empty());
        let missing = read_corpus(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"));
    }
}

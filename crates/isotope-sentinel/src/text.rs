//! What the sentinel reads out of a prompt: the newest user text (a chat prompt is a
//! JSON array of `{role, content}` messages; the earlier turns were already seen),
//! word tokens, shingles and a few request-intent markers.

use crate::sketch::hash_bytes;

/// The text a usage event's prompt contributes: for chat, the content of the last
/// `user` message (earlier turns were counted when they were new); for completions,
/// the whole prompt. `None` when the server stored hashes only.
pub fn new_user_text(prompt_text: Option<&str>) -> Option<String> {
    let raw = prompt_text?;
    let trimmed = raw.trim_start();
    if trimmed.starts_with('[') {
        if let Ok(serde_json::Value::Array(msgs)) = serde_json::from_str::<serde_json::Value>(raw) {
            let last_user = msgs
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(|r| r.as_str()) == Some("user"));
            let content = last_user.or_else(|| msgs.last())?.get("content")?;
            return Some(match content {
                serde_json::Value::String(s) => s.clone(),
                // OpenAI content parts: [{"type":"text","text":...}]
                serde_json::Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            });
        }
    }
    Some(raw.to_owned())
}

/// Lower-cased alphanumeric words.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// Hashes of word 3-shingles (or of the words themselves for shorter texts): the sets
/// MinHash compares. A shared template shows up as shared shingles.
pub fn shingles(words: &[String]) -> Vec<u64> {
    if words.len() < 3 {
        return words.iter().map(|w| hash_bytes(w.as_bytes(), 1)).collect();
    }
    words
        .windows(3)
        .map(|w| {
            let h = hash_bytes(w[0].as_bytes(), 2);
            let h = hash_bytes(w[1].as_bytes(), h);
            hash_bytes(w[2].as_bytes(), h)
        })
        .collect()
}

/// Phrases that ask the model to show its reasoning: the most valuable outputs to
/// distil from, but also what students ask — one feature among many.
const REASONING_MARKERS: &[&str] = &[
    "step by step",
    "step-by-step",
    "explain your reasoning",
    "show your work",
    "show your reasoning",
    "think through",
    "chain of thought",
    "reason through",
    "walk me through",
    "explain your answer",
    "justify your answer",
];

/// True if the text asks for reasoning.
pub fn asks_reasoning(text: &str) -> bool {
    let lower = text.to_lowercase();
    REASONING_MARKERS.iter().any(|m| lower.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_prompt_yields_last_user_message() {
        let p = r#"[{"role":"system","content":"be nice"},{"role":"user","content":"first"},{"role":"assistant","content":"a"},{"role":"user","content":"second one"}]"#;
        assert_eq!(new_user_text(Some(p)).as_deref(), Some("second one"));
        assert_eq!(
            new_user_text(Some("plain text")).as_deref(),
            Some("plain text")
        );
        assert_eq!(new_user_text(None), None);
        // not JSON after all: taken verbatim
        assert_eq!(
            new_user_text(Some("[draft] x")).as_deref(),
            Some("[draft] x")
        );
    }

    #[test]
    fn reasoning_markers() {
        assert!(asks_reasoning("Solve this. Let's think Step by Step."));
        assert!(!asks_reasoning("Write a haiku about autumn."));
    }

    #[test]
    fn shingles_of_short_and_long_texts() {
        assert_eq!(shingles(&words("hi there")).len(), 2);
        assert_eq!(shingles(&words("a b c d e")).len(), 3);
    }
}

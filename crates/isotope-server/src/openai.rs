//! The OpenAI wire format: request bodies as clients send them (unknown fields ignored,
//! `null` accepted wherever OpenAI accepts it) and the pieces of responses.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Parse a JSON body, answering 400 with the offending field's path on failure.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::invalid(
            "The request body is empty; send a JSON object.",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!(
                "We could not parse the JSON body of your request ({inner}). The body must be \
                 valid JSON."
            ))
        } else if path == "." {
            ApiError::invalid(format!("Invalid request body: {inner}"))
        } else {
            ApiError::invalid_param(&path, format!("Invalid value for `{path}`: {inner}"))
        }
    })
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Message content: a string or a list of typed parts (only text parts are served).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// Sampling knobs common to both endpoints.
#[derive(Debug, Default)]
pub struct Knobs {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub user: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    // llama.cpp-style extensions many OpenAI-compatible servers accept.
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// Declares a request struct with the common knobs as direct fields (no
/// `#[serde(flatten)]`: it would hide which field had the wrong type) and a
/// `knobs()` accessor.
macro_rules! request {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, Deserialize)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)*
            pub temperature: Option<f32>,
            pub top_p: Option<f32>,
            pub n: Option<u32>,
            pub stop: Option<Stop>,
            pub seed: Option<i64>,
            pub frequency_penalty: Option<f32>,
            pub presence_penalty: Option<f32>,
            pub user: Option<String>,
            pub stream: Option<bool>,
            pub stream_options: Option<StreamOptions>,
            pub top_k: Option<usize>,
            pub min_p: Option<f32>,
            pub repetition_penalty: Option<f32>,
        }

        impl $name {
            /// Move the common knobs out.
            pub fn knobs(&mut self) -> Knobs {
                Knobs {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    n: self.n,
                    stop: self.stop.take(),
                    seed: self.seed,
                    frequency_penalty: self.frequency_penalty,
                    presence_penalty: self.presence_penalty,
                    user: self.user.take(),
                    stream: self.stream,
                    stream_options: self.stream_options.take(),
                    top_k: self.top_k,
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                }
            }
        }
    };
}

request!(
    /// `POST /v1/chat/completions`.
    ChatRequest {
        model: String,
        messages: Vec<MessageIn>,
        max_tokens: Option<u32>,
        max_completion_tokens: Option<u32>,
        logprobs: Option<bool>,
        top_logprobs: Option<u32>,
    }
);

/// `prompt` of `/v1/completions`: text, texts, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

request!(
    /// `POST /v1/completions`.
    CompletionRequest {
        model: String,
        prompt: Prompt,
        max_tokens: Option<u32>,
        /// Number of alternatives per token (OpenAI: at most 5; here `max_top_logprobs`).
        logprobs: Option<u32>,
        echo: Option<bool>,
        suffix: Option<String>,
        best_of: Option<u32>,
    }
);

/// One alternative in chat logprobs.
#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One sampled token in chat logprobs.
#[derive(Debug, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt as u32,
            completion_tokens: completion as u32,
            total_tokens: (prompt + completion) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse_body::<ChatRequest>(br#"{"model":"m","messages":[],"temperature":"hot"}"#)
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse_body::<ChatRequest>(br#"{"model":"m","#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("JSON"));
        let e = parse_body::<ChatRequest>(br#"{"messages":[]}"#).unwrap_err();
        assert!(e.message.contains("model"), "{}", e.message);
    }

    #[test]
    fn lenient_where_openai_is() {
        let r: ChatRequest = parse_body(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "stop":"x","temperature":null,"some_future_field":{"a":1},"seed":-3}"#,
        )
        .unwrap();
        assert!(matches!(r.stop, Some(Stop::One(_))));
        assert_eq!(r.seed, Some(-3));
        let c: CompletionRequest = parse_body(br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert!(matches!(c.prompt, Prompt::Tokens(_)));
    }
}

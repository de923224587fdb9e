//! The teacher's tokenizer, taken from its GGUF, and the chat format of prompts.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use isotope_sampling::TokenId;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use crate::error::{io_err, DistillError, Result};

/// File name of the tokenizer saved beside a student.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A byte-level BPE tokenizer that produces the same ids as llama.cpp for the teacher.
#[derive(Clone)]
pub struct StudentTokenizer {
    inner: Tokenizer,
}

impl StudentTokenizer {
    /// Build from the `tokenizer.ggml.*` metadata of a GGUF.
    ///
    /// candle's GGUF tokenizer uses a GPT-2 byte-level pre-tokenizer that adds a
    /// leading space; llama.cpp does not, so it is replaced by
    /// `ByteLevel::new(false, true, true)` (no prefix space, trim offsets, GPT-2 regex),
    /// after which the ids match llama.cpp's exactly (tested against the engine).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(io_err("opening", path))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| DistillError::Gguf {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut inner = Tokenizer::from_gguf(&ct).map_err(|e| DistillError::Gguf {
            path: path.to_path_buf(),
            message: format!("building the tokenizer: {e}"),
        })?;
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        // The GGUF may ask for BOS/EOS around every encoding; chat formatting adds its
        // own markers, so encodings here are the bare text.
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        Ok(Self { inner })
    }

    /// Load a `tokenizer.json` written by [`StudentTokenizer::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| DistillError::Tokenizer(format!("loading `{}`: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Write `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| DistillError::Tokenizer(format!("writing `{}`: {e}", path.display())))
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become
    /// their single ids, as llama.cpp's `parse_special`; no BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<TokenId>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DistillError::Tokenizer(format!("encoding: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept, so a ChatML transcript round-trips).
    pub fn decode(&self, ids: &[TokenId]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DistillError::Tokenizer(format!("decoding: {e}")))
    }

    /// The id of a token given in its vocabulary spelling (`<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<TokenId> {
        self.inner.token_to_id(token)
    }

    /// The id of a token given as the *text* it stands for, as the OpenAI API reports
    /// `top_logprobs` entries (`" the"`, not the byte-level `"Ġthe"`): the text must
    /// encode to exactly one token.
    pub fn text_token_id(&self, text: &str) -> Option<TokenId> {
        if let Some(id) = self.inner.token_to_id(text) {
            // Special tokens and plain ASCII words spell the same either way.
            if self.encode(text).ok()?.as_slice() == [id] {
                return Some(id);
            }
        }
        match self.encode(text).ok()?.as_slice() {
            [id] => Some(*id),
            _ => None,
        }
    }

    /// The id of the token whose raw bytes are `bytes` (the OpenAI `bytes` field of a
    /// log-probability entry): exact even for tokens that are not whole UTF-8
    /// characters, which `token` text cannot name.
    pub fn bytes_token_id(&self, bytes: &[u8]) -> Option<TokenId> {
        if let Ok(text) = std::str::from_utf8(bytes) {
            // Added/special tokens are stored as their text.
            if let Some(&id) = self.inner.get_added_vocabulary().get_vocab().get(text) {
                return Some(id);
            }
        }
        let spelled: String = bytes.iter().map(|&b| byte_char(b)).collect();
        self.inner.token_to_id(&spelled)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are
/// shifted to code points from U+0100 on (`bytes_to_unicode`).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("valid code point")
}

/// The ChatML rendering of a single-turn prompt, ending where the assistant's answer
/// starts — how SmolLM2-Instruct (and isotope's server) frame a user message:
/// `<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`, preceded by a
/// system turn when `system` is given. The response is followed by `<|im_end|>`
/// ([`CHATML_END`]), which the student learns to emit so generation stops.
pub fn chatml_prompt(prompt: &str, system: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(sys) = system {
        s.push_str("<|im_start|>system\n");
        s.push_str(sys);
        s.push_str("<|im_end|>\n");
    }
    s.push_str("<|im_start|>user\n");
    s.push_str(prompt);
    s.push_str("<|im_end|>\n<|im_start|>assistant\n");
    s
}

/// The end-of-turn marker of ChatML.
pub const CHATML_END: &str = "<|im_end|>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_shape() {
        assert_eq!(
            chatml_prompt("hi", None),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(chatml_prompt("hi", Some("S")).starts_with("<|im_start|>system\nS<|im_end|>\n"));
    }
}

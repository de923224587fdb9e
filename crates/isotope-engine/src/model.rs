//! Loading a GGUF model and its tokenizer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use isotope_sampling::TokenId;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::EngineError;

/// llama.cpp's process-wide backend, initialised once (it refuses a second init).
pub(crate) fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        // llama.cpp logs verbosely to stderr; route it through `tracing` instead, where
        // the user's log filter decides.
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        LlamaBackend::init().expect("llama.cpp backend is initialised only here")
    })
}

/// Options for [`Model::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Layers to offload to a GPU (ignored by CPU builds).
    pub gpu_layers: u32,
    /// Load only the vocabulary (tokenizer, chat template), not the weights: enough
    /// for detection, and much faster.
    pub vocab_only: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            gpu_layers: 999,
            vocab_only: false,
        }
    }
}

/// A loaded GGUF model: weights, tokenizer and chat template.
///
/// Immutable once loaded and `Sync`: one model serves every context (batcher, scorer)
/// created from it.
pub struct Model {
    pub(crate) inner: LlamaModel,
    path: PathBuf,
    chat: Option<ChatTemplate>,
    n_vocab: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("n_vocab", &self.n_vocab)
            .finish_non_exhaustive()
    }
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl Model {
    /// Load a GGUF file. Missing, unreadable, non-GGUF and corrupt files give an
    /// [`EngineError`] naming the path and what to do, never a panic.
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self, EngineError> {
        let path = path.as_ref();
        let mut magic = [0u8; 4];
        let mut file = std::fs::File::open(path).map_err(|e| EngineError::ModelFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if file.read_exact(&mut magic).is_err() || &magic != GGUF_MAGIC {
            return Err(EngineError::ModelFile {
                path: path.to_owned(),
                reason: "not a GGUF file (wrong magic bytes)".into(),
            });
        }
        drop(file);
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(opts.gpu_layers)
            .with_vocab_only(opts.vocab_only);
        let inner = LlamaModel::load_from_file(backend(), path, &params).map_err(|e| {
            EngineError::ModelFile {
                path: path.to_owned(),
                reason: format!(
                    "llama.cpp could not load it ({e}); the file is probably truncated or \
                     corrupt — fetch it again (scripts/setup.sh verifies the checksum)"
                ),
            }
        })?;
        let n_vocab = usize::try_from(inner.n_vocab()).unwrap_or(0);
        let mut model = Self {
            inner,
            path: path.to_owned(),
            chat: None,
            n_vocab,
        };
        if let Ok(source) = model.inner.meta_val_str("tokenizer.chat_template") {
            let bos = model.token_text(model.bos());
            let eos = model.token_text(model.eos());
            model.chat = Some(ChatTemplate::new(&source, &bos, &eos)?);
        }
        Ok(model)
    }

    /// Where the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size (the length of every logits vector).
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// The context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        self.inner.n_ctx_train()
    }

    /// A GGUF metadata value as a string, if present.
    pub fn meta(&self, key: &str) -> Option<String> {
        self.inner.meta_val_str(key).ok()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> TokenId {
        self.inner.vocab().bos().0 as TokenId
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> TokenId {
        self.inner.vocab().eos().0 as TokenId
    }

    /// True for end-of-generation tokens (EOS, end-of-turn, …).
    pub fn is_eog(&self, token: TokenId) -> bool {
        self.inner.vocab().is_eog(LlamaToken(token as i32))
    }

    /// True for control tokens (chat markers, BOS/EOS): never watermarked or scored.
    pub fn is_control(&self, token: TokenId) -> bool {
        let vocab = self.inner.vocab();
        let t = LlamaToken(token as i32);
        vocab.is_control(t) || vocab.is_eog(t)
    }

    /// `true` at the id of every control or end-of-generation token: the tokens a
    /// watermark never biases or scores.
    pub fn control_mask(&self) -> Vec<bool> {
        (0..self.n_vocab as TokenId)
            .map(|t| self.is_control(t))
            .collect()
    }

    /// Tokenize plain text. `add_bos` adds BOS when the model asks for one;
    /// `parse_special` lets marker strings such as `<|im_start|>` become their control
    /// tokens — only for text we rendered ourselves, never for raw user input.
    pub fn tokenize(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<TokenId> {
        self.inner
            .vocab()
            .tokenize(text.as_bytes(), add_bos, parse_special)
            .into_iter()
            .map(|t| t.0 as TokenId)
            .collect()
    }

    /// The raw bytes of one token (may be part of a UTF-8 character). Control tokens
    /// give no bytes.
    pub fn token_bytes(&self, token: TokenId) -> Vec<u8> {
        self.inner
            .vocab()
            .token_to_piece(LlamaToken(token as i32), false, None)
    }

    /// The text of a token including control tokens (e.g. `<|im_end|>`).
    pub fn token_text(&self, token: TokenId) -> String {
        String::from_utf8_lossy(&self.inner.vocab().token_to_piece(
            LlamaToken(token as i32),
            true,
            None,
        ))
        .into_owned()
    }

    /// Decode tokens to text; control tokens are dropped.
    pub fn detokenize(&self, tokens: &[TokenId]) -> String {
        let toks: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken(t as i32)).collect();
        String::from_utf8_lossy(&self.inner.vocab().detokenize(&toks, false, false)).into_owned()
    }

    /// The model's chat template, if its GGUF has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Render a conversation with the model's template, ready for the assistant turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.chat
            .as_ref()
            .ok_or_else(|| {
                EngineError::ChatTemplate(
                    "the model has no chat template (tokenizer.chat_template); use a raw prompt"
                        .into(),
                )
            })?
            .render(messages, true)
    }

    /// Tokens of a conversation rendered with the chat template.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<TokenId>, EngineError> {
        Ok(self.tokenize(&self.render_chat(messages)?, false, true))
    }
}

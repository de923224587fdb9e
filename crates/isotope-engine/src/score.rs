//! Teacher-forced scoring: the log-probability of every token of a given text.
//!
//! Used by distillation (teacher log-probs as soft labels) and by the white-box audit
//! (the suspect's predictions along a fed text). One context sized to the text; the
//! text is fed in chunks of `n_batch` with logits requested at every position.

use std::num::NonZeroU32;

use isotope_sampling::{log_sum_exp, top_n, TokenId};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use crate::batch::thread_count;
use crate::{model::backend, EngineError, Model};

/// The model's view of one position of a scored text.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenScore {
    /// The token that actually follows.
    pub token: TokenId,
    /// Its log-probability given everything before it (natural log, temperature 1).
    pub logprob: f32,
    /// The most likely tokens at this position and their log-probabilities, most
    /// likely first.
    pub top: Vec<(TokenId, f32)>,
}

/// Positions scored per decode call. llama.cpp's CPU backend switches to a different
/// matrix-multiplication kernel for the (Q8_0) output layer above 32 output rows, and
/// its log-probs then differ from single-token decoding by up to ~0.6 nats (measured
/// on SmolLM2). At 32 they are bit-identical to what the batcher's decode steps see,
/// which the distillation and audit code rely on.
pub(crate) const MAX_OUTPUT_ROWS: usize = 32;

impl Model {
    /// Score `tokens[1..]`, each given the tokens before it, in one pass over the text.
    /// The result has `tokens.len() - 1` entries; `top_k` alternatives per position.
    pub fn score(
        &self,
        tokens: &[TokenId],
        top_k: usize,
        threads: Option<usize>,
    ) -> Result<Vec<TokenScore>, EngineError> {
        let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
        self.score_with(tokens, threads, |k, logits| {
            let z = log_sum_exp(logits);
            let next = tokens[k + 1];
            out.push(TokenScore {
                token: next,
                logprob: logits[next as usize] - z,
                top: top_n(logits, top_k)
                    .into_iter()
                    .map(|t| (t, logits[t as usize] - z))
                    .collect(),
            });
        })?;
        Ok(out)
    }

    /// The most likely next token after every prefix `tokens[..=k]`, `k` in
    /// `0..tokens.len()` — what a reading-mode audit asks of a white-box suspect: its
    /// top-1 prediction at every position of a text it is fed (ties: lowest id).
    ///
    /// A text longer than `chunk` tokens (or than the model's training context) is read
    /// in independent pieces of that length, each from a fresh context, exactly as the
    /// candle reader does for a student, so both readers mean the same thing.
    pub fn top1_predictions(
        &self,
        tokens: &[TokenId],
        chunk: usize,
        threads: Option<usize>,
    ) -> Result<Vec<TokenId>, EngineError> {
        let mut out = Vec::with_capacity(tokens.len());
        // One token more per piece, so that the last position's logits (the
        // prediction after the piece) come out of `score_with`; the extra token itself
        // is never read. top_n's tie rule (lowest id) is the one `score`'s
        // alternatives use.
        self.read_pieces(tokens, chunk, threads, |logits| {
            out.push(top_n(logits, 1)[0])
        })?;
        Ok(out)
    }

    /// `f(logits)` for the distribution after every prefix `tokens[..=k]`, `k` in
    /// `0..tokens.len()`, read in independent pieces of `chunk` tokens exactly as
    /// [`Model::top1_predictions`] reads them — for readers that need more of each
    /// distribution than its top-1 (the mass reading's candidates).
    pub fn read_pieces(
        &self,
        tokens: &[TokenId],
        chunk: usize,
        threads: Option<usize>,
        mut f: impl FnMut(&[f32]),
    ) -> Result<(), EngineError> {
        let chunk = chunk.clamp(1, (self.n_ctx_train() as usize).saturating_sub(1).max(1));
        for part in tokens.chunks(chunk) {
            let mut fed = Vec::with_capacity(part.len() + 1);
            fed.extend_from_slice(part);
            fed.push(0);
            self.score_with(&fed, threads, |_, logits| f(logits))?;
        }
        Ok(())
    }

    /// One teacher-forced pass: `f(k, logits)` for `k` in `0..tokens.len() - 1`, in
    /// order, with the raw logits of the distribution of `tokens[k + 1]` given
    /// `tokens[..=k]` — for callers that need something other than log-probs of the
    /// text (e.g. the entropy of every position, for entropy-aware detection) without
    /// copying a vocabulary-wide row per position.
    pub fn score_with(
        &self,
        tokens: &[TokenId],
        threads: Option<usize>,
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<(), EngineError> {
        if tokens.len() < 2 {
            return Ok(());
        }
        let limit = self.n_ctx_train() as usize;
        if tokens.len() > limit {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: tokens.len(),
                context: limit,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.n_vocab()) {
            return Err(EngineError::InvalidToken(bad));
        }
        let chunk = MAX_OUTPUT_ROWS.min(tokens.len());
        let threads = thread_count(threads);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(tokens.len() as u32))
            .with_n_seq_max(1)
            .with_n_batch(chunk as u32)
            .with_n_ubatch(chunk as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let mut ctx = self
            .inner
            .new_context(backend(), params)
            .map_err(|e| EngineError::Context(e.to_string()))?;
        let mut batch = LlamaBatch::new(chunk, 1);
        // The last token predicts nothing we score.
        let inputs = &tokens[..tokens.len() - 1];
        for (c, piece) in inputs.chunks(chunk).enumerate() {
            batch.clear();
            let start = c * chunk;
            for (k, &t) in piece.iter().enumerate() {
                batch
                    .add(LlamaToken(t as i32), (start + k) as i32, &[0], true)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            for k in 0..piece.len() {
                f(start + k, ctx.get_logits_ith(k as i32));
            }
        }
        Ok(())
    }
}

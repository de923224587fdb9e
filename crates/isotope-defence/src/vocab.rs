//! The proxy must read the teacher's token ids as the same tokens: Δ(x) is computed
//! for the teacher's candidate ids, so a proxy with another tokenizer would score
//! unrelated tokens — silently. Checked once, when the defence is built.

use isotope_distill::StudentTokenizer;
use isotope_sampling::TokenId;

use crate::error::{DefenceError, Result};

/// Check that `proxy` (its vocabulary size and tokenizer) agrees with a teacher of
/// `teacher_vocab` tokens whose token `id` spells `teacher_token(id)` (raw bytes; the
/// text for control tokens): every id must map back to itself.
pub fn check_same_tokenizer(
    proxy_vocab: usize,
    proxy_tokenizer: &StudentTokenizer,
    teacher_vocab: usize,
    teacher_token: impl Fn(TokenId) -> Vec<u8>,
) -> Result<()> {
    if proxy_vocab != teacher_vocab {
        return Err(DefenceError::Vocabulary(format!(
            "the teacher has {teacher_vocab} tokens, the proxy {proxy_vocab}; use a proxy \
             trained with the teacher's tokenizer (`isotope distill train`) or the \
             teacher's own GGUF"
        )));
    }
    let mut mismatches = 0usize;
    let mut first = None;
    for id in 0..teacher_vocab as TokenId {
        let bytes = teacher_token(id);
        if proxy_tokenizer.bytes_token_id(&bytes) != Some(id) {
            mismatches += 1;
            first.get_or_insert((id, bytes));
        }
    }
    if let Some((id, bytes)) = first {
        return Err(DefenceError::Vocabulary(format!(
            "{mismatches} of {teacher_vocab} token ids differ; first: teacher id {id} is \
             {:?}, which the proxy's tokenizer reads as {:?}",
            String::from_utf8_lossy(&bytes),
            proxy_tokenizer.bytes_token_id(&bytes)
        )));
    }
    Ok(())
}

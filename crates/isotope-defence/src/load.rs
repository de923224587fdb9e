//! Building the defence for a teacher from files: the proxy student (a student
//! directory or a GGUF) and its precomputed gradient. Shared by the CLI (`generate`,
//! `defence bench`, `eval defences`) and by `isotope serve`, so both check the same
//! things in the same words.

use std::path::Path;
use std::sync::Arc;

use isotope_distill::{Device, Student, StudentTokenizer, TOKENIZER_FILE};
use isotope_engine::Model;
use isotope_sampling::TokenId;

use crate::error::{DefenceError, Result};
use crate::{check_same_tokenizer, Antidistill, AntidistillConfig, ProxyGradient};

/// A proxy student and its tokenizer: a student directory (with `tokenizer.json`) or a
/// GGUF (dequantized).
pub fn load_proxy(path: &Path) -> Result<(Student, StudentTokenizer)> {
    if path.is_dir() {
        let student = Student::load(path, &Device::Cpu)?;
        let tok_path = path.join(TOKENIZER_FILE);
        if !tok_path.exists() {
            return Err(DefenceError::Config(format!(
                "{} has no {TOKENIZER_FILE}: the proxy's tokenizer must be checked against \
                 the teacher's (students from `isotope distill train` carry one)",
                path.display()
            )));
        }
        Ok((student, StudentTokenizer::load(&tok_path)?))
    } else if path.exists() {
        let student = Student::from_gguf(path, &Device::Cpu)?;
        Ok((student, StudentTokenizer::from_gguf(path)?))
    } else {
        Err(DefenceError::Config(format!(
            "proxy {} not found (a student directory or a GGUF)",
            path.display()
        )))
    }
}

/// A teacher token as the proxy's tokenizer spells it: raw bytes, or the text of a
/// control token (which has no bytes).
fn teacher_token(teacher: &Model, id: TokenId) -> Vec<u8> {
    let b = teacher.token_bytes(id);
    if b.is_empty() {
        teacher.token_text(id).into_bytes()
    } else {
        b
    }
}

/// The defence for `teacher`: loads the proxy at `proxy_path`, checks that it reads
/// the teacher's token ids as the same tokens, loads the gradient at `grad_path` and
/// builds the two perturbed proxies.
pub fn antidistill_for_teacher(
    teacher: &Model,
    proxy_path: &Path,
    grad_path: &Path,
    cfg: AntidistillConfig,
) -> Result<Arc<Antidistill>> {
    cfg.validate()?;
    let (proxy, tok) = load_proxy(proxy_path)?;
    check_same_tokenizer(proxy.config().vocab_size, &tok, teacher.n_vocab(), |id| {
        teacher_token(teacher, id)
    })
    .map_err(|e| match e {
        DefenceError::Vocabulary(m) => {
            DefenceError::Vocabulary(format!("{m} (proxy {})", proxy_path.display()))
        }
        other => other,
    })?;
    let g = ProxyGradient::load(grad_path, &proxy)?;
    Ok(Arc::new(Antidistill::new(&proxy, &g, cfg)?))
}

//! The common-tuples list shipped under `data/`: built from the *reference* split of
//! the human corpora with the model's tokenizer, checked against the tokenizer it was
//! built for when loaded.
//!
//! See `isotope_watermark::common` for what the list is and why leaving its tuples
//! out keeps the p-value valid. Calibration ([`crate::calibration`]) tests only the
//! held-out split ([`HumanText::is_reference`]), so the list never saw the text it is
//! judged on.

use std::path::{Path, PathBuf};

use isotope_engine::Model;
use isotope_watermark::{CommonTuples, CommonTuplesBuilder, TupleShape};

use crate::data::HumanText;

/// A tuple is common if it occurs in at least this many reference texts (of ~7,400):
/// about the same frequency as 5 of the ~18,600 texts of the whole corpus.
pub const COMMON_MIN_TEXTS: u32 = 2;

/// Shapes the shipped list covers: the default schemes' (`h = 4` windows for
/// KGW-LeftHash/SelfHash, Gumbel and SynthID; MinHash pairs within 4 tokens; Unigram's
/// single tokens).
pub const COMMON_SHAPES: [TupleShape; 3] = [
    TupleShape::Window(4),
    TupleShape::MinPair(4),
    TupleShape::Token,
];

/// Where the list lives: `data/common-tuples.bin` beside the corpora (see
/// [`crate::default_data_dir`]).
pub fn default_common_path() -> PathBuf {
    crate::default_data_dir().join("common-tuples.bin")
}

/// A list that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// The file could not be read.
    #[error("cannot read common-tuples list {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is malformed.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        source: isotope_watermark::CommonTuplesError,
    },
    /// Built for another tokenizer: its token ids mean nothing for this model.
    #[error(
        "common-tuples list {path} was built for tokenizer {expected}, but the model's is \
         {actual}; rebuild it for this model (`isotope eval common-tuples --out FILE`) or \
         turn the filter off"
    )]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// The list's tokenizer fingerprint.
        expected: String,
        /// The model's.
        actual: String,
    },
}

/// A fingerprint of the model's tokenizer: BLAKE3 of every token's bytes in id order
/// and of which tokens are control tokens (first 16 hex digits).
pub fn tokenizer_fingerprint(model: &Model) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"isotope tokenizer fingerprint 1");
    h.update(&(model.n_vocab() as u64).to_le_bytes());
    let control = model.control_mask();
    for (t, &is_control) in control.iter().enumerate() {
        let bytes = model.token_bytes(t as u32);
        h.update(&(bytes.len() as u32).to_le_bytes());
        h.update(&bytes);
        h.update(&[u8::from(is_control)]);
    }
    h.finalize().to_hex()[..16].to_owned()
}

/// Build the list from the reference split of `texts` (held-out texts are ignored).
pub fn build_common_tuples(model: &Model, texts: &[HumanText]) -> CommonTuples {
    let mut b = CommonTuplesBuilder::new(COMMON_SHAPES.to_vec(), &model.control_mask());
    for t in texts.iter().filter(|t| t.is_reference()) {
        b.add_text(&model.tokenize(&t.text, false, false));
    }
    b.finish(
        COMMON_MIN_TEXTS,
        &tokenizer_fingerprint(model),
        &format!(
            "reference split (item % {} < {}) of data/ GSM8K train+test and Self-Instruct",
            crate::data::REFERENCE_OF,
            crate::data::REFERENCE_SHARE
        ),
    )
}

/// Read a list and check it was built for `model`'s tokenizer.
pub fn load_common_tuples(path: &Path, model: &Model) -> Result<CommonTuples, CommonError> {
    let bytes = std::fs::read(path).map_err(|source| CommonError::Io {
        path: path.to_owned(),
        source,
    })?;
    let list = CommonTuples::from_bytes(&bytes).map_err(|source| CommonError::Format {
        path: path.to_owned(),
        source,
    })?;
    let actual = tokenizer_fingerprint(model);
    if list.meta().tokenizer != actual {
        return Err(CommonError::Tokenizer {
            path: path.to_owned(),
            expected: list.meta().tokenizer.clone(),
            actual,
        });
    }
    Ok(list)
}

/// The shipped list (`data/common-tuples.bin`), compiled in so the CLI needs no data
/// directory at run time. Built for SmolLM2's tokenizer; a test checks it is exactly
/// what [`build_common_tuples`] makes from the reference split.
pub const SHIPPED_COMMON: &[u8] = include_bytes!("../../../data/common-tuples.bin");

/// The compiled-in list, if it was built for `model`'s tokenizer.
pub fn shipped_common_tuples(model: &Model) -> Result<CommonTuples, CommonError> {
    let path = PathBuf::from("<built-in data/common-tuples.bin>");
    let list = CommonTuples::from_bytes(SHIPPED_COMMON).map_err(|source| CommonError::Format {
        path: path.clone(),
        source,
    })?;
    let actual = tokenizer_fingerprint(model);
    if list.meta().tokenizer != actual {
        return Err(CommonError::Tokenizer {
            path,
            expected: list.meta().tokenizer.clone(),
            actual,
        });
    }
    Ok(list)
}

//! The shipped common-tuples list (`data/common-tuples.bin`) is exactly what the
//! generator builds from the reference split of `data/` with the model's tokenizer, so
//! calibrating on the held-out split is honest; a list for another tokenizer is
//! refused.
//!
//! `ISOTOPE_WRITE_COMMON=1` (re)writes the file instead of failing on a difference.

use std::path::PathBuf;
use std::time::Instant;

use isotope_engine::{LoadOptions, Model};
use isotope_eval::{
    build_common_tuples, default_common_path, default_data_dir, load_common_tuples,
    load_human_texts, CommonError,
};
use isotope_watermark::{CommonTuples, CommonTuplesBuilder, TupleShape};

fn model() -> Model {
    let path = std::env::var_os("ISOTOPE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    Model::load(
        &path,
        &LoadOptions {
            vocab_only: true,
            ..Default::default()
        },
    )
    .expect("model loads")
}

#[test]
fn shipped_list_is_rebuilt_exactly_from_the_reference_split() {
    let model = model();
    let texts = load_human_texts(default_data_dir()).unwrap();
    let t0 = Instant::now();
    let built = build_common_tuples(&model, &texts);
    let secs = t0.elapsed().as_secs_f64();
    let bytes = built.to_bytes();
    eprintln!(
        "common tuples: {} identities from {} reference texts (≥ {} texts each), {} bytes, \
         built in {secs:.2} s",
        built.len(),
        built.meta().reference_texts,
        built.meta().min_texts,
        bytes.len()
    );
    let path = default_common_path();
    if std::env::var_os("ISOTOPE_WRITE_COMMON").is_some() {
        std::fs::write(&path, &bytes).unwrap();
    }
    let shipped = load_common_tuples(&path, &model).expect("shipped list loads");
    assert_eq!(
        shipped,
        built,
        "{} differs from a rebuild; regenerate it (ISOTOPE_WRITE_COMMON=1)",
        path.display()
    );
    let held_out = texts.iter().filter(|t| !t.is_reference()).count();
    assert_eq!(
        built.meta().reference_texts as usize + held_out,
        texts.len()
    );
    assert!(held_out >= 10_000, "{held_out} held-out texts");
}

#[test]
fn a_list_for_another_tokenizer_is_refused() {
    let model = model();
    let mut b = CommonTuplesBuilder::new(vec![TupleShape::Token], &[]);
    b.add_text(&[1, 2, 3]);
    let list: CommonTuples = b.finish(1, "0123456789abcdef", "test");
    let path = std::env::temp_dir().join(format!("isotope-common-{}.bin", std::process::id()));
    std::fs::write(&path, list.to_bytes()).unwrap();
    let e = load_common_tuples(&path, &model).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(matches!(e, CommonError::Tokenizer { .. }), "{e}");
    assert!(e.to_string().contains("rebuild"), "{e}");
    let e = load_common_tuples(&PathBuf::from("/nonexistent/common.bin"), &model).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/common.bin"), "{e}");
}

#[test]
fn the_compiled_in_list_is_the_shipped_file() {
    let model = model();
    let shipped = isotope_eval::shipped_common_tuples(&model).unwrap();
    let file = load_common_tuples(&default_common_path(), &model).unwrap();
    assert_eq!(shipped, file);
}

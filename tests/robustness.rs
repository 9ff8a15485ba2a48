//! Property: nothing a user can write or load crashes. Random declarations (made of the
//! language's own tokens, so they get deep into the parser and lowering) and random or damaged
//! files give `Ok` or a typed error, never a panic.

mod common;

use proptest::prelude::*;
use rnn::ir::{npy, weights};
use rnn::{Program, Tensor};

const WORDS: &[&str] = &[
    "lstm",
    "gru",
    "rnn",
    "cell",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ";",
    ":",
    "=",
    "@",
    "*",
    "+",
    "-",
    "input",
    "hidden",
    "layers",
    "bidirectional",
    "proj",
    "reset",
    "before",
    "true",
    "state",
    "param",
    "output",
    "h",
    "c",
    "x",
    "W",
    "U",
    "b",
    "tanh",
    "sigmoid",
    "relu",
    "concat",
    "0",
    "1",
    "2",
    "3",
    "7",
    "0.5",
    "16777217",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512), ..ProptestConfig::default() })]

    #[test]
    fn random_declarations_never_panic(words in proptest::collection::vec(proptest::sample::select(WORDS), 0..40)) {
        let src = words.join(" ");
        if let Ok(spec) = rnn::parse_str(&src) {
            let _ = Program::compile(&spec);
        }
    }

    #[test]
    fn mutated_valid_declarations_never_panic(
        base in 0usize..5,
        edits in proptest::collection::vec((0u8..3, any::<proptest::sample::Index>(), proptest::sample::select(WORDS)), 1..4),
    ) {
        let sources = [
            common::PEEPHOLE,
            common::MINIMAL_GRU,
            common::RELU_ELMAN,
            "lstm { input: 3, hidden: 4, layers: 2, bidirectional: true, proj: 2 }",
            "gru { input: 3, hidden: 4, reset: before, bias_convention: one }",
        ];
        let mut tokens = tokens_of(sources[base]);
        for (kind, at, word) in edits {
            let i = at.index(tokens.len() + 1);
            match kind {
                0 if i < tokens.len() => tokens[i] = word.to_string(),
                1 if i < tokens.len() => {
                    tokens.remove(i);
                }
                _ => tokens.insert(i, word.to_string()),
            }
        }
        let src = tokens.join(" ");
        if let Ok(spec) = rnn::parse_str(&src) {
            let _ = Program::compile(&spec);
        }
    }

    #[test]
    fn damaged_npy_files_never_panic(cut in 0usize..200, flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..4)) {
        let mut bytes = npy::write_f32(&Tensor::zeros(vec![2, 3, 4]));
        for (i, b) in flips {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        bytes.truncate(cut.min(bytes.len()));
        let _ = npy::read_f32(&bytes);
        let _ = npy::read_i64(&bytes);
    }

    #[test]
    fn damaged_safetensors_files_never_panic(cut in 0usize..400, flips in proptest::collection::vec((0usize..400, any::<u8>()), 0..4)) {
        let mut w = std::collections::BTreeMap::new();
        w.insert("weight_ih_l0".to_string(), Tensor::zeros(vec![4, 3]));
        w.insert("weight_hh_l0".to_string(), Tensor::zeros(vec![4, 4]));
        let mut bytes = weights::write_safetensors(&w).unwrap();
        for (i, b) in flips {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        bytes.truncate(cut.min(bytes.len()));
        if let Ok(t) = weights::read_safetensors(&bytes) {
            let _ = weights::infer_spec(&t, None);
        }
    }
}

/// The tokens of a declaration, split at spaces and around punctuation.
fn tokens_of(src: &str) -> Vec<String> {
    let mut spaced = String::new();
    for ch in src.chars() {
        if "{}()[],;:=@*+-".contains(ch) {
            spaced.push(' ');
            spaced.push(ch);
            spaced.push(' ');
        } else {
            spaced.push(ch);
        }
    }
    spaced.split_whitespace().map(String::from).collect()
}

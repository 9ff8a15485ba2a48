//! The encoder-decoder: PyTorch's greedy decoding of the shared fixture reproduced exactly on
//! every backend, the bridge, and the bad inputs of decoding.

use rnn::ir::model::{Ids, Input, Recurrent, Run};
use rnn::ir::seq2seq::{Beam, Decode, Seq2Seq};
use rnn::ir::{Error, Exec, Program, Tensor, Weights, npy, weights};

mod common;

struct Fixture {
    weights: Weights,
    src: Ids,
    expected: Ids,
    steps: usize,
    sos: i64,
}

fn fixture() -> Fixture {
    let dir = common::fixtures().join("seq2seq_greedy");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let weights = Weights {
        tensors: weights::read_safetensors(&read("weights.safetensors")).unwrap(),
    };
    let (shape, data) = npy::read_i64(&read("src.npy")).unwrap();
    let src = Ids::new(shape, data).unwrap();
    let (shape, data) = npy::read_i64(&read("expected_tokens.npy")).unwrap();
    let expected = Ids::new(shape, data).unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&read("meta.json")).unwrap();
    let number = |key: &str| meta[key].as_i64().unwrap();
    Fixture {
        weights,
        src,
        expected,
        steps: number("steps") as usize,
        sos: number("sos"),
    }
}

/// Decodes the fixture with the stacks bound by `bind`.
fn decode<R: Recurrent>(bind: impl FnMut(&Program, &Weights) -> rnn::ir::Result<R>) -> (Ids, Ids) {
    let f = fixture();
    let model = Seq2Seq::from_state_dict(&f.weights, None).unwrap();
    let bound = model.bind(&f.weights, bind).unwrap();
    let decode = Decode {
        steps: f.steps,
        sos: f.sos,
        eos: None,
    };
    (bound.greedy(&f.src, None, &decode).unwrap(), f.expected)
}

#[test]
fn the_fixture_decodes_to_pytorchs_tokens_on_the_interpreter() {
    let f = fixture();
    let model = Seq2Seq::from_state_dict(&f.weights, None).unwrap();
    assert_eq!(model.encoder.spec.vocab, Some(50));
    assert_eq!(model.decoder.spec.head, Some(60));
    let bound = model.bind_interp(&f.weights, Exec::default()).unwrap();
    let decode = Decode {
        steps: f.steps,
        sos: f.sos,
        eos: None,
    };
    let tokens = bound.greedy(&f.src, None, &decode).unwrap();
    assert_eq!(tokens, f.expected);
}

#[test]
fn the_fixture_decodes_to_pytorchs_tokens_on_the_jit() {
    let (tokens, expected) = decode(rnn::jit::bind_stack);
    assert_eq!(tokens, expected);
}

rnn::seq2seq! {
    /// The shared fixture's model (`seq2seq_greedy/meta.json`).
    #[derive(Clone, Debug, PartialEq)]
    struct Greedy {
        encoder: lstm { vocab: 50, input: 8, hidden: 16, batch_first: true },
        decoder: lstm { vocab: 60, input: 8, hidden: 16, head: 60, batch_first: true },
    }
}

#[test]
fn the_fixture_decodes_to_pytorchs_tokens_on_the_macros() {
    let f = fixture();
    let model = Greedy::from_safetensors(
        &std::fs::read(common::fixtures().join("seq2seq_greedy/weights.safetensors")).unwrap(),
    )
    .unwrap();
    let bound = model.bind().unwrap();
    let decode = Decode {
        steps: f.steps,
        sos: f.sos,
        eos: None,
    };
    for isa in [
        rnn::rt::Isa::Portable,
        rnn::rt::Isa::Avx2,
        rnn::rt::Isa::Avx512,
    ] {
        if let Some(tokens) = rnn::rt::with_isa(isa, || bound.greedy(&f.src, None, &decode)) {
            assert_eq!(tokens.unwrap(), f.expected, "{isa:?}");
        }
    }
    // The same weights through the other door, and the model's own checks.
    let from_weights = Greedy::from_weights(&f.weights).unwrap();
    assert_eq!(from_weights.to_weights().tensors, f.weights.tensors);
    // The declaration's derives reach its stacks.
    assert_eq!((*from_weights).clone(), *model);
    let mut other = f.weights.clone();
    other.tensors.remove("decoder.fc.bias");
    match Greedy::from_weights(&other) {
        Err(Error::MissingTensor { name, .. }) if name == "decoder.fc.bias" => {}
        other => panic!("{:?}", other.map(drop)),
    }
}

#[test]
fn an_end_token_holds_a_finished_row_and_stops_early() {
    let f = fixture();
    let model = Seq2Seq::from_state_dict(&f.weights, None).unwrap();
    let bound = model.bind_interp(&f.weights, Exec::default()).unwrap();
    // The end token is the first token row 0 produces: row 0 repeats it from then on; row 1
    // runs on until it produces it too (or the steps end).
    let eos = f.expected.data[0];
    let decode = Decode {
        steps: f.steps,
        sos: f.sos,
        eos: Some(eos),
    };
    let tokens = bound.greedy(&f.src, None, &decode).unwrap();
    assert_eq!(tokens.shape, vec![2, f.steps]);
    assert!(tokens.data[..f.steps].iter().all(|&t| t == eos));
    let row1 = &f.expected.data[f.steps..];
    let first = row1.iter().position(|&t| t == eos).unwrap_or(f.steps);
    for (t, &token) in row1.iter().enumerate() {
        let want = if t <= first { token } else { eos };
        assert_eq!(tokens.data[f.steps + t], want, "row 1, step {t}");
    }
}

#[test]
fn bad_decoding_inputs_are_typed_errors() {
    let f = fixture();
    let model = Seq2Seq::from_state_dict(&f.weights, None).unwrap();
    let bound = model.bind_interp(&f.weights, Exec::default()).unwrap();
    let ok = Decode {
        steps: 3,
        sos: 1,
        eos: None,
    };
    // A source id outside the source vocabulary (50).
    let mut src = f.src.clone();
    src.data[3] = 50;
    let err = bound.greedy(&src, None, &ok).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Token {
                index: 3,
                found: 50,
                vocab: 50,
                ..
            }
        ),
        "{err:?}"
    );
    src.data[3] = -1;
    assert!(matches!(
        bound.greedy(&src, None, &ok),
        Err(Error::Token { found: -1, .. })
    ));
    // A start token outside the target vocabulary (60), an end token outside the classes.
    let err = bound
        .greedy(&f.src, None, &Decode { sos: 60, ..ok })
        .unwrap_err();
    assert!(
        matches!(err, Error::Token { ref name, .. } if name == "sos"),
        "{err:?}"
    );
    let err = bound
        .greedy(
            &f.src,
            None,
            &Decode {
                eos: Some(-3),
                ..ok
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::Token { ref name, .. } if name == "eos"),
        "{err:?}"
    );
    // No steps; an empty source.
    let err = bound
        .greedy(&f.src, None, &Decode { steps: 0, ..ok })
        .unwrap_err();
    assert!(err.to_string().contains("at least one step"), "{err}");
    let empty = Ids::new(vec![2, 0], vec![]).unwrap();
    let err = bound.greedy(&empty, None, &ok).unwrap_err();
    assert!(err.to_string().contains("no token"), "{err}");
    // Weights of another model: a missing tensor, a wrong shape.
    let mut w = f.weights.clone();
    w.tensors.remove("decoder.fc.bias");
    let err = Seq2Seq::from_state_dict(&w, None).unwrap_err();
    assert!(
        matches!(err, Error::MissingTensor { ref name, .. } if name == "decoder.fc.bias"),
        "{err:?}"
    );
    assert!(matches!(
        model.bind_interp(&w, Exec::default()),
        Err(Error::MissingTensor { .. })
    ));
    let mut w = f.weights.clone();
    w.tensors.insert(
        "decoder.fc.extra".into(),
        w.tensors["decoder.fc.bias"].clone(),
    );
    assert!(matches!(
        model.bind_interp(&w, Exec::default()),
        Err(Error::UnexpectedTensor { ref name }) if name == "decoder.fc.extra"
    ));
    let mut w = f.weights.clone();
    w.tensors.get_mut("decoder.embedding.weight").unwrap().shape = vec![8, 60];
    assert!(matches!(
        model.bind_interp(&w, Exec::default()),
        Err(Error::TensorShape { .. } | Error::WeightsMismatch(_))
    ));
}

#[test]
fn a_beam_of_one_is_greedy_decoding() {
    let f = fixture();
    let model = Seq2Seq::from_state_dict(&f.weights, None).unwrap();
    let bound = model.bind_interp(&f.weights, Exec::default()).unwrap();
    for eos in [None, Some(f.expected.data[0])] {
        let decode = Decode {
            steps: f.steps,
            sos: f.sos,
            eos,
        };
        let greedy = bound.greedy(&f.src, None, &decode).unwrap();
        for alpha in [0.0, 1.0] {
            let (beam, _) = bound
                .beam(&f.src, None, &decode, &Beam { width: 1, alpha })
                .unwrap();
            assert_eq!(beam, greedy, "eos {eos:?}, alpha {alpha}");
        }
    }
}

/// `log_softmax` of a row, in `f64`.
fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

#[test]
fn a_beam_as_wide_as_the_vocabulary_finds_the_best_two_token_sequence() {
    // Two steps, a beam of 60 (the whole target vocabulary): the search is exhaustive, so it
    // must return the pair (t1, t2) of largest log p(t1) + log p(t2 | t1), found here by
    // scoring all 3,600 pairs.
    let f = fixture();
    let model = Seq2Seq::from_state_dict(&f.weights, None).unwrap();
    let bound = model.bind_interp(&f.weights, Exec::default()).unwrap();
    let decode = Decode {
        steps: 2,
        sos: f.sos,
        eos: None,
    };
    let (tokens, scores) = bound
        .beam(
            &f.src,
            None,
            &decode,
            &Beam {
                width: 60,
                alpha: 0.0,
            },
        )
        .unwrap();
    let src_len = f.src.shape[1];
    for (b, &score) in scores.iter().enumerate() {
        let src = Ids::new(
            vec![1, src_len],
            f.src.data[b * src_len..(b + 1) * src_len].to_vec(),
        )
        .unwrap();
        let states = bound.encode(&src, None).unwrap();
        let step = |ids: Vec<i64>, states: &[Tensor]| {
            let ids = Ids::new(vec![ids.len(), 1], ids).unwrap();
            let run = Run {
                initial_states: states.iter().map(Some).collect(),
                ..Run::new(Input::Ids(&ids))
            };
            bound.decoder.forward(&run).unwrap()
        };
        let first = step(vec![f.sos], &states);
        let lp1 = log_softmax(&first.output.data);
        // Every first token at once: 60 rows from the same state.
        let repeat = |s: &Tensor| Tensor {
            shape: vec![s.shape[0], 60, s.shape[2]],
            data: (0..s.shape[0])
                .flat_map(|l| {
                    let n = s.shape[2];
                    let row = s.data[l * n..(l + 1) * n].to_vec();
                    std::iter::repeat_n(row, 60).flatten()
                })
                .collect(),
        };
        let repeated: Vec<Tensor> = first.final_states.iter().map(repeat).collect();
        let second = step((0..60).collect(), &repeated);
        let mut best = (f64::NEG_INFINITY, 0, 0);
        for (t1, &l1) in lp1.iter().enumerate() {
            let lp2 = log_softmax(&second.output.data[t1 * 60..(t1 + 1) * 60]);
            for (t2, &l) in lp2.iter().enumerate() {
                let s = l1 + l;
                if s > best.0 {
                    best = (s, t1 as i64, t2 as i64);
                }
            }
        }
        assert_eq!(tokens.data[b * 2..b * 2 + 2], [best.1, best.2], "row {b}");
        // The same sums in float32 over batches of other sizes: equal to rounding.
        assert!((score - best.0).abs() < 1e-5, "{} vs {}", score, best.0);
    }
}

#[test]
fn bad_beams_are_typed_errors() {
    let f = fixture();
    let model = Seq2Seq::from_state_dict(&f.weights, None).unwrap();
    let bound = model.bind_interp(&f.weights, Exec::default()).unwrap();
    let decode = Decode {
        steps: 3,
        sos: 1,
        eos: None,
    };
    let err = bound
        .beam(
            &f.src,
            None,
            &decode,
            &Beam {
                width: 0,
                alpha: 1.0,
            },
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("beam width must be in 1 ..="),
        "{err}"
    );
    // Sizes that cannot be held are typed errors before any work.
    for (steps, width) in [(usize::MAX, 1), (1 << 25, 1), (3, usize::MAX), (3, 1 << 25)] {
        let err = bound
            .beam(
                &f.src,
                None,
                &Decode { steps, ..decode },
                &Beam { width, alpha: 1.0 },
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("largest size") || err.to_string().contains("beam width"),
            "{err}"
        );
    }
    let err = bound
        .greedy(
            &f.src,
            None,
            &Decode {
                steps: usize::MAX,
                ..decode
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("largest size"), "{err}");
    for alpha in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(
            bound
                .beam(&f.src, None, &decode, &Beam { width: 2, alpha })
                .is_err()
        );
    }
}

rnn::seq2seq! {
    /// An encoder-decoder of custom cells: a minimal GRU reads, a ReLU Elman cell writes.
    struct CustomCells {
        encoder: rnn {
            vocab: 7, input: 3, hidden: 4, bidirectional: true, batch_first: true,
            param W_z: [hidden, input], param W_h: [hidden, input], param b: [hidden],
            state h,
            z = sigmoid(W_z @ x + b),
            h = (1 - z) * h + z * tanh(W_h @ x),
        },
        decoder: rnn {
            vocab: 6, input: 3, hidden: 8, head: 6, batch_first: true, attention: general,
            param W_xh: [hidden, input], param W_hh: [hidden, hidden],
            state h,
            h = relu(W_xh @ x + W_hh @ h),
        },
    }
}

/// The loss, its gradients and the greedy tokens of an encoder-decoder on a fixed batch.
fn run_custom<R: Recurrent>(
    bound: &rnn::ir::seq2seq::BoundSeq2Seq<'_, R>,
) -> (rnn::ir::model::Loss, Ids) {
    let src = Ids::new(vec![2, 4], vec![1, 2, 3, 4, 5, 6, 1, 0]).unwrap();
    let lengths = [4, 3];
    let tgt_in = Ids::new(vec![2, 3], vec![1, 3, 4, 1, 5, 2]).unwrap();
    let tgt_out = Ids::new(vec![2, 3], vec![3, 4, 2, 5, 2, -100]).unwrap();
    let loss = bound
        .loss(&src, Some(&lengths), &tgt_in, &tgt_out, -100)
        .unwrap();
    let decode = Decode {
        steps: 5,
        sos: 1,
        eos: Some(2),
    };
    let tokens = bound.greedy(&src, Some(&lengths), &decode).unwrap();
    (loss, tokens)
}

#[test]
fn custom_cells_encode_and_decode_alike_on_every_backend() {
    let model = CustomCells::init(3).unwrap();
    let weights = model.to_weights();
    let runtime = CustomCells::compiled().unwrap();
    let (want, want_tokens) = run_custom(&runtime.bind_interp(&weights, Exec::default()).unwrap());
    let jit = runtime.bind(&weights, rnn::jit::bind_stack).unwrap();
    let emitted = model.bind().unwrap();
    let mut runs = vec![("jit", run_custom(&jit))];
    for isa in [
        rnn::rt::Isa::Portable,
        rnn::rt::Isa::Avx2,
        rnn::rt::Isa::Avx512,
    ] {
        if let Some(r) = rnn::rt::with_isa(isa, || run_custom(&emitted)) {
            runs.push(("macro", r));
        }
    }
    for (backend, (loss, tokens)) in runs {
        assert_eq!(tokens, want_tokens, "{backend}");
        assert!(
            (loss.loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
            "{backend}"
        );
        assert_eq!(loss.grads.params.len(), runtime.parameters().len());
        for (name, g) in &want.grads.params {
            common::assert_close(
                &format!("{backend}: {name}"),
                &loss.grads.params[name],
                g,
                1e-5,
                1e-6,
            );
        }
    }
}

#[test]
fn binding_stacks_checks_the_layers_it_is_given() {
    let model = CustomCells::init(1).unwrap();
    let runtime = CustomCells::compiled().unwrap();
    let table = model.encoder_embedding_weight.as_flattened();
    let nan = vec![f32::NAN; table.len()];
    for (layers, wanted) in [
        (vec![("encoder.embedding.weight", table)], "missing tensor"),
        (
            vec![("encoder.embedding.weight", &table[1..])],
            "holds 20 elements",
        ),
        (vec![("encoder.embedding.weight", &nan[..])], "holds NaN"),
        (
            vec![("encoder.rnn.W_z_l0", table)],
            "missing tensor `encoder.embedding.weight`",
        ),
    ] {
        let (enc, dec) = (
            rnn::rt::Emitted(&model.encoder),
            rnn::rt::Emitted(&model.decoder),
        );
        let err = runtime
            .bind_stacks(&layers, enc, dec)
            .map(drop)
            .unwrap_err();
        assert!(err.to_string().contains(wanted), "{wanted}: {err}");
    }
}

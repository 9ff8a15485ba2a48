//! Models around a stack against PyTorch (`tests/fixtures/model/`, made by
//! `make_model_cases.py`): an embedding, a stack and a linear head trained by the mean
//! cross-entropy with an ignore index, and teacher-forced encoder-decoders (a bidirectional
//! encoder through the bridge; a two-layer encoder over packed sources). The loss, the logits
//! and every gradient, on the interpreter and on the JIT.

use rnn::ir::model::{BoundModel, Ids, Input, Model, Recurrent, Run};
use rnn::ir::seq2seq::{BoundSeq2Seq, Decode, Seq2Seq};
use rnn::ir::spec::{Placement, Score};
use rnn::ir::{Error, Exec, Program, Tensor, Weights, npy, weights};
use std::collections::BTreeMap;
use std::path::PathBuf;

mod common;
use common::assert_close;

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-6;

fn dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(case)
}

fn read(case: &str, file: &str) -> Vec<u8> {
    std::fs::read(dir(case).join(file)).unwrap()
}

fn ids(case: &str, file: &str) -> Ids {
    let (shape, data) = npy::read_i64(&read(case, file)).unwrap();
    Ids::new(shape, data).unwrap()
}

fn meta(case: &str) -> serde_json::Value {
    serde_json::from_slice(&read(case, "meta.json")).unwrap()
}

fn weights_of(case: &str) -> Weights {
    Weights {
        tensors: weights::read_safetensors(&read(case, "weights.safetensors")).unwrap(),
    }
}

fn expected(case: &str) -> BTreeMap<String, Tensor> {
    weights::read_safetensors(&read(case, "expected.safetensors")).unwrap()
}

/// The declaration of a language-model case.
fn declaration(m: &serde_json::Value) -> String {
    let cell = match m["cell"].as_str().unwrap() {
        "rnn_tanh" => "rnn",
        other => other,
    };
    let vocab = match m["vocab"].as_u64().unwrap() {
        0 => String::new(),
        v => format!("vocab: {v}, "),
    };
    format!(
        "{cell} {{ {vocab}input: {}, hidden: {}, layers: {}, bidirectional: {}, batch_first: {}, head: {} }}",
        m["input"], m["hidden"], m["layers"], m["bidirectional"], m["batch_first"], m["head"]
    )
}

const LM_CASES: [&str; 3] = [
    "lm_lstm_2layer",
    "gru_bidir_features_batch_first",
    "rnn_lm_batch_first",
];

fn check_lm<R: Recurrent>(case: &str, bound: &BoundModel<'_, R>, backend: &str) {
    let m = meta(case);
    let want = expected(case);
    let targets = ids(case, "targets.npy");
    let ignore = m["ignore_index"].as_i64().unwrap();
    let features;
    let tokens;
    let input = if m["vocab"].as_u64().unwrap() == 0 {
        features = npy::read_f32(&read(case, "input.npy")).unwrap();
        Input::Features(&features)
    } else {
        tokens = ids(case, "input.npy");
        Input::Ids(&tokens)
    };
    let run = Run::new(input);
    let what = |n: &str| format!("{case} ({backend}): {n}");
    let logits = bound.forward(&run).unwrap();
    assert_close(&what("logits"), &logits.output, &want["logits"], RTOL, ATOL);
    let loss = bound.loss(&run, &targets, ignore).unwrap();
    let expected_loss = want["loss"].data[0] as f64;
    assert!(
        (loss.loss - expected_loss).abs() <= 1e-5 * expected_loss.abs(),
        "{}: {} against PyTorch's {expected_loss}",
        what("loss"),
        loss.loss
    );
    let counted = targets.data.iter().filter(|&&t| t != ignore).count();
    assert_eq!(loss.counted, counted);
    let names: Vec<String> = bound
        .model()
        .parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(loss.grads.params.len(), names.len());
    for name in names {
        assert_close(
            &what(&format!("grad.{name}")),
            &loss.grads.params[&name],
            &want[&format!("grad.{name}")],
            RTOL,
            ATOL,
        );
    }
    match (&loss.grads.input, want.get("grad.input")) {
        (Some(g), Some(w)) => assert_close(&what("grad.input"), g, w, RTOL, ATOL),
        (None, None) => {}
        (g, w) => panic!("{}: {g:?} against {w:?}", what("grad.input")),
    }
}

#[test]
fn language_models_match_pytorch_on_the_interpreter() {
    for case in LM_CASES {
        let model = Model::compile(&rnn::parse_str(&declaration(&meta(case))).unwrap()).unwrap();
        let bound = model
            .bind_interp(&weights_of(case), Exec::default())
            .unwrap();
        check_lm(case, &bound, "interp");
    }
}

#[test]
fn language_models_match_pytorch_on_the_jit() {
    for case in LM_CASES {
        let model = Model::compile(&rnn::parse_str(&declaration(&meta(case))).unwrap()).unwrap();
        let bound = model.bind(&weights_of(case), rnn::jit::bind_stack).unwrap();
        check_lm(case, &bound, "jit");
    }
}

const SEQ2SEQ_CASES: [&str; 8] = [
    "seq2seq_gru_bidir",
    "seq2seq_lstm_2layer_packed",
    "seq2seq_attn_general_lstm_packed",
    "seq2seq_attn_additive_gru_bidir",
    "seq2seq_attn_dot_rnn",
    "seq2seq_input_attn_additive_gru_bidir",
    "seq2seq_input_attn_general_lstm_2layer",
    "seq2seq_input_attn_dot_rnn",
];

/// Checks the teacher-forced loss of `case` and its gradients on `backend` (`interp`, `jit`).
fn check_seq2seq(case: &str, backend: &str) {
    let w = weights_of(case);
    let model = Seq2Seq::from_state_dict(&w, None).unwrap();
    let m = meta(case);
    assert_eq!(model.encoder.spec.bidirectional, m["bidirectional"] == true);
    let score = model.decoder.spec.attention.map(|a| a.score);
    let want = match m["attention"].as_str() {
        None => None,
        Some("dot") => Some(Score::Dot),
        Some("general") => Some(Score::General),
        Some(_) => Some(Score::Additive(m["units"].as_u64().unwrap() as usize)),
    };
    assert_eq!(score, want, "{case}: the attention inferred from the names");
    let placement = model.decoder.spec.attention.map(|a| a.placement);
    let want = m["attention"]
        .as_str()
        .map(|_| match m["placement"].as_str() {
            Some("input") => Placement::Input,
            _ => Placement::Output,
        });
    assert_eq!(
        placement, want,
        "{case}: the placement inferred from the shapes"
    );
    match backend {
        "interp" => compare_seq2seq(
            case,
            &model,
            &model.bind_interp(&w, Exec::default()).unwrap(),
            backend,
        ),
        _ => compare_seq2seq(
            case,
            &model,
            &model.bind(&w, rnn::jit::bind_stack).unwrap(),
            backend,
        ),
    }
}

fn compare_seq2seq<R: Recurrent>(
    case: &str,
    model: &Seq2Seq,
    bound: &BoundSeq2Seq<'_, R>,
    backend: &str,
) {
    let want = expected(case);
    let lengths = dir(case)
        .join("src_lengths.npy")
        .exists()
        .then(|| npy::read_i64(&read(case, "src_lengths.npy")).unwrap().1);
    let loss = bound
        .loss(
            &ids(case, "src.npy"),
            lengths.as_deref(),
            &ids(case, "tgt_in.npy"),
            &ids(case, "tgt_out.npy"),
            -100,
        )
        .unwrap();
    let expected_loss = want["loss"].data[0] as f64;
    assert!(
        (loss.loss - expected_loss).abs() <= 1e-5 * expected_loss.abs(),
        "{case} ({backend}): loss {} against PyTorch's {expected_loss}",
        loss.loss
    );
    // Greedy decoding (through the attention, over the packed sources) as PyTorch's.
    let decode = Decode {
        steps: 6,
        sos: 1,
        eos: None,
    };
    let tokens = bound
        .greedy(&ids(case, "src.npy"), lengths.as_deref(), &decode)
        .unwrap();
    assert_eq!(
        tokens,
        ids(case, "greedy_tokens.npy"),
        "{case} ({backend}): greedy tokens"
    );
    assert_eq!(loss.grads.params.len(), model.parameters().len());
    for (name, _) in model.parameters() {
        assert_close(
            &format!("{case} ({backend}): grad.{name}"),
            &loss.grads.params[&name],
            &want[&format!("grad.{name}")],
            RTOL,
            ATOL,
        );
    }
}

#[test]
fn teacher_forced_seq2seq_matches_pytorch_on_the_interpreter() {
    for case in SEQ2SEQ_CASES {
        check_seq2seq(case, "interp");
    }
}

#[test]
fn teacher_forced_seq2seq_matches_pytorch_on_the_jit() {
    for case in SEQ2SEQ_CASES {
        check_seq2seq(case, "jit");
    }
}

/// The cases declared with the macros: the emitted stacks, the layers on the shared kernels.
mod declared {
    rnn::lstm! { pub struct LmLstm2Layer { vocab: 11, input: 5, hidden: 7, layers: 2, head: 11 } }
    rnn::gru! {
        pub struct GruBidirFeatures { input: 4, hidden: 6, bidirectional: true, batch_first: true, head: 5 }
    }
    rnn::rnn! { pub struct RnnLm { vocab: 9, input: 3, hidden: 8, batch_first: true, head: 9 } }

    rnn::seq2seq! {
        pub struct GruBidir {
            encoder: gru { vocab: 13, input: 4, hidden: 5, bidirectional: true, batch_first: true },
            decoder: gru { vocab: 9, input: 4, hidden: 10, head: 9, batch_first: true },
        }
    }
    rnn::seq2seq! {
        pub struct Lstm2LayerPacked {
            encoder: lstm { vocab: 12, input: 3, hidden: 6, layers: 2, batch_first: true },
            decoder: lstm { vocab: 10, input: 3, hidden: 6, layers: 2, head: 10, batch_first: true },
        }
    }
    rnn::seq2seq! {
        pub struct AttnGeneralLstm {
            encoder: lstm { vocab: 12, input: 3, hidden: 6, batch_first: true },
            decoder: lstm { vocab: 10, input: 3, hidden: 6, head: 10, batch_first: true, attention: general },
        }
    }
    rnn::seq2seq! {
        pub struct AttnAdditiveGruBidir {
            encoder: gru { vocab: 11, input: 4, hidden: 4, bidirectional: true, batch_first: true },
            decoder: gru {
                vocab: 9, input: 4, hidden: 8, head: 9, batch_first: true,
                attention: additive, attention_units: 5,
            },
        }
    }
    rnn::seq2seq! {
        pub struct InputAttnAdditiveGruBidir {
            encoder: gru { vocab: 11, input: 4, hidden: 4, bidirectional: true, batch_first: true },
            decoder: gru {
                vocab: 9, input: 4, hidden: 8, head: 9, batch_first: true,
                attention: additive, attention_units: 5, attention_placement: input,
            },
        }
    }
    rnn::seq2seq! {
        pub struct InputAttnGeneralLstm2Layer {
            encoder: lstm { vocab: 12, input: 3, hidden: 6, layers: 2, batch_first: true },
            decoder: lstm {
                vocab: 10, input: 3, hidden: 6, layers: 2, head: 10, batch_first: true,
                attention: general, attention_placement: input,
            },
        }
    }
    rnn::seq2seq! {
        pub struct InputAttnDotRnn {
            encoder: rnn { vocab: 10, input: 3, hidden: 6, batch_first: true },
            decoder: rnn {
                vocab: 8, input: 3, hidden: 6, head: 8, batch_first: true,
                attention: dot, attention_placement: input,
            },
        }
    }
    rnn::seq2seq! {
        pub struct AttnDotRnn {
            encoder: rnn { vocab: 10, input: 3, hidden: 6, batch_first: true },
            decoder: rnn { vocab: 8, input: 3, hidden: 6, head: 8, batch_first: true, attention: dot },
        }
    }
}

/// Runs `f` on each path of the emitted kernels this CPU has, named.
fn on_each_isa(mut f: impl FnMut(&str)) {
    use rnn::rt::Isa;
    for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
        rnn::rt::with_isa(isa, || f(&format!("macro {isa:?}")));
    }
}

#[test]
fn language_models_match_pytorch_on_the_macros() {
    macro_rules! check {
        ($case:expr, $ty:ty) => {{
            let model = <$ty>::from_weights(&weights_of($case)).unwrap();
            // The macro's declaration is the case's: the runtime's view of it agrees.
            let runtime =
                Model::compile(&rnn::parse_str(&declaration(&meta($case))).unwrap()).unwrap();
            assert_eq!(
                <$ty>::compiled().unwrap().parameters(),
                runtime.parameters()
            );
            assert_eq!(<$ty>::PARAMETERS as u128, runtime.parameter_count());
            let bound = model.bind().unwrap();
            on_each_isa(|backend| check_lm($case, &bound, backend));
        }};
    }
    check!("lm_lstm_2layer", declared::LmLstm2Layer);
    check!("gru_bidir_features_batch_first", declared::GruBidirFeatures);
    check!("rnn_lm_batch_first", declared::RnnLm);
}

#[test]
fn teacher_forced_seq2seq_matches_pytorch_on_the_macros() {
    macro_rules! check {
        ($case:expr, $ty:ty) => {{
            let w = weights_of($case);
            let model = <$ty>::from_weights(&w).unwrap();
            let runtime = Seq2Seq::from_state_dict(&w, None).unwrap();
            let compiled = <$ty>::compiled().unwrap();
            assert_eq!(compiled.parameters(), runtime.parameters());
            assert_eq!(
                compiled.decoder.spec.attention,
                runtime.decoder.spec.attention
            );
            assert_eq!(
                model.to_weights().tensors,
                w.tensors,
                "{}: weights round trip",
                $case
            );
            let bound = model.bind().unwrap();
            on_each_isa(|backend| compare_seq2seq($case, compiled, &bound, backend));
        }};
    }
    check!("seq2seq_gru_bidir", declared::GruBidir);
    check!("seq2seq_lstm_2layer_packed", declared::Lstm2LayerPacked);
    check!(
        "seq2seq_attn_general_lstm_packed",
        declared::AttnGeneralLstm
    );
    check!(
        "seq2seq_attn_additive_gru_bidir",
        declared::AttnAdditiveGruBidir
    );
    check!("seq2seq_attn_dot_rnn", declared::AttnDotRnn);
    check!(
        "seq2seq_input_attn_additive_gru_bidir",
        declared::InputAttnAdditiveGruBidir
    );
    check!(
        "seq2seq_input_attn_general_lstm_2layer",
        declared::InputAttnGeneralLstm2Layer
    );
    check!("seq2seq_input_attn_dot_rnn", declared::InputAttnDotRnn);
}

#[test]
fn bad_model_inputs_are_typed_errors() {
    let case = "lm_lstm_2layer";
    let model = Model::compile(&rnn::parse_str(&declaration(&meta(case))).unwrap()).unwrap();
    let bound = model
        .bind_interp(&weights_of(case), Exec::default())
        .unwrap();
    let x = ids(case, "input.npy");
    let targets = ids(case, "targets.npy");
    // An input id outside the vocabulary of 11; a target outside the 11 classes.
    let mut bad = x.clone();
    bad.data[4] = 11;
    let err = bound.forward(&Run::new(Input::Ids(&bad))).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Token {
                index: 4,
                found: 11,
                vocab: 11,
                ..
            }
        ),
        "{err:?}"
    );
    let mut bad = targets.clone();
    bad.data[1] = -7;
    let err = bound
        .loss(&Run::new(Input::Ids(&x)), &bad, -100)
        .unwrap_err();
    assert!(
        matches!(err, Error::Token { ref name, found: -7, .. } if name == "targets"),
        "{err:?}"
    );
    // Targets of another shape; every target ignored; an ignore index beyond 2^24.
    let short = Ids::new(vec![1, 3], vec![0, 1, 2]).unwrap();
    let err = bound
        .loss(&Run::new(Input::Ids(&x)), &short, -100)
        .unwrap_err();
    assert!(matches!(err, Error::TensorShape { .. }), "{err:?}");
    let none = Ids::new(targets.shape.clone(), vec![-100; targets.data.len()]).unwrap();
    let err = bound
        .loss(&Run::new(Input::Ids(&x)), &none, -100)
        .unwrap_err();
    assert!(
        err.to_string().contains("every target is the ignore index"),
        "{err}"
    );
    let err = bound
        .loss(&Run::new(Input::Ids(&x)), &targets, 1 << 30)
        .unwrap_err();
    assert!(err.to_string().contains("2^24"), "{err}");
    // Features to a model that embeds ids.
    let f = Tensor::zeros(vec![6, 3, 5]);
    let err = bound.forward(&Run::new(Input::Features(&f))).unwrap_err();
    assert!(err.to_string().contains("give it ids"), "{err}");
    // Ids made by hand (public fields) that disagree with their shape.
    for bad in [
        Ids {
            shape: vec![18],
            data: vec![0; 18],
        },
        Ids {
            shape: vec![6, 3],
            data: vec![0; 17],
        },
    ] {
        let err = bound.forward(&Run::new(Input::Ids(&bad))).unwrap_err();
        assert!(err.to_string().contains("holds"), "{err}");
        let err = bound
            .loss(&Run::new(Input::Ids(&x)), &bad, -100)
            .unwrap_err();
        assert!(err.to_string().contains("holds"), "{err}");
    }
    // Ids of one dimension; the wrong count.
    assert!(Ids::new(vec![6], vec![0; 6]).is_err());
    assert!(Ids::new(vec![2, 3], vec![0; 5]).is_err());
    // Weights of another model: a stack's names without the `rnn.` prefix.
    let w = weights_of(case);
    let stripped = w.clone().strip_prefix("rnn.").unwrap();
    assert!(matches!(
        model.bind_interp(&stripped, Exec::default()),
        Err(Error::MissingTensor { .. })
    ));
    // A Program refuses a declaration with layers around its stack, naming Model.
    let spec = rnn::parse_str("lstm { vocab: 4, input: 2, hidden: 3, head: 4 }").unwrap();
    let err = Program::compile(&spec).unwrap_err();
    assert!(err.to_string().contains("Model::compile"), "{err}");
    // Past a sequence's length a target must be ignored.
    let lengths = [6i64, 2, 6];
    let run = Run {
        lengths: Some(&lengths),
        ..Run::new(Input::Ids(&x))
    };
    let err = bound.loss(&run, &targets, -100).unwrap_err();
    assert!(err.to_string().contains("past its length"), "{err}");
}

#[test]
fn an_attention_seq2seq_models_gradients_match_finite_differences() {
    // A small encoder-decoder with additive attention over a bidirectional GRU encoder and
    // packed sources: every parameter's gradient (three entries of each) against central
    // differences of the loss. The model computes in float32; the loss is summed in float64
    // and the step is large enough that float32 rounding stays below the tolerance. The
    // attention after the stack, then in the step.
    for placement in [Placement::Output, Placement::Input] {
        attention_gradients_match_finite_differences(placement);
    }
}

fn attention_gradients_match_finite_differences(placement: Placement) {
    use rnn::ir::spec::Attention;
    let mut enc = rnn::ModelSpec::new(rnn::CellKind::Gru, 3, 4);
    enc.vocab = Some(7);
    enc.bidirectional = true;
    enc.batch_first = true;
    let mut dec = rnn::ModelSpec::new(rnn::CellKind::Gru, 3, 8);
    dec.vocab = Some(6);
    dec.head = Some(6);
    dec.batch_first = true;
    dec.attention = Some(Attention {
        score: Score::Additive(5),
        memory: 1,
        placement,
    });
    let model = Seq2Seq::new(&enc, &dec).unwrap();
    let weights = model.init(3).unwrap();
    let src = Ids::new(vec![2, 4], vec![1, 5, 6, 2, 3, 0, 4, 4]).unwrap();
    let lengths = [4i64, 2];
    let tgt_in = Ids::new(vec![2, 3], vec![1, 2, 3, 1, 5, 0]).unwrap();
    let tgt_out = Ids::new(vec![2, 3], vec![2, 3, 4, 5, -100, -100]).unwrap();
    let loss_of = |w: &Weights| {
        let bound = model.bind_interp(w, Exec::default()).unwrap();
        bound
            .loss(&src, Some(&lengths), &tgt_in, &tgt_out, -100)
            .unwrap()
    };
    let analytic = loss_of(&weights).grads.params;
    let eps = 1e-2f32;
    for (name, dims) in model.parameters() {
        let n: usize = dims.iter().product();
        for k in [0, n / 2, n - 1] {
            let mut plus = weights.clone();
            plus.tensors.get_mut(&name).unwrap().data[k] += eps;
            let mut minus = weights.clone();
            minus.tensors.get_mut(&name).unwrap().data[k] -= eps;
            // The step actually taken in float32.
            let h = (plus.tensors[&name].data[k] - minus.tensors[&name].data[k]) as f64;
            let numeric = (loss_of(&plus).loss - loss_of(&minus).loss) / h;
            let a = analytic[&name].data[k] as f64;
            assert!(
                (a - numeric).abs() <= 2e-4 + 2e-2 * numeric.abs(),
                "{placement:?}: d loss / d {name}[{k}]: {a} by autodiff, {numeric} by finite differences"
            );
        }
    }
}

#[test]
fn a_prepared_memory_decodes_to_the_same_bits_and_is_checked() {
    // Greedy decoding prepares the memory once (the projected memory of the general and
    // additive scores); one decoder step on it equals the step that computes everything.
    use rnn::ir::model::MemoryRef;
    for case in [
        "seq2seq_attn_general_lstm_packed",
        "seq2seq_attn_additive_gru_bidir",
    ] {
        let w = weights_of(case);
        let model = Seq2Seq::from_state_dict(&w, None).unwrap();
        let bound = model.bind_interp(&w, Exec::default()).unwrap();
        let src = ids(case, "src.npy");
        let lengths = npy::read_i64(&read(case, "src_lengths.npy")).unwrap().1;
        let (states, memory) = bound.encode_all(&src, Some(&lengths)).unwrap();
        let memory = memory.unwrap();
        let plain = MemoryRef {
            values: &memory,
            lengths: Some(&lengths),
            prepared: None,
        };
        let prepared = bound.decoder.prepare(plain).unwrap();
        let tokens = Ids::new(vec![3, 1], vec![1, 2, 3]).unwrap();
        let step = |memory| {
            bound
                .decoder
                .forward(&Run {
                    initial_states: states.iter().map(Some).collect(),
                    memory: Some(memory),
                    ..Run::new(Input::Ids(&tokens))
                })
                .unwrap()
                .output
        };
        let with = step(MemoryRef {
            prepared: Some(&prepared),
            ..plain
        });
        assert_eq!(with.data, step(plain).data, "{case}");
        // A prepared memory of another batch is refused.
        let two = Ids::new(vec![2, 1], vec![1, 2]).unwrap();
        let err = bound
            .decoder
            .forward(&Run {
                initial_states: Vec::new(),
                memory: Some(MemoryRef {
                    prepared: Some(&prepared),
                    ..plain
                }),
                ..Run::new(Input::Ids(&two))
            })
            .unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }
}

#[test]
fn an_attention_in_the_step_decodes_by_beam_as_greedily_and_refuses_what_it_cannot_run() {
    use rnn::ir::model::MemoryRef;
    use rnn::ir::seq2seq::Beam;
    let case = "seq2seq_input_attn_general_lstm_2layer";
    let w = weights_of(case);
    let model = Seq2Seq::from_state_dict(&w, None).unwrap();
    let bound = model.bind_interp(&w, Exec::default()).unwrap();
    let src = ids(case, "src.npy");
    let lengths = npy::read_i64(&read(case, "src_lengths.npy")).unwrap().1;
    // A beam of one is greedy decoding, through the steps' attention.
    let decode = Decode {
        steps: 6,
        sos: 1,
        eos: None,
    };
    let greedy = bound.greedy(&src, Some(&lengths), &decode).unwrap();
    assert_eq!(greedy, ids(case, "greedy_tokens.npy"));
    let (beam, _) = bound
        .beam(
            &src,
            Some(&lengths),
            &decode,
            &Beam {
                width: 1,
                alpha: 0.0,
            },
        )
        .unwrap();
    assert_eq!(beam, greedy);
    // Lengths for the decoder's own rows: refused, with what to do instead.
    let (states, memory) = bound.encode_all(&src, Some(&lengths)).unwrap();
    let memory = memory.unwrap();
    let tgt = ids(case, "tgt_in.npy");
    let run = Run {
        lengths: Some(&[4, 4, 4]),
        initial_states: states.iter().map(Some).collect(),
        memory: Some(MemoryRef {
            values: &memory,
            lengths: Some(&lengths),
            prepared: None,
        }),
        ..Run::new(Input::Ids(&tgt))
    };
    let err = bound.decoder.forward(&run).unwrap_err();
    assert!(err.to_string().contains("give no `lengths`"), "{err}");
    // No memory at all.
    let run = Run {
        initial_states: states.iter().map(Some).collect(),
        ..Run::new(Input::Ids(&tgt))
    };
    let err = bound.decoder.forward(&run).unwrap_err();
    assert!(err.to_string().contains("give it with the run"), "{err}");
    // A bidirectional stack cannot run one step after another.
    let mut spec = model.decoder.spec.clone();
    spec.bidirectional = true;
    let err = Model::compile(&spec).unwrap_err();
    assert!(
        matches!(err, Error::Spec(ref m) if m.contains("cannot be bidirectional")),
        "{err}"
    );
    // Features without an embedding are read by the steps: their shape is checked there.
    let mut spec =
        rnn::parse_str("gru { input: 2, hidden: 3, attention: dot, attention_placement: input }")
            .unwrap();
    spec.attention.as_mut().unwrap().memory = 3;
    let features = Model::compile(&spec).unwrap();
    let fb = features
        .bind_interp(&features.init(0).unwrap(), Exec::default())
        .unwrap();
    let values = Tensor::zeros(vec![4, 1, 3]);
    let with = |x| Run {
        memory: Some(MemoryRef {
            values: &values,
            lengths: None,
            prepared: None,
        }),
        ..Run::new(Input::Features(x))
    };
    let wide = Tensor::zeros(vec![2, 1, 5]);
    let err = fb.forward(&with(&wide)).unwrap_err();
    assert!(
        matches!(err, Error::TensorShape { ref name, .. } if name == "input"),
        "{err}"
    );
    let x = Tensor::zeros(vec![2, 1, 2]);
    assert_eq!(fb.forward(&with(&x)).unwrap().output.shape, vec![2, 1, 3]);
    // A custom cell whose output is not one of its states has no first query.
    let text =
        "cell { vocab: 5, input: 2, hidden: 3, head: 5, attention: dot, attention_placement: input,
        param W: [hidden, input], param V: [hidden, hidden], state h, h = tanh(W @ x + V @ h),
        output y = 2 * h }";
    let mut dec = rnn::parse_str(text).unwrap();
    let mut enc = rnn::parse_str("rnn { vocab: 5, input: 2, hidden: 3 }").unwrap();
    (dec.batch_first, enc.batch_first) = (true, true);
    // Refused when the model is compiled (so `seq2seq!` refuses it at compile time).
    let err = Seq2Seq::new(&enc, &dec).map(drop).unwrap_err();
    assert!(
        matches!(err, Error::Spec(ref m) if m.contains("is not one of its states")),
        "{err}"
    );
}

#[test]
fn an_attention_in_the_step_runs_time_major_as_batch_first_and_checks_its_memory() {
    // The same model and data in both layouts: the same loss and gradients.
    use rnn::ir::model::MemoryRef;
    use rnn::ir::spec::Attention;
    let specs = |batch_first: bool| {
        let mut enc = rnn::ModelSpec::new(rnn::CellKind::Lstm, 3, 4);
        enc.vocab = Some(7);
        enc.num_layers = 2;
        enc.batch_first = batch_first;
        let mut dec = enc.clone();
        dec.vocab = Some(6);
        dec.head = Some(6);
        dec.attention = Some(Attention {
            score: Score::Additive(5),
            memory: 1,
            placement: Placement::Input,
        });
        Seq2Seq::new(&enc, &dec).unwrap()
    };
    let (bf, tm) = (specs(true), specs(false));
    let weights = bf.init(2).unwrap();
    let transpose = |x: &Ids| {
        let (a, b) = (x.shape[0], x.shape[1]);
        let data = (0..a * b).map(|i| x.data[(i % a) * b + i / a]).collect();
        Ids::new(vec![b, a], data).unwrap()
    };
    let src = Ids::new(vec![3, 4], vec![1, 5, 6, 2, 3, 0, 4, 4, 6, 6, 1, 2]).unwrap();
    let tgt_in = Ids::new(vec![3, 2], vec![1, 2, 1, 5, 1, 3]).unwrap();
    let tgt_out = Ids::new(vec![3, 2], vec![2, 3, 5, -100, 4, 4]).unwrap();
    let lengths = [4i64, 2, 3];
    let a = bf
        .bind_interp(&weights, Exec::default())
        .unwrap()
        .loss(&src, Some(&lengths), &tgt_in, &tgt_out, -100)
        .unwrap();
    let b = tm
        .bind_interp(&weights, Exec::default())
        .unwrap()
        .loss(
            &transpose(&src),
            Some(&lengths),
            &transpose(&tgt_in),
            &transpose(&tgt_out),
            -100,
        )
        .unwrap();
    assert!(
        (a.loss - b.loss).abs() <= 1e-6 * a.loss.abs(),
        "{} {}",
        a.loss,
        b.loss
    );
    for (name, g) in &a.grads.params {
        assert_close(name, &b.grads.params[name], g, 1e-5, 1e-6);
    }
    // A memory of another batch than the decoder's rows: refused.
    let bound = bf.bind_interp(&weights, Exec::default()).unwrap();
    let (states, memory) = bound.encode_all(&src, Some(&lengths)).unwrap();
    let memory = memory.unwrap();
    let one = Tensor::new(
        vec![1, memory.shape[1], memory.shape[2]],
        memory.data[..memory.shape[1] * memory.shape[2]].to_vec(),
    )
    .unwrap();
    let run = Run {
        initial_states: states.iter().map(Some).collect(),
        memory: Some(MemoryRef {
            values: &one,
            lengths: None,
            prepared: None,
        }),
        ..Run::new(Input::Ids(&tgt_in))
    };
    let err = bound.decoder.forward(&run).unwrap_err();
    assert!(
        matches!(err, Error::TensorShape { ref name, .. } if name == "memory"),
        "{err}"
    );
}

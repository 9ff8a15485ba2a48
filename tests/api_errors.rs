//! Bad input through the library API: each class is a typed error naming what is wrong, never a
//! panic.

mod common;

use rnn::ir::weights::{read_safetensors, write_safetensors};
use rnn::{CellKind, Error, Exec, ModelSpec, Program, Request, Tensor, Weights};

fn lstm() -> (Program, Weights) {
    let program = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 4)).unwrap();
    let weights = Weights::init(&program, 0).unwrap();
    (program, weights)
}

fn run(p: &Program, w: &Weights, req: &Request) -> Result<rnn::Response, Error> {
    p.run::<f32>(w, req, &Exec::default())
}

#[test]
fn truncated_weights_are_a_weight_file_error() {
    let (p, w) = lstm();
    let bytes = write_safetensors(&w.tensors).unwrap();
    for cut in [0, 7, 8, bytes.len() / 2, bytes.len() - 1] {
        match Weights::from_safetensors(&bytes[..cut], &p) {
            Err(Error::WeightFile(_)) => {}
            other => panic!("cut at {cut}: expected a weight-file error, got {other:?}"),
        }
    }
}

#[test]
fn weights_round_trip_through_safetensors() {
    let (p, w) = lstm();
    let bytes = write_safetensors(&w.tensors).unwrap();
    assert_eq!(Weights::from_safetensors(&bytes, &p).unwrap(), w);
}

#[test]
fn non_f32_weights_are_a_dtype_error() {
    // A safetensors file holding one F64 tensor, written by hand.
    let header = br#"{"weight_ih_l0":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&1.0f64.to_le_bytes());
    match read_safetensors(&bytes) {
        Err(Error::TensorDtype {
            name,
            expected,
            found,
        }) => {
            assert_eq!(
                (name.as_str(), expected.as_str(), found.as_str()),
                ("weight_ih_l0", "F32", "F64")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_wrong_shaped_extra_and_non_finite_weights() {
    let (p, w) = lstm();
    let mut m = w.clone();
    m.tensors.remove("bias_hh_l0");
    assert!(
        matches!(m.check(&p), Err(Error::MissingTensor { name, expected }) if name == "bias_hh_l0" && expected == vec![16])
    );

    let mut m = w.clone();
    m.tensors
        .insert("weight_ih_l0".into(), Tensor::zeros(vec![16, 4]));
    let e = m.check(&p).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`weight_ih_l0` has shape [16, 4], expected [16, 3]"
    );

    let mut m = w.clone();
    m.tensors
        .insert("weight_ih_l1".into(), Tensor::zeros(vec![16, 4]));
    assert!(matches!(m.check(&p), Err(Error::UnexpectedTensor { name }) if name == "weight_ih_l1"));

    let mut m = w.clone();
    m.tensors.get_mut("weight_hh_l0").unwrap().data[5] = f32::INFINITY;
    assert!(
        matches!(m.check(&p), Err(Error::NonFinite { name, index: 5, .. }) if name == "weight_hh_l0")
    );
}

#[test]
fn input_errors_name_the_argument() {
    let (p, w) = lstm();
    let good = Tensor::zeros(vec![5, 2, 3]);

    let bad = Tensor::zeros(vec![5, 2, 4]);
    let e = run(
        &p,
        &w,
        &Request {
            input: Some(&bad),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("`input` has shape [5, 2, 4], expected 3 dimensions (time, batch, features) with 3 features"), "{e}");

    let empty = Tensor::zeros(vec![0, 2, 3]);
    let e = run(
        &p,
        &w,
        &Request {
            input: Some(&empty),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("time and batch must be at least 1"),
        "{e}"
    );

    let mut nan = good.clone();
    nan.data[7] = f32::NAN;
    let e = run(
        &p,
        &w,
        &Request {
            input: Some(&nan),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::NonFinite { ref name, index: 7, .. } if name == "input"),
        "{e}"
    );

    for (lengths, index, found) in [(vec![5, 0], 1, 0), (vec![6, 5], 0, 6), (vec![-1, 5], 0, -1)] {
        let e = run(
            &p,
            &w,
            &Request {
                input: Some(&good),
                lengths: Some(&lengths),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Length { index: i, found: f, max: 5 } if i == index && f == found),
            "{e}"
        );
    }
    let e = run(
        &p,
        &w,
        &Request {
            input: Some(&good),
            lengths: Some(&[5]),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "`lengths` has shape [1], expected [2]");

    let h0 = Tensor::zeros(vec![2, 2, 4]);
    let e = run(
        &p,
        &w,
        &Request {
            input: Some(&good),
            initial_states: vec![Some(&h0)],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`h0` has shape [2, 2, 4], expected [1, 2, 4]"
    );

    let gy = Tensor::zeros(vec![5, 2, 3]);
    let e = run(
        &p,
        &w,
        &Request {
            input: Some(&good),
            grad_output: Some(&gy),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "`grad_output` has shape [5, 2, 3], expected [5, 2, 4]"
    );

    let gy = Tensor::zeros(vec![5, 2, 4]);
    let mut dh = Tensor::zeros(vec![1, 2, 4]);
    dh.data[3] = f32::NEG_INFINITY;
    let req = Request {
        input: Some(&good),
        grad_output: Some(&gy),
        grad_final_states: vec![Some(&dh)],
        ..Default::default()
    };
    let e = run(&p, &w, &req).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`grad_h_n` holds -inf at flat index 3; inputs must be finite"
    );

    let e = run(&p, &w, &Request::default()).unwrap_err();
    assert_eq!(e.to_string(), "no input given");
}

#[test]
fn packed_outputs_are_zero_past_each_length_and_states_taken_at_the_last_step() {
    let (p, w) = lstm();
    let x = rnn::bench::random_tensor(vec![5, 2, 3], 1);
    let lengths = [5i64, 2];
    let packed = run(
        &p,
        &w,
        &Request {
            input: Some(&x),
            lengths: Some(&lengths),
            ..Default::default()
        },
    )
    .unwrap();
    // The second sequence alone, two steps long.
    let short = Tensor {
        shape: vec![2, 1, 3],
        data: (0..2)
            .flat_map(|t| x.data[(t * 2 + 1) * 3..(t * 2 + 2) * 3].to_vec())
            .collect(),
    };
    let alone = run(
        &p,
        &w,
        &Request {
            input: Some(&short),
            ..Default::default()
        },
    )
    .unwrap();
    for t in 0..5 {
        let row = &packed.output.data[(t * 2 + 1) * 4..(t * 2 + 2) * 4];
        if t < 2 {
            assert_eq!(row, &alone.output.data[t * 4..(t + 1) * 4]);
        } else {
            assert!(
                row.iter().all(|&v| v == 0.0),
                "step {t} past the length is not zero: {row:?}"
            );
        }
    }
    assert_eq!(
        &packed.final_states[0].data[4..8],
        &alone.final_states[0].data[..]
    );
    assert_eq!(
        &packed.final_states[1].data[4..8],
        &alone.final_states[1].data[..]
    );
}

#[test]
fn absurd_sizes_are_errors_not_crashes() {
    let e = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 1 << 30)).unwrap_err();
    assert!(
        e.to_string()
            .contains("`hidden` is 1073741824, more than the largest size supported (16777216)"),
        "{e}"
    );

    // Valid sizes whose parameters cannot be held in memory: an error from `init`, no abort.
    let p = Program::compile(&ModelSpec::new(CellKind::Lstm, 1 << 24, 1 << 24)).unwrap();
    assert!(
        matches!(Weights::init(&p, 0), Err(Error::Argument(m)) if m.contains("cannot allocate"))
    );

    let e = rnn::parse_str("cell C { input: 3, hidden: 4, param W: [hidden * 1000000 * 1000000, input], state h, h = W @ x }")
        .and_then(|s| Program::compile(&s).map(drop))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("a dimension of `W` is larger than the largest size supported"),
        "{e}"
    );
}

#[test]
fn an_npy_shape_too_large_to_address_is_refused() {
    // (2^62, 4, 5) float32: the element count overflows; it must not wrap to an empty array.
    let mut bytes = rnn::ir::npy::write_f32(&Tensor::zeros(vec![1, 4, 5]));
    let header = String::from_utf8_lossy(&bytes[10..]).into_owned();
    let patched = header.replacen("(1, 4, 5)", "(4611686018427387904, 4, 5)", 1);
    let start = 10;
    let end = start + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let new_header = &patched[..patched.find('\n').unwrap() + 1];
    bytes.splice(start..end, new_header.bytes());
    let len = (new_header.len() as u16).to_le_bytes();
    bytes[8] = len[0];
    bytes[9] = len[1];
    bytes.truncate(start + new_header.len());
    let e = rnn::ir::npy::read_f32(&bytes).unwrap_err();
    assert!(e.to_string().contains("is too large to address"), "{e}");
}

#[test]
fn a_custom_cell_built_in_code_is_checked_like_a_parsed_one() {
    let mut spec = rnn::parse_str(common::RELU_ELMAN).unwrap();
    let CellKind::Custom(cell) = &mut spec.cell else {
        unreachable!()
    };
    cell.equations.clear();
    let e = Program::compile(&spec).unwrap_err();
    assert!(e.to_string().contains("state `h` is never assigned"), "{e}");
    let mut spec = rnn::parse_str(common::RELU_ELMAN).unwrap();
    let CellKind::Custom(cell) = &mut spec.cell else {
        unreachable!()
    };
    cell.output.0 = "y".into();
    let e = Program::compile(&spec).unwrap_err();
    assert!(
        e.to_string().contains(
            "`output y`: the output must be a declared state or a name an equation assigns"
        ),
        "{e}"
    );
}

#[test]
fn run_sequence_checks_its_arguments() {
    use rnn::ir::graph::Role;
    use rnn::ir::interp::{Feed, SeqIo, run_sequence};
    use rnn::ir::program::Scheduled;
    use std::collections::HashMap;

    fn io<'a>(
        cell: &Scheduled,
        w: &'a Weights,
        steps: usize,
        x: &'a [f32],
        carried: Vec<Vec<f32>>,
        lengths: Option<&'a [usize]>,
    ) -> SeqIo<'a, f32> {
        let mut feeds = HashMap::new();
        feeds.insert(Role::Input, Feed::Rows(x));
        for (i, info) in cell.graph.params().iter().enumerate() {
            feeds.insert(
                Role::Param(i as u32),
                Feed::Fixed(w.tensors[&format!("{}_l0", info.name)].data.as_slice()),
            );
        }
        SeqIo {
            steps,
            batch: 2,
            reverse: false,
            lengths,
            feeds,
            carried,
            zero_inactive_carried: false,
            keep: &[],
        }
    }
    let p = Program::compile(&ModelSpec::new(CellKind::RnnTanh, 2, 3)).unwrap();
    let cell = &p.layers[0].forward;
    let w = Weights::init(&p, 0).unwrap();
    let x = vec![0.5f32; 4 * 2 * 2];
    let h = || vec![vec![0.0f32; 6]];
    let err = |io| {
        run_sequence(cell, io, &Exec::default())
            .map(drop)
            .unwrap_err()
            .to_string()
    };

    run_sequence(cell, io(cell, &w, 4, &x, h(), None), &Exec::default()).unwrap();
    assert!(err(io(cell, &w, 0, &x[..0], h(), None)).contains("at least one step and one row"));
    assert!(
        err(io(cell, &w, 4, &x[..15], h(), None))
            .contains("input `x` has 15 elements, expected 16")
    );
    assert!(
        err(io(cell, &w, 4, &x, vec![vec![0.0; 5]], None))
            .contains("carried `h` has 5 elements, expected 6")
    );
    assert!(
        err(io(cell, &w, 4, &x, vec![], None))
            .contains("0 carried values given, the graph carries 1")
    );
    assert!(
        err(io(cell, &w, 4, &x, h(), Some(&[4, 5])))
            .contains("must give 1 ..= 4 for each of 2 rows")
    );
}

#[test]
fn a_parameter_count_beyond_u64_is_exact() {
    // At the largest sizes a deep bidirectional LSTM validates and compiles, and holds more
    // parameters than `u64` counts: the count is a `u128`, exact, not wrapped around.
    let size = ModelSpec::MAX_SIZE;
    let mut spec = ModelSpec::new(CellKind::Lstm, size, size);
    spec.num_layers = 4096;
    spec.bidirectional = true;
    let program = Program::compile(&spec).unwrap();
    let (h, layers) = (size as u128, 4096u128);
    let biases = 2 * 4 * h;
    let first = 4 * h * h + 4 * h * h + biases; // input size h
    let rest = 4 * h * (2 * h) + 4 * h * h + biases; // input 2h: both directions' outputs
    let want = 2 * (first + (layers - 1) * rest);
    assert!(want > u64::MAX as u128);
    assert_eq!(program.parameter_count(), want);
    // Binding weights for it is a typed error, not an abort.
    match Weights::init(&program, 0) {
        Err(Error::Argument(m)) => assert!(m.contains("cannot allocate"), "{m}"),
        other => panic!("expected an allocation error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_measurement_of_zero_repetitions_or_threads_is_refused() {
    let w5 = rnn::bench::workload("W5").unwrap();
    for (threads, reps, what) in [(1, 0, "`reps` is 0"), (0, 1, "`threads` is 0")] {
        match rnn::bench::measure(w5, "interp", threads, reps) {
            Err(Error::Argument(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected an argument error, got {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn a_stack_whose_sizes_depend_on_the_layer_input_is_refused() {
    // Layer 1 reads layer 0's output, not 5 features: an output or state sized by `input` would change size
    // between layers, and the stack holds one size per state and for the output.
    let output = "cell A { input: 5, hidden: 8, layers: 2, param W: [hidden, input], param U: [hidden, hidden],
        state h, h = tanh(W @ x + U @ h), output y = concat(h, x) }";
    let e = Program::compile(&rnn::parse_str(output).unwrap()).unwrap_err();
    assert!(
        e.to_string()
            .contains("the output has 21 features in layer 1 but 13 in layer 0"),
        "{e}"
    );
    let state = "cell B { input: 5, hidden: 8, layers: 2, param W: [hidden, input],
        state h, state s: input, h = tanh(W @ x), s = x }";
    let e = Program::compile(&rnn::parse_str(state).unwrap()).unwrap_err();
    assert!(
        e.to_string()
            .contains("state `s` has 8 features in layer 1 but 5 in layer 0"),
        "{e}"
    );
    // One layer of either is fine.
    Program::compile(&rnn::parse_str(&output.replace("layers: 2", "layers: 1")).unwrap()).unwrap();
}

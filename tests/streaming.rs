//! The interpreter's streaming API: bind once, then one `step` per time step, carrying the
//! state; it gives what a whole-sequence run gives, and refuses what it cannot do.

mod common;

use rnn::bench::random_tensor;
use rnn::{CellKind, Error, Exec, ModelSpec, Program, Request, Weights, parse_str};

/// Steps `spec` through a sequence one call at a time and compares every step's output and the
/// final states with a whole-sequence run of the same weights.
fn stream_equals_sequence(spec: &ModelSpec, steps: usize, batch: usize) {
    let program = Program::compile(spec).unwrap();
    let weights = Weights::init(&program, 3).unwrap();
    let bound = program.bind::<f64>(&weights).unwrap();
    let x = random_tensor(vec![steps, batch, spec.input_size], 4);
    let whole = bound
        .run(
            &Request {
                input: Some(&x),
                ..Default::default()
            },
            &Exec::default(),
        )
        .unwrap();
    let mut stream = bound.stream(batch, Exec::default()).unwrap();
    let mut state = stream.zero_state();
    let row = batch * spec.input_size;
    let out = batch * spec.output_size();
    for t in 0..steps {
        let xt: Vec<f64> = x.data[t * row..(t + 1) * row]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let y = stream.step(&mut state, &xt).unwrap();
        assert_eq!(y.len(), out, "{}: output length", spec.cell.name());
        for (j, (&a, &e)) in y.iter().zip(&whole.output.data[t * out..]).enumerate() {
            assert!(
                (a as f32 - e).abs() <= 1e-6 + 1e-6 * e.abs(),
                "{} step {t} element {j}: stream {a}, sequence {e}",
                spec.cell.name()
            );
        }
    }
    // Final states: the stream's per-layer state against `(layers, B, size)`.
    for (k, fin) in whole.final_states.iter().enumerate() {
        let per_layer = fin.data.len() / spec.num_layers;
        for (layer, s) in state.layers.iter().enumerate() {
            assert_eq!(s[k].len(), per_layer);
            for (&a, &e) in s[k].iter().zip(&fin.data[layer * per_layer..]) {
                assert!((a as f32 - e).abs() <= 1e-6 + 1e-6 * e.abs());
            }
        }
    }
}

#[test]
fn streaming_equals_the_whole_sequence_for_every_cell() {
    for cell in [
        CellKind::RnnTanh,
        CellKind::RnnRelu,
        CellKind::Lstm,
        CellKind::Gru,
    ] {
        let mut spec = ModelSpec::new(cell, 5, 6);
        stream_equals_sequence(&spec, 7, 1);
        spec.num_layers = 3;
        stream_equals_sequence(&spec, 4, 3);
    }
    let mut proj = ModelSpec::new(CellKind::Lstm, 4, 6);
    proj.proj_size = 2;
    proj.num_layers = 2;
    stream_equals_sequence(&proj, 5, 2);
    for src in [common::PEEPHOLE, common::MINIMAL_GRU, common::RELU_ELMAN] {
        stream_equals_sequence(&parse_str(src).unwrap(), 6, 2);
    }
    // Every acceptance cell, including outputs that are not states (computed after the loop in
    // a whole-sequence run, within the step when streaming) and a stack of them. A
    // bidirectional model cannot stream; its one-direction version does.
    for (name, src) in common::acceptance_cells() {
        let mut spec = parse_str(src).unwrap();
        spec.bidirectional = false;
        stream_equals_sequence(&spec, 6, 2);
        if name == "elman_output" {
            // The second layer reads the first's 3 output features, not its 8 hidden ones.
            spec.num_layers = 2;
            stream_equals_sequence(&spec, 5, 3);
        }
    }
}

fn lstm() -> (Program, Weights) {
    let program = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 4)).unwrap();
    let weights = Weights::init(&program, 0).unwrap();
    (program, weights)
}

#[test]
fn streaming_checks_the_input_and_the_state() {
    let (program, weights) = lstm();
    let bound = program.bind::<f32>(&weights).unwrap();
    let mut stream = bound.stream(2, Exec::default()).unwrap();
    let mut state = stream.zero_state();
    match stream.step(&mut state, &[0.0; 5]) {
        Err(Error::TensorShape {
            name,
            expected,
            found,
        }) => {
            assert_eq!((name.as_str(), expected, found), ("x", vec![2, 3], vec![5]));
        }
        other => panic!("expected a shape error, got {:?}", other.map(<[f32]>::len)),
    }
    let mut x = [0.0f32; 6];
    x[4] = f32::NAN;
    match stream.step(&mut state, &x) {
        Err(Error::NonFinite { name, index, .. }) => assert_eq!((name.as_str(), index), ("x", 4)),
        other => panic!("expected a NaN error, got {:?}", other.map(<[f32]>::len)),
    }
    let mut wrong = stream.zero_state();
    wrong.layers[0][1].pop();
    let e = stream.step(&mut wrong, &[0.0; 6]).unwrap_err();
    assert!(e.to_string().contains("does not fit this stream"), "{e}");
    // The failed calls changed nothing: the state still steps.
    stream.step(&mut state, &[0.5; 6]).unwrap();
}

#[test]
fn streaming_refuses_a_bidirectional_model_and_an_empty_batch() {
    let mut spec = ModelSpec::new(CellKind::Gru, 3, 4);
    spec.bidirectional = true;
    let program = Program::compile(&spec).unwrap();
    let bound = program
        .bind::<f32>(&Weights::init(&program, 0).unwrap())
        .unwrap();
    let e = bound.stream(1, Exec::default()).err().unwrap();
    assert!(e.to_string().contains("reverse direction"), "{e}");
    let (program, weights) = lstm();
    let bound = program.bind::<f32>(&weights).unwrap();
    assert!(bound.stream(0, Exec::default()).is_err());
}

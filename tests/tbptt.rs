//! Truncated BPTT's chunks (`driver::time_chunks`): run one after another, each from the
//! previous chunk's final states, they give the whole sequence's outputs and final states, on
//! the interpreter and the JIT, time-major and batch-first.

mod common;

use rnn::ir::driver::time_chunks;
use rnn::jit::Jit;
use rnn::{CellKind, Error, Exec, ModelSpec, Program, Request, Response, Tensor, Weights};

/// A backend's run of a request.
type Runner<'a> = dyn Fn(&Request) -> Response + 'a;

/// A deterministic pseudo-random tensor (the tests' shared generator).
fn tensor(shape: Vec<usize>, seed: u64) -> Tensor {
    common::Rng(seed).tensor(shape)
}

fn close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1.0),
            "{what}[{i}]: {x} against {y}"
        );
    }
}

/// The chunks' outputs joined along time, in the input's layout.
fn join(parts: &[Tensor], batch_first: bool) -> Vec<f32> {
    if !batch_first {
        return parts.iter().flat_map(|p| p.data.clone()).collect();
    }
    let rows = parts[0].shape[0];
    let mut out = Vec::new();
    for r in 0..rows {
        for p in parts {
            let per_row = p.data.len() / rows;
            out.extend_from_slice(&p.data[r * per_row..(r + 1) * per_row]);
        }
    }
    out
}

fn check(spec: &ModelSpec) {
    let program = Program::compile(spec).unwrap();
    let weights = Weights::init(&program, 5).unwrap();
    let jit = std::sync::Arc::new(Jit::compile(&program).unwrap())
        .bind(&weights)
        .unwrap();
    let (steps, batch) = (10, 3);
    let shape = if spec.batch_first {
        vec![batch, steps, spec.input_size]
    } else {
        vec![steps, batch, spec.input_size]
    };
    let x = tensor(shape, 9);
    let runs: [(&str, &Runner); 2] = [
        ("interpreter", &|req| {
            program.run::<f32>(&weights, req, &Exec::default()).unwrap()
        }),
        ("jit", &|req| jit.run(req).unwrap()),
    ];
    for (backend, run) in runs {
        let whole = run(&Request {
            input: Some(&x),
            ..Default::default()
        });
        for len in [1, 3, 4, 10, 25] {
            let chunks = time_chunks(&x, len, spec).unwrap();
            assert_eq!(chunks.len(), steps.div_ceil(len));
            let mut states: Vec<Tensor> = Vec::new();
            let mut outputs = Vec::new();
            for c in &chunks {
                let out = run(&Request {
                    input: Some(c),
                    initial_states: states.iter().map(Some).collect(),
                    ..Default::default()
                });
                states = out.final_states;
                outputs.push(out.output);
            }
            let what = format!("{backend} chunks of {len}");
            close(
                &format!("{what}: outputs"),
                &join(&outputs, spec.batch_first),
                &whole.output.data,
            );
            for (k, (a, b)) in states.iter().zip(&whole.final_states).enumerate() {
                close(&format!("{what}: final state {k}"), &a.data, &b.data);
            }
        }
    }
}

#[test]
fn chunks_carried_through_their_states_are_the_whole_sequence() {
    check(&ModelSpec::new(CellKind::Lstm, 4, 6));
    let mut gru = ModelSpec::new(CellKind::Gru, 3, 5);
    gru.num_layers = 2;
    gru.batch_first = true;
    check(&gru);
}

#[test]
fn bad_chunks_are_typed_errors() {
    let spec = ModelSpec::new(CellKind::Gru, 3, 4);
    let x = tensor(vec![4, 2, 3], 1);
    assert!(matches!(time_chunks(&x, 0, &spec), Err(Error::Argument(_))));
    let flat = tensor(vec![8, 3], 1);
    assert!(matches!(
        time_chunks(&flat, 2, &spec),
        Err(Error::TensorShape { .. })
    ));
    let short = Tensor {
        shape: vec![4, 2, 3],
        data: vec![0.0; 5],
    };
    assert!(matches!(
        time_chunks(&short, 2, &spec),
        Err(Error::Argument(_))
    ));
    let mut bidirectional = spec.clone();
    bidirectional.bidirectional = true;
    let err = time_chunks(&x, 2, &bidirectional).unwrap_err();
    assert!(
        matches!(&err, Error::Argument(m) if m.contains("bidirectional")),
        "{err:?}"
    );
}

//! Three acceptance cells against PyTorch modules written the obvious way
//! (`tests/fixtures/make_cell_cases.py`): the LayerNorm-LSTM, minGRU and the chapter's Elman
//! cell with its output projection. Outputs, final states and every gradient (parameters, input,
//! initial states) are compared with the module's results, computed in float64 from the same
//! float32 numbers:
//! - run in `f64`, every cell matches at 1e-5 relative + 1e-6 absolute: the semantics are
//!   PyTorch's;
//! - run in `f32` (on every backend: `parity.rs`), minGRU and the Elman cell match at 1e-5
//!   relative + 1e-6 absolute. The LayerNorm-LSTM's gradients are ill-conditioned in float32 (a
//!   layer norm's backward subtracts nearly equal sums): PyTorch's own float32 run is up to 1e-4
//!   away from the exact values (`pytorch_f32.safetensors`), so there each tensor is held to the
//!   same bound or to PyTorch's float32 error, whichever is larger.
//!
//! `cli.rs` runs the same cases through `rnnc run --model`.

mod common;

use rnn::ir::tensor::Real;
use rnn::ir::{npy, weights};
use rnn::{Exec, Program, Request, Tensor, Weights, parse_str};
use std::collections::BTreeMap;
use std::path::Path;

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-6;

/// The cases: fixture folder and the `.rnn` file of `examples/cells/` it was made for.
fn cases() -> impl Iterator<Item = (&'static str, &'static str)> {
    common::acceptance_cells()
        .into_iter()
        .filter(|(name, _)| common::PYTORCH_CELLS.contains(name))
}

/// How far `actual` is from `expected`, in units of the tolerance: at most 1 means it matches.
fn worst(actual: &Tensor, expected: &Tensor) -> f64 {
    common::tolerance_ratio(actual, expected, RTOL, ATOL)
}

fn read(name: &str, file: &str) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cells");
    std::fs::read(dir.join(name).join(file)).unwrap()
}

/// Every tensor the case compares, as `rnn` computes it in `T`.
fn results<T: Real>(name: &str, src: &str) -> BTreeMap<String, Tensor> {
    let spec = parse_str(src).unwrap();
    let program = Program::compile(&spec).unwrap();
    let w = Weights::from_safetensors(&read(name, "weights.safetensors"), &program)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let load = |f: &str| npy::read_f32(&read(name, f)).unwrap();
    let (input, gy) = (load("input.npy"), load("grad_output.npy"));
    let states: Vec<Tensor> = program
        .states()
        .iter()
        .map(|(s, _)| load(&format!("{s}0.npy")))
        .collect();
    let req = Request {
        input: Some(&input),
        initial_states: states.iter().map(Some).collect(),
        grad_output: Some(&gy),
        ..Default::default()
    };
    let out = program
        .bind::<T>(&w)
        .unwrap()
        .run(&req, &Exec::default())
        .unwrap();
    let grads = out.grads.unwrap();
    let mut r = BTreeMap::new();
    r.insert("output".to_string(), out.output);
    r.insert("grad.input".to_string(), grads.input);
    for (k, (s, _)) in program.states().iter().enumerate() {
        r.insert(format!("{s}_n"), out.final_states[k].clone());
        r.insert(format!("grad.{s}0"), grads.initial_states[k].clone());
    }
    for (p, g) in grads.params {
        r.insert(format!("grad.{p}"), g);
    }
    r
}

#[test]
fn in_f64_every_cell_computes_what_pytorch_computes() {
    assert_eq!(
        cases().count(),
        common::PYTORCH_CELLS.len(),
        "every case has its cell"
    );
    for (name, src) in cases() {
        let expected = weights::read_safetensors(&read(name, "expected.safetensors")).unwrap();
        let ours = results::<f64>(name, src);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{name}: the same tensors"
        );
        for (key, t) in &ours {
            let w = worst(t, &expected[key]);
            assert!(w <= 1.0, "{name} {key}: {w:.2} times the tolerance");
        }
    }
}

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

use rnn::{Exec, Program, Tensor, parse_str};
use std::collections::BTreeMap;

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

/// The case `name` for the cell `src`, run by the interpreter in `T`: the case's expected
/// tensors and ours, under the same names.
fn results<T: Real>(name: &str, src: &str) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let program = Program::compile(&parse_str(src).unwrap()).unwrap();
    let case = common::CellCase::load(name, &program);
    let out = program
        .bind::<T>(&case.weights)
        .unwrap()
        .run(&case.request(), &Exec::default())
        .unwrap();
    (case.expected, out.into_named(program.states(), &[]))
}

#[test]
fn in_f64_every_cell_computes_what_pytorch_computes() {
    assert_eq!(
        cases().count(),
        common::PYTORCH_CELLS.len(),
        "every case has its cell"
    );
    for (name, src) in cases() {
        let (expected, ours) = results::<f64>(name, src);
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

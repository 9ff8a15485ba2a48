//! The CLIF of a tanh RNN's and an LSTM's step (hidden 4), forward and backward, as compiled:
//! pinned so that a change to the lowering is a reviewed diff.

use rnn_ir::{CellKind, ModelSpec, Program};
use rnn_jit::Jit;

fn clif(cell: CellKind, function: &str) -> String {
    let program = Program::compile(&ModelSpec::new(cell, 3, 4)).unwrap();
    let jit = Jit::compile(&program).unwrap();
    jit.clif()
        .iter()
        .find(|(name, _)| name == function)
        .unwrap_or_else(|| panic!("no function {function}"))
        .1
        .clone()
}

#[test]
fn tanh_rnn_forward_step() {
    insta::assert_snapshot!(clif(CellKind::RnnTanh, "l0_fwd_step"));
}

#[test]
fn tanh_rnn_backward_step() {
    insta::assert_snapshot!(clif(CellKind::RnnTanh, "l0_bwd_step"));
}

#[test]
fn lstm_forward_step() {
    insta::assert_snapshot!(clif(CellKind::Lstm, "l0_fwd_step"));
}

#[test]
fn lstm_backward_step() {
    insta::assert_snapshot!(clif(CellKind::Lstm, "l0_bwd_step"));
}

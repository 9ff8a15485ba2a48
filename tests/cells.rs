//! The acceptance cells of `examples/cells/`: each parses, compiles and is pinned by a snapshot
//! of its step graph and backward step graph after the passes (each value tagged with its phase);
//! and the plan's scheduling facts the cells are there to show.
//!
//! Their gradients are checked against finite differences in `gradcheck.rs`; three of them are
//! matched against PyTorch in `pytorch_cells.rs`.

use rnn::ir::graph::{Op, OutRole};
use rnn::ir::passes::hoist::Phase;
use rnn::ir::program::CompileOptions;
use rnn::{Exec, ModelSpec, Program, Request, Weights, parse_str};

mod common;

fn cell(src: &str) -> ModelSpec {
    parse_str(src).unwrap_or_else(|e| panic!("{e}"))
}

macro_rules! snapshot_cell {
    ($test:ident, $file:literal) => {
        #[test]
        fn $test() {
            let p = Program::compile(&cell(include_str!(concat!("../examples/cells/", $file))))
                .unwrap();
            let text = format!(
                "{}\n-- backward --\n{}",
                p.layers[0].forward.to_text(),
                p.layers[0].backward.to_text()
            );
            insta::assert_snapshot!(text);
        }
    };
}

snapshot_cell!(layernorm_lstm, "layernorm_lstm.rnn");
snapshot_cell!(min_gru, "min_gru.rnn");
snapshot_cell!(min_lstm, "min_lstm.rnn");
snapshot_cell!(indrnn, "indrnn.rnn");
snapshot_cell!(peephole_lstm, "peephole_lstm.rnn");
snapshot_cell!(elman_output, "elman_output.rnn");
snapshot_cell!(chapter_gru, "chapter_gru.rnn");
snapshot_cell!(min_gru_stack, "min_gru_stack.rnn");

#[test]
fn layer_norm_of_the_input_product_runs_before_the_loop() {
    // The input's product and its normalisation read no state: every feature-axis reduction
    // of it is computed once over all time steps; those of the recurrent product and of the
    // cell state stay in the loop.
    let p = Program::compile(&cell(include_str!("../examples/cells/layernorm_lstm.rnn"))).unwrap();
    let f = &p.layers[0].forward;
    let sums: Vec<Phase> = f
        .graph
        .iter()
        .filter(|&v| f.graph.data(v).op == Op::SumFeatures)
        .map(|v| f.phases[v.index()])
        .collect();
    assert_eq!(
        sums,
        [
            Phase::Pre,
            Phase::Pre,
            Phase::Loop,
            Phase::Loop,
            Phase::Loop,
            Phase::Loop
        ],
        "two sums per layer norm: the input's before the loop, the state's and the cell's inside"
    );
}

#[test]
fn min_gru_gates_are_all_computed_before_the_loop() {
    // minGRU's point: the gate and the candidate read only x. Inside the loop are the state's
    // update alone.
    let p = Program::compile(&cell(include_str!("../examples/cells/min_gru.rnn"))).unwrap();
    let f = &p.layers[0].forward;
    let mut seen = 0;
    for v in f.graph.iter() {
        let op = f.graph.data(v).op;
        if matches!(op, Op::MatMul | Op::Sigmoid) {
            assert_eq!(f.phases[v.index()], Phase::Pre, "{v} = {}", op.mnemonic());
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "a product and the gate's sigmoid:\n{}",
        f.to_text()
    );
}

#[test]
fn a_projected_output_is_computed_after_the_loop() {
    // y = W_hy h + b_y reads the state but no state reads it: one product over all steps after
    // the loop, with its own size.
    let spec = cell(include_str!("../examples/cells/elman_output.rnn"));
    assert_eq!(spec.output_size(), 3);
    let p = Program::compile(&spec).unwrap();
    let f = &p.layers[0].forward;
    let y = f.graph.output(OutRole::Output).unwrap();
    assert_eq!(f.phases[y.index()], Phase::Post);
    assert_eq!(f.graph.shape(y).features(), 3);
}

#[test]
fn row_slices_of_one_weight_are_not_stacked_again() {
    // The peephole cell slices W and U by rows, gate by gate; fusion reads W and U themselves.
    let p = Program::compile(&cell(include_str!("../examples/cells/peephole_lstm.rnn"))).unwrap();
    let f = &p.layers[0].forward.graph;
    // Both products read a whole parameter: `W` (32 × 5) with x, `U` (32 × 8) with h.
    let whole: Vec<_> = f
        .iter()
        .filter(|&v| f.data(v).op == Op::MatMul)
        .map(|v| f.data(f.data(v).args[0]).op)
        .collect();
    assert_eq!(whole.len(), 2, "{}", p.layers[0].forward.to_text());
    assert!(
        whole
            .iter()
            .all(|op| matches!(op, Op::Input(rnn::ir::graph::Role::Param(_)))),
        "{}",
        p.layers[0].forward.to_text()
    );
    assert!(
        !f.iter()
            .any(|v| f.data(v).op == Op::Concat
                && f.data(v).name.as_deref() == Some("fused_weights")),
        "{}",
        p.layers[0].forward.to_text()
    );
}

#[test]
fn every_cell_runs_the_same_with_and_without_the_passes() {
    // Hoisting, fusion and the plan change where values are computed, never what they are.
    for (name, src) in common::acceptance_cells() {
        let spec = cell(src);
        let fast = Program::compile(&spec).unwrap();
        let slow = Program::compile_with(&spec, CompileOptions { optimize: false }).unwrap();
        let w = Weights::init(&fast, 3).unwrap();
        let x = rnn::bench::random_tensor(vec![5, 3, spec.input_size], 4);
        let gy = rnn::bench::random_tensor(vec![5, 3, spec.output_size() * spec.directions()], 5);
        let ld = spec.num_layers * spec.directions();
        let h0: Vec<rnn::Tensor> = fast
            .states()
            .iter()
            .enumerate()
            .map(|(k, (_, n))| rnn::bench::random_tensor(vec![ld, 3, *n], 6 + k as u64))
            .collect();
        let req = Request {
            input: Some(&x),
            initial_states: h0.iter().map(Some).collect(),
            lengths: Some(&[5, 2, 4]),
            grad_output: Some(&gy),
            ..Default::default()
        };
        let exec = Exec::default();
        let a = fast.bind::<f64>(&w).unwrap().run(&req, &exec).unwrap();
        let b = slow.bind::<f64>(&w).unwrap().run(&req, &exec).unwrap();
        let close = |x: &rnn::Tensor, y: &rnn::Tensor, what: &str| {
            assert_eq!(x.shape, y.shape, "{name} {what}: shape");
            for (i, (p, q)) in x.data.iter().zip(&y.data).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-5 + 1e-5 * q.abs(),
                    "{name} {what}[{i}]: {p} vs {q}"
                );
            }
        };
        close(&a.output, &b.output, "output");
        assert_eq!(a.final_states.len(), b.final_states.len());
        for (k, (x, y)) in a.final_states.iter().zip(&b.final_states).enumerate() {
            close(x, y, &format!("final state {k}"));
        }
        let (ga, gb) = (a.grads.unwrap(), b.grads.unwrap());
        close(&ga.input, &gb.input, "grad.input");
        for (k, (x, y)) in ga.initial_states.iter().zip(&gb.initial_states).enumerate() {
            close(x, y, &format!("grad of initial state {k}"));
        }
        assert_eq!(
            ga.params.keys().collect::<Vec<_>>(),
            gb.params.keys().collect::<Vec<_>>()
        );
        for (k, g) in &ga.params {
            close(g, &gb.params[k], k);
        }
    }
}

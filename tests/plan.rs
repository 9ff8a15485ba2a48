//! The Program as a plan: its printed form (the snapshot contract every backend is read
//! against), what the storage plan decides, the forward/backward pair verifier, and the hoisting
//! rule for sums over rows.

mod common;

use rnn::ir::autodiff::backward;
use rnn::ir::graph::{Graph, Op, OutRole, Role, Shape};
use rnn::ir::passes::hoist::{Phase, check, hoist};
use rnn::ir::plan::{Place, Rows, Storage, StoragePlan};
use rnn::ir::program::{Scheduled, verify_pair};
use rnn::{CellKind, ModelSpec, Program, parse_str};

#[test]
fn snapshot_lstm_plan() {
    let p = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 4)).unwrap();
    insta::assert_snapshot!(p.to_string());
}

#[test]
fn snapshot_gru_plan() {
    let mut spec = ModelSpec::new(CellKind::Gru, 3, 4);
    spec.num_layers = 2;
    spec.bidirectional = true;
    let p = Program::compile(&spec).unwrap();
    insta::assert_snapshot!(p.to_string());
}

#[test]
fn snapshot_custom_cell_plan() {
    let p = Program::compile(&parse_str(common::PEEPHOLE).unwrap()).unwrap();
    insta::assert_snapshot!(p.to_string());
}

#[test]
fn the_plan_is_deterministic() {
    let a = Program::compile(&parse_str(common::MINIMAL_GRU).unwrap()).unwrap();
    let b = Program::compile(&parse_str(common::MINIMAL_GRU).unwrap()).unwrap();
    assert_eq!(a.to_string(), b.to_string());
}

/// The LSTM's plan, read as a backend would read it.
#[test]
fn lstm_plan_binds_views_and_double_buffers() {
    let p = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 4)).unwrap();
    let cell = &p.layers[0];
    let (f, plan) = (&cell.forward.graph, &cell.inference);
    // The two biases are summed once, when the weights are bound.
    let bias_sum = f
        .iter()
        .find(|&v| {
            f.data(v).op == Op::Add
                && f.data(v)
                    .args
                    .iter()
                    .all(|&a| matches!(f.data(a).op, Op::Input(Role::Param(_))))
        })
        .expect("b_ih + b_hh");
    assert_eq!(plan.storage[bias_sum.index()], Storage::Bound);
    // Every gate is a view of the fused gate buffer, never a copy.
    for v in f
        .iter()
        .filter(|&v| matches!(f.data(v).op, Op::Slice { .. }))
    {
        assert!(
            matches!(plan.place[v.index()], Place::View { .. }),
            "{v} is copied"
        );
    }
    // The new cell state is written straight into its carried slot's next buffer.
    let c_new = f.output(OutRole::State(1)).unwrap();
    assert_eq!(plan.place[c_new.index()], Place::Next(1));
    // The input projection runs once over all T·B rows, the recurrent product per step.
    let rows: Vec<Rows> = plan.products.iter().map(|p| p.rows).collect();
    assert_eq!(rows, vec![Rows::All, Rows::Step]);
    // Inference keeps nothing per step but the output; training keeps what backward reads.
    let taped = |plan: &StoragePlan| {
        plan.buffers
            .iter()
            .filter(|b| b.storage == Storage::Tape)
            .count()
    };
    assert_eq!(taped(&cell.inference), 1);
    assert!(taped(&cell.training) > 1);
    // Step buffers are reused between values whose lifetimes do not overlap.
    assert!(
        cell.inference
            .buffers
            .iter()
            .any(|b| b.storage == Storage::Step && b.values.len() > 1),
        "{}",
        cell.inference.to_text(&cell.forward)
    );
}

/// The backward pass's gate gradients are computed straight into the columns of the tape that
/// the weight gradients read after the loop.
#[test]
fn lstm_backward_assembles_gate_gradients_on_the_tape() {
    let p = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 4)).unwrap();
    let cell = &p.layers[0];
    let (b, plan) = (&cell.backward.graph, &cell.backward_plan);
    let concat = b
        .iter()
        .find(|&v| b.data(v).op == Op::Concat && b.shape(v) == Shape::Batch(16))
        .expect("the stacked gate gradient");
    assert_eq!(plan.storage[concat.index()], Storage::Tape);
    for &a in &b.data(concat).args {
        assert!(
            matches!(plan.place[a.index()], Place::View { of, .. } if of == concat),
            "{a} is copied into the concatenation"
        );
    }
}

/// A forward graph with a per-step sum over rows used as a vector: `h' = tanh(W x + s ⊙ h)`,
/// `s = Σ_rows h`. Its backward graph reads `s`, which varies per step but is unbatched.
fn per_step_vector_cell() -> Graph {
    let mut g = Graph::new();
    let x = g.x(2);
    let h = g.state("h", 2);
    let w = g.param("W", Shape::Matrix(2, 2));
    let wx = g.matmul(w, x).unwrap();
    let s = g.push(Op::SumRows, &[h]).unwrap();
    let sh = g.mul(s, h).unwrap();
    let pre = g.add(wx, sh).unwrap();
    let y = g.tanh(pre).unwrap();
    g.set_output(OutRole::State(0), y);
    g.set_output(OutRole::Output, y);
    g
}

/// The forward values a backward graph reads.
fn saved_by(b: &Graph) -> Vec<rnn::ir::graph::Value> {
    b.iter()
        .filter_map(|v| match b.data(v).op {
            Op::Input(Role::Saved(s)) => Some(s),
            _ => None,
        })
        .collect()
}

#[test]
fn pair_verifier_refuses_an_unbatched_saved_value_that_varies_per_step() {
    let f = Scheduled::new(per_step_vector_cell(), true).unwrap();
    let b = backward(&f.graph).unwrap();
    let plan = StoragePlan::new(&f, &saved_by(&b));
    let e = verify_pair(&f, &plan, &b).unwrap_err();
    assert!(
        e.to_string()
            .contains("unbatched but not computed from parameters alone"),
        "{e}"
    );
}

/// `h' = tanh(x + h)`, and its new state.
fn tanh_cell() -> (Scheduled, rnn::ir::graph::Value) {
    let mut f = Graph::new();
    let x = f.x(2);
    let h = f.state("h", 2);
    let y = f.add(x, h).unwrap();
    let y = f.tanh(y).unwrap();
    f.set_output(OutRole::State(0), y);
    (Scheduled::new(f, true).unwrap(), y)
}

#[test]
fn pair_verifier_refuses_a_cotangent_without_its_output() {
    let (f, _) = tanh_cell();
    let mut b = backward(&f.graph).unwrap();
    b.input_value(Role::Cotangent(OutRole::State(3)), Shape::Batch(2), None);
    let plan = StoragePlan::new(&f, &saved_by(&b));
    let e = verify_pair(&f, &plan, &b).unwrap_err();
    assert!(e.to_string().contains("does not output"), "{e}");
}

#[test]
fn pair_verifier_refuses_a_saved_value_of_the_wrong_shape() {
    let (f, y) = tanh_cell();
    let mut b = backward(&f.graph).unwrap();
    b.input_value(Role::Saved(y), Shape::Batch(5), None);
    let plan = StoragePlan::new(&f, &[y]);
    let e = verify_pair(&f, &plan, &b).unwrap_err();
    assert!(e.to_string().contains("read as batch[5]"), "{e}");
}

#[test]
fn every_standard_and_custom_cell_passes_the_pair_verifier() {
    for spec in common::every_cell(3, 4) {
        for optimize in [true, false] {
            let p = Program::compile_with(&spec, rnn::CompileOptions { optimize }).unwrap();
            for cell in &p.layers {
                verify_pair(&cell.forward, &cell.training, &cell.backward.graph).unwrap();
            }
        }
    }
}

/// A backward graph whose parameter gradient is `(Σ_rows d)²` after the loop: summed over all
/// steps first it gives `(Σ_t s_t)²`, not `Σ_t s_t²`, so hoisting must refuse it.
/// A backward-style graph: the state's gradient `dh` is carried and passed on unchanged, and
/// `s = Σ_rows dh ⊙ x` is a sum over the rows after the loop. Returns the graph, `s`, and the
/// vector parameter `b` whose gradient the caller defines from `s`.
fn sum_after_the_loop() -> (Graph, rnn::ir::graph::Value, rnn::ir::graph::Value) {
    let mut g = Graph::new();
    let x = g.x(2);
    let b = g.param("b", Shape::Vector(2));
    let dh = g.input_value(Role::Cotangent(OutRole::State(0)), Shape::Batch(2), None);
    g.declare_state("h", 2);
    let d = g.mul(dh, x).unwrap();
    let s = g.push(Op::SumRows, &[d]).unwrap();
    g.set_output(OutRole::StateGrad(0), dh);
    (g, s, b)
}

#[test]
fn hoisting_refuses_a_nonlinear_function_of_a_sum_outside_the_loop() {
    let (mut g, s, _) = sum_after_the_loop();
    let sq = g.mul(s, s).unwrap();
    g.set_output(OutRole::ParamGrad(0), sq);
    let e = hoist(&g).unwrap_err();
    assert!(e.to_string().contains("only be linear in a sum"), "{e}");
    // The same graph with the square of the sum in the loop is per step, hence fine.
    let phases = vec![Phase::Loop; g.len()];
    check(&g, &phases).unwrap();
}

#[test]
fn hoisting_accepts_linear_functions_of_sums_outside_the_loop() {
    let (mut g, s, b) = sum_after_the_loop();
    let scaled = g.mul(s, b).unwrap(); // times a parameter: linear
    let neg = g.push(Op::Neg, &[scaled]).unwrap();
    let both = g.add(neg, s).unwrap();
    g.set_output(OutRole::ParamGrad(0), both);
    let phases = hoist(&g).unwrap();
    assert_eq!(phases[both.index()], Phase::Post);
}

/// A plan corrupted in each way the plan verifier names is refused.
#[test]
fn plan_verifier_refuses_broken_plans() {
    let p = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 4)).unwrap();
    let cell = &p.layers[0];
    let (s, good) = (&cell.forward, &cell.inference);
    let g = &s.graph;
    good.verify(s).unwrap();
    let place_of = |v| good.place[rnn::ir::graph::Value::index(v)];

    // Two values alive in the same step put in one buffer.
    let steps: Vec<_> = g
        .iter()
        .filter(|&v| good.storage[v.index()] == Storage::Step)
        .filter(|&v| matches!(place_of(v), Place::Buffer(_)))
        .collect();
    let (a, b) = (steps[0], steps[1]); // the recurrent product, then the gate sum reading it
    let mut bad = good.clone();
    let Place::Buffer(ba) = bad.place[a.index()] else {
        unreachable!()
    };
    bad.place[b.index()] = Place::Buffer(ba);
    bad.buffers[ba.0 as usize].values.push(b);
    let e = bad.verify(s).unwrap_err();
    assert!(e.to_string().contains("still live"), "{e}");

    // A slice viewing its argument at the wrong offset.
    let slice = g
        .iter()
        .find(|&v| matches!(g.data(v).op, Op::Slice { start, .. } if start > 0))
        .unwrap();
    let mut bad = good.clone();
    let Place::View { of, .. } = bad.place[slice.index()] else {
        unreachable!()
    };
    bad.place[slice.index()] = Place::View { of, start: 0 };
    assert!(
        bad.verify(s)
            .unwrap_err()
            .to_string()
            .contains("viewed at 0")
    );

    // The per-step output kept for one step only.
    let out = g.output(OutRole::Output).unwrap();
    let mut bad = good.clone();
    let Place::Buffer(bo) = bad.place[out.index()] else {
        unreachable!()
    };
    bad.buffers[bo.0 as usize].rows = Rows::Step;
    bad.buffers[bo.0 as usize].storage = Storage::Step;
    bad.storage[out.index()] = Storage::Step;
    assert!(bad.verify(s).is_err());

    // A value classed as bound that depends on the step input.
    let product = g.iter().find(|&v| g.data(v).op == Op::MatMul).unwrap();
    let mut bad = good.clone();
    bad.storage[product.index()] = Storage::Bound;
    let e = bad.verify(s).unwrap_err();
    assert!(e.to_string().contains("class `bound`"), "{e}");
}

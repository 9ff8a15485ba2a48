//! Gradient checks: autodiff against central finite differences, in `f64`.
//!
//! Two levels. For every op, a one-op graph is differentiated by `autodiff::backward` and both
//! graphs are run by the interpreter; the loss is `Σ y ⊙ G` for a random `G`. Then whole models
//! (every standard cell, three custom cells, layers, directions, packed lengths) are run through
//! BPTT and every parameter, input and initial-state gradient is checked.

use rnn::bench::random_tensor;
use rnn::ir::autodiff::backward;
use rnn::ir::graph::{Graph, Op, OutRole, Role, Shape, Value};
use rnn::ir::interp::{Extent, eval_graph, eval_graph_with};
use rnn::ir::spec::{BiasConvention, GruReset};
use rnn::{CellKind, Exec, ModelSpec, Program, Request, Tensor, Weights, parse_str};
use std::collections::HashMap;

mod common;
use common::{MINIMAL_GRU, PEEPHOLE, RELU_ELMAN};

const ROWS: usize = 3;
/// The token ids every `Tokens` input of a checked graph holds: a repeated id, so that an
/// embedding's gradient sums two rows into one.
const IDS: [f64; ROWS] = [2.0, 0.0, 2.0];

/// Random `f64` values in (-1, 1) kept away from 0, so that relu and step are differentiable at
/// every point drawn.
fn random(n: usize, seed: u64) -> Vec<f64> {
    random_tensor(vec![n], seed)
        .data
        .iter()
        .map(|&v| {
            let v = v as f64;
            if v.abs() < 0.1 {
                v + 0.2f64.copysign(v)
            } else {
                v
            }
        })
        .collect()
}

/// Elements of a value of `shape` over `rows` rows and a memory of extent `e`.
fn len_at(shape: Shape, rows: usize, e: Option<&Extent<'_>>) -> usize {
    let positions = e.map_or(1, |e| e.positions);
    match shape {
        Shape::Memory(n) => positions * e.map_or(1, |e| e.batch) * n,
        Shape::Pairs(n) => rows * positions * n,
        s if s.is_batched() => rows * s.row_len(),
        s => s.row_len(),
    }
}

/// Checks the autodiff gradient of every input of `g` (whose `Output` is the result) against
/// central differences of `Σ output ⊙ G`.
fn check_graph(g: &Graph, what: &str) {
    check_graph_at(g, what, ROWS, None);
}

/// [`check_graph`] over `rows` rows and a memory of extent `extent`.
fn check_graph_at(g: &Graph, what: &str, rows: usize, extent: Option<&Extent<'_>>) {
    let exec = Exec::default();
    let len = |s: Shape| len_at(s, rows, extent);
    let eval = |g: &Graph, inputs: &HashMap<Role, Vec<f64>>| {
        eval_graph_with::<f64>(g, rows, inputs, &exec, extent).unwrap()
    };
    let out = g.output(OutRole::Output).expect("an output");
    let mut inputs: HashMap<Role, Vec<f64>> = HashMap::new();
    for (i, v) in g.iter().enumerate() {
        if let Op::Input(role) = g.data(v).op {
            let x = match g.shape(v) {
                Shape::Tokens => (0..rows).map(|r| IDS[r % ROWS]).collect(),
                shape => random(len(shape), 100 + i as u64),
            };
            inputs.insert(role, x);
        }
    }
    let weight = random(len(g.shape(out)), 7);
    let loss = |inputs: &HashMap<Role, Vec<f64>>| -> f64 {
        let vals = eval(g, inputs);
        vals[out.index()]
            .iter()
            .zip(&weight)
            .map(|(y, w)| y * w)
            .sum()
    };

    let b = backward(g).unwrap();
    let fwd = eval(g, &inputs);
    let mut b_inputs: HashMap<Role, Vec<f64>> = HashMap::new();
    for v in b.iter() {
        if let Op::Input(role) = b.data(v).op {
            let x = match role {
                Role::Saved(s) => fwd[s.index()].to_vec(),
                Role::Cotangent(OutRole::Output) => weight.clone(),
                Role::Cotangent(_) => vec![0.0; len(b.shape(v))],
                other => inputs[&other].clone(),
            };
            b_inputs.insert(role, x);
        }
    }
    let grads = eval(&b, &b_inputs);
    for v in g.iter() {
        let Op::Input(role) = g.data(v).op else {
            continue;
        };
        if g.shape(v) == Shape::Tokens {
            // Ids are not differentiable; the backward graph has no gradient for them.
            assert!(role != Role::Input || b.output(OutRole::InputGrad).is_none());
            continue;
        }
        let grad_role = match role {
            Role::Param(p) => OutRole::ParamGrad(p),
            Role::Input => OutRole::InputGrad,
            Role::State(k) => OutRole::StateGrad(k),
            Role::Memory => OutRole::MemoryGrad,
            _ => unreachable!(),
        };
        let analytic = &grads[b.output(grad_role).unwrap().index()];
        for (i, &a) in analytic.iter().enumerate() {
            let eps = 1e-6;
            let mut plus = inputs.clone();
            plus.get_mut(&role).unwrap()[i] += eps;
            let mut minus = inputs.clone();
            minus.get_mut(&role).unwrap()[i] -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps);
            assert!(
                (a - numeric).abs() <= 1e-7 + 1e-6 * numeric.abs(),
                "{what}: d loss / d {}[{i}] is {a} by autodiff, {numeric} by finite differences",
                g.role_name(role)
            );
        }
    }
}

/// A graph with batched inputs `x: batch[3]` and `s: batch[3]`, a matrix `W: [4, 3]` and a vector
/// `b: [3]`, whose output is `f` of them.
fn op_graph(f: impl FnOnce(&mut Graph, [Value; 4]) -> Value) -> Graph {
    let mut g = Graph::new();
    let x = g.x(3);
    let s = g.state("s", 3);
    let w = g.param("W", Shape::Matrix(4, 3));
    let b = g.param("b", Shape::Vector(3));
    let y = f(&mut g, [x, s, w, b]);
    g.set_output(OutRole::Output, y);
    g.set_output(OutRole::State(0), s);
    g
}

#[test]
fn matmul_gradient() {
    // y = x·Wᵀ:  dW = Gᵀ·x,  dx = G·W
    check_graph(
        &op_graph(|g, [x, _, w, _]| g.matmul(w, x).unwrap()),
        "matmul",
    );
}

#[test]
fn matmul_t_gradient() {
    // y = d·W with d = W·x (batch[4]):  dd = G·Wᵀ,  dW = dᵀ·G (plus matmul's share)
    check_graph(
        &op_graph(|g, [x, _, w, _]| {
            let d = g.matmul(w, x).unwrap();
            g.push(Op::MatMulT, &[w, d]).unwrap()
        }),
        "matmul_t",
    );
}

#[test]
fn outer_sum_gradient() {
    // M = sᵀ·x (3 × 3, summed over rows), read back through y = x·Mᵀ.
    check_graph(
        &op_graph(|g, [x, s, _, _]| {
            let m = g.push(Op::OuterSum, &[s, x]).unwrap();
            g.matmul(m, x).unwrap()
        }),
        "outer_sum",
    );
}

#[test]
fn sum_rows_and_broadcast_gradients() {
    // v = Σ_rows x;  y = broadcast(v) ⊙ s:  dx_r = Σ_rows (G ⊙ s),  ds = G ⊙ v
    check_graph(
        &op_graph(|g, [x, s, _, _]| {
            let v = g.push(Op::SumRows, &[x]).unwrap();
            let bv = g.push(Op::Broadcast, &[v]).unwrap();
            g.mul(bv, s).unwrap()
        }),
        "sum_rows/broadcast",
    );
}

#[test]
fn add_sub_mul_neg_gradients_with_broadcast_bias() {
    // y = (x + b) ⊙ s - (-x):  dx = G ⊙ s + G,  ds = G ⊙ (x + b),  db = Σ_rows G ⊙ s
    check_graph(
        &op_graph(|g, [x, s, _, b]| {
            let xb = g.add(x, b).unwrap();
            let m = g.mul(xb, s).unwrap();
            let nx = g.push(Op::Neg, &[x]).unwrap();
            g.sub(m, nx).unwrap()
        }),
        "add/sub/mul/neg",
    );
}

#[test]
fn scalar_constant_gradient() {
    // y = 1 - 2 ⊙ x:  dx = -2 G
    check_graph(
        &op_graph(|g, [x, _, _, _]| {
            let one = g.constant(1.0, Shape::Scalar);
            let two = g.constant(2.0, Shape::Scalar);
            let tx = g.mul(two, x).unwrap();
            g.sub(one, tx).unwrap()
        }),
        "constants",
    );
}

#[test]
fn sigmoid_gradient() {
    // y = σ(x):  dx = G ⊙ y ⊙ (1 - y)
    check_graph(
        &op_graph(|g, [x, _, _, _]| g.sigmoid(x).unwrap()),
        "sigmoid",
    );
}

#[test]
fn tanh_gradient() {
    // y = tanh(x):  dx = G ⊙ (1 - y²)
    check_graph(&op_graph(|g, [x, _, _, _]| g.tanh(x).unwrap()), "tanh");
}

#[test]
fn relu_gradient() {
    // y = relu(x):  dx = G ⊙ [x > 0]
    check_graph(&op_graph(|g, [x, _, _, _]| g.relu(x).unwrap()), "relu");
}

#[test]
fn step_has_zero_gradient() {
    // y = [x > 0] ⊙ s:  dx = 0 (away from 0),  ds = G ⊙ [x > 0]
    check_graph(
        &op_graph(|g, [x, s, _, _]| {
            let st = g.push(Op::Step, &[x]).unwrap();
            g.mul(st, s).unwrap()
        }),
        "step",
    );
}

#[test]
fn div_gradient() {
    // y = x / (s² + 1) + b / 2:  both sides of the division and a broadcast numerator
    check_graph(
        &op_graph(|g, [x, s, _, b]| {
            let s2 = g.mul(s, s).unwrap();
            let one = g.constant(1.0, Shape::Scalar);
            let den = g.add(s2, one).unwrap();
            let q = g.push(Op::Div, &[x, den]).unwrap();
            let two = g.constant(2.0, Shape::Scalar);
            let half = g.push(Op::Div, &[b, two]).unwrap();
            g.add(q, half).unwrap()
        }),
        "div",
    );
}

#[test]
fn exp_log_sqrt_softplus_gradients() {
    // log and sqrt read positive values: exp(x) and s² + 1
    check_graph(
        &op_graph(|g, [x, s, _, _]| {
            let e = g.push(Op::Exp, &[x]).unwrap();
            let l = g.push(Op::Log, &[e]).unwrap();
            let s2 = g.mul(s, s).unwrap();
            let one = g.constant(1.0, Shape::Scalar);
            let pos = g.add(s2, one).unwrap();
            let r = g.push(Op::Sqrt, &[pos]).unwrap();
            let lr = g.push(Op::Log, &[r]).unwrap();
            let sp = g.push(Op::Softplus, &[s]).unwrap();
            let a = g.mul(l, lr).unwrap();
            let b = g.add(a, sp).unwrap();
            g.add(b, e).unwrap()
        }),
        "exp/log/sqrt/softplus",
    );
}

#[test]
fn abs_min_max_gradients() {
    // |x| · min(s, 0.05) + max(x, -0.05): the random values stay 0.1 away from every kink
    check_graph(
        &op_graph(|g, [x, s, _, _]| {
            let a = g.push(Op::Abs, &[x]).unwrap();
            let lo = g.push(Op::Min(0.05f32.to_bits()), &[s]).unwrap();
            let hi = g.push(Op::Max((-0.05f32).to_bits()), &[x]).unwrap();
            let m = g.mul(a, lo).unwrap();
            g.add(m, hi).unwrap()
        }),
        "abs/min/max",
    );
}

#[test]
fn min_and_max_pass_no_gradient_at_a_tie() {
    // As PyTorch's clamp: at a == c the constant wins and the gradient is 0.
    let g = op_graph(|g, [x, _, _, _]| {
        let hi = g.push(Op::Max(0.5f32.to_bits()), &[x]).unwrap();
        let lo = g.push(Op::Min(0.5f32.to_bits()), &[x]).unwrap();
        g.add(hi, lo).unwrap()
    });
    let b = backward(&g).unwrap();
    let exec = Exec::default();
    let x = vec![0.5, 0.2, 0.8];
    let mut given: HashMap<Role, Vec<f64>> = HashMap::new();
    for v in g.iter() {
        if let Op::Input(role) = g.data(v).op {
            given.insert(role, vec![0.0; g.shape(v).row_len()]);
        }
    }
    given.insert(Role::Input, x.clone());
    let fwd = eval_graph::<f64>(&g, 1, &given, &exec).unwrap();
    let mut inputs: HashMap<Role, Vec<f64>> = HashMap::new();
    for v in b.iter() {
        if let Op::Input(role) = b.data(v).op {
            let val = match role {
                Role::Saved(s) => fwd[s.index()].to_vec(),
                Role::Cotangent(OutRole::Output) => vec![1.0; 3],
                Role::Cotangent(_) => vec![0.0; b.shape(v).row_len()],
                other => given[&other].clone(),
            };
            inputs.insert(role, val);
        }
    }
    let grads = eval_graph::<f64>(&b, 1, &inputs, &exec).unwrap();
    let dx = b.output(OutRole::InputGrad).unwrap();
    // max: [0, 0, 1]; min: [0, 1, 0]
    assert_eq!(grads[dx.index()].to_vec(), [0.0, 1.0, 1.0]);
}

#[test]
fn feature_sums_broadcast_back() {
    // A layer norm over the features with a [1] gain and a scalar shift:
    // (x - mean(x)) / sqrt(mean((x - mean)²) + eps) * a + c
    let mut g = Graph::new();
    let x = g.x(3);
    let s = g.state("s", 3);
    let a = g.param("a", Shape::Vector(1));
    let c = g.declare_param(rnn::ir::graph::ParamInfo {
        name: "c".into(),
        shape: Shape::Vector(1),
        scalar: true,
        init: None,
    });
    let xs = g.mul(x, s).unwrap();
    let three = g.constant(3.0, Shape::Scalar);
    let sum = g.push(Op::SumFeatures, &[xs]).unwrap();
    let mean = g.push(Op::Div, &[sum, three]).unwrap();
    let centred = g.sub(xs, mean).unwrap();
    let sq = g.mul(centred, centred).unwrap();
    let var_sum = g.push(Op::SumFeatures, &[sq]).unwrap();
    let var = g.push(Op::Div, &[var_sum, three]).unwrap();
    let eps = g.constant(1e-5, Shape::Scalar);
    let ve = g.add(var, eps).unwrap();
    let sd = g.push(Op::Sqrt, &[ve]).unwrap();
    let n = g.push(Op::Div, &[centred, sd]).unwrap();
    let na = g.mul(n, a).unwrap();
    let y = g.add(na, c).unwrap();
    // A spread of a per-row value, and its own backward.
    let spread = g.push(Op::Spread(3), &[mean]).unwrap();
    let y = g.add(y, spread).unwrap();
    g.set_output(OutRole::Output, y);
    g.set_output(OutRole::State(0), s);
    check_graph(&g, "layer norm with scalar parameters");
}

#[test]
fn slice_and_concat_gradients() {
    // y = concat(x[1..3], s, x[0..1]) scaled by W's first rows: each piece's gradient lands in
    // its source, overlapping slices add.
    check_graph(
        &op_graph(|g, [x, s, w, _]| {
            let a = g.slice(x, 1, 2).unwrap();
            let c = g.slice(x, 0, 1).unwrap();
            let d = g.slice(x, 0, 2).unwrap();
            let cat = g.push(Op::Concat, &[a, s, c, d]).unwrap();
            let ws = g.slice(w, 0, 2).unwrap(); // a matrix slice: [2, 3]
            let wx = g.matmul(ws, x).unwrap();
            let all = g.push(Op::Concat, &[cat, wx]).unwrap();
            g.tanh(all).unwrap()
        }),
        "slice/concat",
    );
}

/// Checks every gradient of a whole model's BPTT against central differences of
/// `Σ output ⊙ G + Σ h_n ⊙ G_h`, perturbing the `f32` parameters and inputs by an exact step.
fn check_model(
    spec: &ModelSpec,
    steps: usize,
    batch: usize,
    lengths: Option<Vec<i64>>,
    with_h0: bool,
) {
    let program = Program::compile(spec).unwrap();
    let weights = Weights::init(&program, 11).unwrap();
    let width = spec.output_size() * spec.directions();
    let ld = spec.num_layers * spec.directions();
    let x = random_tensor(vec![steps, batch, spec.input_size], 12);
    let gy = random_tensor(vec![steps, batch, width], 13);
    let states = program.states().to_vec();
    let h0s: Vec<Tensor> = states
        .iter()
        .enumerate()
        .map(|(k, s)| random_tensor(vec![ld, batch, s.1], 20 + k as u64))
        .collect();
    let g_final: Vec<Tensor> = states
        .iter()
        .enumerate()
        .map(|(k, s)| random_tensor(vec![ld, batch, s.1], 30 + k as u64))
        .collect();
    let exec = Exec::default();

    let loss = |w: &Weights, x: &Tensor, h0s: &[Tensor]| -> f64 {
        let req = Request {
            input: Some(x),
            initial_states: if with_h0 {
                h0s.iter().map(Some).collect()
            } else {
                vec![]
            },
            lengths: lengths.as_deref(),
            ..Default::default()
        };
        let r = program
            .bind::<f64>(w)
            .unwrap()
            .run_raw(&req, &exec)
            .unwrap();
        let mut l: f64 = r
            .output
            .iter()
            .zip(&gy.data)
            .map(|(y, g)| y * *g as f64)
            .sum();
        for (f, g) in r.final_states.iter().zip(&g_final) {
            l += f
                .iter()
                .zip(&g.data)
                .map(|(y, g)| y * *g as f64)
                .sum::<f64>();
        }
        l
    };
    let req = Request {
        input: Some(&x),
        initial_states: if with_h0 {
            h0s.iter().map(Some).collect()
        } else {
            vec![]
        },
        lengths: lengths.as_deref(),
        grad_output: Some(&gy),
        grad_final_states: g_final.iter().map(Some).collect(),
    };
    let grads = program
        .bind::<f64>(&weights)
        .unwrap()
        .run(&req, &exec)
        .unwrap()
        .grads
        .unwrap();

    // Central difference along one f32 element, with the step actually taken after rounding.
    let numeric = |get: &dyn Fn(f32) -> f64, v: f32| -> f64 {
        // The loss is computed in f64 from f32 weights, so a small step loses nothing to rounding
        // and keeps relu cells (IndRNN) away from their kinks.
        let (up, down) = (v + 1e-5, v - 1e-5);
        (get(up) - get(down)) / (up as f64 - down as f64)
    };
    let close = |a: f32, n: f64, what: &str| {
        assert!(
            (a as f64 - n).abs() <= 2e-5 + 1e-4 * n.abs(),
            "{}: {what} is {a} by BPTT, {n} by finite differences",
            spec.cell.name()
        );
    };
    for (name, t) in &weights.tensors {
        for i in (0..t.data.len()).step_by(t.data.len().div_ceil(12)) {
            let n = numeric(
                &|v| {
                    let mut w = weights.clone();
                    w.tensors.get_mut(name).unwrap().data[i] = v;
                    loss(&w, &x, &h0s)
                },
                t.data[i],
            );
            close(grads.params[name].data[i], n, &format!("d/d {name}[{i}]"));
        }
    }
    for i in (0..x.data.len()).step_by(x.data.len().div_ceil(12)) {
        let n = numeric(
            &|v| {
                let mut x2 = x.clone();
                x2.data[i] = v;
                loss(&weights, &x2, &h0s)
            },
            x.data[i],
        );
        close(grads.input.data[i], n, &format!("d/d input[{i}]"));
    }
    if with_h0 {
        for (k, h0) in h0s.iter().enumerate() {
            for i in 0..h0.data.len() {
                let n = numeric(
                    &|v| {
                        let mut hs = h0s.clone();
                        hs[k].data[i] = v;
                        loss(&weights, &x, &hs)
                    },
                    h0.data[i],
                );
                close(
                    grads.initial_states[k].data[i],
                    n,
                    &format!("d/d {}0[{i}]", states[k].0),
                );
            }
        }
    }
}

fn spec(cell: CellKind, input: usize, hidden: usize) -> ModelSpec {
    ModelSpec::new(cell, input, hidden)
}

#[test]
fn bptt_rnn_tanh_and_relu() {
    check_model(&spec(CellKind::RnnTanh, 3, 4), 4, 2, None, true);
    check_model(&spec(CellKind::RnnRelu, 3, 4), 4, 2, None, true);
}

#[test]
fn bptt_lstm_with_states_and_projection() {
    check_model(&spec(CellKind::Lstm, 3, 4), 4, 2, None, true);
    let mut proj = spec(CellKind::Lstm, 3, 5);
    proj.proj_size = 2;
    check_model(&proj, 3, 2, None, true);
}

#[test]
fn bptt_gru_both_reset_placements() {
    check_model(&spec(CellKind::Gru, 3, 4), 4, 2, None, true);
    let mut cho = spec(CellKind::Gru, 3, 4);
    cho.gru_reset = GruReset::BeforeMatmul;
    check_model(&cho, 4, 2, None, true);
}

#[test]
fn bptt_stacked_bidirectional_packed() {
    let mut s = spec(CellKind::Lstm, 2, 3);
    s.num_layers = 2;
    s.bidirectional = true;
    check_model(&s, 4, 3, Some(vec![4, 1, 3]), true);
    let mut g = spec(CellKind::Gru, 2, 3);
    g.bidirectional = true;
    g.bias_convention = BiasConvention::One;
    check_model(&g, 3, 2, Some(vec![2, 3]), false);
}

#[test]
fn bptt_custom_peephole_lstm() {
    check_model(&parse_str(PEEPHOLE).unwrap(), 4, 2, None, true);
}

#[test]
fn bptt_custom_minimal_gru() {
    check_model(&parse_str(MINIMAL_GRU).unwrap(), 4, 2, None, true);
}

/// An acceptance cell of `examples/cells/`, with the sizes written there.
fn acceptance_cell(name: &str) -> ModelSpec {
    let (_, src) = common::acceptance_cells()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("a cell");
    parse_str(src).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn bptt_layernorm_lstm() {
    check_model(&acceptance_cell("layernorm_lstm"), 4, 2, None, true);
}

#[test]
fn bptt_min_gru_and_min_lstm() {
    check_model(&acceptance_cell("min_gru"), 4, 2, None, true);
    check_model(&acceptance_cell("min_lstm"), 4, 2, None, true);
}

#[test]
fn bptt_indrnn_and_peephole_lstm() {
    check_model(&acceptance_cell("indrnn"), 4, 2, None, true);
    check_model(&acceptance_cell("peephole_lstm"), 4, 2, None, true);
}

#[test]
fn bptt_elman_with_output_projection() {
    let mut s = acceptance_cell("elman_output");
    assert_eq!(s.output_size(), 3, "the output has its own size");
    check_model(&s, 4, 2, Some(vec![4, 2]), true);
    // Stacked and bidirectional: the second layer reads both directions' 3 output features.
    s.num_layers = 2;
    s.bidirectional = true;
    assert_eq!(s.layer_input_size(1), 6);
    check_model(&s, 4, 2, Some(vec![4, 2]), true);
}

#[test]
fn bptt_chapter_gru() {
    check_model(&acceptance_cell("chapter_gru"), 4, 2, None, true);
}

#[test]
fn bptt_min_gru_two_layer_bidirectional_stack() {
    let s = acceptance_cell("min_gru_stack");
    assert_eq!((s.num_layers, s.bidirectional), (2, true));
    check_model(&s, 4, 3, Some(vec![4, 1, 3]), true);
}

#[test]
fn bptt_every_function_of_the_language_with_scalar_parameters() {
    // Every function and operator the equations offer, scalar (`[]`) and one-element parameters
    // broadcast over rows and features, slices, a concatenation, a per-row mean and sum, and
    // an output of its own size that is not a state.
    let src = "cell Everything {
        input: 3, hidden: 4,
        param W: [2 * hidden, input + hidden], param b: [2h],
        param alpha: [], param beta: [1] = 0.5, param V: [2, hidden],
        state h, state s: 1,
        hx = concat(x, h),
        g = W @ hx + b,
        u = g[0 .. h], v = g[hidden ..],
        m = mean(u), q = sum(v * v) / 4,
        w = (u - m) / sqrt(q + 1) * alpha + beta,
        e = exp(min(w, 2)) + log(1 + abs(v)) + softplus(max(v, -0.5)),
        h = tanh(w + e / (1 + abs(s))),
        s = sigmoid(s + mean(h)),
        output y = V @ h + s,
    }";
    let spec = parse_str(src).unwrap_or_else(|e| panic!("{e}"));
    let p = Program::compile(&spec).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = p.parameters();
    assert!(shapes.contains(&("alpha_l0".into(), vec![])), "{shapes:?}");
    assert!(shapes.contains(&("beta_l0".into(), vec![1])), "{shapes:?}");
    assert_eq!(spec.output_size(), 2);
    let w = Weights::init(&p, 1).unwrap();
    assert_eq!(w.tensors["beta_l0"].data, [0.5], "a declared initial value");
    assert_eq!(
        w.tensors["alpha_l0"].shape,
        Vec::<usize>::new(),
        "a scalar is 0-dimensional"
    );
    check_model(&spec, 4, 2, Some(vec![4, 3]), true);
}

#[test]
fn bptt_custom_relu_elman_stacked() {
    let mut s = parse_str(RELU_ELMAN).unwrap();
    s.num_layers = 2;
    s.bidirectional = true;
    check_model(&s, 4, 2, Some(vec![4, 2]), true);
}

/// A graph whose step input is ids (`IDS`), with a state `s: batch[3]`, an embedding table
/// `E: [4, 3]` and a head `W: [5, 3]`, whose output is `f` of them.
fn token_graph(f: impl FnOnce(&mut Graph, [Value; 4]) -> Value) -> Graph {
    let mut g = Graph::new();
    let ids = g.tokens();
    let s = g.state("s", 3);
    let e = g.param("E", Shape::Matrix(4, 3));
    let w = g.param("W", Shape::Matrix(5, 3));
    let y = f(&mut g, [ids, s, e, w]);
    g.set_output(OutRole::Output, y);
    g.set_output(OutRole::State(0), s);
    g
}

#[test]
fn embedding_gradient_sums_repeated_ids() {
    // y = tanh(E[ids] ⊙ s):  dE[i] = Σ_{r: ids[r] = i} (G ⊙ (1 - y²) ⊙ s)_r
    let g = token_graph(|g, [ids, s, e, _]| {
        let x = g.push(Op::Gather, &[e, ids]).unwrap();
        let xs = g.mul(x, s).unwrap();
        g.tanh(xs).unwrap()
    });
    check_graph(&g, "gather");
    // The analytic derivative beside it: rows 0 and 2 both read E[2].
    let b = backward(&g).unwrap();
    assert!(
        b.output(OutRole::InputGrad).is_none(),
        "ids get no gradient"
    );
    let exec = Exec::default();
    let e: Vec<f64> = (0..12).map(|i| i as f64 / 10.0).collect();
    let mut inputs = HashMap::new();
    inputs.insert(Role::Input, IDS.to_vec());
    inputs.insert(Role::State(0), vec![1.0; 9]);
    inputs.insert(Role::Param(0), e.clone());
    inputs.insert(Role::Param(1), vec![0.0; 15]);
    let fwd = eval_graph::<f64>(&g, ROWS, &inputs, &exec).unwrap();
    let mut b_inputs = HashMap::new();
    for v in b.iter() {
        if let Op::Input(role) = b.data(v).op {
            let x = match role {
                Role::Saved(sv) => fwd[sv.index()].clone(),
                Role::Cotangent(OutRole::Output) => vec![1.0; 9],
                Role::Cotangent(_) => vec![0.0; 9],
                other => inputs[&other].clone(),
            };
            b_inputs.insert(role, x);
        }
    }
    let grads = eval_graph::<f64>(&b, ROWS, &b_inputs, &exec).unwrap();
    let de = &grads[b.output(OutRole::ParamGrad(0)).unwrap().index()];
    for i in 0..4 {
        for j in 0..3 {
            let count = IDS.iter().filter(|&&id| id as usize == i).count() as f64;
            let y = e[i * 3 + j].tanh();
            let want = count * (1.0 - y * y);
            assert!(
                (de[i * 3 + j] - want).abs() < 1e-12,
                "dE[{i}][{j}] = {}, analytically {want}",
                de[i * 3 + j]
            );
        }
    }
}

#[test]
fn log_softmax_gradient() {
    check_graph(
        &token_graph(|g, [_, s, _, w]| {
            let z = g.matmul(w, s).unwrap();
            g.push(Op::LogSoftmax, &[z]).unwrap()
        }),
        "log_softmax",
    );
}

#[test]
fn cross_entropy_gradient_with_an_ignored_row() {
    // loss_r = -log_softmax(W s_r)[t_r], and 0 on a row whose target is the ignore index:
    // dz_r = (softmax(z_r) - onehot(t_r)) · G_r, zero on the ignored row.
    let ignore = 2;
    let mut g = Graph::new();
    let s = g.x(3);
    let w = g.param("W", Shape::Matrix(5, 3));
    let t = g.target();
    let z = g.matmul(w, s).unwrap();
    let lp = g.push(Op::LogSoftmax, &[z]).unwrap();
    let pick = g.push(Op::Pick { ignore }, &[lp, t]).unwrap();
    let nll = g.push(Op::Neg, &[pick]).unwrap();
    g.set_output(OutRole::Output, nll);
    // IDS are [2, 0, 2]: rows 0 and 2 are ignored, row 1 picks class 0.
    check_graph(&g, "cross-entropy");

    let exec = Exec::default();
    let x = random(9, 3);
    let wv = random(15, 4);
    let mut inputs = HashMap::new();
    inputs.insert(Role::Input, x.clone());
    inputs.insert(Role::Param(0), wv.clone());
    inputs.insert(Role::Target, IDS.to_vec());
    let fwd = eval_graph::<f64>(&g, ROWS, &inputs, &exec).unwrap();
    let loss = &fwd[nll.index()];
    assert_eq!(loss[0], 0.0);
    assert_eq!(loss[2], 0.0);
    let zr: Vec<f64> = (0..5)
        .map(|o| (0..3).map(|i| wv[o * 3 + i] * x[3 + i]).sum())
        .collect();
    let lse = zr.iter().map(|z| z.exp()).sum::<f64>().ln();
    assert!((loss[1] - (lse - zr[0])).abs() < 1e-12);
    // The backward graph's dz on row 1 is softmax - onehot(0).
    let b = backward(&g).unwrap();
    let mut b_inputs = HashMap::new();
    for v in b.iter() {
        if let Op::Input(role) = b.data(v).op {
            let val = match role {
                Role::Saved(sv) => fwd[sv.index()].clone(),
                Role::Cotangent(OutRole::Output) => vec![1.0; 3],
                other => inputs[&other].clone(),
            };
            b_inputs.insert(role, val);
        }
    }
    let grads = eval_graph::<f64>(&b, ROWS, &b_inputs, &exec).unwrap();
    let dx = &grads[b.output(OutRole::InputGrad).unwrap().index()];
    let p: Vec<f64> = zr.iter().map(|z| (z - lse).exp()).collect();
    for i in 0..3 {
        let want: f64 = (0..5)
            .map(|o| (p[o] - if o == 0 { 1.0 } else { 0.0 }) * wv[o * 3 + i])
            .sum();
        assert!((dx[3 + i] - want).abs() < 1e-12, "dx[1][{i}]");
        assert_eq!(dx[i], 0.0, "the ignored row 0 gets no gradient");
        assert_eq!(dx[6 + i], 0.0, "the ignored row 2 gets no gradient");
    }
}

#[test]
fn place_and_scatter_rows_gradients() {
    // The backward ops of pick and gather, differentiated themselves.
    check_graph(
        &token_graph(|g, [ids, s, _, _]| {
            let sum = g.push(Op::SumFeatures, &[s]).unwrap();
            let placed = g
                .push(Op::Place { n: 3, ignore: -100 }, &[sum, ids])
                .unwrap();
            let rows = g.push(Op::ScatterRows(4), &[placed, ids]).unwrap(); // [4, 3]
            let back = g.push(Op::Gather, &[rows, ids]).unwrap();
            let m = g.mul(back, s).unwrap();
            g.tanh(m).unwrap()
        }),
        "place/scatter_rows",
    );
}

#[test]
fn argmax_takes_the_first_of_equals_and_a_nan_and_passes_no_gradient() {
    let mut g = Graph::new();
    let x = g.x(4);
    let a = g.push(Op::ArgMax, &[x]).unwrap();
    assert_eq!(g.shape(a), Shape::Tokens);
    let e = g.param("E", Shape::Matrix(4, 1));
    let y = g.push(Op::Gather, &[e, a]).unwrap();
    g.set_output(OutRole::Output, y);
    let exec = Exec::default();
    let mut inputs = HashMap::new();
    inputs.insert(
        Role::Input,
        vec![
            1.0,
            3.0,
            3.0,
            2.0, // a tie: the first
            f64::NAN,
            9.0,
            f64::NAN,
            0.0, // a NaN is the largest: the first NaN
            -1.0,
            -2.0,
            -0.5,
            -0.5,
        ],
    );
    inputs.insert(Role::Param(0), vec![10.0, 11.0, 12.0, 13.0]);
    let vals = eval_graph::<f64>(&g, ROWS, &inputs, &exec).unwrap();
    assert_eq!(vals[a.index()], [1.0, 0.0, 2.0]);
    assert_eq!(vals[y.index()], [11.0, 10.0, 12.0]);
    let b = backward(&g).unwrap();
    let dx = b.output(OutRole::InputGrad).unwrap();
    assert_eq!(
        b.data(dx).op,
        Op::Const(0.0f32.to_bits()),
        "no gradient through argmax"
    );
}

#[test]
fn ids_are_not_numbers_to_compute_with() {
    let mut g = Graph::new();
    let ids = g.tokens();
    let x = g.state("h", 4);
    for op in [Op::Tanh, Op::Neg, Op::LogSoftmax, Op::ArgMax] {
        let err = g.push(op, &[ids]).unwrap_err();
        assert!(
            err.message.contains("tokens") || err.message.contains("token"),
            "{err}"
        );
    }
    assert!(g.push(Op::Add, &[ids, x]).is_err());
    assert!(g.push(Op::Concat, &[ids, ids]).is_err());
    assert!(g.slice(ids, 0, 1).is_err());
    let w = g.param("W", Shape::Matrix(2, 1));
    assert!(g.matmul(w, ids).is_err());
}

/// A decoder-side graph over `T = 2` steps of `B = 2` sequences (4 rows) and a memory of 3
/// source positions, the second sequence's source 2 long: `h: batch[3]`, `M: memory[4]`.
fn attention_check(what: &str, f: impl FnOnce(&mut Graph, Value, Value) -> Value) {
    let mut g = Graph::new();
    let h = g.x(3);
    let m = g.input_value(Role::Memory, Shape::Memory(4), Some("M".into()));
    let y = f(&mut g, h, m);
    g.set_output(OutRole::Output, y);
    let lengths = [3, 2];
    let extent = Extent {
        positions: 3,
        batch: 2,
        lengths: Some(&lengths),
    };
    check_graph_at(&g, what, 4, Some(&extent));
}

#[test]
fn luong_general_attention_gradient() {
    // s = (W_a M)·h, a = softmax over the valid positions, c = Σ a M, h̃ = tanh(W_c [c; h])
    attention_check("general attention", |g, h, m| {
        let wa = g.param("W_a", Shape::Matrix(3, 4));
        let k = g.matmul(wa, m).unwrap();
        let s = g.push(Op::PairDot, &[k, h]).unwrap();
        let a = g.push(Op::SoftmaxPositions, &[s]).unwrap();
        let c = g.push(Op::Context, &[a, m]).unwrap();
        let ch = g.push(Op::Concat, &[c, h]).unwrap();
        let wc = g.param("W_c", Shape::Matrix(3, 7));
        let z = g.matmul(wc, ch).unwrap();
        g.tanh(z).unwrap()
    });
}

#[test]
fn additive_attention_gradient() {
    // Bahdanau's score: v · tanh(W_1 M + W_2 h + b), then the context.
    attention_check("additive attention", |g, h, m| {
        let w1 = g.param("W_1", Shape::Matrix(5, 4));
        let w2 = g.param("W_2", Shape::Matrix(5, 3));
        let bias = g.param("b", Shape::Vector(5));
        let v = g.param("v", Shape::Matrix(1, 5));
        let k = g.matmul(w1, m).unwrap();
        let kb = g.add(k, bias).unwrap();
        let q = g.matmul(w2, h).unwrap();
        let kp = g.push(Op::MemoryToPairs, &[kb]).unwrap();
        let qp = g.push(Op::SpreadPositions, &[q]).unwrap();
        let sum = g.add(kp, qp).unwrap();
        let t = g.tanh(sum).unwrap();
        let s = g.matmul(v, t).unwrap();
        let a = g.push(Op::SoftmaxPositions, &[s]).unwrap();
        g.push(Op::Context, &[a, m]).unwrap()
    });
}

#[test]
fn the_backward_attention_ops_have_gradients_too() {
    // context_t, pairs_to_memory and sum_positions, differentiated themselves.
    attention_check("context_t / pairs_to_memory / sum_positions", |g, h, m| {
        let w = g.param("W", Shape::Matrix(4, 3));
        let hw = g.matmul(w, h).unwrap(); // batch[4]
        let s = g.push(Op::PairDot, &[m, hw]).unwrap();
        let y = g.push(Op::ContextT, &[s, hw]).unwrap(); // memory[4]
        let p = g.push(Op::MemoryToPairs, &[y]).unwrap();
        let back = g.push(Op::PairsToMemory, &[p]).unwrap();
        let ym = g.mul(back, m).unwrap();
        let c = g.push(Op::Context, &[s, ym]).unwrap();
        let sp = g.push(Op::SpreadPositions, &[c]).unwrap();
        let t = g.tanh(sp).unwrap();
        g.push(Op::SumPositions, &[t]).unwrap()
    });
}

#[test]
fn masked_positions_weigh_nothing_and_get_no_gradient() {
    // The second sequence's third position is past its length: its weight is exactly 0 and
    // the memory there gets no gradient.
    let mut g = Graph::new();
    let h = g.x(4);
    let m = g.input_value(Role::Memory, Shape::Memory(4), Some("M".into()));
    let s = g.push(Op::PairDot, &[m, h]).unwrap();
    let a = g.push(Op::SoftmaxPositions, &[s]).unwrap();
    let c = g.push(Op::Context, &[a, m]).unwrap();
    g.set_output(OutRole::Output, c);
    let lengths = [3, 2];
    let extent = Extent {
        positions: 3,
        batch: 2,
        lengths: Some(&lengths),
    };
    let exec = Exec::default();
    let mut inputs = HashMap::new();
    inputs.insert(Role::Input, random(16, 1));
    inputs.insert(Role::Memory, random(24, 2));
    let vals = eval_graph_with::<f64>(&g, 4, &inputs, &exec, Some(&extent)).unwrap();
    let w = &vals[a.index()];
    for r in 0..4 {
        let row = &w[r * 3..r * 3 + 3];
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        if r % 2 == 1 {
            assert_eq!(row[2], 0.0, "row {r} weighs a masked position");
        }
    }
    let b = backward(&g).unwrap();
    let mut b_inputs = HashMap::new();
    for v in b.iter() {
        if let Op::Input(role) = b.data(v).op {
            let x = match role {
                Role::Saved(sv) => vals[sv.index()].clone(),
                Role::Cotangent(OutRole::Output) => vec![1.0; 16],
                other => inputs[&other].clone(),
            };
            b_inputs.insert(role, x);
        }
    }
    let grads = eval_graph_with::<f64>(&b, 4, &b_inputs, &exec, Some(&extent)).unwrap();
    let dm = &grads[b.output(OutRole::MemoryGrad).unwrap().index()];
    // Position 2 of sequence 1 is memory row 2 · 2 + 1 = 5.
    assert!(
        dm[5 * 4..6 * 4].iter().all(|&x| x == 0.0),
        "{:?}",
        &dm[20..24]
    );
    // Without an extent, a graph with a memory is refused.
    let err = eval_graph::<f64>(&g, 4, &inputs, &exec).unwrap_err();
    assert!(err.to_string().contains("extent"), "{err}");
}

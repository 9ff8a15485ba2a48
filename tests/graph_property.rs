//! Property: on random step graphs built from every op (not only the cells the DSL lowers), the
//! optimised and time-hoisted schedule computes what the plain schedule (every value in the
//! loop, no pass) computes, for the forward graph, its backward graph, and the backward graph of
//! the optimised forward graph; in `f64`, over random sequences (lengths or none), parameters,
//! inputs, saved values, cotangents and initial carried values.
//!
//! The generator builds a forward step graph from random numbers: the input `x`, one to three
//! recurrent states, parameters (vectors and matrices), constants (scalars, vectors, batches),
//! then 3 to 25 ops of every kind with arguments picked among the values of compatible shapes,
//! mostly values that depend on the state (so that most of the graph recurs), sometimes
//! loop-invariant ones (so that some of it hoists), some products sharing a right operand (gate
//! fusion) and some long sums (reassociation). Each state's next value is derived from a random
//! value of the graph (sliced, repeated, added to a state, often with a cross-row reduction
//! `broadcast(sum_rows(..))` of state-dependent values mixed in, often squashed); the output
//! joins one to three random values. Graphs `hoist` refuses are skipped;
//! `most_random_graphs_hoist` checks that this is rare.
//!
//! Runs 64 cases by default; set `PROPTEST_CASES` for a longer run.

mod common;

use common::Rng;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use rnn::ir::autodiff;
use rnn::ir::graph::{Graph, Op, OutRole, Role, Shape, Value, verify};
use rnn::ir::interp::{Exec, Feed, SeqIo, run_sequence};
use rnn::ir::passes::{self, hoist::Phase};
use rnn::ir::program::Scheduled;
use std::collections::{BTreeMap, HashMap};

/// Runs `s` over a sequence: the one place this test touches the executor.
fn run(s: &Scheduled, io: &SeqInputs) -> SeqOutputs {
    let feeds: HashMap<Role, Feed<'_, f64>> = io
        .feeds
        .iter()
        .map(|(&role, fed)| {
            let feed = match fed {
                Fed::Fixed(x) => Feed::Fixed(x.as_slice()),
                Fed::Rows(x) => Feed::Rows(x.as_slice()),
            };
            (role, feed)
        })
        .collect();
    let seq = SeqIo {
        steps: io.steps,
        batch: io.batch,
        reverse: io.backward,
        lengths: io.lengths.as_deref(),
        feeds,
        carried: io.carried.clone(),
        zero_inactive_carried: io.backward,
        keep: &[],
    };
    let r = run_sequence(s, seq, &Exec::default())
        .unwrap_or_else(|e| panic!("run_sequence failed: {e}\n{}", s.to_text()));
    SeqOutputs {
        outputs: r.outputs,
        carried: r.carried,
    }
}

/// A non-carried input's data.
#[derive(Clone, Debug)]
enum Fed {
    /// The same at every step (`row_len` elements).
    Fixed(Vec<f64>),
    /// `T·B` rows; step `t` reads rows `t·B .. (t+1)·B`.
    Rows(Vec<f64>),
}

/// Everything one run of a step graph over a sequence reads.
#[derive(Clone, Debug)]
struct SeqInputs {
    steps: usize,
    batch: usize,
    /// Per-row lengths `1 ..= steps`, or every row runs every step.
    lengths: Option<Vec<usize>>,
    /// A backward graph: the loop runs from the last step to the first, and the carried
    /// inputs are zero on rows past their length.
    backward: bool,
    /// Every non-carried input by role (parameters, `x`, saved values, output cotangents).
    feeds: BTreeMap<Role, Fed>,
    /// The initial carried values, one `B × size` buffer per state.
    carried: Vec<Vec<f64>>,
}

/// What a run gives back.
#[derive(Clone, Debug)]
struct SeqOutputs {
    /// `Output`/`InputGrad` over `T·B` rows, `ParamGrad` summed over time.
    outputs: BTreeMap<OutRole, Vec<f64>>,
    /// The final carried values.
    carried: Vec<Vec<f64>>,
}

// ---------------------------------------------------------------------------------------------
// The generator.

/// The random numbers a graph is built from (see [`build`]).
#[derive(Clone, Debug)]
struct Recipe {
    input: usize,
    states: Vec<usize>,
    /// `(matrix?, size pick, size pick)`.
    params: Vec<(bool, u8, u8)>,
    /// `(kind: scalar / vector / batch, size pick, value in quarters)`.
    consts: Vec<(u8, u8, i8)>,
    /// `(op kind, pick, pick, pick)`.
    ops: Vec<(u8, u16, u16, u16)>,
    /// Per state: `(value pick, flags)`; only the first `states.len()` are used.
    state_outs: Vec<(u16, u16)>,
    /// The `Output` picks.
    output: u16,
}

/// The op kinds [`Builder::op`] knows: matmul, matmul_t, outer_sum, sum_rows, broadcast, add,
/// sub, mul, neg, sigmoid, tanh, relu, step, slice, concat, div, the smooth functions (exp, log,
/// sqrt, softplus, abs, sign), min/max against a constant, and feature sums (with their spread
/// or as a mean).
const OP_KINDS: u8 = 19;

/// The kind each op of a recipe asks for: every kind, matmuls (which fusion needs two of) and
/// sums (which reassociation regroups) more often.
const KIND_MIX: [u8; 27] = [
    0, 0, 0, 0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 16, 17, 18, 18,
];

fn recipe() -> impl Strategy<Value = Recipe> {
    use proptest::collection::vec;
    (
        1usize..=9,
        vec(1usize..=9, 1..=3),
        vec((any::<bool>(), any::<u8>(), any::<u8>()), 1..=6),
        vec((0u8..3, any::<u8>(), -8i8..=8), 0..=3),
        vec(
            (
                0..KIND_MIX.len() as u8,
                any::<u16>(),
                any::<u16>(),
                any::<u16>(),
            ),
            3..=25,
        ),
        vec((any::<u16>(), any::<u16>()), 3),
        any::<u16>(),
    )
        .prop_map(
            |(input, states, params, consts, ops, state_outs, output)| Recipe {
                input,
                states,
                params,
                consts,
                ops,
                state_outs,
                output,
            },
        )
}

/// A graph under construction, with which values depend on a recurrent state.
struct Builder {
    g: Graph,
    dep: Vec<bool>,
}

impl Builder {
    fn leaf(&mut self, v: Value, dep: bool) -> Value {
        debug_assert_eq!(v.index(), self.dep.len());
        self.dep.push(dep);
        v
    }

    /// `op(args)` through `Graph::push` (which checks the shapes); `None` if ill-typed.
    fn push(&mut self, op: Op, args: &[Value]) -> Option<Value> {
        let v = self.g.push(op, args).ok()?;
        let dep = args.iter().any(|a| self.dep[a.index()]);
        Some(self.leaf(v, dep))
    }

    /// The scalar constant `c`.
    fn constant(&mut self, c: f32) -> Value {
        let v = self.g.constant(c, Shape::Scalar);
        self.leaf(v, false)
    }

    fn values_where(&self, f: impl Fn(Shape) -> bool) -> Vec<Value> {
        self.g.iter().filter(|&v| f(self.g.shape(v))).collect()
    }

    /// One of `cands` chosen by `n`: one time in four any of them, one in two a state-dependent
    /// one and one in four a loop-invariant one (when there are such).
    fn pick(&self, cands: &[Value], n: u16) -> Option<Value> {
        let n = n as usize;
        match n % 8 {
            0 | 1 => self.pick_among(cands, n >> 3, |_| true),
            2..=5 => self.pick_among(cands, n >> 3, |dep| dep),
            _ => self.pick_among(cands, n >> 3, |dep| !dep),
        }
    }

    /// One of `cands` chosen by `n`, three times in four a state-dependent one if there is one
    /// (for reductions: a sum over the rows of a loop-invariant value cannot be hoisted).
    fn pick_dep(&self, cands: &[Value], n: u16) -> Option<Value> {
        let n = n as usize;
        self.pick_among(cands, n >> 2, |dep| dep || n.is_multiple_of(4))
    }

    /// One of the `cands` whose dependence on the state `want` accepts, chosen by `n`; any of
    /// `cands` if none is.
    fn pick_among(&self, cands: &[Value], n: usize, want: impl Fn(bool) -> bool) -> Option<Value> {
        if cands.is_empty() {
            return None;
        }
        let pool: Vec<Value> = cands
            .iter()
            .copied()
            .filter(|v| want(self.dep[v.index()]))
            .collect();
        let pool = if pool.is_empty() { cands } else { &pool };
        Some(pool[n % pool.len()])
    }

    /// `v` made `n` features wide: repeated by concat if narrower, then sliced from `offset`.
    fn fit(&mut self, v: Value, n: usize, offset: usize) -> Value {
        let m = self.g.shape(v).features();
        if m == n {
            return v;
        }
        let wide = if m < n {
            self.push(Op::Concat, &vec![v; n.div_ceil(m)]).unwrap()
        } else {
            v
        };
        let w = self.g.shape(wide).features();
        if w == n {
            return wide;
        }
        let start = (offset % (w - n + 1)) as u32;
        self.push(
            Op::Slice {
                start,
                len: n as u32,
            },
            &[wide],
        )
        .unwrap()
    }

    /// One op of kind `kind` with arguments chosen by `a`, `b`, `c`, or `None` if the graph
    /// has no values of the shapes it needs.
    fn op(&mut self, kind: u8, a: u16, b: u16, c: u16) -> Option<Value> {
        let batched = self.values_where(Shape::is_batched);
        let not_scalar = self.values_where(|s| s != Shape::Scalar);
        match kind {
            // matmul [o, i] @ batch[i]; matmul_t [o, i] @ batch[o]
            0 | 1 => {
                let mats = self.values_where(|s| matches!(s, Shape::Matrix(..)));
                let op = if kind == 0 { Op::MatMul } else { Op::MatMulT };
                let cols = |w: Value| match self.g.shape(w) {
                    Shape::Matrix(o, i) => Shape::Batch(if kind == 0 { i } else { o }),
                    _ => unreachable!(),
                };
                // Half the time another weight times the right operand of an earlier product
                // (what gate fusion stacks).
                let earlier: Vec<Value> =
                    self.g.iter().filter(|&v| self.g.data(v).op == op).collect();
                if c % 2 == 1 && !earlier.is_empty() {
                    let m = earlier[a as usize % earlier.len()];
                    let (w0, x) = (self.g.data(m).args[0], self.g.data(m).args[1]);
                    let others: Vec<Value> = mats
                        .iter()
                        .copied()
                        .filter(|&w| w != w0 && cols(w) == self.g.shape(x))
                        .collect();
                    if let Some(w) = self.pick_among(&others, b as usize, |_| true) {
                        return self.push(op, &[w, x]);
                    }
                }
                if mats.is_empty() {
                    return None;
                }
                let first = a as usize % mats.len();
                for k in 0..mats.len() {
                    let w = mats[(first + k) % mats.len()];
                    let xs = self.values_where(|s| s == cols(w));
                    if let Some(x) = self.pick(&xs, b) {
                        return self.push(op, &[w, x]);
                    }
                }
                None
            }
            2 => {
                let d = self.pick_dep(&batched, a)?;
                let x = self.pick_dep(&batched, b)?;
                self.push(Op::OuterSum, &[d, x])
            }
            3 => {
                let d = self.pick_dep(&batched, a)?;
                self.push(Op::SumRows, &[d])
            }
            4 => {
                let vecs = self.values_where(|s| matches!(s, Shape::Vector(_)));
                let v = self.pick(&vecs, a)?;
                self.push(Op::Broadcast, &[v])
            }
            5..=7 => {
                // One sum in four continues the latest sum (long sums to reassociate).
                let latest_sum = self.g.iter().rev().find(|&v| self.g.data(v).op == Op::Add);
                let x = match latest_sum {
                    Some(s) if kind == 5 && c & 6 == 0 => s,
                    _ => self.pick(&not_scalar, a)?,
                };
                let sx = self.g.shape(x);
                let others = self.values_where(|s| rnn::ir::graph::broadcast(sx, s).is_some());
                let y = self.pick(&others, b)?;
                let op = [Op::Add, Op::Sub, Op::Mul][(kind - 5) as usize];
                if c.is_multiple_of(2) {
                    self.push(op, &[x, y])
                } else {
                    self.push(op, &[y, x])
                }
            }
            8..=12 => {
                let x = self.pick(&not_scalar, a)?;
                let op = [Op::Neg, Op::Sigmoid, Op::Tanh, Op::Relu, Op::Step][(kind - 8) as usize];
                self.push(op, &[x])
            }
            13 => {
                let x = self.pick(&not_scalar, a)?;
                let f = self.g.shape(x).features();
                let start = b as usize % f;
                let len = 1 + c as usize % (f - start);
                self.push(
                    Op::Slice {
                        start: start as u32,
                        len: len as u32,
                    },
                    &[x],
                )
            }
            14 => {
                let x = self.pick(&not_scalar, a)?;
                let sx = self.g.shape(x);
                let others = self.values_where(|s| {
                    s != Shape::Scalar && s.with_features(0) == sx.with_features(0)
                });
                let mut args = vec![x];
                for k in 0..1 + c as usize % 2 {
                    args.push(self.pick(&others, b.rotate_left(5 * k as u32))?);
                }
                self.push(Op::Concat, &args)
            }
            // x / (1 + softplus(y)): a denominator at least 1, so values stay finite
            15 => {
                let x = self.pick(&not_scalar, a)?;
                let sx = self.g.shape(x);
                let others = self.values_where(|s| rnn::ir::graph::broadcast(sx, s).is_some());
                let y = self.pick(&others, b)?;
                let sp = self.push(Op::Softplus, &[y])?;
                let one = self.constant(1.0);
                let den = self.push(Op::Add, &[sp, one])?;
                self.push(Op::Div, &[x, den])
            }
            // exp(tanh x), log(1 + |x|), sqrt(1 + |x|), softplus x, |x|, sign x
            16 => {
                let x = self.pick(&not_scalar, a)?;
                let positive = |me: &mut Self, x: Value| {
                    let ax = me.push(Op::Abs, &[x])?;
                    let one = me.constant(1.0);
                    me.push(Op::Add, &[ax, one])
                };
                match c % 6 {
                    0 => {
                        let t = self.push(Op::Tanh, &[x])?;
                        self.push(Op::Exp, &[t])
                    }
                    1 => {
                        let p = positive(self, x)?;
                        self.push(Op::Log, &[p])
                    }
                    2 => {
                        let p = positive(self, x)?;
                        self.push(Op::Sqrt, &[p])
                    }
                    3 => self.push(Op::Softplus, &[x]),
                    4 => self.push(Op::Abs, &[x]),
                    _ => self.push(Op::Sign, &[x]),
                }
            }
            // max(x, c) or min(x, c), c in [-1, 1]
            17 => {
                let x = self.pick(&not_scalar, a)?;
                let k = (b % 17) as f32 / 8.0 - 1.0;
                let op = if c.is_multiple_of(2) {
                    Op::Max(k.to_bits())
                } else {
                    Op::Min(k.to_bits())
                };
                self.push(op, &[x])
            }
            // sum over the features, spread back or divided into a mean
            18 => {
                let rows = self.values_where(|s| matches!(s, Shape::Vector(_) | Shape::Batch(_)));
                let x = self.pick(&rows, a)?;
                let n = self.g.shape(x).features();
                let sum = self.push(Op::SumFeatures, &[x])?;
                match c % 3 {
                    0 => Some(sum),
                    1 => self.push(Op::Spread(1 + b as u32 % 9), &[sum]),
                    _ => {
                        let count = self.constant(n as f32);
                        self.push(Op::Div, &[sum, count])
                    }
                }
            }
            _ => unreachable!(),
        }
    }
}

/// The forward step graph `r` describes (deterministic).
fn build(r: &Recipe) -> Graph {
    let mut b = Builder {
        g: Graph::new(),
        dep: Vec::new(),
    };
    let mut widths = vec![r.input];
    widths.extend(&r.states);
    // Mostly a width already in play, so that matmuls and element-wise ops find arguments.
    let size = |pick: u8| {
        if pick < 192 {
            widths[pick as usize % widths.len()]
        } else {
            1 + pick as usize % 9
        }
    };
    let x = b.g.x(r.input);
    b.leaf(x, false);
    let mut hs = Vec::new();
    for (k, &n) in r.states.iter().enumerate() {
        let h = b.g.state(&format!("h{k}"), n);
        hs.push(b.leaf(h, true));
    }
    for (p, &(matrix, s0, s1)) in r.params.iter().enumerate() {
        let shape = if matrix {
            Shape::Matrix(size(s0), size(s1))
        } else {
            Shape::Vector(size(s0))
        };
        let v = b.g.param(&format!("p{p}"), shape);
        b.leaf(v, false);
    }
    for &(kind, s, q) in &r.consts {
        let shape = match kind {
            0 => Shape::Scalar,
            1 => Shape::Vector(size(s)),
            _ => Shape::Batch(size(s)),
        };
        let v = b.g.constant(q as f32 / 4.0, shape);
        b.leaf(v, false);
    }
    for &(kind, p0, p1, p2) in &r.ops {
        // An op kind with no well-typed arguments yields to the next kind.
        let kind = KIND_MIX[kind as usize];
        for k in 0..OP_KINDS {
            if b.op((kind + k) % OP_KINDS, p0, p1, p2).is_some() {
                break;
            }
        }
    }
    for (k, &n) in r.states.iter().enumerate() {
        let (pick, flags) = r.state_outs[k];
        let batched = b.values_where(Shape::is_batched);
        let v = b.pick(&batched, pick).unwrap();
        let mut next = b.fit(v, n, pick as usize >> 8);
        // Three times in four the state recurs for sure.
        if flags & 3 != 0 && !b.dep[next.index()] {
            let j = (flags as usize >> 2) % hs.len();
            let h = b.fit(hs[j], n, flags as usize >> 4);
            next = b.push(Op::Add, &[next, h]).unwrap();
        }
        // Half the time a sum over the step's rows of a state-dependent value feeds the state.
        if flags & 64 != 0 {
            let deps: Vec<Value> = batched
                .iter()
                .copied()
                .filter(|v| b.dep[v.index()])
                .collect();
            let d = deps[(flags as usize >> 7) % deps.len()];
            let d = b.fit(d, n, flags as usize >> 9);
            let sum = b.push(Op::SumRows, &[d]).unwrap();
            let spread = b.push(Op::Broadcast, &[sum]).unwrap();
            next = b.push(Op::Add, &[next, spread]).unwrap();
        }
        next = match (flags >> 12) % 4 {
            0 | 1 => b.push(Op::Tanh, &[next]).unwrap(),
            2 => b.push(Op::Sigmoid, &[next]).unwrap(),
            _ => next,
        };
        b.g.set_output(OutRole::State(k as u32), next);
    }
    let batched = b.values_where(Shape::is_batched);
    // The output joins one to three values (so that more of the graph is live).
    let mut parts = Vec::new();
    for k in 0..1 + r.output as usize % 3 {
        parts.push(
            b.pick(&batched, r.output.rotate_left(2 + 5 * k as u32))
                .unwrap(),
        );
    }
    let y = if parts.len() == 1 {
        parts[0]
    } else {
        b.push(Op::Concat, &parts).unwrap()
    };
    b.g.set_output(OutRole::Output, y);
    b.g
}

/// A sequence to run on: `T`, `B`, whether rows have lengths, and the seed of all data.
#[derive(Clone, Debug)]
struct Sequence {
    steps: usize,
    batch: usize,
    packed: bool,
    seed: u64,
}

fn sequence() -> impl Strategy<Value = Sequence> {
    (1usize..=6, 1usize..=4, any::<bool>(), any::<u64>()).prop_map(
        |(steps, batch, packed, seed)| Sequence {
            steps,
            batch,
            packed,
            seed,
        },
    )
}

/// Random inputs for every input of `g` (a forward or backward step graph), by role.
fn inputs(g: &Graph, s: &Sequence, backward: bool) -> SeqInputs {
    let mut rng = Rng(s.seed ^ if backward { 0x5eed } else { 0 });
    let rows = s.steps * s.batch;
    let lengths = s.packed.then(|| {
        (0..s.batch)
            .map(|_| 1 + rng.next_u64() as usize % s.steps)
            .collect()
    });
    let mut roles: Vec<(Role, Shape)> = g
        .iter()
        .filter_map(|v| match g.data(v).op {
            Op::Input(role) => Some((role, g.shape(v))),
            _ => None,
        })
        .collect();
    roles.sort_by_key(|&(role, _)| role);
    let mut feeds = BTreeMap::new();
    for (role, shape) in roles {
        let fed = match (role, shape) {
            (Role::State(_) | Role::Cotangent(OutRole::State(_)), _) => continue,
            (_, Shape::Batch(n)) => Fed::Rows(rng.vec_f64(rows * n)),
            (_, s) => Fed::Fixed(rng.vec_f64(s.row_len())),
        };
        feeds.insert(role, fed);
    }
    let carried = g
        .states()
        .iter()
        .map(|&(_, n)| rng.vec_f64(s.batch * n))
        .collect();
    SeqInputs {
        steps: s.steps,
        batch: s.batch,
        lengths,
        backward,
        feeds,
        carried,
    }
}

// ---------------------------------------------------------------------------------------------
// The comparison.

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + 1e-9 * b.abs() || (a.is_nan() && b.is_nan()) || a == b
}

fn compare_buffers(what: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, the reference has {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if !close(a, b) {
            return Err(format!("{what}[{i}]: {a} but the reference gives {b}"));
        }
    }
    Ok(())
}

/// Every output and final carried value of `got` against `want`, lengths first.
fn compare(got: &SeqOutputs, want: &SeqOutputs) -> Result<(), String> {
    let roles = |o: &SeqOutputs| o.outputs.keys().copied().collect::<Vec<_>>();
    if roles(got) != roles(want) {
        return Err(format!(
            "outputs {:?}, the reference has {:?}",
            roles(got),
            roles(want)
        ));
    }
    for (role, w) in &want.outputs {
        compare_buffers(&format!("{role:?}"), &got.outputs[role], w)?;
    }
    if got.carried.len() != want.carried.len() {
        return Err(format!(
            "{} carried values, the reference has {}",
            got.carried.len(),
            want.carried.len()
        ));
    }
    for (k, (a, b)) in got.carried.iter().zip(&want.carried).enumerate() {
        compare_buffers(&format!("final carried {k}"), a, b)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The property.

/// How one graph of a case fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Hoisting refused the optimised graph.
    Refused,
    /// Compared, equal.
    Equal,
}

/// Checks graph `g` (forward, or backward when `backward`): optimising must succeed and verify;
/// if `hoist` accepts the optimised graph, its run must equal the plain run. The graph as
/// given, hoisted without the passes, is compared too when `hoist` accepts it (it tells a
/// hoisting bug from a pass bug).
fn check_graph(name: &str, g: &Graph, s: &Sequence, backward: bool) -> Result<Outcome, String> {
    let opt = passes::optimize(g).map_err(|e| format!("{name}: optimize failed: {e}\n{g}"))?;
    verify(&opt).map_err(|e| format!("{name}: the optimised graph does not verify: {e}\n{opt}"))?;
    let io = inputs(g, s, backward);
    let plain = Scheduled::new(g.clone(), false).map_err(|e| e.to_string())?;
    let reference = run(&plain, &io);
    if let Ok(hoisted) = Scheduled::new(g.clone(), true) {
        compare(&run(&hoisted, &io), &reference).map_err(|e| {
            format!(
                "{name}, hoisted without passes: {e}\n{s:?}\n{}",
                hoisted.to_text()
            )
        })?;
    }
    let Ok(hoisted) = Scheduled::new(opt.clone(), true) else {
        return Ok(Outcome::Refused);
    };
    compare(&run(&hoisted, &io), &reference).map_err(|e| {
        format!(
            "{name}, optimised and hoisted: {e}\n{s:?}\ngraph:\n{g}optimised:\n{}",
            hoisted.to_text()
        )
    })?;
    Ok(Outcome::Equal)
}

/// The graphs of one case: the forward graph, its backward graph, and the backward graph of
/// the optimised forward graph (what `Program::compile` differentiates).
fn graphs(r: &Recipe) -> Result<Vec<(&'static str, Graph, bool)>, String> {
    let f = build(r);
    verify(&f).map_err(|e| format!("generated graph does not verify: {e}\n{f}"))?;
    let b = autodiff::backward(&f).map_err(|e| format!("autodiff failed: {e}\n{f}"))?;
    verify(&b).map_err(|e| format!("backward graph does not verify: {e}\n{b}"))?;
    let fo = passes::optimize(&f).map_err(|e| format!("optimize failed: {e}\n{f}"))?;
    let bo = autodiff::backward(&fo).map_err(|e| format!("autodiff failed: {e}\n{fo}"))?;
    verify(&bo).map_err(|e| format!("backward graph does not verify: {e}\n{bo}"))?;
    Ok(vec![
        ("forward", f, false),
        ("backward", b, true),
        ("backward of optimised", bo, true),
    ])
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_global_rejects: cases().max(1024),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hoisting_preserves_random_graphs(r in recipe(), s in sequence()) {
        let graphs = graphs(&r).map_err(TestCaseError::fail)?;
        let mut compared = 0;
        for (name, g, backward) in &graphs {
            if check_graph(name, g, &s, *backward).map_err(TestCaseError::fail)? == Outcome::Equal {
                compared += 1;
            }
        }
        prop_assume!(compared > 0, "hoisting refused every graph of the case");
    }
}

/// Of a fixed sample of generated cases, at least 70% of the forward graphs and of the
/// backward graphs are hoisted (not skipped), and most states recur through the loop.
#[test]
fn most_random_graphs_hoist() {
    let mut runner = TestRunner::deterministic();
    let strategy = recipe();
    let n = 400;
    let (mut hoisted, mut recurs, mut reduces) = ([0usize; 3], 0, 0);
    for _ in 0..n {
        let r = strategy.new_tree(&mut runner).unwrap().current();
        let graphs = graphs(&r).unwrap();
        for (i, (_, g, _)) in graphs.iter().enumerate() {
            let opt = passes::optimize(g).unwrap();
            let Ok(s) = Scheduled::new(opt, true) else {
                continue;
            };
            hoisted[i] += 1;
            if i == 0 {
                let loop_vals = s.values(Phase::Loop);
                let state_out = s.graph.outputs().iter().any(|o| {
                    matches!(o.role, OutRole::State(_)) && s.phases[o.value.index()] == Phase::Loop
                });
                recurs += state_out as usize;
                reduces += loop_vals.iter().any(|&v| s.graph.data(v).op.is_reduction()) as usize;
            }
        }
    }
    println!(
        "of {n} cases hoisted: forward {}, backward {}, backward of optimised {}; \
         forward with a state in the loop {recurs}, with a reduction in the loop {reduces}",
        hoisted[0], hoisted[1], hoisted[2]
    );
    for h in hoisted {
        assert!(h * 10 >= n * 7, "only {h} of {n} graphs hoisted");
    }
    assert!(
        recurs * 10 >= n * 8,
        "only {recurs} of {n} forward graphs recur"
    );
}

/// A hole `hoist::check` had: a nonlinear function of a sum over the rows
/// after the loop. Per step the loop sums `(Σ_rows d_t)²` over time; after the loop the schedule
/// squares `Σ_t Σ_rows d_t`. Autodiff never builds such a graph (its gradients are linear in the
/// cotangents), so the generator above cannot reach it; this hand-written backward-style graph
/// does. Either `hoist` must refuse it or the hoisted run must equal the plain one.
#[test]
fn nonlinear_row_sum_after_the_loop() {
    let mut g = Graph::new();
    let x = g.x(2);
    g.declare_state("h", 2);
    let dh = g.input_value(Role::Cotangent(OutRole::State(0)), Shape::Batch(2), None);
    g.param("p0", Shape::Vector(2));
    let d = g.add(dh, x).unwrap();
    let sum = g.push(Op::SumRows, &[d]).unwrap();
    let square = g.mul(sum, sum).unwrap();
    let zero = g.constant(0.0, Shape::Batch(2));
    g.set_output(OutRole::ParamGrad(0), square);
    g.set_output(OutRole::InputGrad, zero);
    g.set_output(OutRole::StateGrad(0), d);
    verify(&g).unwrap();
    let s = Sequence {
        steps: 3,
        batch: 2,
        packed: false,
        seed: 1,
    };
    let io = inputs(&g, &s, true);
    let reference = run(&Scheduled::new(g.clone(), false).unwrap(), &io);
    if let Ok(hoisted) = Scheduled::new(g.clone(), true)
        && let Err(e) = compare(&run(&hoisted, &io), &reference)
    {
        panic!("{e}\n{}", hoisted.to_text());
    }
}

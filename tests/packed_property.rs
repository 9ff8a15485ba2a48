//! Property: a packed batch computes, for each of its sequences, exactly what that sequence
//! computes run alone.
//!
//! For random models (every standard cell, three custom cells, 1 to 3 layers, one or two
//! directions, time- or batch-major) and random packed batches (lengths in `1 ..= T`, often all
//! different and unsorted; random initial states or none; a random `grad_output`, nonzero past
//! the lengths too; sometimes gradients into the final states), the batch is run once and every
//! sequence `b` alone: batch 1, its input cut to its length, no lengths, its own column of the
//! initial states and of the gradients. Then, in `f64`:
//! - output rows within the length equal the single run's, rows past it are exactly zero;
//! - final states, and the gradients of the initial states, equal column `b` of the batch's;
//! - `grad.input` rows within the length equal the single run's, rows past it are exactly zero;
//! - every parameter gradient of the batch is the sum over sequences of the single runs'.
//!
//! Runs 64 cases by default; set `PROPTEST_CASES` for a longer run.

use proptest::prelude::*;
use rnn::{Exec, Program, Request, Response, Tensor, Weights, parse_str};
use std::collections::BTreeMap;

mod common;

use common::Rng;

/// Every value leaves the library as an `f32` (`Tensor` holds `f32`), rounded from the `f64` it
/// was computed in. Two `f64` results that agree to `RTOL` can round to neighbouring `f32`s, so
/// each comparison allows the `f64` tolerance plus the rounding of every `f32` term involved
/// (half an `f32` ulp, `2⁻²⁴` relative, each).
const RTOL: f64 = 1e-9;
const ATOL: f64 = 1e-12;
const HALF_ULP: f64 = 1.0 / (1u64 << 24) as f64;

#[derive(Clone, Debug)]
struct Case {
    /// 0 rnn tanh, 1 rnn relu, 2 lstm, 3 lstm with proj, 4 gru (reset after), 5 gru (reset
    /// before), 6 peephole, 7 minimal gru, 8 relu elman.
    cell: u8,
    input: usize,
    hidden: usize,
    layers: usize,
    bidirectional: bool,
    batch_first: bool,
    /// 0 two biases, 1 one bias, 2 no bias (standard cells).
    bias: u8,
    batch: usize,
    steps: usize,
    lengths: Vec<i64>,
    /// Per state: an initial value given.
    with_initial: [bool; 2],
    /// Per state: a gradient into its final value given.
    with_grad_final: [bool; 2],
    seed: u64,
}

fn lengths(steps: usize, batch: usize) -> BoxedStrategy<Vec<i64>> {
    let any_lengths = proptest::collection::vec(1..=steps as i64, batch).boxed();
    if batch <= steps {
        // All different, in random order.
        let distinct = Just((1..=steps as i64).collect::<Vec<_>>())
            .prop_shuffle()
            .prop_map(move |v| v[..batch].to_vec());
        prop_oneof![any_lengths, distinct].boxed()
    } else {
        any_lengths
    }
}

fn case() -> impl Strategy<Value = Case> {
    let shape = (
        0u8..9,
        1usize..=9,
        1usize..=9,
        1usize..=3,
        1usize..=5,
        1usize..=7,
    );
    let flags = (
        any::<bool>(),
        any::<bool>(),
        0u8..3,
        any::<[bool; 2]>(),
        any::<[bool; 2]>(),
        any::<u64>(),
    );
    (shape, flags).prop_flat_map(
        |(
            (cell, input, hidden, layers, batch, steps),
            (bidirectional, batch_first, bias, with_initial, with_grad_final, seed),
        )| {
            // A projection needs hidden ≥ 2.
            let hidden = if cell == 3 { hidden.max(2) } else { hidden };
            lengths(steps, batch).prop_map(move |lengths| Case {
                cell,
                input,
                hidden,
                layers,
                bidirectional,
                batch_first,
                bias,
                batch,
                steps,
                lengths,
                with_initial,
                with_grad_final,
                seed,
            })
        },
    )
}

/// The `.rnn` declaration of the case's model.
fn declaration(c: &Case) -> String {
    common::declaration(&common::ModelShape {
        cell: c.cell,
        input: c.input,
        hidden: c.hidden,
        layers: c.layers,
        bidirectional: c.bidirectional,
        batch_first: c.batch_first,
        bias: c.bias,
    })
}

/// The tensors of one request, owned.
struct Inputs {
    input: Tensor,
    initial: Vec<Option<Tensor>>,
    grad_output: Tensor,
    grad_final: Vec<Option<Tensor>>,
    lengths: Option<Vec<i64>>,
}

impl Inputs {
    fn run(&self, program: &Program, weights: &Weights) -> Response {
        let req = Request {
            input: Some(&self.input),
            initial_states: self.initial.iter().map(Option::as_ref).collect(),
            lengths: self.lengths.as_deref(),
            grad_output: Some(&self.grad_output),
            grad_final_states: self.grad_final.iter().map(Option::as_ref).collect(),
        };
        program
            .run::<f64>(weights, &req, &Exec::default())
            .expect("a valid request runs")
    }
}

/// Index of element `(t, b, j)` of a sequence tensor with `steps`, `batch` and `n` features.
fn seq_index(
    batch_first: bool,
    steps: usize,
    batch: usize,
    n: usize,
    t: usize,
    b: usize,
    j: usize,
) -> usize {
    if batch_first {
        (b * steps + t) * n + j
    } else {
        (t * batch + b) * n + j
    }
}

fn seq_shape(batch_first: bool, steps: usize, batch: usize, n: usize) -> Vec<usize> {
    if batch_first {
        vec![batch, steps, n]
    } else {
        vec![steps, batch, n]
    }
}

/// Sequence `b` of `x` (`(T, B, n)` or batch-first), cut to `len` steps, as a batch of one.
fn sequence(x: &Tensor, batch_first: bool, b: usize, len: usize) -> Tensor {
    let (steps, batch) = if batch_first {
        (x.shape[1], x.shape[0])
    } else {
        (x.shape[0], x.shape[1])
    };
    let n = x.shape[2];
    let mut data = Vec::with_capacity(len * n);
    for t in 0..len {
        let at = seq_index(batch_first, steps, batch, n, t, b, 0);
        data.extend_from_slice(&x.data[at..at + n]);
    }
    Tensor {
        shape: seq_shape(batch_first, len, 1, n),
        data,
    }
}

/// Column `b` of a `(L·D, B, n)` state tensor, as `(L·D, 1, n)`.
fn column(s: &Tensor, b: usize) -> Tensor {
    let (ld, batch, n) = (s.shape[0], s.shape[1], s.shape[2]);
    let mut data = Vec::with_capacity(ld * n);
    for i in 0..ld {
        let at = (i * batch + b) * n;
        data.extend_from_slice(&s.data[at..at + n]);
    }
    Tensor {
        shape: vec![ld, 1, n],
        data,
    }
}

/// `|a - e| <= RTOL·scale + ATOL + HALF_ULP·rounding`: `scale` is what the `f64` error is
/// relative to, `rounding` the sum of the magnitudes of the `f32` roundings involved.
fn close(a: f64, e: f64, scale: f64, rounding: f64) -> bool {
    (a - e).abs() <= RTOL * scale + ATOL + HALF_ULP * rounding
}

/// Compares `actual` with `expected` element-wise (same shape), both single rounded `f32`s.
fn check_equal(what: &str, actual: &Tensor, expected: &Tensor) -> Result<(), TestCaseError> {
    prop_assert_eq!(&actual.shape, &expected.shape, "{}: shape", what);
    for (i, (&a, &e)) in actual.data.iter().zip(&expected.data).enumerate() {
        let (a, e) = (a as f64, e as f64);
        prop_assert!(
            close(a, e, e.abs(), a.abs() + e.abs()),
            "{what} [{i}]: {a} (batch) vs {e} (alone)"
        );
    }
    Ok(())
}

/// Checks a per-step tensor of the batch (output, grad.input) against sequence `b` alone:
/// equal within the length, exactly zero past it.
fn check_rows(
    what: &str,
    batched: &Tensor,
    alone: &Tensor,
    batch_first: bool,
    b: usize,
    len: usize,
) -> Result<(), TestCaseError> {
    let (steps, batch) = if batch_first {
        (batched.shape[1], batched.shape[0])
    } else {
        (batched.shape[0], batched.shape[1])
    };
    let n = batched.shape[2];
    prop_assert_eq!(
        &alone.shape,
        &seq_shape(batch_first, len, 1, n),
        "{} alone: shape",
        what
    );
    check_equal(what, &sequence(batched, batch_first, b, len), alone)?;
    for t in len..steps {
        let at = seq_index(batch_first, steps, batch, n, t, b, 0);
        let past = &batched.data[at..at + n];
        prop_assert!(
            past.iter().all(|&v| v == 0.0),
            "{what}: sequence {b} (length {len}) step {t} is {past:?}, not zero"
        );
    }
    Ok(())
}

/// A parameter's shape, and per element the sum of the single runs' gradients and of their
/// magnitudes.
type Sum = (Vec<usize>, Vec<f64>, Vec<f64>);

fn check_case(c: &Case) -> Result<(), TestCaseError> {
    let source = declaration(c);
    let spec = parse_str(&source).unwrap_or_else(|e| panic!("{source}: {e:?}"));
    let program = Program::compile(&spec).unwrap();
    let weights = Weights::init(&program, c.seed).unwrap();
    let states = program.states().to_vec();
    let ld = spec.num_layers * spec.directions();
    let width = spec.directions() * spec.output_size();
    let (steps, batch, bf) = (c.steps, c.batch, spec.batch_first);

    let mut rng = Rng(c.seed ^ 0x5EED);
    let mut maybe = |given: bool, n: usize| given.then(|| rng.tensor(vec![ld, batch, n]));
    let initial: Vec<Option<Tensor>> = states
        .iter()
        .enumerate()
        .map(|(k, s)| maybe(c.with_initial[k], s.1))
        .collect();
    let grad_final: Vec<Option<Tensor>> = states
        .iter()
        .enumerate()
        .map(|(k, s)| maybe(c.with_grad_final[k], s.1))
        .collect();
    let packed = Inputs {
        input: rng.tensor(seq_shape(bf, steps, batch, spec.input_size)),
        initial,
        grad_output: rng.tensor(seq_shape(bf, steps, batch, width)),
        grad_final,
        lengths: Some(c.lengths.clone()),
    };
    let all = packed.run(&program, &weights);
    let all_grads = all.grads.as_ref().expect("gradients were asked for");

    prop_assert_eq!(&all.output.shape, &seq_shape(bf, steps, batch, width));
    prop_assert_eq!(all.final_states.len(), states.len());
    prop_assert_eq!(all_grads.initial_states.len(), states.len());
    for (k, (_, n)) in states.iter().enumerate() {
        prop_assert_eq!(&all.final_states[k].shape, &vec![ld, batch, *n]);
        prop_assert_eq!(&all_grads.initial_states[k].shape, &vec![ld, batch, *n]);
    }
    prop_assert_eq!(&all_grads.input.shape, &packed.input.shape);

    // Per parameter: the sum of the single runs' gradients and of their magnitudes.
    let mut sums: BTreeMap<String, Sum> = BTreeMap::new();
    for b in 0..batch {
        let len = c.lengths[b] as usize;
        let col = |t: &Option<Tensor>| t.as_ref().map(|t| column(t, b));
        let alone = Inputs {
            input: sequence(&packed.input, bf, b, len),
            initial: packed.initial.iter().map(col).collect(),
            grad_output: sequence(&packed.grad_output, bf, b, len),
            grad_final: packed.grad_final.iter().map(col).collect(),
            lengths: None,
        };
        let one = alone.run(&program, &weights);
        let one_grads = one.grads.as_ref().expect("gradients were asked for");
        let at = |what: &str| format!("sequence {b} (length {len}): {what}");

        check_rows(&at("output"), &all.output, &one.output, bf, b, len)?;
        check_rows(
            &at("grad.input"),
            &all_grads.input,
            &one_grads.input,
            bf,
            b,
            len,
        )?;
        prop_assert_eq!(one.final_states.len(), states.len());
        prop_assert_eq!(one_grads.initial_states.len(), states.len());
        for (k, (name, _)) in states.iter().enumerate() {
            check_equal(
                &at(&format!("final {name}")),
                &column(&all.final_states[k], b),
                &one.final_states[k],
            )?;
            check_equal(
                &at(&format!("grad.{name}0")),
                &column(&all_grads.initial_states[k], b),
                &one_grads.initial_states[k],
            )?;
        }

        let names = |g: &BTreeMap<String, Tensor>| g.keys().cloned().collect::<Vec<_>>();
        prop_assert_eq!(
            names(&one_grads.params),
            names(&all_grads.params),
            "{}",
            at("parameter names")
        );
        for (name, g) in &one_grads.params {
            let entry = sums
                .entry(name.clone())
                .or_insert_with(|| (g.shape.clone(), vec![0.0; g.len()], vec![0.0; g.len()]));
            prop_assert_eq!(&entry.0, &g.shape, "{}", at(&format!("grad.{name} shape")));
            for (i, &v) in g.data.iter().enumerate() {
                entry.1[i] += v as f64;
                entry.2[i] += (v as f64).abs();
            }
        }
    }
    for (name, (shape, sum, magnitude)) in &sums {
        let g = &all_grads.params[name];
        prop_assert_eq!(&g.shape, shape, "grad.{} shape", name);
        for (i, &a) in g.data.iter().enumerate() {
            let a = a as f64;
            // Each single gradient was rounded once, the batch's once: magnitude + |a|.
            prop_assert!(
                close(a, sum[i], magnitude[i], magnitude[i] + a.abs()),
                "grad.{name} [{i}]: {a} (batch) vs {} (sum of the {batch} sequences alone)",
                sum[i]
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64), ..ProptestConfig::default() })]

    #[test]
    fn packed_batch_equals_each_sequence_alone(c in case()) {
        check_case(&c)?;
    }
}

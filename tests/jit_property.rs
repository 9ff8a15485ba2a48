//! Property: the JIT computes what the interpreter computes.
//!
//! Random models: every standard cell (tanh and ReLU RNN, LSTM with and without a projection,
//! GRU with either reset), and three custom cells (a peephole LSTM, a minimal GRU, a ReLU
//! Elman cell). Sizes are 1 ..= 70, odd ones included; 1 to 3 layers; one or two directions;
//! time- or batch-major; two, one or no biases. The requests are random too: batches of 1 to 4,
//! 1 to 6 steps, packed lengths (or none), random initial states (or none), a random
//! `grad_output` and sometimes gradients into the final states. Both backends run in `f32`, and
//! every tensor (output, final states, the gradients of the input, of the initial states and of
//! every parameter) must agree within `1e-4` of the tensor's largest magnitude plus `1e-5`.
//! The two backends differ only in the order of a few sums and in the last bits of `exp`,
//! `tanh`, `sigmoid`, `ln` (the JIT's inline approximations, within 2.5e-7 relative), which
//! three layers of six steps of products of up to 70 terms amplify by at most a few hundred.
//!
//! Runs 500 cases by default; set `PROPTEST_CASES` for another count (10,000 for the long run).

use proptest::prelude::*;
use rnn::{Exec, Program, Request, Response, Tensor, Weights, parse_str};
use std::sync::Arc;

mod common;

use common::Rng;

#[derive(Clone, Debug)]
struct Case {
    /// 0 rnn tanh, 1 rnn relu, 2 lstm, 3 lstm with proj, 4 gru (reset after), 5 gru (reset
    /// before), 6 peephole, 7 minimal gru, 8 relu elman, 9 a state computed before the loop.
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
    packed: bool,
    with_initial: bool,
    with_grad_final: bool,
    seed: u64,
}

/// Sizes 1 ..= 70, small ones more often (they are the edge cases of every loop).
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 1usize..=9, 1 => 10usize..=70]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (0u8..10, size(), size(), 1usize..=3, 1usize..=4, 1usize..=6),
        (
            any::<bool>(),
            any::<bool>(),
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (cell, input, hidden, layers, batch, steps),
                (bidirectional, batch_first, bias, packed, with_initial, with_grad_final, seed),
            )| Case {
                cell,
                input,
                // A projection needs hidden ≥ 2.
                hidden: if cell == 3 { hidden.max(2) } else { hidden },
                layers,
                bidirectional,
                batch_first,
                bias,
                batch,
                steps,
                packed,
                with_initial,
                with_grad_final,
                seed,
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

fn random(rng: &mut Rng, shape: Vec<usize>) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect();
    Tensor::new(shape, data).unwrap()
}

/// Every element of `got` within `1e-4 · max|want| + 1e-5` of `want`.
fn agree(what: &str, got: &Tensor, want: &Tensor) -> Result<(), TestCaseError> {
    prop_assert_eq!(&got.shape, &want.shape, "{}: shapes", what);
    let scale = want.data.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
        prop_assert!(
            (a - b).abs() <= 1e-4 * scale + 1e-5,
            "{}[{}]: jit {} interpreter {} (largest magnitude {})",
            what,
            i,
            a,
            b,
            scale
        );
    }
    Ok(())
}

fn same(jit: &Response, interp: &Response) -> Result<(), TestCaseError> {
    agree("output", &jit.output, &interp.output)?;
    prop_assert_eq!(jit.final_states.len(), interp.final_states.len());
    for (k, (a, b)) in jit
        .final_states
        .iter()
        .zip(&interp.final_states)
        .enumerate()
    {
        agree(&format!("final state {k}"), a, b)?;
    }
    let (Some(a), Some(b)) = (jit.grads.as_ref(), interp.grads.as_ref()) else {
        prop_assert_eq!(jit.grads.is_some(), interp.grads.is_some());
        return Ok(());
    };
    agree("grad input", &a.input, &b.input)?;
    for (k, (x, y)) in a.initial_states.iter().zip(&b.initial_states).enumerate() {
        agree(&format!("grad initial state {k}"), x, y)?;
    }
    prop_assert_eq!(a.params.len(), b.params.len());
    for (name, g) in &b.params {
        agree(&format!("grad {name}"), &a.params[name], g)?;
    }
    Ok(())
}

fn check_case(c: &Case) -> Result<(), TestCaseError> {
    let spec = parse_str(&declaration(c)).expect("a valid declaration");
    let program = Program::compile(&spec).expect("compiles");
    let jit = Arc::new(rnn::jit::Jit::compile(&program).expect("the JIT compiles it"));
    let weights = Weights::init(&program, c.seed).unwrap();
    let model = jit.bind(&weights).unwrap();
    let mut rng = Rng(c.seed);
    let (b, t) = (c.batch, c.steps);
    let shape = |n: usize| {
        if c.batch_first {
            vec![b, t, n]
        } else {
            vec![t, b, n]
        }
    };
    let ld = c.layers * spec.directions();
    let input = random(&mut rng, shape(c.input));
    let grad_output = random(&mut rng, shape(spec.output_size() * spec.directions()));
    let states = program.states();
    let initial: Vec<Tensor> = states
        .iter()
        .map(|s| random(&mut rng, vec![ld, b, s.1]))
        .collect();
    let grad_final: Vec<Tensor> = states
        .iter()
        .map(|s| random(&mut rng, vec![ld, b, s.1]))
        .collect();
    let mut lengths: Vec<i64> = (0..b).map(|_| rng.range(1, t) as i64).collect();
    // Half the packed batches by decreasing length, as PyTorch packs them: the JIT's forward
    // steps then run on the rows still running only.
    if rng.one_in(2) {
        lengths.sort_unstable_by(|a, b| b.cmp(a));
    }
    let req = Request {
        input: Some(&input),
        initial_states: if c.with_initial {
            initial.iter().map(Some).collect()
        } else {
            Vec::new()
        },
        lengths: c.packed.then_some(&lengths[..]),
        grad_output: Some(&grad_output),
        grad_final_states: if c.with_grad_final {
            grad_final.iter().map(Some).collect()
        } else {
            Vec::new()
        },
    };
    let want = program
        .run::<f32>(&weights, &req, &Exec::default())
        .expect("the interpreter runs it");
    let got = model.run(&req).expect("the JIT runs it");
    // Inference (no gradients) runs its own plan.
    let infer = Request {
        grad_output: None,
        grad_final_states: Vec::new(),
        ..req.clone()
    };
    let want_out = program
        .run::<f32>(&weights, &infer, &Exec::default())
        .expect("the interpreter runs it");
    let got_out = model.run(&infer).expect("the JIT runs it");
    same(&got_out, &want_out)?;
    same(&got, &want)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_jit_equals_the_interpreter(c in case()) {
        check_case(&c)?;
    }
}

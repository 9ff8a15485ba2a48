//! Property: on random models, the interpreter with every pass (DCE, CSE, gate fusion, time
//! hoisting) computes what it computes without any, forward and backward.
//!
//! Runs 64 cases by default; set `PROPTEST_CASES` for a longer run.

use proptest::prelude::*;
use rnn::bench::random_tensor;
use rnn::ir::spec::{BiasConvention, GruReset};
use rnn::{
    CellKind, CompileOptions, Exec, ModelSpec, Program, Request, Tensor, Weights, parse_str,
};

mod common;

#[derive(Clone, Debug)]
struct Case {
    cell: u8,
    input: usize,
    hidden: usize,
    layers: usize,
    bidirectional: bool,
    bias: bool,
    one_bias: bool,
    proj: bool,
    batch: usize,
    steps: usize,
    lengths: Option<Vec<i64>>,
    with_h0: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    let sizes = (
        0u8..9,
        1usize..5,
        2usize..6,
        1usize..3,
        1usize..4,
        1usize..5,
    );
    let flags = (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    );
    (sizes, flags).prop_flat_map(
        |(
            (cell, input, hidden, layers, batch, steps),
            (bidirectional, bias, one_bias, proj, packed, with_h0, seed),
        )| {
            let lengths = if packed {
                proptest::collection::vec(1..=steps as i64, batch)
                    .prop_map(Some)
                    .boxed()
            } else {
                Just(None).boxed()
            };
            lengths.prop_map(move |lengths| Case {
                cell,
                input,
                hidden,
                layers,
                bidirectional,
                bias,
                one_bias,
                proj,
                batch,
                steps,
                lengths,
                with_h0,
                seed,
            })
        },
    )
}

fn spec_of(c: &Case) -> ModelSpec {
    let custom = |src: &str| {
        let src = src.replace(
            "input: 3, hidden: 4",
            &format!("input: {}, hidden: {}", c.input, c.hidden),
        );
        parse_str(&src).unwrap()
    };
    let mut s = match c.cell {
        0 => ModelSpec::new(CellKind::RnnTanh, c.input, c.hidden),
        1 => ModelSpec::new(CellKind::RnnRelu, c.input, c.hidden),
        2 => ModelSpec::new(CellKind::Lstm, c.input, c.hidden),
        3 => ModelSpec::new(CellKind::Gru, c.input, c.hidden),
        4 => {
            let mut s = ModelSpec::new(CellKind::Gru, c.input, c.hidden);
            s.gru_reset = GruReset::BeforeMatmul;
            s
        }
        5 => {
            let mut s = ModelSpec::new(CellKind::Lstm, c.input, c.hidden);
            s.proj_size = if c.proj { c.hidden - 1 } else { 0 };
            s
        }
        6 => custom(common::PEEPHOLE),
        7 => custom(common::MINIMAL_GRU),
        _ => custom(common::RELU_ELMAN),
    };
    s.num_layers = c.layers;
    s.bidirectional = c.bidirectional;
    if c.cell < 6 {
        s.bias = c.bias;
        if c.one_bias {
            s.bias_convention = BiasConvention::One;
        }
    }
    s
}

fn run(program: &Program, weights: &Weights, c: &Case) -> (Vec<f64>, Vec<Vec<f64>>, Vec<Tensor>) {
    let spec = &program.spec;
    let width = spec.output_size() * spec.directions();
    let ld = spec.num_layers * spec.directions();
    let x = random_tensor(vec![c.steps, c.batch, spec.input_size], c.seed);
    let gy = random_tensor(vec![c.steps, c.batch, width], c.seed ^ 1);
    let h0s: Vec<Tensor> = program
        .states()
        .iter()
        .map(|s| random_tensor(vec![ld, c.batch, s.1], c.seed ^ 2))
        .collect();
    let req = Request {
        input: Some(&x),
        initial_states: if c.with_h0 {
            h0s.iter().map(Some).collect()
        } else {
            vec![]
        },
        lengths: c.lengths.as_deref(),
        grad_output: Some(&gy),
        grad_final_states: vec![],
    };
    let r = program
        .bind::<f64>(weights)
        .unwrap()
        .run_raw(&req, &Exec::default())
        .unwrap();
    let grads = r.response.grads.unwrap();
    let mut g: Vec<Tensor> = vec![grads.input];
    g.extend(grads.initial_states);
    g.extend(grads.params.into_values());
    (r.output, r.final_states, g)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-10 + 1e-9 * b.abs()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64), ..ProptestConfig::default() })]

    #[test]
    fn passes_preserve_outputs_and_gradients(c in case()) {
        let spec = spec_of(&c);
        let optimized = Program::compile(&spec).unwrap();
        let reference = Program::compile_with(&spec, CompileOptions { optimize: false }).unwrap();
        let weights = Weights::init(&optimized, c.seed).unwrap();
        let (y1, s1, g1) = run(&optimized, &weights, &c);
        let (y2, s2, g2) = run(&reference, &weights, &c);
        for (a, b) in y1.iter().zip(&y2) {
            prop_assert!(close(*a, *b), "output {a} vs {b}");
        }
        for (a, b) in s1.iter().flatten().zip(s2.iter().flatten()) {
            prop_assert!(close(*a, *b), "final state {a} vs {b}");
        }
        prop_assert_eq!(g1.len(), g2.len());
        for (ta, tb) in g1.iter().zip(&g2) {
            prop_assert_eq!(&ta.shape, &tb.shape);
            for (a, b) in ta.data.iter().zip(&tb.data) {
                prop_assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "gradient {a} vs {b}");
            }
        }
    }
}

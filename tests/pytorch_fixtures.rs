//! Every recurrent-layer case made by PyTorch runs through the library API and matches PyTorch's
//! output, final states and every gradient.

mod common;

use common::{Case, assert_close, rnn_cases};
use rnn::ir::weights::infer_spec;
use rnn::{Exec, Program, Request, Tensor, Weights};
use std::collections::BTreeMap;

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-6;

/// Runs `case` through the library and returns every result under PyTorch's names.
fn run_case(case: &Case) -> BTreeMap<String, Tensor> {
    let mut spec = infer_spec(&case.weights, Some(case.cell())).unwrap();
    spec.batch_first = case.batch_first();
    let program = Program::compile(&spec).unwrap();
    let weights = Weights {
        tensors: case.weights.clone(),
    };
    let req = Request {
        input: Some(&case.input),
        initial_states: vec![case.h0.as_ref(), case.c0.as_ref()],
        lengths: case.lengths.as_deref(),
        grad_output: Some(&case.grad_output),
        grad_final_states: vec![],
    };
    let out = program
        .run::<f32>(&weights, &req, &Exec::default())
        .unwrap();
    let mut got = BTreeMap::new();
    got.insert("output".to_string(), out.output);
    for (k, s) in out.final_states.into_iter().enumerate() {
        got.insert(format!("{}_n", program.states()[k].0), s);
    }
    let grads = out.grads.unwrap();
    got.insert("grad.input".into(), grads.input);
    for (k, g) in grads.initial_states.into_iter().enumerate() {
        let given = [case.h0.is_some(), case.c0.is_some()][k];
        if given {
            got.insert(format!("grad.{}0", program.states()[k].0), g);
        }
    }
    for (name, g) in grads.params {
        got.insert(format!("grad.{name}"), g);
    }
    got
}

#[test]
fn every_pytorch_case_matches_through_the_library() {
    for name in rnn_cases() {
        let case = Case::load(&name);
        let got = run_case(&case);
        let expected_keys: Vec<_> = case.expected.keys().collect();
        let got_keys: Vec<_> = got.keys().collect();
        assert_eq!(got_keys, expected_keys, "case {name}: the set of results");
        for (key, expected) in &case.expected {
            assert_close(&format!("{name}: {key}"), &got[key], expected, RTOL, ATOL);
        }
    }
}

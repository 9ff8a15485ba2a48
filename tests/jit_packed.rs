//! A packed batch ordered by decreasing length runs on the JIT with each step over the rows
//! still running: the same outputs, final states and gradients as the interpreter (which runs
//! every row), for every standard cell and a custom one, layers and both directions.

use rnn::{Exec, Program, Request, Weights, parse_str};
use std::sync::Arc;

mod common;

#[test]
fn a_batch_packed_by_decreasing_length_runs_on_its_running_rows_and_agrees() {
    let declarations = [
        "lstm { input: 5, hidden: 7, layers: 2, bidirectional: true }",
        "gru { input: 6, hidden: 9 }",
        "rnn { input: 3, hidden: 11, layers: 2 }",
        "lstm { input: 4, hidden: 6, batch_first: true }",
        "cell MinGru { input: 4, hidden: 5, param W_z: [hidden, input], param W_h: [hidden, input], \
         state h, z = sigmoid(W_z @ x), h = (1 - z) * h + z * (W_h @ x) }",
        // A value of the loop on the tape divided by in the output: a finished row's positions
        // past its length hold its last step's numbers, never a 0 to divide by.
        "cell DivOut { input: 3, hidden: 4, param W: [hidden, input], param U: [hidden, hidden], \
         param V: [hidden, input], param W_y: [2, hidden], state h, \
         z = sigmoid(W @ x + U @ h), h = z * tanh(V @ x), output y = W_y @ (h / z) }",
    ];
    let mut rng = common::Rng(7);
    for text in declarations {
        let spec = parse_str(text).unwrap();
        let program = Program::compile(&spec).unwrap();
        let jit = Arc::new(rnn::jit::Jit::compile(&program).unwrap());
        assert!(jit.shrinks_packed_batches(), "{text}");
        let weights = Weights::init(&program, 3).unwrap();
        let model = jit.bind(&weights).unwrap();
        let (t, b) = (9, 5);
        let lengths = [9i64, 7, 7, 3, 1];
        let shape = |n: usize| {
            if spec.batch_first {
                vec![b, t, n]
            } else {
                vec![t, b, n]
            }
        };
        let x = rng.tensor(shape(spec.input_size));
        let gy = rng.tensor(shape(spec.output_size() * spec.directions()));
        for grads in [false, true] {
            let req = Request {
                input: Some(&x),
                lengths: Some(&lengths),
                grad_output: grads.then_some(&gy),
                ..Default::default()
            };
            let want = program
                .run::<f32>(&weights, &req, &Exec::default())
                .unwrap();
            let got = model.run(&req).unwrap();
            common::assert_close("output", &got.output, &want.output, 1e-5, 1e-6);
            for (k, (a, e)) in got.final_states.iter().zip(&want.final_states).enumerate() {
                common::assert_close(&format!("final state {k}"), a, e, 1e-5, 1e-6);
            }
            if let (Some(a), Some(e)) = (&got.grads, &want.grads) {
                common::assert_close("grad input", &a.input, &e.input, 1e-5, 1e-6);
                for (name, g) in &e.params {
                    common::assert_close(&format!("grad {name}"), &a.params[name], g, 1e-5, 1e-6);
                }
            }
            assert_eq!(got.grads.is_some(), grads);
        }
    }
}

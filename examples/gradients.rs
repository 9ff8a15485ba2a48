//! Forward and backward through the library: one call with `grad_output` gives the gradients of
//! `sum(output * grad_output)` with respect to the input, the initial states and every parameter
//! (BPTT through the backward step that autodiff derived from the cell).
//!
//! 1. An LSTM's gradient norms, one of them checked against a central finite difference in f64.
//! 2. The chapter's vanishing gradients: how much the last output depends on each earlier input,
//!    for a tanh RNN and for an LSTM (at PyTorch's initialisation, and with its forget gate
//!    held open).
//!
//! ```sh
//! cargo run --release --example gradients
//! ```

use rnn::{CellKind, Exec, ModelSpec, Program, Request, Tensor, Weights};

/// `n` values in `[-1, 1]`, different for each `seed`.
fn data(shape: Vec<usize>, seed: usize) -> Tensor {
    let n = shape.iter().product();
    let values = (0..n)
        .map(|i| ((i * 7 + seed * 13) as f32 * 0.31).sin())
        .collect();
    Tensor::new(shape, values).expect("n values")
}

fn norm(xs: &[f32]) -> f64 {
    xs.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// `sum(output * g)` computed in f64 from an f64 run.
fn loss(program: &Program, weights: &Weights, request: &Request, g: &Tensor) -> rnn::Result<f64> {
    let raw = program
        .bind::<f64>(weights)?
        .run_raw(request, &Exec::default())?;
    Ok(raw
        .output
        .iter()
        .zip(&g.data)
        .map(|(y, &g)| y * f64::from(g))
        .sum())
}

fn main() -> Result<(), rnn::Error> {
    // 1. An LSTM, input 8, hidden 16, batch 4, 15 steps.
    let (steps, batch) = (15, 4);
    let program = Program::compile(&ModelSpec::new(CellKind::Lstm, 8, 16))?;
    let weights = Weights::init(&program, 3)?;
    let x = data(vec![steps, batch, 8], 1);
    let h0 = data(vec![1, batch, 16], 2);
    let g = data(vec![steps, batch, 16], 3); // d loss / d output
    let request = Request {
        input: Some(&x),
        initial_states: vec![Some(&h0)],
        grad_output: Some(&g),
        ..Default::default()
    };
    let out = program.run::<f32>(&weights, &request, &Exec::default())?;
    let grads = out.grads.expect("grad_output was given");
    println!("LSTM(8, 16), loss = sum(output * g): gradient norms");
    println!("  {:<14} {:>9.4}", "input", norm(&grads.input.data));
    for (name, state) in ["h0", "c0"].iter().zip(&grads.initial_states) {
        println!("  {:<14} {:>9.4}", name, norm(&state.data));
    }
    for (name, grad) in &grads.params {
        println!("  {name:<14} {:>9.4}  {:?}", norm(&grad.data), grad.shape);
    }

    // The same gradient by central differences, in f64: nudge one weight both ways.
    let (name, index) = ("weight_hh_l0", 37);
    let nudged = |delta: f32| {
        let mut w = weights.clone();
        w.tensors.get_mut(name).expect("a parameter").data[index] += delta;
        let moved = f64::from(w.tensors[name].data[index]);
        loss(&program, &w, &request, &g).map(|l| (l, moved))
    };
    let ((up, w_up), (down, w_down)) = (nudged(1e-3)?, nudged(-1e-3)?);
    let numeric = (up - down) / (w_up - w_down);
    println!(
        "  d loss / d {name}[{index}]: backward pass {:.6}, finite difference {numeric:.6}\n",
        grads.params[name].data[index]
    );

    // 2. Vanishing gradients: the loss is the sum of the last step's output, so its gradient
    //    reaches x_t only through the recurrence from t to the end.
    let (steps, input, hidden) = (100, 32, 64);
    let x = data(vec![steps, 1, input], 4);
    let mut last = Tensor::zeros(vec![steps, 1, hidden]);
    last.data[(steps - 1) * hidden..].fill(1.0);
    //    At PyTorch's initialisation an LSTM's forget gate sits near sigmoid(0) = 0.5, so its
    //    gradient fades too; a forget-gate bias of 3 (rows hidden..2·hidden of `bias_ih_l0`,
    //    gates i, f, g, o) keeps the gate near 0.95 and the gradient alive.
    println!("|d sum(y_99) / d x_t|, input {input}, hidden {hidden}, {steps} steps:");
    println!(
        "  {:>3} {:>11} {:>11} {:>18}",
        "t", "tanh RNN", "LSTM", "LSTM, forget +3"
    );
    let mut columns = Vec::new();
    for (cell, forget_bias) in [
        (CellKind::RnnTanh, 0.0),
        (CellKind::Lstm, 0.0),
        (CellKind::Lstm, 3.0),
    ] {
        let program = Program::compile(&ModelSpec::new(cell, input, hidden))?;
        let mut weights = Weights::init(&program, 5)?;
        if forget_bias != 0.0 {
            let bias = weights.tensors.get_mut("bias_ih_l0").expect("an LSTM bias");
            for b in &mut bias.data[hidden..2 * hidden] {
                *b += forget_bias;
            }
        }
        let request = Request {
            input: Some(&x),
            grad_output: Some(&last),
            ..Default::default()
        };
        let out = program.run::<f32>(&weights, &request, &Exec::default())?;
        let dx = out.grads.expect("grad_output was given").input;
        columns.push(dx.data.chunks(input).map(norm).collect::<Vec<_>>());
    }
    for t in [99, 95, 90, 80, 60, 40, 20, 0] {
        println!(
            "  {t:>3} {:>11.3e} {:>11.3e} {:>18.3e}",
            columns[0][t], columns[1][t], columns[2][t]
        );
    }
    Ok(())
}

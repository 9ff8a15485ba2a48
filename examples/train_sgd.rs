//! Training with the emitted code: a small recurrent model declared with `rnn::rnn!` learns to
//! predict the next value of a sine wave. Each epoch runs `forward_train`, computes the
//! mean squared error and its gradient, runs `backward` (back-propagation through time) and
//! takes a plain SGD step on every parameter by name.
//!
//! Run with `cargo run --release --example train_sgd`.

use rnn::{Request, Tensor};

rnn::rnn! {
    /// An Elman cell with an output projection: one value in, one value out.
    pub struct Predictor {
        input: 1, hidden: 16,
        param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b_h: [hidden],
        param W_hy: [1, hidden], param b_y: [1],
        state h,
        h = tanh(W_hh @ h + W_xh @ x + b_h),
        output y = W_hy @ h + b_y,
    }
}

/// `batch` windows of `steps + 1` samples of a sine wave with different phases: inputs are the
/// first `steps`, targets the last `steps`. Time-major `(steps, batch, 1)`.
fn windows(steps: usize, batch: usize, epoch: usize) -> (Tensor, Tensor) {
    let mut x = Tensor::zeros(vec![steps, batch, 1]);
    let mut y = Tensor::zeros(vec![steps, batch, 1]);
    for b in 0..batch {
        let phase = (epoch * batch + b) as f32 * 0.37;
        let wave = |t: usize| (phase + t as f32 * 0.3).sin();
        for t in 0..steps {
            x.data[t * batch + b] = wave(t);
            y.data[t * batch + b] = wave(t + 1);
        }
    }
    (x, y)
}

fn main() -> Result<(), rnn::Error> {
    let mut model = Predictor::init(7);
    let (steps, batch, rate) = (30, 16, 0.05);
    for epoch in 0..=300 {
        let (x, target) = windows(steps, batch, epoch);
        let request = Request {
            input: Some(&x),
            ..Request::default()
        };
        let (out, tape) = model.forward_train(&request)?;

        // Mean squared error and its gradient with respect to every output.
        let n = out.output.data.len() as f32;
        let mut loss = 0.0;
        let mut grad = Tensor::zeros(out.output.shape.clone());
        for ((g, &y), &t) in grad.data.iter_mut().zip(&out.output.data).zip(&target.data) {
            loss += (y - t) * (y - t) / n;
            *g = 2.0 * (y - t) / n;
        }

        let grads = model.backward(tape, &grad, &[])?;
        for (name, data) in model.parameters_mut() {
            for (w, g) in data.iter_mut().zip(&grads.params[name].data) {
                *w -= rate * g;
            }
        }
        if epoch % 50 == 0 {
            println!("epoch {epoch:3}: mean squared error {loss:.5}");
        }
    }
    Ok(())
}

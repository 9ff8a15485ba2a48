//! Training with the JIT, Adam, gradient clipping and a checkpoint: an LSTM learns to predict
//! the next value of a sine wave. Halfway, the run is saved to a checkpoint (weights, Adam's
//! moments, the step and the data position in one safetensors file); a second run resumes from
//! it and ends on the same bits as the first.
//!
//! Run with `cargo run --release --example train_adam`.

use rnn::ir::checkpoint::Checkpoint;
use rnn::ir::optim::{Adam, Norm, Optimizer, Rule, clip_grad_norm};
use rnn::jit::Jit;
use rnn::{CellKind, ModelSpec, Program, Request, Tensor, Weights};
use std::sync::Arc;

/// `batch` windows of a sine wave at phases set by `position`: inputs and next values,
/// time-major `(steps, batch, 1)`.
fn windows(steps: usize, batch: usize, position: u64) -> (Tensor, Tensor) {
    let mut x = Tensor::zeros(vec![steps, batch, 1]);
    let mut y = Tensor::zeros(vec![steps, batch, 1]);
    for b in 0..batch {
        let phase = (position as usize * batch + b) as f32 * 0.37;
        let wave = |t: usize| (phase + t as f32 * 0.3).sin();
        for t in 0..steps {
            x.data[t * batch + b] = wave(t);
            y.data[t * batch + b] = wave(t + 1);
        }
    }
    (x, y)
}

/// Training steps `from .. to` (the data position is the step): returns the last loss.
fn train(
    jit: &Arc<Jit>,
    weights: &mut Weights,
    opt: &mut Optimizer,
    from: u64,
    to: u64,
) -> Result<f32, rnn::Error> {
    let (steps, batch) = (30, 16);
    let mut loss = 0.0;
    for position in from..to {
        let (x, target) = windows(steps, batch, position);
        // The model's weights change at every step: bind them (the code is compiled once).
        let model = jit.bind(weights)?;
        let (out, tape) = model.forward_train(&Request {
            input: Some(&x),
            ..Request::default()
        })?;
        // Mean squared error and its gradient with respect to every output.
        let n = out.output.data.len() as f32;
        let mut grad = Tensor::zeros(out.output.shape.clone());
        loss = 0.0;
        for ((g, &y), &t) in grad.data.iter_mut().zip(&out.output.data).zip(&target.data) {
            loss += (y - t) * (y - t) / n;
            *g = 2.0 * (y - t) / n;
        }
        let mut grads = model.backward(tape, &grad, &[])?.params;
        clip_grad_norm(&mut grads, 1.0, Norm::L2)?;
        opt.step(weights, &grads)?;
        if position % 100 == 0 {
            println!("step {position:3}: mean squared error {loss:.5}");
        }
    }
    Ok(loss)
}

fn main() -> Result<(), rnn::Error> {
    let program = Program::compile(&ModelSpec::new(CellKind::Lstm, 1, 16))?;
    let jit = Arc::new(Jit::compile(&program)?);
    let adam = Rule::Adam(Adam {
        lr: 0.01,
        ..Adam::default()
    });

    let mut weights = Weights::init(&program, 7)?;
    let mut opt = Optimizer::new(adam)?;
    train(&jit, &mut weights, &mut opt, 0, 250)?;
    let saved = Checkpoint {
        weights: weights.clone(),
        optimizer: opt.clone(),
        step: 250,
        data_position: 250,
        run: Default::default(),
    }
    .to_safetensors(&program)?;
    println!("checkpoint at step 250: {} bytes", saved.len());
    let loss = train(&jit, &mut weights, &mut opt, 250, 501)?;

    let resumed = Checkpoint::from_safetensors(&saved, &program)?;
    let (mut w2, mut opt2) = (resumed.weights, resumed.optimizer);
    let loss2 = train(&jit, &mut w2, &mut opt2, resumed.data_position, 501)?;
    println!(
        "final loss {loss:.6}; resumed from the checkpoint: {loss2:.6}, the same bits: {}",
        weights == w2
    );
    Ok(())
}

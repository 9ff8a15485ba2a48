//! A standard cell through the library: a two-layer bidirectional LSTM with PyTorch's
//! conventions, run over a packed batch, then a one-directional LSTM streamed one step per call.
//!
//! ```sh
//! cargo run --release --example standard_cell
//! ```

use rnn::{CellKind, Exec, ModelSpec, Program, Request, Tensor, Weights};

/// `n` values in `[-1, 1]`, different for each `seed`, to stand in for real data.
fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed * 13) as f32 * 0.31).sin())
        .collect()
}

fn main() -> Result<(), rnn::Error> {
    // A model can be built in Rust as well as parsed from text: this is
    // `nn.LSTM(16, 32, num_layers=2, bidirectional=True)`, equally
    // `parse_str("lstm { input: 16, hidden: 32, layers: 2, bidirectional: true }")`.
    let spec = ModelSpec {
        num_layers: 2,
        bidirectional: true,
        ..ModelSpec::new(CellKind::Lstm, 16, 32)
    };
    let program = Program::compile(&spec)?;

    // The parameters have PyTorch's names, shapes and order (its `state_dict`).
    println!("nn.LSTM(16, 32, num_layers=2, bidirectional=True):");
    for (name, shape) in program.parameters() {
        println!("  {name:<24} {shape:?}");
    }
    println!("  {} parameters\n", program.parameter_count());

    // Weights: PyTorch's initialisation (uniform in ±1/√hidden) from a seed. A trained
    // `state_dict` saved with `safetensors.torch.save_file` loads with
    // `Weights::from_safetensors(&std::fs::read(path)?, &program)`.
    let weights = Weights::init(&program, 7)?;
    let bound = program.bind::<f32>(&weights)?;

    // A packed batch: three sequences of lengths 20, 12 and 5, padded to 20 steps.
    let (steps, batch) = (20, 3);
    let x = Tensor::new(vec![steps, batch, 16], data(steps * batch * 16, 1)).expect("sizes");
    let lengths = [20, 12, 5];
    let out = bound.run(
        &Request {
            input: Some(&x),
            lengths: Some(&lengths),
            ..Default::default()
        },
        &Exec::default(),
    )?;
    // Both directions' outputs side by side, zero past each sequence's length.
    println!("output {:?} (time, batch, 2·hidden)", out.output.shape);
    let row = batch * 64;
    let padded = &out.output.data[12 * row + 2 * 64..13 * row];
    println!(
        "  sequence 2 at step 12 (past its length 5): all zero = {}",
        padded.iter().all(|&v| v == 0.0)
    );
    // h_n and c_n: (layers · directions, batch, hidden), indexed layer · 2 + direction; each
    // sequence's forward state is taken at its own last step.
    println!(
        "h_n {:?}, c_n {:?}\n",
        out.final_states[0].shape, out.final_states[1].shape
    );

    // Streaming (one direction only: the reverse direction needs the whole sequence). Bind
    // once, then one call per step with the state carried by the caller.
    let program = Program::compile(&ModelSpec::new(CellKind::Lstm, 16, 32))?;
    let bound = program.bind::<f32>(&Weights::init(&program, 8)?)?;
    let whole = bound.run(
        &Request {
            input: Some(&x),
            ..Default::default()
        },
        &Exec::default(),
    )?;
    let mut stream = bound.stream(batch, Exec::default())?;
    let mut state = stream.zero_state();
    let mut largest_difference = 0.0f32;
    for t in 0..steps {
        let x_t = &x.data[t * batch * 16..(t + 1) * batch * 16];
        let y_t = stream.step(&mut state, x_t)?;
        let expected = &whole.output.data[t * batch * 32..(t + 1) * batch * 32];
        for (a, b) in y_t.iter().zip(expected) {
            largest_difference = largest_difference.max((a - b).abs());
        }
    }
    println!(
        "streamed {steps} steps of nn.LSTM(16, 32): largest difference from the whole-sequence run {largest_difference:.1e}"
    );
    // The final state is every layer's (h, c), `batch × hidden` each.
    let h = &state.layers[0][0];
    println!("  final h of row 0: {:.4?} …", &h[..4]);
    Ok(())
}

//! Custom cells declared as equations in the cell language, compiled like the standard ones:
//! autodiff derives their backward step, the passes fuse and hoist them, the same driver runs them.
//!
//! 1. An Elman cell, checked against the built-in `rnn` cell given the same weights.
//! 2. An IndRNN (Li et al., 2018): each unit sees only its own previous state, through a vector
//!    `u` and an element-wise product instead of a recurrent matrix.
//!
//! ```sh
//! cargo run --release --example custom_cell
//! ```

use rnn::{Exec, Program, Request, Tensor, Weights, parse_str};

/// `Elman` is PyTorch's `nn.RNN` with one bias, written out.
const ELMAN: &str = "
cell Elman {
    input: 8, hidden: 16,
    param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b: [hidden],
    state h,
    h = tanh(W_hh @ h + W_xh @ x + b)
}";

/// IndRNN: `h = relu(W x + u ⊙ h + b)`, stacked two layers deep.
const INDRNN: &str = "
cell IndRNN {
    input: 8, hidden: 16, layers: 2,
    param W: [hidden, input], param u: [hidden], param b: [hidden],
    state h,
    h = relu(W @ x + u * h + b)
}";

fn main() -> Result<(), rnn::Error> {
    let (steps, batch) = (12, 2);
    let data = (0..steps * batch * 8)
        .map(|i| (i as f32 * 0.21).cos())
        .collect();
    let x = Tensor::new(vec![steps, batch, 8], data).expect("sizes");
    let request = Request {
        input: Some(&x),
        ..Default::default()
    };

    // 1. The Elman cell: its parameters are named as declared, with PyTorch's layer suffix.
    let elman = Program::compile(&parse_str(ELMAN)?)?;
    println!("{ELMAN}\n");
    for (name, shape) in elman.parameters() {
        println!("  {name:<8} {shape:?}");
    }
    let weights = Weights::init(&elman, 1)?;
    let custom = elman.run::<f32>(&weights, &request, &Exec::default())?;

    // The built-in cell with one bias per gate computes the same function: rename the weights
    // to PyTorch's names and compare.
    let builtin = Program::compile(&parse_str(
        "rnn { input: 8, hidden: 16, bias_convention: one }",
    )?)?;
    let mut renamed = Weights::default();
    for (declared, pytorch) in [
        ("W_xh_l0", "weight_ih_l0"),
        ("W_hh_l0", "weight_hh_l0"),
        ("b_l0", "bias_ih_l0"),
    ] {
        let tensor = weights.tensors[declared].clone();
        renamed.tensors.insert(pytorch.to_string(), tensor);
    }
    let standard = builtin.run::<f32>(&renamed, &request, &Exec::default())?;
    let difference = custom
        .output
        .data
        .iter()
        .zip(&standard.output.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("  largest difference from the built-in `rnn` cell: {difference:.1e}\n");

    // 2. IndRNN, two layers: the second layer's input is the first layer's output.
    let indrnn = Program::compile(&parse_str(INDRNN)?)?;
    println!("{INDRNN}\n");
    println!(
        "  {} parameters: {:?}",
        indrnn.parameter_count(),
        indrnn
            .parameters()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
    );
    let out = indrnn.run::<f32>(&Weights::init(&indrnn, 2)?, &request, &Exec::default())?;
    let last = &out.output.data[(steps - 1) * batch * 16..];
    println!(
        "  output {:?}, h_n {:?}; last step, row 0: {:.3?} …",
        out.output.shape,
        out.final_states[0].shape,
        &last[..4]
    );

    // `rnnc inspect FILE.rnn` prints what the compiler made of a declaration; so does `Display`.
    let plan = indrnn.to_string();
    println!(
        "\nThe compiled plan has {} lines; its first:\n{}",
        plan.lines().count(),
        plan.lines().take(6).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

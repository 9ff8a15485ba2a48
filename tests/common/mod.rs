//! Helpers shared by the integration tests: the PyTorch reference cases and tolerant comparison.
#![allow(dead_code)]

use rnn::ir::{CellKind, Tensor, npy, weights};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The folder of the PyTorch reference cases copied into the repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch")
}

/// The names of the recurrent-layer cases (every case but the seq2seq one).
pub fn rnn_cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| fixtures().join(n).join("expected.safetensors").exists())
        .collect();
    names.sort();
    names
}

/// One PyTorch reference case.
pub struct Case {
    pub dir: PathBuf,
    pub meta: serde_json::Value,
    pub weights: BTreeMap<String, Tensor>,
    pub input: Tensor,
    pub h0: Option<Tensor>,
    pub c0: Option<Tensor>,
    pub lengths: Option<Vec<i64>>,
    pub grad_output: Tensor,
    pub expected: BTreeMap<String, Tensor>,
}

impl Case {
    pub fn load(name: &str) -> Case {
        let dir = fixtures().join(name);
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let opt = |f: &str| {
            dir.join(f)
                .exists()
                .then(|| npy::read_f32(&read(f)).unwrap())
        };
        Case {
            meta: serde_json::from_slice(&read("meta.json")).unwrap(),
            weights: weights::read_safetensors(&read("weights.safetensors")).unwrap(),
            input: npy::read_f32(&read("input.npy")).unwrap(),
            h0: opt("h0.npy"),
            c0: opt("c0.npy"),
            lengths: dir
                .join("lengths.npy")
                .exists()
                .then(|| npy::read_i64(&read("lengths.npy")).unwrap().1),
            grad_output: npy::read_f32(&read("grad_output.npy")).unwrap(),
            expected: weights::read_safetensors(&read("expected.safetensors")).unwrap(),
            dir,
        }
    }

    pub fn cell(&self) -> CellKind {
        let name = self.meta["cell"].as_str().unwrap();
        CellKind::from_name(name).unwrap_or_else(|| panic!("unknown cell {name}"))
    }

    pub fn batch_first(&self) -> bool {
        self.meta["batch_first"].as_bool().unwrap()
    }
}

/// Asserts `|a - e| <= atol + rtol·|e|` element-wise, naming the tensor and the worst element.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(actual.shape, expected.shape, "`{name}`: shape");
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&a, &e)) in actual.data.iter().zip(&expected.data).enumerate() {
        let excess = (a as f64 - e as f64).abs() - (atol + rtol * (e as f64).abs());
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "`{name}` differs at flat index {i}: got {}, expected {} (tolerance {rtol} relative + {atol} absolute)",
            actual.data[i], expected.data[i]
        );
    }
}

/// A peephole LSTM (Gers & Schmidhuber) with one weight per gate.
pub const PEEPHOLE: &str = "cell Peephole {
    input: 3, hidden: 4,
    param W_i: [hidden, input], param W_f: [hidden, input], param W_g: [hidden, input], param W_o: [hidden, input],
    param U_i: [hidden, hidden], param U_f: [hidden, hidden], param U_g: [hidden, hidden], param U_o: [hidden, hidden],
    param b_i: [hidden], param b_f: [hidden], param b_g: [hidden], param b_o: [hidden],
    param p_i: [hidden], param p_f: [hidden], param p_o: [hidden],
    state h, state c,
    i = sigmoid(W_i @ x + U_i @ h + p_i * c + b_i),
    f = sigmoid(W_f @ x + U_f @ h + p_f * c + b_f),
    g = tanh(W_g @ x + U_g @ h + b_g),
    c = f * c + i * g,
    o = sigmoid(W_o @ x + U_o @ h + p_o * c + b_o),
    h = o * tanh(c),
    output h
}";

/// The minimal gated unit (Zhou et al.): one forget gate.
pub const MINIMAL_GRU: &str = "cell MinimalGru {
    input: 3, hidden: 4,
    param W_f: [hidden, input], param U_f: [hidden, hidden], param b_f: [hidden],
    param W_h: [hidden, input], param U_h: [hidden, hidden], param b_h: [hidden],
    state h;
    f = sigmoid(W_f @ x + U_f @ h + b_f);
    candidate = tanh(W_h @ x + U_h @ (f * h) + b_h);
    h = (1 - f) * h + f * candidate;
}";

/// An Elman network with a ReLU.
pub const RELU_ELMAN: &str = "cell Elman {
    input: 3, hidden: 4,
    param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b: [hidden],
    state h,
    h = relu(W_hh @ h + W_xh @ x + b)
}";

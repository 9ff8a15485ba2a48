//! Helpers shared by the integration tests: the PyTorch reference cases and tolerant comparison.
#![allow(dead_code)]

use rnn::ir::{CellKind, ModelSpec, Program, Request, Tensor, Weights, npy, weights};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The folder of the PyTorch reference cases copied into the repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch")
}

/// The names of the recurrent-layer cases (every case but the seq2seq one); there are exactly
/// twelve, so a case that goes missing fails every test that walks them.
pub fn rnn_cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| fixtures().join(n).join("expected.safetensors").exists())
        .collect();
    names.sort();
    assert_eq!(
        names.len(),
        12,
        "expected the twelve recurrent-layer cases, found {names:?}"
    );
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

/// How far `actual` is from `expected` in units of the tolerance `atol + rtol·|e|`, at its worst
/// element: at most 1 means every element is within it.
pub fn tolerance_ratio(actual: &Tensor, expected: &Tensor, rtol: f64, atol: f64) -> f64 {
    assert_eq!(actual.shape, expected.shape, "shape");
    actual
        .data
        .iter()
        .zip(&expected.data)
        .map(|(&a, &e)| (a as f64 - e as f64).abs() / (atol + rtol * (e as f64).abs()))
        .fold(0.0, f64::max)
}

/// The acceptance cells matched against PyTorch (fixtures in `tests/fixtures/cells/`).
pub const PYTORCH_CELLS: [&str; 3] = ["layernorm_lstm", "min_gru", "elman_output"];

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

/// A cell with a state that reads no carried value (`g`, computed before the loop over every
/// step's rows and copied into its slot at each step) beside one that does.
pub const DELAYED: &str = "cell Delayed {
    input: 3, hidden: 4,
    param W_g: [hidden, input], param b_g: [hidden], param W_hh: [hidden, hidden],
    state h, state g,
    g = sigmoid(W_g @ x + b_g),
    h = tanh(W_hh @ h + g * g)
}";

/// Deterministic random numbers for the generators of the property and golden tests
/// (SplitMix64): the same seed gives the same numbers everywhere.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo ..= hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next_u64().is_multiple_of(n)
    }

    /// Uniform in `(-1, 1)` with 24 random bits (exact in `f32`).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }

    /// A tensor of `uniform` values.
    pub fn tensor(&mut self, shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        let data = (0..n).map(|_| self.uniform()).collect();
        Tensor { shape, data }
    }

    /// Uniform in `[-1, 1)` with 53 random bits.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// `n` values of `uniform_f64`.
    pub fn vec_f64(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform_f64()).collect()
    }
}

/// One model of every standard cell (`input` → `hidden`) and the three custom cells above.
pub fn every_cell(input: usize, hidden: usize) -> Vec<ModelSpec> {
    let mut specs: Vec<ModelSpec> = [
        CellKind::RnnTanh,
        CellKind::RnnRelu,
        CellKind::Lstm,
        CellKind::Gru,
    ]
    .into_iter()
    .map(|c| ModelSpec::new(c, input, hidden))
    .collect();
    for src in [PEEPHOLE, MINIMAL_GRU, RELU_ELMAN, DELAYED] {
        specs.push(rnn::parse_str(src).unwrap());
    }
    specs
}

/// Every acceptance cell of `examples/cells/` (file stem, source), with the sizes written there.
pub fn acceptance_cells() -> [(&'static str, &'static str); 8] {
    [
        (
            "layernorm_lstm",
            include_str!("../../examples/cells/layernorm_lstm.rnn"),
        ),
        ("min_gru", include_str!("../../examples/cells/min_gru.rnn")),
        (
            "min_lstm",
            include_str!("../../examples/cells/min_lstm.rnn"),
        ),
        ("indrnn", include_str!("../../examples/cells/indrnn.rnn")),
        (
            "peephole_lstm",
            include_str!("../../examples/cells/peephole_lstm.rnn"),
        ),
        (
            "elman_output",
            include_str!("../../examples/cells/elman_output.rnn"),
        ),
        (
            "chapter_gru",
            include_str!("../../examples/cells/chapter_gru.rnn"),
        ),
        (
            "min_gru_stack",
            include_str!("../../examples/cells/min_gru_stack.rnn"),
        ),
    ]
}

/// One PyTorch case of an acceptance cell (`tests/fixtures/cells/<name>`, made by
/// `make_cell_cases.py`): the weights, input, output gradient and initial states it was run on,
/// the exact results (`expected`, float64) and PyTorch's own float32 ones.
pub struct CellCase {
    pub weights: Weights,
    pub input: Tensor,
    pub grad_output: Tensor,
    /// Per state of the program, in its order.
    pub states: Vec<Tensor>,
    pub expected: BTreeMap<String, Tensor>,
    pub pytorch_f32: BTreeMap<String, Tensor>,
}

impl CellCase {
    /// Loads case `name` for `program` (the weights checked against it).
    pub fn load(name: &str, program: &Program) -> CellCase {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/cells")
            .join(name);
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let tensor = |f: &str| npy::read_f32(&read(f)).unwrap();
        CellCase {
            weights: Weights::from_safetensors(&read("weights.safetensors"), program)
                .unwrap_or_else(|e| panic!("{name}: {e}")),
            input: tensor("input.npy"),
            grad_output: tensor("grad_output.npy"),
            states: program
                .states()
                .iter()
                .map(|(s, _)| tensor(&format!("{s}0.npy")))
                .collect(),
            expected: weights::read_safetensors(&read("expected.safetensors")).unwrap(),
            pytorch_f32: weights::read_safetensors(&read("pytorch_f32.safetensors")).unwrap(),
        }
    }

    /// The request the case was run with: input, initial states and output gradient.
    pub fn request(&self) -> Request<'_> {
        Request {
            input: Some(&self.input),
            initial_states: self.states.iter().map(Some).collect(),
            grad_output: Some(&self.grad_output),
            ..Default::default()
        }
    }
}

/// The shape of a random model of the property tests: its cell (0 rnn tanh, 1 rnn relu, 2
/// lstm, 3 lstm with a projection of `hidden - 1`, 4 gru with the reset after the product, 5
/// gru with it before, 6 the peephole LSTM, 7 the minimal GRU, 8 the ReLU Elman cell, 9 the
/// cell with a state computed before the loop, [`DELAYED`]), sizes,
/// layers, directions, layout and biases (0 two, 1 one, 2 none; standard cells only).
#[allow(dead_code)]
pub struct ModelShape {
    pub cell: u8,
    pub input: usize,
    pub hidden: usize,
    pub layers: usize,
    pub bidirectional: bool,
    pub batch_first: bool,
    pub bias: u8,
}

/// The `.rnn` declaration of a [`ModelShape`].
#[allow(dead_code)]
pub fn declaration(m: &ModelShape) -> String {
    let common = format!(
        "input: {}, hidden: {}, layers: {}, bidirectional: {}, batch_first: {}",
        m.input, m.hidden, m.layers, m.bidirectional, m.batch_first
    );
    let bias = match m.bias {
        0 => ", bias: true, bias_convention: two",
        1 => ", bias: true, bias_convention: one",
        _ => ", bias: false",
    };
    let custom = |src: &str| src.replacen("input: 3, hidden: 4", &common, 1);
    match m.cell {
        0 => format!("rnn {{ {common}{bias}, nonlinearity: tanh }}"),
        1 => format!("rnn {{ {common}{bias}, nonlinearity: relu }}"),
        2 => format!("lstm {{ {common}{bias} }}"),
        3 => format!("lstm {{ {common}{bias}, proj: {} }}", m.hidden - 1),
        4 => format!("gru {{ {common}{bias}, reset: after }}"),
        5 => format!("gru {{ {common}{bias}, reset: before }}"),
        6 => custom(PEEPHOLE),
        7 => custom(MINIMAL_GRU),
        9 => custom(DELAYED),
        _ => custom(RELU_ELMAN),
    }
}

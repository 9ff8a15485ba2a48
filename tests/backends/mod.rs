//! The backends a test body runs on, and the models declared with the macros for them.
//!
//! A test is written once, over [`backends`]: the interpreter (the reference) and the emitted
//! Rust on each SIMD path this machine has (AVX2 + FMA, portable). A backend instantiates a model
//! from its declaration's name and a set of weights; the interpreter compiles the declaration's
//! text, the macro backend looks the name up among the models declared below, whose text is the
//! very tokens the macro read (`stringify!`), so both run the same declaration.

#![allow(dead_code)]

use rnn::rt::Isa;
use rnn::{Exec, Program, Request, Response, Result, Weights, parse_str};

/// A model as a test body drives it, whatever runs it.
pub trait Model {
    /// Forward, and backward when the request has `grad_output`.
    fn run(&self, req: &Request) -> Result<Response>;
    /// The same through separate forward and backward calls (the interpreter has one call).
    fn run_split(&self, req: &Request) -> Result<Response>;
    /// Runs `xs` (one sequence, one row) one step at a time from zero states: the outputs.
    /// `None` for a bidirectional model.
    fn stream(&self, xs: &[Vec<f32>]) -> Option<Vec<Vec<f32>>>;
}

/// Something that runs declared models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `rnn-ir`'s interpreter: the reference.
    Interpreter,
    /// The Rust the macros emit, its kernels on one path.
    Macro(Isa),
    /// The Cranelift JIT.
    Jit,
}

/// Every backend this machine can run: the interpreter, the JIT, the emitted code on the
/// portable path and, where the CPU has them, on the AVX2 and the AVX-512 paths.
pub fn backends() -> Vec<Backend> {
    let mut list = vec![
        Backend::Interpreter,
        Backend::Jit,
        Backend::Macro(Isa::Portable),
    ];
    for isa in [Isa::Avx2, Isa::Avx512] {
        if rnn::rt::supports(isa) {
            list.push(Backend::Macro(isa));
        } else {
            eprintln!("this CPU has no {isa:?}: the emitted code's {isa:?} path is not tested");
        }
    }
    list
}

impl Backend {
    /// Runs `f` with this backend's kernels selected on this thread.
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        match self {
            Backend::Interpreter | Backend::Jit => f(),
            Backend::Macro(isa) => rnn::rt::with_isa(isa, f).expect("the path was detected"),
        }
    }

    /// The model `name` (declared below) with `weights`.
    pub fn model(self, name: &str, weights: &Weights) -> Box<dyn Model> {
        let (_, text, make) = declared(name);
        match self {
            Backend::Interpreter => {
                let program = Program::compile(&parse_str(text).unwrap()).unwrap();
                weights.check(&program).unwrap();
                Box::new(Interp {
                    program,
                    weights: weights.clone(),
                })
            }
            Backend::Jit => {
                let jit = rnn::jit::Jit::from_source(text).unwrap();
                let model = std::sync::Arc::new(jit)
                    .bind(weights)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                Box::new(JitBacked(model))
            }
            Backend::Macro(_) => make(weights).unwrap_or_else(|e| panic!("{name}: {e}")),
        }
    }
}

struct JitBacked(rnn::jit::JitModel);

impl Model for JitBacked {
    fn run(&self, req: &Request) -> Result<Response> {
        self.0.run(req)
    }

    fn run_split(&self, req: &Request) -> Result<Response> {
        let Some(gy) = req.grad_output else {
            return self.0.forward(req);
        };
        let (mut response, tape) = self.0.forward_train(req)?;
        response.grads = Some(self.0.backward(tape, gy, &req.grad_final_states)?);
        Ok(response)
    }

    fn stream(&self, xs: &[Vec<f32>]) -> Option<Vec<Vec<f32>>> {
        let mut state = self.0.zero_state();
        Some(
            xs.iter()
                .map(|x| self.0.step(&mut state, x).unwrap())
                .collect(),
        )
    }
}

/// The declaration `name`: its name, text and macro constructor.
pub fn declared(name: &str) -> &'static Declared {
    DECLARED
        .iter()
        .find(|d| d.0 == name)
        .unwrap_or_else(|| panic!("no model `{name}` is declared in tests/backends/mod.rs"))
}

/// `(name, declaration text, constructor of the macro-declared model)`.
pub type Declared = (
    &'static str,
    &'static str,
    fn(&Weights) -> Result<Box<dyn Model>>,
);

/// The program of declaration `name`, compiled from its text.
pub fn program(name: &str) -> Program {
    Program::compile(&parse_str(declared(name).1).unwrap()).unwrap()
}

struct Interp {
    program: Program,
    weights: Weights,
}

impl Model for Interp {
    fn run(&self, req: &Request) -> Result<Response> {
        self.program
            .run::<f32>(&self.weights, req, &Exec::default())
    }

    fn run_split(&self, req: &Request) -> Result<Response> {
        self.run(req)
    }

    fn stream(&self, xs: &[Vec<f32>]) -> Option<Vec<Vec<f32>>> {
        let bound = self.program.bind::<f32>(&self.weights).unwrap();
        let mut stream = bound.stream(1, Exec::default()).ok()?;
        let mut state = stream.zero_state();
        Some(
            xs.iter()
                .map(|x| stream.step(&mut state, x).unwrap().to_vec())
                .collect(),
        )
    }
}

/// Declares each model with its macro and lists it in [`DECLARED`]: `Name streams NameState`
/// for a model that streams (`step` exists for unidirectional models only). `rnn[cell]` marks an `rnn!`
/// custom cell, whose `.rnn` text starts with `cell`.
macro_rules! declare {
    ($( $mac:ident $([$kind:ident])? $name:ident $(streams $state:ident)? { $($body:tt)* } )*) => {
        $(
            rnn::$mac! { pub struct $name { $($body)* } }

            impl Model for $name {
                fn run(&self, req: &Request) -> Result<Response> {
                    $name::run(self, req)
                }
                fn run_split(&self, req: &Request) -> Result<Response> {
                    split(req, |r| self.forward_train(r), |t, g, s| self.backward(t, g, s))
                }
                fn stream(&self, xs: &[Vec<f32>]) -> Option<Vec<Vec<f32>>> {
                    declare!(@stream self, xs, $name $($state)?)
                }
            }
        )*

        pub static DECLARED: &[Declared] = &[
            $((
                stringify!($name),
                concat!(declare!(@kind $mac $($kind)?), " ", stringify!($name), " { ", stringify!($($body)*), " }"),
                |w| {
                    let model: Box<dyn Model> = $name::from_weights(w)?;
                    Ok(model)
                },
            ),)*
        ];
    };
    (@kind $mac:ident) => { stringify!($mac) };
    (@kind $mac:ident $kind:ident) => { stringify!($kind) };
    // A bidirectional model does not stream.
    (@stream $self:ident, $xs:ident, $name:ident) => {{
        let _ = ($self, $xs);
        None
    }};
    (@stream $self:ident, $xs:ident, $name:ident $state:ident) => {{
        let mut state = $state::ZERO;
        Some($xs.iter().map(|x| {
            let mut y = vec![0.0; $name::OUTPUT_SIZE];
            $self.step_slices(x, &mut state, &mut y).unwrap();
            y
        }).collect())
    }};
}

/// Forward with a tape, then backward, joined into one response.
fn split<'m>(
    req: &Request,
    forward: impl FnOnce(&Request) -> Result<(Response, rnn::Tape<'m>)>,
    backward: impl FnOnce(
        rnn::Tape<'m>,
        &rnn::Tensor,
        &[Option<&rnn::Tensor>],
    ) -> Result<rnn::Gradients>,
) -> Result<Response> {
    let Some(gy) = req.grad_output else {
        return forward(req).map(|(r, _)| r);
    };
    let (mut response, tape) = forward(req)?;
    response.grads = Some(backward(tape, gy, &req.grad_final_states)?);
    Ok(response)
}

declare! {
    // The sizes of the PyTorch reference cases (tests/fixtures/pytorch).
    gru GruBasic streams GruBasicState { input: 5, hidden: 7 }
    gru GruH0BatchFirst streams GruH0BatchFirstState { input: 3, hidden: 5, batch_first: true }
    gru GruNoBias streams GruNoBiasState { input: 4, hidden: 6, bias: false }
    gru GruPackedBidir { input: 3, hidden: 5, layers: 2, bidirectional: true }
    lstm Lstm2LayerBidir { input: 3, hidden: 4, layers: 2, bidirectional: true }
    lstm LstmBasic streams LstmBasicState { input: 5, hidden: 7 }
    lstm LstmHidden256 streams LstmHidden256State { input: 16, hidden: 256 }
    lstm LstmPacked streams LstmPackedState { input: 3, hidden: 4 }
    lstm LstmProjBidirC0 { input: 5, hidden: 8, bidirectional: true, proj: 3 }
    rnn RnnBatchFirstPackedH0 streams RnnBatchFirstPackedH0State { input: 3, hidden: 4, batch_first: true }
    rnn RnnReluBasic streams RnnReluBasicState { input: 4, hidden: 6, nonlinearity: relu }
    rnn RnnTanhBasic streams RnnTanhBasicState { input: 4, hidden: 6 }

    // More of the standard cells' options.
    gru GruBefore streams GruBeforeState { input: 3, hidden: 5, reset: before }
    gru GruBeforeStack streams GruBeforeStackState { input: 4, hidden: 3, layers: 3, reset: before, batch_first: true }
    rnn RnnOneBias streams RnnOneBiasState { input: 3, hidden: 4, bias_convention: one }
    lstm LstmProjStack streams LstmProjStackState { input: 4, hidden: 6, proj: 2, layers: 2 }
    rnn RnnReluBidirStack { input: 2, hidden: 3, layers: 2, bidirectional: true, nonlinearity: relu }

    // The acceptance cells of examples/cells (the same text: see `acceptance_cells_are_the_files`).
    rnn[cell] LayerNormLstm streams LayerNormLstmState {
        input: 5, hidden: 8,
        param W_ih: [4 * hidden, input],
        param W_hh: [4 * hidden, hidden],
        param bias: [4 * hidden] = 0,
        param gamma_ih: [4 * hidden] = 1, param beta_ih: [4 * hidden] = 0,
        param gamma_hh: [4 * hidden] = 1, param beta_hh: [4 * hidden] = 0,
        param gamma_c: [hidden] = 1, param beta_c: [hidden] = 0,
        state h, state c,
        eps = 0.00001,
        a = W_ih @ x,
        a_c = a - mean(a),
        a_n = a_c / sqrt(mean(a_c * a_c) + eps) * gamma_ih + beta_ih,
        r = W_hh @ h,
        r_c = r - mean(r),
        r_n = r_c / sqrt(mean(r_c * r_c) + eps) * gamma_hh + beta_hh,
        gates = a_n + r_n + bias,
        i = sigmoid(gates[0 .. hidden]),
        f = sigmoid(gates[hidden .. 2 * hidden]),
        g = tanh(gates[2 * hidden .. 3 * hidden]),
        o = sigmoid(gates[3 * hidden .. 4 * hidden]),
        c = f * c + i * g,
        c_c = c - mean(c),
        c_n = c_c / sqrt(mean(c_c * c_c) + eps) * gamma_c + beta_c,
        h = o * tanh(c_n),
    }
    rnn[cell] MinGru streams MinGruState {
        input: 5, hidden: 8,
        param W_z: [hidden, input], param b_z: [hidden],
        param W_h: [hidden, input], param b_h: [hidden],
        state h,
        z = sigmoid(W_z @ x + b_z),
        h_tilde = W_h @ x + b_h,
        h = (1 - z) * h + z * h_tilde,
    }
    rnn[cell] MinLstm streams MinLstmState {
        input: 5, hidden: 8,
        param W_f: [hidden, input], param b_f: [hidden],
        param W_i: [hidden, input], param b_i: [hidden],
        param W_h: [hidden, input], param b_h: [hidden],
        state h,
        f = sigmoid(W_f @ x + b_f),
        i = sigmoid(W_i @ x + b_i),
        h_tilde = W_h @ x + b_h,
        h = f / (f + i) * h + i / (f + i) * h_tilde,
    }
    rnn[cell] IndRnn streams IndRnnState {
        input: 5, hidden: 8,
        param W: [hidden, input], param u: [hidden], param b: [hidden],
        state h,
        h = relu(W @ x + u * h + b),
    }
    rnn[cell] PeepholeLstm streams PeepholeLstmState {
        input: 5, hidden: 8,
        param W: [4 * hidden, input], param U: [4 * hidden, hidden], param b: [4 * hidden],
        param p_i: [hidden], param p_f: [hidden], param p_o: [hidden],
        state h, state c,
        i = sigmoid(W[0 .. hidden, ..] @ x + U[0 .. hidden, ..] @ h + p_i * c + b[0 .. hidden]),
        f = sigmoid(W[hidden .. 2 * hidden, ..] @ x + U[hidden .. 2 * hidden, ..] @ h + p_f * c
            + b[hidden .. 2 * hidden]),
        g = tanh(W[2 * hidden .. 3 * hidden, ..] @ x + U[2 * hidden .. 3 * hidden, ..] @ h
            + b[2 * hidden .. 3 * hidden]),
        c = f * c + i * g,
        o = sigmoid(W[3 * hidden .. 4 * hidden, ..] @ x + U[3 * hidden .. 4 * hidden, ..] @ h
            + p_o * c + b[3 * hidden .. 4 * hidden]),
        h = o * tanh(c),
    }
    rnn[cell] Elman streams ElmanState {
        input: 5, hidden: 8,
        param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b_h: [hidden],
        param W_hy: [3, hidden], param b_y: [3],
        state h,
        h = tanh(W_hh @ h + W_xh @ x + b_h),
        output y = W_hy @ h + b_y,
    }
    rnn[cell] ChapterGru streams ChapterGruState {
        input: 5, hidden: 8,
        param W_z: [hidden, hidden + input], param b_z: [hidden],
        param W_r: [hidden, hidden + input], param b_r: [hidden],
        param W: [hidden, hidden + input], param b: [hidden],
        state h,
        hx = concat(h, x),
        z = sigmoid(W_z @ hx + b_z),
        r = sigmoid(W_r @ hx + b_r),
        h = (1 - z) * h + z * tanh(W @ concat(r * h, x) + b),
    }
    rnn[cell] MinGruStack {
        input: 5, hidden: 8, layers: 2, bidirectional: true,
        param W_z: [hidden, input], param b_z: [hidden],
        param W_h: [hidden, input], param b_h: [hidden],
        state h,
        z = sigmoid(W_z @ x + b_z),
        h_tilde = W_h @ x + b_h,
        h = (1 - z) * h + z * h_tilde,
    }

    // Cells of the property tests (tests/common: PEEPHOLE, MINIMAL_GRU, RELU_ELMAN).
    // The backward pass reads slices of the input (views of `x` with `x`'s stride).
    rnn[cell] SlicedInput streams SlicedInputState {
        input: 4, hidden: 3,
        param W: [hidden, hidden],
        state h,
        h = tanh(W @ h + x[0 .. 3] * x[1 .. 4]),
    }
    rnn[cell] MinimalGru streams MinimalGruState {
        input: 3, hidden: 4,
        param W_f: [hidden, input], param U_f: [hidden, hidden], param b_f: [hidden],
        param W_h: [hidden, input], param U_h: [hidden, hidden], param b_h: [hidden],
        state h;
        f = sigmoid(W_f @ x + U_f @ h + b_f);
        candidate = tanh(W_h @ x + U_h @ (f * h) + b_h);
        h = (1 - f) * h + f * candidate;
    }
    rnn[cell] ReluElmanStack streams ReluElmanStackState {
        input: 3, hidden: 4, layers: 3, batch_first: true,
        param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b: [hidden],
        state h,
        h = relu(W_hh @ h + W_xh @ x + b)
    }
}

/// The PyTorch case each fixture-sized model was declared for.
pub const FIXTURE_MODELS: [(&str, &str); 12] = [
    ("gru_basic", "GruBasic"),
    ("gru_h0_batch_first", "GruH0BatchFirst"),
    ("gru_no_bias", "GruNoBias"),
    ("gru_packed_bidir", "GruPackedBidir"),
    ("lstm_2layer_bidir", "Lstm2LayerBidir"),
    ("lstm_basic", "LstmBasic"),
    ("lstm_hidden256", "LstmHidden256"),
    ("lstm_packed", "LstmPacked"),
    ("lstm_proj_bidir_c0", "LstmProjBidirC0"),
    ("rnn_batch_first_packed_h0", "RnnBatchFirstPackedH0"),
    ("rnn_relu_basic", "RnnReluBasic"),
    ("rnn_tanh_basic", "RnnTanhBasic"),
];

/// The acceptance cell of `examples/cells/` each declared cell copies.
pub const CELL_MODELS: [(&str, &str); 8] = [
    ("layernorm_lstm", "LayerNormLstm"),
    ("min_gru", "MinGru"),
    ("min_lstm", "MinLstm"),
    ("indrnn", "IndRnn"),
    ("peephole_lstm", "PeepholeLstm"),
    ("elman_output", "Elman"),
    ("chapter_gru", "ChapterGru"),
    ("min_gru_stack", "MinGruStack"),
];

//! `rnn`: a compiler for recurrent neural networks.
//!
//! This facade is what users depend on. It re-exports the compiler front end and reference
//! interpreter ([`ir`], the `rnn-ir` crate) and holds the benchmark workloads shared by the
//! `rnnc` command line and the benches.
//!
//! ```
//! use rnn::{Exec, Program, Request, Tensor, Weights, parse_str};
//!
//! let program = Program::compile(&parse_str("gru { input: 8, hidden: 16 }").unwrap()).unwrap();
//! let weights = Weights::init(&program, 42).unwrap();
//! let x = Tensor::zeros(vec![10, 1, 8]);
//! let out = program.run::<f32>(&weights, &Request { input: Some(&x), ..Default::default() }, &Exec::default()).unwrap();
//! assert_eq!(out.final_states[0].shape, vec![1, 1, 16]);
//!
//! // Streaming: bind once, then one call per step (nothing is allocated per step).
//! let bound = program.bind::<f32>(&weights).unwrap();
//! let mut stream = bound.stream(1, Exec::default()).unwrap();
//! let mut state = stream.zero_state();
//! let y = stream.step(&mut state, &[0.5; 8]).unwrap();
//! assert_eq!(y.len(), 16);
//! ```

#![warn(missing_docs)]
#![cfg_attr(not(feature = "std"), no_std)]

// The emitted code names the facade `::rnn`; inside the facade itself (its benchmark models)
// that is this crate.
extern crate self as rnn;

#[cfg(feature = "jit")]
pub mod bench;
#[cfg(feature = "cli")]
pub mod emit;
#[doc(hidden)]
pub mod rt;
#[cfg(feature = "cli")]
pub mod tour;
#[cfg(feature = "jit")]
pub mod train;

/// The Cranelift JIT: a model compiled at run time from a [`ModelSpec`], a
/// `.rnn` text or a [`Program`]; bind PyTorch weights, then run many times with
/// the interpreter's semantics (the same driver, checks and errors).
///
/// ```
/// use std::sync::Arc;
/// let jit = Arc::new(rnn::jit::Jit::from_spec(&rnn::ModelSpec::new(rnn::CellKind::Gru, 3, 4))?);
/// let weights = rnn::Weights::init(jit.program(), 0)?;
/// let model = jit.bind(&weights)?;
/// let x = rnn::Tensor::new(vec![5, 2, 3], vec![0.1; 30]).unwrap();
/// let out = model.run(&rnn::Request { input: Some(&x), ..Default::default() })?;
/// assert_eq!(out.output.shape, vec![5, 2, 4]);
/// # Ok::<(), rnn::Error>(())
/// ```
#[cfg(feature = "jit")]
pub mod jit {
    pub use rnn_jit::{Jit, JitError, JitModel, JitTape, bind_stack};
}

/// An attribute that keeps its item with the facade's `std` feature and removes it without:
/// how emitted code declares the parts of a model that need a heap (an attribute rather than a
/// macro call, so that formatters and readers see ordinary items).
#[cfg(feature = "std")]
#[doc(hidden)]
pub use rnn_macros::__keep as __std;
/// See the `std` variant.
#[cfg(not(feature = "std"))]
#[doc(hidden)]
pub use rnn_macros::__strip as __std;

/// Declares a vanilla RNN (or a custom cell written as equations) as a size-specialised Rust
/// model.
///
/// # Grammar
/// ```text
/// rnn! { [#[attr]]* [pub] struct Name { setting, ... } }
/// setting := input: N | hidden: N | layers: N | bidirectional: bool | batch_first: bool
///          | bias: bool | bias_convention: two | one | nonlinearity: tanh | relu
/// ```
/// A body with `param`, `state`, `output` or equations declares a custom cell (the language of
/// `.rnn` files, `rnn::ir::parse`): `param W: [hidden, input]`, `state h`, `h = tanh(W @ x + ...)`.
///
/// The declared struct holds every weight in a fixed-size array named as PyTorch names it, and
/// provides the constants `PARAMETERS`, `INPUT_SIZE`, `HIDDEN_SIZE`, `OUTPUT_SIZE`, `LAYERS`,
/// `DIRECTIONS`, `BATCH_FIRST`, `ZERO`; `parameters()` and `parameters_mut()`; for
/// unidirectional models a `NameState` and `step` (only `core`: no heap, no `std`). With the
/// `std` feature (default): `init(seed)`, `zeroed()`, `from_safetensors`, `to_safetensors`,
/// `from_weights`, `to_weights`, and `forward` / `forward_train` / `backward` / `run` over a
/// batch of sequences (packed lengths, initial states, batch-first as declared), through the
/// same driver as the interpreter.
///
/// ```
/// rnn::rnn! { pub struct Elman { input: 4, hidden: 8, nonlinearity: relu } }
///
/// let model = Elman::init(0);
/// let mut state = ElmanState::ZERO;
/// let y = model.step(&[0.5; 4], &mut state);
/// assert_eq!(y.len(), Elman::OUTPUT_SIZE);
/// assert_eq!(Elman::PARAMETERS, 8 * 4 + 8 * 8 + 2 * 8);
///
/// rnn::rnn! { struct MinGru { input: 3, hidden: 5,
///     param W_z: [hidden, input], param W_h: [hidden, input],
///     state h,
///     z = sigmoid(W_z @ x),
///     h = (1 - z) * h + z * (W_h @ x) } }
/// let cell = MinGru::init(1);
/// let mut s = MinGruState::default();
/// let _ = cell.step(&[1.0, 2.0, 3.0], &mut s);
/// ```
pub use rnn_macros::rnn;

/// Declares an LSTM as a size-specialised Rust model (see [`rnn!`] for what it provides).
///
/// # Grammar
/// ```text
/// lstm! { [#[attr]]* [pub] struct Name { setting, ... } }
/// setting := input: N | hidden: N | layers: N | bidirectional: bool | batch_first: bool
///          | bias: bool | bias_convention: two | one | proj: N
/// ```
///
/// ```
/// use rnn::{Request, Tensor};
/// rnn::lstm! { pub struct Encoder { input: 3, hidden: 4, layers: 2, bidirectional: true } }
///
/// let model = Encoder::init(42);
/// let x = Tensor::zeros(vec![5, 2, 3]); // (time, batch, features)
/// let out = model.forward(&Request { input: Some(&x), ..Request::default() })?;
/// assert_eq!(out.output.shape, vec![5, 2, 8]);
/// assert_eq!(out.final_states[1].shape, vec![4, 2, 4]); // c_n
/// # Ok::<(), rnn::Error>(())
/// ```
pub use rnn_macros::lstm;

/// Declares a GRU as a size-specialised Rust model (see [`rnn!`] for what it provides).
///
/// # Grammar
/// ```text
/// gru! { [#[attr]]* [pub] struct Name { setting, ... } }
/// setting := input: N | hidden: N | layers: N | bidirectional: bool | batch_first: bool
///          | bias: bool | bias_convention: two | one | reset: after | before
/// ```
/// `reset: after` is PyTorch's GRU (`n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`);
/// `reset: before` applies the reset gate to `h` before the product (Cho et al.).
///
/// ```
/// rnn::gru! { struct Speech { input: 2, hidden: 3, reset: before } }
///
/// let model = Speech::init(7);
/// let mut state = SpeechState::ZERO;
/// for x in [[0.1, 0.2], [0.3, 0.4]] {
///     let h = model.step(&x, &mut state);
///     assert!(h.iter().all(|v| v.abs() < 1.0));
/// }
/// ```
pub use rnn_macros::gru;

/// Declares an encoder-decoder (the chapter's seq2seq model) as Rust: two size-specialised
/// stacks and the layers around them.
///
/// # Grammar
/// ```text
/// seq2seq! { [#[attr]]* [pub] struct Name {
///     encoder: kind { setting, ... },
///     decoder: kind { setting, ... },
/// } }                                    (the parts in either order, `,` or `;` after each)
/// kind    := rnn | lstm | gru            (an `rnn` with equations is a custom cell)
/// setting := those of `rnn!`, `lstm!`, `gru!`, and
///            vocab: N                     (the part's embedding: ids below N)
///          | head: N                      (the decoder's vocabulary head: N classes)
///          | attention: dot | general | additive   (the decoder's, over the encoder's outputs)
///          | attention_units: N           (of an additive score; 64 when not given)
///          | attention_placement: output | input   (after the stack, Luong's; or in the step,
///                                                   Bahdanau's: the context joins the input)
/// ```
/// The encoder needs `vocab`; the decoder `vocab` and `head` (at most `vocab` classes), one
/// direction, and the encoder's number of layers and `batch_first`. The decoder starts from the
/// encoder's final states (a bidirectional encoder's two joined, forward first, so the decoder's
/// `hidden` is twice the encoder's): see [`ir::seq2seq`] for the bridge, attention, greedy and
/// beam decoding. The checks are [`ir::seq2seq::Seq2Seq::new`]'s, at compile time.
///
/// It declares `Name`, and the two stacks as `lstm!` (or `rnn!`, `gru!`) declares them,
/// `NameEncoder` and `NameDecoder` (with their `forward`, `backward`, and for a unidirectional
/// stack `step` and its state type `NameEncoderState` / `NameDecoderState`); the declaration's
/// `#[derive(..)]`s go on the stacks too (with `attention_placement: input`, `NameDecoder`
/// reads `input + memory` features: the embedding and the context). `Name` holds them
/// as the fields `encoder` and `decoder`, and every other parameter as an array named after its
/// PyTorch name (`decoder.fc.weight` is `decoder_fc_weight`); `PARAMETERS`, `parameters()`,
/// `parameters_mut()`. With the `std` feature: `init(seed)`, `zeroed()`, `from_weights`,
/// `load`, `from_safetensors`, `to_weights`, `to_safetensors` (PyTorch's names, the shared
/// fixture's: `encoder.embedding.weight`, `encoder.rnn.weight_ih_l0`, …, `decoder.fc.bias`),
/// `compiled()` (the runtime's [`ir::seq2seq::Seq2Seq`] of the same declaration), and
/// `bind()`: an [`ir::seq2seq::BoundSeq2Seq`] whose stacks run this model's emitted kernels and
/// whose embeddings, attention and head run the shared kernels, with `greedy`, `beam`,
/// `encode` and `loss` (teacher forcing, every gradient).
///
/// A declaration of `rnn!`, `lstm!` or `gru!` with `vocab` or `head` (a language model) is a
/// model around a stack the same way: `NameStack` and `Name`, whose `bind()` gives an
/// [`ir::model::BoundModel`].
///
/// ```
/// use rnn::ir::model::Ids;
/// use rnn::ir::seq2seq::Decode;
/// rnn::seq2seq! {
///     pub struct Reverser {
///         encoder: gru { vocab: 12, input: 8, hidden: 16, bidirectional: true, batch_first: true },
///         decoder: gru { vocab: 12, input: 8, hidden: 32, head: 12, attention: general,
///                        batch_first: true },
///     }
/// }
/// let model = Reverser::init(0)?;
/// let src = Ids::new(vec![2, 5], vec![3, 4, 5, 6, 7, 8, 9, 10, 11, 3])?; // (batch, time)
/// let tokens = model.bind()?.greedy(&src, None, &Decode { steps: 6, sos: 1, eos: Some(2) })?;
/// assert_eq!(tokens.shape, vec![2, 6]);
/// # Ok::<(), rnn::Error>(())
/// ```
pub use rnn_macros::seq2seq;

/// The Rust code blocks of `README.md`, compiled and run as doctests (`cargo test --doc`), so the
/// README's example cannot drift from the API.
#[cfg(all(doctest, feature = "std"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(feature = "std")]
pub use rnn_ir as ir;
#[cfg(feature = "std")]
pub use rnn_ir::parse::parse_str;
#[cfg(feature = "std")]
pub use rnn_ir::{
    Bound, CellKind, CompileOptions, Error, Exec, Gradients, ModelSpec, Program, Request, Response,
    Result, State, Stream, Tensor, Weights,
};
#[cfg(feature = "std")]
pub use rt::Tape;

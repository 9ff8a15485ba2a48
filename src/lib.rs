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

pub mod bench;

/// The Rust code blocks of `README.md`, compiled and run as doctests (`cargo test --doc`), so the
/// README's example cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use rnn_ir as ir;
pub use rnn_ir::parse::parse_str;
pub use rnn_ir::{
    Bound, CellKind, CompileOptions, Error, Exec, Gradients, ModelSpec, Program, Request, Response,
    Result, State, Stream, Tensor, Weights,
};

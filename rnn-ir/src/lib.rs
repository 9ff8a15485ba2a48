//! `rnn-ir`: the compiler front end and reference interpreter of `rnn`.
//!
//! The pipeline, each stage a module:
//!
//! ```text
//! .rnn text / macro tokens ─> parse ─> ModelSpec ─> lower ─> step Graph ─> verify
//!     ─> passes ─> autodiff ─> passes ─> hoisting ─> Program ─> interpreter
//! ```
//!
//! - [`parse`]: the DSL on `proc_macro2` tokens ([`spec::ModelSpec`] out).
//! - [`lower`]: a cell to the step graph of one layer ([`graph::Graph`]).
//! - [`graph`]: the IR, its verifier and printer.
//! - [`autodiff`]: the backward step graph of a forward step graph.
//! - [`passes`]: DCE, CSE, gate fusion and time hoisting.
//! - [`program`]: the sequence-level plan for a model.
//! - [`interp`]: the reference interpreter, forward and backward.
//! - [`weights`], [`npy`]: PyTorch `state_dict`s in safetensors, NumPy arrays.
//!
//! ```
//! use rnn_ir::{Program, Request, Exec, Tensor, Weights, parse::parse_str};
//!
//! let spec = parse_str("lstm { input: 3, hidden: 4 }").unwrap();
//! let program = Program::compile(&spec).unwrap();
//! assert_eq!(program.parameter_count(), 4 * 4 * (3 + 4) + 2 * 4 * 4);
//! let weights = Weights::init(&program, 0).unwrap();
//! let x = Tensor::zeros(vec![5, 2, 3]); // (time, batch, features)
//! let gy = Tensor::zeros(vec![5, 2, 4]);
//! let req = Request { input: Some(&x), grad_output: Some(&gy), ..Request::default() };
//! let out = program.run::<f32>(&weights, &req, &Exec::default()).unwrap();
//! assert_eq!(out.output.shape, vec![5, 2, 4]);
//! assert_eq!(out.grads.unwrap().params["weight_hh_l0"].shape, vec![16, 4]);
//! ```

#![warn(missing_docs)]

pub mod autodiff;
pub mod driver;
pub mod error;
pub mod graph;
pub mod interp;
pub mod lower;
pub mod npy;
pub mod parse;
pub mod passes;
pub mod plan;
pub mod program;
pub mod spec;
pub mod tensor;
pub mod weights;

pub use driver::{Gradients, RawResponse, Request, Response};
pub use error::{Error, Result};
pub use interp::{Bound, Exec, State, Stream};
pub use program::{CompileOptions, Program};
pub use spec::{CellKind, ModelSpec};
pub use tensor::Tensor;
pub use weights::Weights;

//! `rnn-ir`: the compiler front end, the execution plan every backend reads, the shared
//! sequence driver and the reference interpreter of `rnn`.
//!
//! The pipeline, each stage a module:
//!
//! ```text
//! .rnn text / macro tokens ─> parse ─> ModelSpec ─> lower ─> step Graph ─> verify
//!     ─> passes ─> autodiff ─> passes ─> hoisting ─> storage plans ─> Program
//!     ─> driver + executor (the interpreter; later the emitted Rust and the JIT)
//! ```
//!
//! The front end (no features):
//! - [`parse`]: the DSL on `proc_macro2` tokens ([`spec::ModelSpec`] out).
//! - [`lower`]: a cell to the step graph of one layer ([`graph::Graph`]).
//! - [`graph`]: the IR, its verifier, printer and dataflow facts.
//! - [`autodiff`]: the backward step graph of a forward step graph.
//! - [`passes`]: DCE, CSE, gate fusion, reassociation and time hoisting.
//! - [`schedule`]: a step graph with its time-loop phases.
//! - [`plan`]: where every value lives while a sequence runs.
//! - [`program`]: the whole model's plan (`Display` prints it) and the pair verifier.
//!
//! The runtime (feature `runtime`, on by default):
//! - `driver`: layers, directions, lengths, initial states, batch-first and the backward
//!   pass, written once over a per-sequence executor.
//! - `interp`: the reference executor, the bind phase and the streaming API.
//! - `model`: the embedding, head and loss around a stack, run on any backend's stack.
//! - `seq2seq`: the encoder-decoder and its decoding.
//! - `tensor`, `weights`, `npy`: tensors, PyTorch `state_dict`s in safetensors, NumPy arrays.
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
#[cfg(feature = "runtime")]
pub mod checkpoint;
#[cfg(feature = "runtime")]
pub mod driver;
pub mod emit;
pub mod error;
pub mod fuse;
pub mod graph;
#[cfg(feature = "runtime")]
pub mod interp;
pub mod lower;
pub mod model;
#[cfg(feature = "runtime")]
pub mod npy;
#[cfg(feature = "runtime")]
pub mod optim;
pub mod panels;
pub mod parse;
pub mod passes;
pub mod plan;
pub mod pool;
pub mod program;
pub mod schedule;
pub mod seq2seq;
pub mod spec;
#[cfg(feature = "runtime")]
pub mod tensor;
#[cfg(feature = "runtime")]
pub mod weights;

#[cfg(feature = "runtime")]
pub use driver::{Gradients, Layout, RawResponse, Request, Response};
pub use error::{Error, Result};
#[cfg(feature = "runtime")]
pub use interp::{Bound, Exec, State, Stream};
pub use program::{CompileOptions, Program};
pub use spec::{CellKind, ModelSpec};
#[cfg(feature = "runtime")]
pub use tensor::Tensor;
#[cfg(feature = "runtime")]
pub use weights::Weights;

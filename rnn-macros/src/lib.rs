//! `rnn-macros`: the `rnn!`, `lstm!`, `gru!` and `seq2seq!` declaration macros.
//!
//! This crate stays a shell: each macro will be one call into `rnn-ir` (which parses the same
//! declaration language on `proc_macro2` tokens and owns the Rust emitter), turning its errors
//! into `compile_error!` at the user's tokens. The macros themselves land with their own issue;
//! until then the crate exports nothing, and the declaration language is available through
//! `rnn_ir::parse` and `rnnc inspect`.

#![warn(missing_docs)]

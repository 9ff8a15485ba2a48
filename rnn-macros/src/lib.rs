//! `rnn-macros`: the `rnn!`, `lstm!`, `gru!` and `seq2seq!` declaration macros of `rnn`.
//!
//! A shell: each macro is one call into `rnn_ir::emit::expand`, which parses the declaration
//! (the language of `.rnn` files), compiles it and emits the model; mistakes come back as
//! `compile_error!`s on the user's tokens. Use them through the `rnn` facade (`rnn::lstm!`),
//! whose documentation states the grammar.

#![warn(missing_docs)]

use proc_macro::TokenStream;

/// A vanilla RNN (`nonlinearity: tanh | relu`), or a custom cell written as equations. See
/// `rnn::rnn!`.
#[proc_macro]
pub fn rnn(input: TokenStream) -> TokenStream {
    rnn_ir::emit::expand("rnn", input.into()).into()
}

/// An LSTM. See `rnn::lstm!`.
#[proc_macro]
pub fn lstm(input: TokenStream) -> TokenStream {
    rnn_ir::emit::expand("lstm", input.into()).into()
}

/// A GRU (`reset: after | before`). See `rnn::gru!`.
#[proc_macro]
pub fn gru(input: TokenStream) -> TokenStream {
    rnn_ir::emit::expand("gru", input.into()).into()
}

/// An encoder-decoder. See `rnn::seq2seq!`.
#[proc_macro]
pub fn seq2seq(input: TokenStream) -> TokenStream {
    rnn_ir::emit::expand_seq2seq(input.into()).into()
}

/// The item unchanged: what the facade's `__std` attribute is with its `std` feature.
#[doc(hidden)]
#[proc_macro_attribute]
pub fn __keep(_: TokenStream, item: TokenStream) -> TokenStream {
    item
}

/// Nothing: what the facade's `__std` attribute is without its `std` feature.
#[doc(hidden)]
#[proc_macro_attribute]
pub fn __strip(_: TokenStream, _: TokenStream) -> TokenStream {
    TokenStream::new()
}

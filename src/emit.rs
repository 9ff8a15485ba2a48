//! The Rust a macro emits, formatted for people: what `rnnc emit` prints and the snapshot tests
//! pin (a recurrent stack, or a model around one).

use crate::Program;

/// The code `rnn!` / `lstm!` / `gru!` emit for `program`, declared as `pub struct name`,
/// formatted by `prettyplease`. Fails when `name` is not a Rust identifier.
pub fn rust(program: &Program, name: &str) -> Result<String, String> {
    let ident = syn::parse_str::<syn::Ident>(name)
        .map_err(|_| format!("`{name}` is not a Rust identifier: name the struct with --name"))?;
    let tokens = rnn_ir::emit::emit_model(program, &ident, &quote_pub(), &[]);
    let file: syn::File =
        syn::parse2(tokens).map_err(|e| format!("the emitted code does not parse: {e}"))?;
    Ok(prettyplease::unparse(&file))
}

/// The code `rnn!` / `lstm!` / `gru!` emit for a declaration with an embedding or a head
/// (`model`, declared by the `.rnn` text `source`), as [`rust`] formats it.
pub fn rust_model(
    model: &rnn_ir::model::Model,
    name: &str,
    source: &str,
) -> Result<String, String> {
    let ident = syn::parse_str::<syn::Ident>(name)
        .map_err(|_| format!("`{name}` is not a Rust identifier: name the struct with --name"))?;
    let tokens = rnn_ir::emit::emit_around(model, &ident, &quote_pub(), &[], source);
    let file: syn::File =
        syn::parse2(tokens).map_err(|e| format!("the emitted code does not parse: {e}"))?;
    Ok(prettyplease::unparse(&file))
}

fn quote_pub() -> proc_macro2::TokenStream {
    "pub".parse().expect("`pub` is a token")
}

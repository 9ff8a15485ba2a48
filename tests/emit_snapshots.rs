//! The Rust the macros emit, formatted with `prettyplease` and pinned with `insta`, for a tanh
//! RNN, an LSTM, a GRU in both reset forms, a 2-layer bidirectional LSTM and a custom cell, at
//! sizes small enough to read; and a malformed declaration, whose expansion is its
//! `compile_error!`s beside an empty struct. `rnnc emit` prints the same text.

use rnn::{Program, parse_str};

/// The formatted expansion of `src` declared as `pub struct name`.
fn emitted(src: &str, name: &str) -> String {
    let program = Program::compile(&parse_str(src).unwrap()).unwrap();
    rnn::emit::rust(&program, name).unwrap()
}

#[test]
fn a_tanh_rnn() {
    insta::assert_snapshot!("tanh_rnn", emitted("rnn { input: 2, hidden: 3 }", "Elman"));
}

#[test]
fn an_lstm() {
    insta::assert_snapshot!("lstm", emitted("lstm { input: 2, hidden: 3 }", "Lstm"));
}

#[test]
fn a_gru_with_the_reset_after_the_product() {
    insta::assert_snapshot!(
        "gru_reset_after",
        emitted("gru { input: 2, hidden: 3, reset: after }", "Gru")
    );
}

#[test]
fn a_gru_with_the_reset_before_the_product() {
    insta::assert_snapshot!(
        "gru_reset_before",
        emitted("gru { input: 2, hidden: 3, reset: before }", "ChoGru")
    );
}

#[test]
fn a_two_layer_bidirectional_lstm() {
    insta::assert_snapshot!(
        "lstm_2layer_bidirectional",
        emitted(
            "lstm { input: 2, hidden: 3, layers: 2, bidirectional: true }",
            "Encoder"
        )
    );
}

#[test]
fn a_custom_cell() {
    let src = "cell MinGru {
        input: 2, hidden: 3,
        param W_z: [hidden, input], param b_z: [hidden],
        param W_h: [hidden, input], param b_h: [hidden],
        state h,
        z = sigmoid(W_z @ x + b_z),
        h = (1 - z) * h + z * (W_h @ x + b_h),
    }";
    insta::assert_snapshot!("custom_min_gru", emitted(src, "MinGru"));
}

#[test]
fn a_malformed_declaration_expands_to_its_errors_and_an_empty_struct() {
    let tokens: proc_macro2::TokenStream = "pub struct Broken { input: 0, hiden: 4, layers: true }"
        .parse()
        .unwrap();
    let file: syn::File = syn::parse2(rnn::ir::emit::expand("lstm", tokens)).unwrap();
    insta::assert_snapshot!("malformed", prettyplease::unparse(&file));
}

/// The expansion is the same in another process (where a hash map would iterate in another
/// order): `rnnc emit`'s output equals this process's, and both equal a second expansion here.
#[test]
fn the_expansion_is_deterministic() {
    let src = "lstm { input: 2, hidden: 3, layers: 2, bidirectional: true }";
    let here = emitted(src, "A");
    assert_eq!(here, emitted(src, "A"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rnnc"))
        .args([
            "emit",
            "--cell",
            "lstm",
            "--input-size",
            "2",
            "--hidden-size",
            "3",
            "--layers",
            "2",
            "--bidirectional",
            "--name",
            "A",
        ])
        .output()
        .expect("rnnc runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8(o.stdout).unwrap().trim_end(),
        here.trim_end()
    );
}

/// The items of an expansion that belong to `name` itself, not to the stacks it declares
/// beside it (those are pinned above, as `lstm!` emits them).
fn own_items(tokens: proc_macro2::TokenStream, name: &str) -> String {
    let file: syn::File = syn::parse2(tokens).unwrap();
    let mine = |item: &syn::Item| {
        let text = quote::quote!(#item).to_string();
        match item {
            syn::Item::Struct(s) => s.ident == name,
            syn::Item::Impl(i) => {
                let ty = &i.self_ty;
                quote::quote!(#ty).to_string() == name
            }
            _ => {
                text.contains(&format!("impl {name} {{"))
                    || text.contains(&format!("for {name} {{"))
                    || text.contains(&format!("size_of :: < {name} >"))
            }
        }
    };
    let items = file.items.into_iter().filter(mine).collect();
    prettyplease::unparse(&syn::File {
        shebang: None,
        attrs: Vec::new(),
        items,
    })
}

#[test]
fn an_encoder_decoder_with_attention() {
    let tokens: proc_macro2::TokenStream = "pub struct Tiny {
        encoder: gru { vocab: 5, input: 2, hidden: 3, bidirectional: true, batch_first: true },
        decoder: gru { vocab: 6, input: 2, hidden: 6, head: 6, batch_first: true, attention: general },
    }"
    .parse()
    .unwrap();
    insta::assert_snapshot!(
        "seq2seq_attention",
        own_items(rnn::ir::emit::expand_seq2seq(tokens), "Tiny")
    );
}

#[test]
fn a_language_model_around_a_stack() {
    let tokens: proc_macro2::TokenStream =
        "pub struct CharLm { vocab: 7, input: 2, hidden: 3, head: 7 }"
            .parse()
            .unwrap();
    insta::assert_snapshot!(
        "language_model",
        own_items(rnn::ir::emit::expand("lstm", tokens), "CharLm")
    );
}

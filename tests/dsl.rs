//! The declaration language: what it accepts, and for what it rejects, a message at the
//! offending token saying what was expected.

mod common;

use rnn::ir::spec::{BiasConvention, GruReset};
use rnn::{CellKind, Error, Program, parse_str};

/// The diagnostics of a declaration that must not parse, as `line:column: message`.
fn errors(src: &str) -> Vec<String> {
    match parse_str(src).and_then(|s| Program::compile(&s).map(|_| ())) {
        Err(Error::Parse(d)) => d.iter().map(|d| d.to_string()).collect(),
        Err(e) => vec![e.to_string()],
        Ok(()) => panic!("expected `{src}` to be rejected"),
    }
}

#[test]
fn standard_cells_with_every_setting() {
    let s = parse_str("lstm Encoder { input: 128, hidden: 256, layers: 2, bidirectional: true, proj: 64, batch_first: true }").unwrap();
    assert!(matches!(s.cell, CellKind::Lstm));
    assert_eq!(
        (s.input_size, s.hidden_size, s.num_layers, s.proj_size),
        (128, 256, 2, 64)
    );
    assert!(s.bidirectional && s.batch_first && s.bias);
    assert_eq!(s.name.as_deref(), Some("Encoder"));

    let s = parse_str("gru { input: 4, hidden: 8, reset: before, bias_convention: one; }").unwrap();
    assert_eq!(s.gru_reset, GruReset::BeforeMatmul);
    assert_eq!(s.bias_convention, BiasConvention::One);

    let s = parse_str("rnn { input: 4, hidden: 8, nonlinearity: relu, bias: false }").unwrap();
    assert!(matches!(s.cell, CellKind::RnnRelu));
    assert!(!s.bias);
}

#[test]
fn custom_cells_parse_and_compile() {
    // input 3, hidden 4. Peephole: 4 W [4, 3], 4 U [4, 4], 4 b [4], 3 p [4]. Minimal GRU:
    // 2 × (W [4, 3] + U [4, 4] + b [4]). Elman: W_xh [4, 3] + W_hh [4, 4] + b [4].
    for (src, count) in [
        (common::PEEPHOLE, 48 + 64 + 16 + 12),
        (common::MINIMAL_GRU, 2 * (12 + 16 + 4)),
        (common::RELU_ELMAN, 12 + 16 + 4),
    ] {
        let spec = parse_str(src).unwrap();
        let program = Program::compile(&spec).unwrap();
        assert_eq!(program.parameter_count(), count, "{src}");
    }
}

#[test]
fn custom_cell_sizes_follow_the_layer_input() {
    let src =
        common::RELU_ELMAN.replace("hidden: 4,", "hidden: 4, layers: 2, bidirectional: true,");
    let program = Program::compile(&parse_str(&src).unwrap()).unwrap();
    let params = program.parameters();
    assert!(params.contains(&("W_xh_l0".to_string(), vec![4, 3])));
    // Layer 1 reads both directions of layer 0: 2 × 4 features.
    assert!(params.contains(&("W_xh_l1_reverse".to_string(), vec![4, 8])));
}

#[test]
fn unknown_setting_names_the_valid_ones() {
    let e = errors("lstm {\n  input: 128,\n  hiden: 256\n}");
    assert_eq!(
        e[0],
        "3:3: unknown setting `hiden` for `lstm`; expected one of: input, hidden, layers, bidirectional, bias, batch_first, bias_convention, proj"
    );
}

#[test]
fn every_mistake_is_reported_at_once() {
    let e = errors("gru { input: many, hidden: 8, reset: sideways, layers: 2, layers: 3 }");
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[0].ends_with("`input` takes a whole number, found `many`"));
    assert!(
        e[1].contains("`reset` takes `after` (PyTorch) or `before` (Cho et al.), found `sideways`")
    );
    assert!(e[2].contains("`layers` is given twice"));
}

#[test]
fn missing_sizes() {
    let e = errors("lstm { layers: 2 }");
    assert!(
        e.iter().any(|m| m.contains("`lstm` needs `input: N`")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|m| m.contains("`lstm` needs `hidden: N`")),
        "{e:?}"
    );
}

#[test]
fn bad_kind_and_structure() {
    assert_eq!(
        errors("transformer { input: 3 }")[0],
        "1:1: unknown model kind `transformer`: expected `rnn`, `lstm`, `gru` or `cell`"
    );
    assert!(errors("lstm ( input: 3 )")[0].contains("expected `{` opening the declaration's body"));
    assert!(
        errors("lstm { input 3, hidden: 4 }")[0].contains("expected `:` after the setting `input`")
    );
    assert!(
        errors("lstm { input: 3 hidden: 4 }")[0]
            .contains("expected `,` or `;` between items, found `hidden`")
    );
}

#[test]
fn equations_only_in_cells() {
    let e = errors("lstm { input: 3, hidden: 4, h = tanh(x) }");
    assert!(
        e[0].contains("equations are only allowed in `cell` declarations"),
        "{e:?}"
    );
}

#[test]
fn invalid_option_combinations() {
    assert!(
        errors("gru { input: 3, hidden: 4, proj: 2 }")[0]
            .contains("unknown setting `proj` for `gru`")
    );
    assert!(
        errors("lstm { input: 3, hidden: 4, proj: 4 }")[0]
            .contains("`proj` must be smaller than `hidden` (4), found 4")
    );
    assert!(errors("lstm { input: 0, hidden: 4 }")[0].contains("`input` must be at least 1"));
}

#[test]
fn custom_cell_mistakes_point_at_the_token() {
    let base = "cell C {\n  input: 3, hidden: 4,\n  param W: [hidden, input], param U: [hidden, hidden],\n  state h,\n";
    let e = errors(&format!("{base}  h = tanh(W @ x + V @ h)\n}}"));
    assert_eq!(
        e[0],
        "5:20: unknown name `V`: declare it with `param V: [..]` or `state V`, or assign it before this use"
    );

    let e = errors(&format!("{base}  h = tanh(U @ x)\n}}"));
    assert_eq!(
        e[0],
        "5:14: matmul needs [o, i] @ batch[i], found [4, 4] @ batch[3]"
    );

    let e = errors(&format!("{base}  h = W @ x,\n  W = h\n}}"));
    assert_eq!(e[0], "6:3: cannot assign to `W`: it is a parameter");

    let e = errors(&format!("{base}  h = softmax(W @ x)\n}}"));
    assert!(e[0].contains("unknown function `softmax`"), "{e:?}");

    let e = errors(
        "cell C { input: 3, hidden: 4, param W: [hidden, input], state h, state c, h = tanh(W @ x) }",
    );
    assert!(
        e[0].contains("state `c` is never assigned: add an equation `c = ...`"),
        "{e:?}"
    );

    let e = errors("cell C { input: 3, hidden: 4, param W: [5, input], state h, h = tanh(W @ x) }");
    assert!(
        e[0].contains("state `h` has size 4, but this equation gives batch[5]"),
        "{e:?}"
    );
}

#[test]
fn tokenizer_errors_are_diagnostics() {
    let e = errors("lstm { input: 3, hidden: \"4 }");
    assert!(e[0].contains("cannot tokenize"), "{e:?}");
}

#[test]
fn mistakes_inside_brackets_and_parentheses_are_reported_not_dropped() {
    // A misspelt size inside a parameter's shape: the parameter must not silently vanish.
    let e = errors("cell C { input: 4, hidden: 4, param W: [hiden, input], state h, h = tanh(x) }");
    assert_eq!(
        e,
        vec!["1:41: expected a size: a number, `input` or `hidden`, found `hiden`"]
    );
    // Tokens left over inside parentheses are an error, not ignored.
    let e = errors(
        "cell C { input: 4, hidden: 4, param W: [(hidden input), input], state h, h = tanh(W @ x) }",
    );
    assert_eq!(e, vec!["1:49: unexpected `input` before `)`"]);
    let e = errors(
        "cell C { input: 4, hidden: 4, param W: [hidden, input], state h, h = tanh((W @ x) h) }",
    );
    assert_eq!(e, vec!["1:83: expected `,` between arguments, found `h`"]);
    let e = errors("cell C { input: 4, hidden: 4, state h, h = tanh((x) h), h = (x h) }");
    assert_eq!(
        e,
        vec![
            "1:53: expected `,` between arguments, found `h`",
            "1:64: unexpected `h` before `)`"
        ]
    );
    let e = errors(
        "cell C { input: 4, hidden: 4, param W: [hidden, input], state h, h = tanh(W @ x h) }",
    );
    assert_eq!(e, vec!["1:81: expected `,` between arguments, found `h`"]);
}

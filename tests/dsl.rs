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
        "3:3: unknown setting `hiden` for `lstm`: did you mean `hidden`? expected one of: input, hidden, layers, bidirectional, bias, batch_first, bias_convention, proj, vocab, head, attention, attention_units, attention_placement"
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
    // Sizes out of range are reported at their values.
    assert_eq!(
        errors("lstm { input: 3, hidden: 4, proj: 4 }"),
        vec!["1:35: `proj` must be smaller than `hidden` (4), found 4"]
    );
    assert_eq!(
        errors("lstm { input: 0, hidden: 4 }"),
        vec!["1:15: `input` must be at least 1, found `0`"]
    );
    // A value missing at the end of the body is reported at its `}`.
    assert_eq!(
        errors("lstm {\n  input: 3,\n  hidden:\n}"),
        vec!["4:1: expected a value for `hidden`, found the end of the declaration"]
    );
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
        "5:14: `@` multiplies an `[out, in]` matrix by a value of `in` features, found `U` (a [4, 4] matrix) @ `x` (3 features): make the matrix [4, 3], or multiply it by a value of 4 features"
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
        e[0].contains("state `h` has size 4, but this equation gives 5 features"),
        "{e:?}"
    );
}

#[test]
fn what_the_tokenizer_refuses_is_a_diagnostic() {
    // Not a bracket: the tokenizer's own message, at the character it stopped on.
    assert_eq!(
        errors("lstm { input: 3, hidden: 4 \\ }"),
        vec![
            "1:28: cannot tokenize the declaration at `\\`: cannot parse string into token stream"
        ]
    );
    // A string (which the language has none of) never closed hides the brackets after it.
    assert_eq!(
        errors("lstm { input: 3, hidden: \"4 }"),
        vec!["1:26: this string is never closed"]
    );
}

#[test]
fn mistakes_inside_brackets_and_parentheses_are_reported_not_dropped() {
    // A misspelt size inside a parameter's shape: the parameter must not silently vanish.
    let e = errors("cell C { input: 4, hidden: 4, param W: [hiden, input], state h, h = tanh(x) }");
    assert_eq!(
        e,
        vec![
            "1:41: expected a size: a number, `input` or `hidden`, found `hiden`: did you mean `hidden`?"
        ]
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

// --- Errors: every mistake at once, each once, with what was probably meant ---

#[test]
fn several_mistakes_in_settings_params_states_and_equations_are_reported_at_once() {
    let e = errors(
        "cell Broken {
    input: many, hidden: 8, bidirectional: yes,
    param W: [hidden, input, 2], param U: [hiden, hidden],
    state c: hiden * 2, state h,
    z = sigmoid(W @ x +),
    g = concat(x y, z),
    h = tanh(U @ h) * z + q,
    c = g * c,
}",
    );
    assert_eq!(
        e,
        vec![
            "2:12: `input` takes a whole number, found `many`",
            "2:44: `bidirectional` takes `true` or `false`, found `yes`",
            "3:14: a parameter has no dimension (a scalar, `[]`), one (a vector) or two (a matrix `[out, in]`)",
            "3:44: expected a size: a number, `input` or `hidden`, found `hiden`: did you mean `hidden`?",
            "4:14: expected a size: a number, `input` or `hidden`, found `hiden`: did you mean `hidden`?",
            "5:24: expected an expression: a name, a number, a call or `(`, found `)`",
            "6:18: expected `,` between arguments, found `y`",
            "7:27: unknown name `q`: declare it with `param q: [..]` or `state q`, or assign it before this use",
        ]
    );
}

#[test]
fn the_body_goes_on_after_a_missing_separator_or_an_unfinished_equation() {
    assert_eq!(
        errors("lstm { input: 3 hidden: 4 layers: 0 }"),
        vec![
            "1:17: expected `,` or `;` between items, found `hidden`",
            "1:27: expected `,` or `;` between items, found `layers`",
            "1:35: `layers` must be at least 1, found `0`",
        ]
    );
    // `a = h` is read as the next equation, so `output a` names something.
    assert_eq!(
        errors(
            "cell C { input: 3, hidden: 4, param W: [hidden, input], state h,\n  h = W @\n  a = h, output a }"
        ),
        vec!["3:3: expected an expression, found the start of the next item `a`"]
    );
}

#[test]
fn lowering_reports_every_independent_mistake_at_once() {
    // Shapes are lowering's: two equations wrong, and two operands of one `+`.
    let e = errors(
        "cell C {
    input: 3, hidden: 4,
    param W: [hidden, input], param U: [hidden, hidden], param b: [5],
    state h,
    a = (U @ x) + (W @ h),
    h = tanh(W @ x + b)
}",
    );
    assert_eq!(
        e,
        vec![
            "5:12: `@` multiplies an `[out, in]` matrix by a value of `in` features, found `U` (a [4, 4] matrix) @ `x` (3 features): make the matrix [4, 3], or multiply it by a value of 4 features",
            "5:22: `@` multiplies an `[out, in]` matrix by a value of `in` features, found `W` (a [4, 3] matrix) @ `h` (4 features): make the matrix [4, 4], or multiply it by a value of 3 features",
            "6:20: `+` cannot combine 4 features and `b` (a [5] vector): both sides need as many features, or one side a single one (a number, a scalar parameter, a `mean`)",
        ]
    );
}

#[test]
fn a_failed_equation_or_declaration_causes_no_follow_on_errors() {
    // `a` fails (unknown `y`): `b` and `h` use it, and are not reported.
    let e = errors(
        "cell C {
    input: 3, hidden: 4,
    param W: [hidden, input],
    state h,
    a = tanh(W @ y),
    b = a * 2,
    h = tanh(a + b)
}",
    );
    assert_eq!(
        e,
        vec![
            "5:18: unknown name `y`: declare it with `param y: [..]` or `state y`, or assign it before this use"
        ]
    );
    // A parameter whose shape does not parse is still declared: no "unknown name `U`".
    let e = errors(
        "cell C { input: 3, hidden: 4, param U: [hiden, hidden], state h, h = tanh(U @ h) }",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("1:41: expected a size"), "{e:?}");
    // Shapes lowering refuses (0, too large) are reported at the declaration alone, not where
    // the parameter or state is used nor where the state is assigned.
    let e = errors(
        "cell C {
    input: 3, hidden: 4,
    param V: [hidden, 0], param U: [hidden * 100000 * 100000, hidden],
    state h, state c: 0,
    a = V @ x,
    c = U @ h + a,
    h = tanh(a) * c
}",
    );
    assert_eq!(
        e,
        vec![
            "3:11: parameter `V` has a dimension of size 0",
            "3:33: a dimension of `U` is larger than the largest size supported (16777216)",
            "4:20: state `c` has size 0",
        ]
    );
    // An equation that does not parse still assigns its name: no "never assigned", no
    // "unknown name".
    assert_eq!(
        errors("cell C { input: 3, hidden: 4, state h, a = x +, h = a }"),
        vec!["1:47: expected an expression: a name, a number, a call or `(`, found `,`"]
    );
    // A misspelt keyword is read as the keyword meant: `W` and `h` are declared.
    assert_eq!(
        errors("cell C { input: 3, hidden: 4, parm W: [hidden, input], stat h, h = W @ x }"),
        vec![
            "1:31: unknown keyword `parm`: did you mean `param`?",
            "1:56: unknown keyword `stat`: did you mean `state`?",
        ]
    );
    // A name declared twice: the second declaration is the mistake, not the equations.
    assert_eq!(
        errors("cell C { input: 3, hidden: 4, param h: [hidden], state h, h = h * x }"),
        vec!["1:56: `h` is already a parameter: give this state another name"]
    );
}

#[test]
fn misspelt_model_kinds_are_suggested_and_the_body_still_checked() {
    assert_eq!(
        errors("lstn { input: 3, hiden: 4 }"),
        vec![
            "1:1: unknown model kind `lstn`: did you mean `lstm`? expected `rnn`, `lstm`, `gru` or `cell`",
            "1:18: unknown setting `hiden` for `lstm`: did you mean `hidden`? expected one of: input, hidden, layers, bidirectional, bias, batch_first, bias_convention, proj, vocab, head, attention, attention_units, attention_placement",
        ]
    );
    assert_eq!(
        errors("cel C { input: 3, hidden: 4, state h, h = x }")[0],
        "1:1: unknown model kind `cel`: did you mean `cell`? expected `rnn`, `lstm`, `gru` or `cell`"
    );
}

#[test]
fn misspelt_keywords_are_suggested() {
    let e = errors(
        "cell C {\n  input: 3, hidden: 4,\n  parm W: [hidden, input],\n  stat h,\n  h = tanh(W @ x),\n  ouput h\n}",
    );
    assert_eq!(
        e,
        vec![
            "3:3: unknown keyword `parm`: did you mean `param`?",
            "4:3: unknown keyword `stat`: did you mean `state`?",
            "6:3: unknown keyword `ouput`: did you mean `output`?",
        ]
    );
    // In a standard cell, the item is skipped after the one error.
    assert_eq!(
        errors("lstm { input: 3, hidden: 4, parm W: [3] }"),
        vec!["1:29: unknown keyword `parm`: did you mean `param`?"]
    );
}

#[test]
fn misspelt_settings_and_setting_values_are_suggested() {
    assert_eq!(
        errors("gru { input: 3, hidden: 4, bidirectonal: ture }"),
        vec![
            "1:28: unknown setting `bidirectonal` for `gru`: did you mean `bidirectional`? expected one of: input, hidden, layers, bidirectional, bias, batch_first, bias_convention, reset, vocab, head, attention, attention_units, attention_placement"
        ]
    );
    assert_eq!(
        errors("gru { input: 3, hidden: 4, bidirectional: ture, reset: aftr }"),
        vec![
            "1:43: `bidirectional` takes `true` or `false`, found `ture`: did you mean `true`?",
            "1:56: `reset` takes `after` (PyTorch) or `before` (Cho et al.), found `aftr`: did you mean `after`?",
        ]
    );
    assert_eq!(
        errors("rnn { input: 3, hidden: 4, nonlinearity: rel, bias_convention: ones }"),
        vec![
            "1:42: `nonlinearity` takes `tanh` or `relu`, found `rel`: did you mean `relu`?",
            "1:64: `bias_convention` takes `two` (PyTorch) or `one` (Keras), found `ones`: did you mean `one`?",
        ]
    );
    // A setting of another kind says whose it is.
    assert_eq!(
        errors("gru { input: 3, hidden: 4, proj: 2 }"),
        vec![
            "1:28: unknown setting `proj` for `gru`: it is a setting of `lstm` only; expected one of: input, hidden, layers, bidirectional, bias, batch_first, bias_convention, reset, vocab, head, attention, attention_units, attention_placement"
        ]
    );
    // A misspelt size is not also reported missing; a missing one is.
    assert_eq!(
        errors("cell C { input: 3, param W: [hidden, input], state h, h = W @ x }"),
        vec!["1:1: `cell` needs `hidden: N`, the number of hidden features"]
    );
}

#[test]
fn misspelt_functions_sizes_and_outputs_are_suggested() {
    let e = errors(
        "cell C { input: 3, hidden: 4, param W: [hidden, input], state h, h = sigmod(W @ x) }",
    );
    assert_eq!(
        e,
        vec![
            "1:70: unknown function `sigmod`: did you mean `sigmoid`? the functions are `sigmoid`, `tanh`, `relu`, `exp`, `log`, `sqrt`, `softplus`, `abs`, `min`, `max`, `mean`, `sum`, `concat`"
        ]
    );
    let e = errors("cell C { input: 3, hidden: 4, param g: [2h], state h, h = g[0 .. hiden] * x }");
    assert_eq!(
        e,
        vec![
            "1:66: expected a size: a number, `input` or `hidden`, found `hiden`: did you mean `hidden`?"
        ]
    );
    let e = errors("cell C { input: 3, hidden: 4, state h, h = tanh(x), output hh }");
    assert_eq!(
        e,
        vec!["1:60: `output hh` names nothing: did you mean `h`?"]
    );
}

#[test]
fn misspelt_names_are_suggested_among_what_is_visible_there() {
    let e = errors(
        "cell C {
    input: 3, hidden: 4,
    param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b: [hidden],
    state h,
    pre = W_hx @ x + W_hh @ h + b,
    h = tanh(pree)
}",
    );
    assert_eq!(
        e,
        vec![
            "5:11: unknown name `W_hx`: did you mean `W_xh`?",
            "6:14: unknown name `pree`: did you mean `pre`?",
        ]
    );
    // A name assigned later is not misspelt: it is used too early.
    let e = errors(
        "cell C { input: 3, hidden: 4, param W: [hidden, input], state h, a = b + x, b = W @ x, h = a }",
    );
    assert_eq!(
        e,
        vec![
            "1:70: `b` is used before the equation that assigns it (at 1:77): equations run in order, and only a `state` keeps its value from the previous step"
        ]
    );
    let e = errors("cell C { input: 3, hidden: 4, state h, a = a + x, h = a }");
    assert_eq!(
        e,
        vec![
            "1:44: `a` is used in its own equation before it has a value: only a `state` keeps its value from the previous step (declare `state a`)"
        ]
    );
}

#[test]
fn unclosed_and_extra_brackets_are_reported_at_the_bracket() {
    let e = errors("cell C {\n  input: 3, hidden: 4,\n  state h,\n  h = tanh(x,\n}");
    assert_eq!(
        e,
        vec!["4:11: this `(` is never closed: a `)` is missing before the `}` at 5:1"]
    );
    let e = errors("cell C { input: 3, hidden: 4, param W: [hidden, input, state h, h = W @ x }");
    assert_eq!(
        e,
        vec!["1:40: this `[` is never closed: a `]` is missing before the `}` at 1:75"]
    );
    let e = errors("lstm {\n  input: 3,\n  hidden: 4\n");
    assert_eq!(
        e,
        vec!["1:6: this `{` is never closed: a `}` is missing at the end"]
    );
    let e = errors("lstm { input: 3, hidden: 4 } }");
    assert_eq!(
        e,
        vec!["1:30: unexpected `}`: there is no `{` open for it to close"]
    );
    let e = errors("lstm { input: 3, hidden: (4)) }");
    assert_eq!(
        e,
        vec!["1:29: unexpected `)`: there is no `(` open for it to close"]
    );
}

#[test]
fn settings_a_custom_cell_ignores_are_refused() {
    let e = errors(
        "cell C {
    input: 3, hidden: 4, layers: 2, bidirectional: true, batch_first: true,
    bias: false, bias_convention: one, proj: 2, reset: before, nonlinearity: relu,
    param W: [hidden, input], state h, h = tanh(W @ x)
}",
    );
    assert_eq!(
        e,
        vec![
            "3:5: a `cell` takes no `bias`: a custom cell's biases are the parameters its equations add (`param b: [hidden]`, then `... + b`); there is nothing for `bias` to switch on or off",
            "3:18: a `cell` takes no `bias_convention`: a custom cell's biases are the parameters its equations add, as many as they add; there is no convention to choose",
            "3:40: a `cell` takes no `proj`: `proj` projects an LSTM's output; in a `cell`, write the projection as an equation (`output y = W_hy @ h`)",
            "3:49: a `cell` takes no `reset`: `reset` places a GRU's reset gate; in a `cell`, the equations place it (`W @ (r * h)` or `r * (W @ h)`)",
            "3:64: a `cell` takes no `nonlinearity`: `nonlinearity` picks an `rnn`'s activation; in a `cell`, the equations apply their own (`h = tanh(...)`)",
        ]
    );
    // A standard cell without biases has no bias convention either.
    assert_eq!(
        errors("lstm { input: 3, hidden: 4, bias: false, bias_convention: one }"),
        vec![
            "1:42: `bias_convention` means nothing with `bias: false`: there are no biases to count; leave one of the two out"
        ]
    );
}

/// Every function and setting is in the grammar's reference, in the parser's module doc and in
/// the README.
#[test]
fn the_grammar_reference_names_every_function_and_setting() {
    let parser_doc: String = include_str!("../rnn-ir/src/parse.rs")
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let readme = include_str!("../README.md");
    let settings = [
        "input",
        "hidden",
        "layers",
        "bidirectional",
        "batch_first",
        "bias",
        "bias_convention",
        "proj",
        "reset",
        "nonlinearity",
    ];
    for (name, text) in [("parse.rs", &parser_doc[..]), ("README.md", readme)] {
        for f in rnn::ir::lower::function_names() {
            assert!(
                text.contains(&format!("`{f}(")),
                "{name} does not show `{f}(...)`"
            );
        }
        for s in settings {
            assert!(
                text.contains(&format!("`{s}")),
                "{name} does not name `{s}`"
            );
        }
        for form in [
            "output y = ",
            "param a: []",
            "= 1",
            "2h",
            "[0 .. hidden, ..]",
            "`/`",
        ] {
            assert!(text.contains(form), "{name} does not show `{form}`");
        }
    }
}

/// A cell whose equation for `h` is `body`.
fn with_equation(body: &str) -> String {
    format!("cell C {{ input: 3, hidden: 4, param W: [hidden, input], state h, h = {body} }}")
}

#[test]
fn an_equation_has_a_bounded_size_and_depth() {
    // Expressions are checked and lowered recursively: their size is bounded, so a generated
    // file cannot overflow the stack. At the bounds, it compiles and runs (here on a test
    // thread's small stack).
    let chain = format!("tanh(W @ x + {})", vec!["h"; 490].join(" + "));
    let nested = format!("tanh(W @ x + {}h{})", "(".repeat(60), ")".repeat(60));
    for src in [with_equation(&chain), with_equation(&nested)] {
        let p = Program::compile(&parse_str(&src).unwrap()).unwrap();
        let w = rnn::Weights::init(&p, 0).unwrap();
        let x = rnn::Tensor::zeros(vec![2, 1, 3]);
        let req = rnn::Request {
            input: Some(&x),
            ..Default::default()
        };
        p.bind::<f32>(&w)
            .unwrap()
            .run(&req, &rnn::Exec::default())
            .unwrap();
    }
    let long = with_equation(&vec!["h"; 1200].join(" + "));
    let e = errors(&long);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("this equation is too long: more than 1000"),
        "{e:?}"
    );
    let negations = with_equation(&format!("{}h", "-".repeat(100_000)));
    assert!(errors(&negations)[0].contains("too long"));
    let deep = with_equation(&format!("{}h{}", "(".repeat(5000), ")".repeat(5000)));
    let e = errors(&deep);
    assert!(
        e[0].starts_with("1:") && e[0].contains("groups nest more than 64 deep here"),
        "{e:?}"
    );
}

#[test]
fn numbers_float32_cannot_hold_are_refused() {
    let e = errors(&with_equation("tanh(W @ x + 1e-50 * h)"));
    assert!(
        e[0].contains("`1e-50` is too small for float32: it would be 0"),
        "{e:?}"
    );
    let e = errors(&with_equation("tanh(W @ x + 1e40 * h)"));
    assert!(e[0].contains("`1e40` is out of float32's range"), "{e:?}");
    let e = errors("cell C { input: 3, hidden: 4, param g: [hidden] = 1e-50, state h, h = g * h }");
    assert!(e[0].contains("too small for float32"), "{e:?}");
    // Zero, subnormal-free small numbers and exponents are fine.
    parse_str(&with_equation("tanh(W @ x + 0.0 * h + 1e-30)")).unwrap();
}

#[test]
fn an_output_equation_cannot_take_a_states_or_parameters_name() {
    let e = errors(
        "cell C { input: 3, hidden: 4, param W: [hidden, input], state h,\n h = tanh(W @ x),\n output h = W @ x }",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(
            "3:9: `output h = ...`: `h` is a state: this equation would replace its update"
        ),
        "{e:?}"
    );
    let e = errors(
        "cell C { input: 3, hidden: 4, param W: [hidden, input], state h,\n h = tanh(W @ x),\n output W = h }",
    );
    assert!(e.iter().any(|m| m.contains("`W` is a parameter")), "{e:?}");
    // Naming a state without an equation outputs it.
    parse_str(
        "cell C { input: 3, hidden: 4, param W: [hidden, input], state h, state c, h = tanh(W @ x + c), c = h, output c }",
    )
    .unwrap();
}

#[test]
fn vocab_and_head_declare_a_model_around_the_stack() {
    let spec = parse_str("lstm Lm { vocab: 65, input: 32, hidden: 128, head: 65 }").unwrap();
    assert_eq!((spec.vocab, spec.head), (Some(65), Some(65)));
    assert!(spec.has_model_layers());
    assert_eq!(spec.stack().vocab, None);
    let cell = parse_str(
        "cell E { input: 3, hidden: 4, vocab: 9, param W: [hidden, input], state h, h = tanh(W @ x) }",
    )
    .unwrap();
    assert_eq!(cell.vocab, Some(9));
    for (text, want) in [
        (
            "gru { input: 3, hidden: 4, vocab: 0 }",
            "`vocab` must be at least 1",
        ),
        (
            "gru { input: 3, hidden: 4, head: 0 }",
            "`head` must be at least 1",
        ),
        (
            "gru { input: 3, hidden: 4, head: 99999999 }",
            "more than the largest size",
        ),
    ] {
        let err = parse_str(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text}: {err}");
    }
}

#[test]
fn an_attention_is_declared_by_its_score_and_sized_by_its_encoder() {
    use rnn::ir::spec::Score;
    let spec = parse_str(
        "gru { vocab: 9, input: 4, hidden: 8, head: 9, attention: additive, attention_units: 5 }",
    )
    .unwrap();
    let a = spec.attention.unwrap();
    assert_eq!((a.score, a.memory), (Score::Additive(5), 0));
    // The units may come first; without an additive score they are an error, and so is a
    // score that does not exist.
    let spec = parse_str("gru { input: 4, hidden: 8, attention_units: 5, attention: additive }");
    assert_eq!(spec.unwrap().attention.unwrap().score, Score::Additive(5));
    assert_eq!(
        errors("gru { input: 4, hidden: 8, attention_units: 5, attention: general }"),
        vec!["1:28: `attention_units` sizes an additive score: declare `attention: additive` too"]
    );
    assert_eq!(
        errors("gru { input: 4, hidden: 8, attention: genral }"),
        vec![
            "1:39: `attention` takes `dot`, `general` (Luong) or `additive` (Bahdanau), found `genral`: did you mean `general`?"
        ]
    );
    // Without an encoder there is no memory to attend over.
    let e = rnn::ir::model::Model::compile(
        &parse_str("gru { vocab: 9, input: 4, hidden: 8, head: 9, attention: dot }").unwrap(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("declare it in the decoder of an encoder-decoder"),
        "{e}"
    );
}

#[test]
fn an_attention_is_placed_after_the_stack_or_in_the_step() {
    use rnn::ir::spec::Placement;
    let text = "gru { vocab: 9, input: 4, hidden: 8, head: 9, attention: general, attention_placement: input }";
    let spec = parse_str(text).unwrap();
    assert_eq!(spec.attention.unwrap().placement, Placement::Input);
    // The stack reads the embedding and the context once the memory is sized.
    let mut sized = spec.clone();
    sized.attention.as_mut().unwrap().memory = 6;
    assert_eq!(sized.stack().input_size, 4 + 6);
    assert_eq!(
        errors("gru { input: 4, hidden: 8, attention_placement: input }"),
        vec!["1:28: `attention_placement` places an attention: declare `attention` too"]
    );
    assert_eq!(
        errors("gru { input: 4, hidden: 8, attention: dot, attention_placement: inside }")[0],
        "1:65: `attention_placement` takes `output` (after the stack, Luong) or `input` (in the step, Bahdanau), found `inside`"
    );
}

//! The DSL parser, on `proc_macro2` tokens, shared by `.rnn` files and the macros.
//!
//! # Grammar
//! ```text
//! model    := kind [Name] '{' [item ((',' | ';') item)* [',' | ';']] '}'
//! kind     := 'rnn' | 'lstm' | 'gru' | 'cell'
//! item     := setting | param | state | output | equation
//! setting  := key ':' (integer | 'true' | 'false' | identifier)
//! param    := 'param' name ':' '[' [dim [',' dim]] ']' ['=' ['-'] number]   (cell only)
//! state    := 'state' name [':' dim]                     (cell only; default size `hidden`)
//! output   := 'output' name ['=' expr]                   (cell only; default the first state)
//! equation := name '=' expr                              (cell only)
//! dim      := dterm ('+' dterm)* ;   dterm := datom ('*' datom)*
//! datom    := integer | integer 'h' | 'input' | 'hidden' | 'h' | '(' dim ')'
//! expr     := term (('+' | '-') term)* ;   term := unary (('*' | '/' | '@') unary)*
//! unary    := '-' unary | postfix ;   postfix := atom ('[' range [',' range] ']')*
//! range    := dim | [dim] '..' [dim]
//! atom     := number | name | function '(' [expr (',' expr)*] ')' | '(' expr ')'
//! ```
//! Comments are Rust's (`// ...`, `/* ... */`). Items are separated by `,` or `;` (a trailing
//! one is allowed) and may come in any order, except that equations run in the order written.
//!
//! # Settings
//! | setting | kinds | meaning |
//! |---|---|---|
//! | `input: N` | all (required) | features of the input `x_t` |
//! | `hidden: N` | all (required) | features of the hidden state |
//! | `layers: N` | all | stacked layers (default 1); layer `l > 0` reads both directions' outputs of layer `l - 1` |
//! | `bidirectional: true \| false` | all | each layer also runs backwards in time (default `false`) |
//! | `batch_first: true \| false` | all | inputs and outputs are `(batch, time, features)` (default `false`: `(time, batch, features)`) |
//! | `bias: true \| false` | `rnn`, `lstm`, `gru` | whether the cell has biases (default `true`) |
//! | `bias_convention: two \| one` | `rnn`, `lstm`, `gru` | PyTorch's two biases `bias_ih` and `bias_hh` (default), or one (Keras, the chapter's counts) stored as `bias_ih`; refused with `bias: false` |
//! | `proj: N` (or `proj_size`) | `lstm` | project `h` to `N < hidden` features (default 0: none) |
//! | `reset: after \| before` | `gru` | PyTorch's form (default), or the reset gate applied before the matmul (Cho et al., the chapter) |
//! | `nonlinearity: tanh \| relu` | `rnn` | the activation (default `tanh`) |
//!
//! A `cell` refuses `bias`, `bias_convention`, `proj`, `reset` and `nonlinearity`: its biases,
//! projections, reset gates and activations are whatever its equations write, so those settings
//! would mean nothing.
//!
//! # Custom cells
//! - `x` is the step input: `input` features in the first layer, the previous layer's output
//!   (both directions') in the others. In sizes, `input` is that layer's input size.
//! - `param W: [hidden, input]` declares a matrix (PyTorch's `(out, in)` layout), `param b:
//!   [hidden]` a vector, `param a: []` a scalar (one number for every feature; a 0-dimensional
//!   tensor in the weights). `= v` (a number, possibly negative) starts every element at `v`
//!   (`param g: [4 * hidden] = 1`); without it the initialisation draws the parameter as PyTorch
//!   draws its own (uniform in `±1/√hidden`).
//! - `state c: dim` declares a recurrent state (`state h` is `state h: hidden`). Before the
//!   equation that assigns it, a state's name is its value from the previous step; after, the
//!   new value, which is carried to the next step. Every state must be assigned.
//! - `name = expr` names a value; equations run in order, so a name is used after the equation
//!   that assigns it (only states carry a value from the previous step).
//! - The step's output is the first state, or `output name` (a state or an assigned name), or
//!   `output y = expr`: a value that is not a state, of its own size, e.g. an output projection
//!   `output y = W_hy @ h + b_y`.
//! - Sizes (`dim`): whole numbers, `input`, `hidden` (or `h`), `+`, `*` and parentheses; `2h` is
//!   short for `2 * hidden` (one token, no space).
//!
//! # Expressions
//! - `+`, `-`, `*`, `/` and unary `-` are element-wise: equal shapes combine, a number or a
//!   one-feature value (a scalar parameter, a `mean`) combines with any vector or batch, and a vector with
//!   a batch of as many features (a bias on every row).
//! - `W @ v` is the matrix product of a `[o, i]` matrix and a batched value of `i` features (the
//!   input, a state or a value computed from them), giving `o` features on every row.
//! - Numbers (`1`, `0.5`, `1e-5`) are constants.
//! - `g[hidden .. 2 * hidden]` (or `g[h .. 2h]`) takes features `hidden` to `2·hidden - 1`;
//!   either bound may be left out (`g[.. hidden]`, `g[hidden ..]`), and `g[i]` takes feature `i`
//!   alone. `W[0 .. hidden, ..]` takes rows of a matrix (its columns are always all taken,
//!   written `..`). Bounds are sizes, like a parameter's dimensions.
//!
//! Functions (element-wise unless said):
//!
//! | function | value |
//! |---|---|
//! | `sigmoid(a)` | `1 / (1 + e^-a)` |
//! | `tanh(a)` | `tanh(a)` |
//! | `relu(a)` | `max(a, 0)` |
//! | `exp(a)` | `e^a` |
//! | `log(a)` | the natural logarithm |
//! | `sqrt(a)` | the square root |
//! | `softplus(a)` | `ln(1 + e^a)` (`a` itself above 20, as PyTorch) |
//! | `abs(a)` | `\|a\|` |
//! | `min(a, c)`, `max(a, c)` | against a constant number `c` (`max(a, -1)`) |
//! | `mean(a)`, `sum(a)` | the mean or sum over the feature axis of each row, broadcast back over it (`a - mean(a)`) |
//! | `concat(a, b, ...)` | the arguments joined along the feature axis |
//!
//! ```text
//! lstm Encoder { input: 128, hidden: 256, layers: 2, bidirectional: true }
//! cell Elman { input: 4, hidden: 8,
//!     param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b: [hidden],
//!     param W_hy: [3, hidden], param b_y: [3],
//!     state h,
//!     h = tanh(W_hh @ h + W_xh @ x + b),
//!     output y = W_hy @ h + b_y }
//! ```
//!
//! # Errors
//! Every mistake is reported at once, in source order, each at its token with what was
//! expected: the parser resynchronises at the next `,` or `;` (or the next item, when a
//! separator is missing), and inside brackets and parentheses at the next `,`. A mistake is
//! reported once: a parameter whose shape is wrong, or an equation that fails, leaves its name
//! declared but without a value, and its uses are not reported again. Misspelt kinds,
//! keywords, settings, setting values, sizes, functions and names get a "did you mean"
//! ([`suggest`]). A `.rnn` file whose brackets do not nest is reported at the bracket never
//! closed, or at the one that closes nothing, rather than with the tokenizer's error.
//!
//! Names and functions are checked here (by [`lower`](crate::lower)'s `check_names`, which
//! lowering runs too); shapes and sizes are checked by lowering, which reports every
//! independent mistake at once as well.
//!
//! The spec keeps no spans: each token's span becomes a [`Loc`] (line and column) as the spec is
//! built, and [`span_at`] finds the token again, for a macro to point at a mistake lowering found.

use crate::error::{Diagnostic, Error, suggest};
use crate::spec::{
    Attention, BiasConvention, BinOp, CellKind, CustomCell, CustomParam, Dim, Expr, GruReset, Loc,
    ModelSpec, Placement, Range, Score,
};
use proc_macro2::{Delimiter, Group, Span, TokenStream, TokenTree};
use std::cell::Cell;
use std::rc::Rc;
use std::str::FromStr;

/// Units of an additive attention declared without `attention_units` (as `rnnc train`'s).
pub const DEFAULT_ATTENTION_UNITS: usize = 64;

/// The kinds of model.
const KINDS: [&str; 4] = ["rnn", "lstm", "gru", "cell"];

/// The keywords that start an item of a `cell`.
pub(crate) const KEYWORDS: [&str; 3] = ["param", "state", "output"];

/// The settings `kind` takes (`proj_size` is also accepted for `proj`).
fn settings_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "lstm" => &[
            "input",
            "hidden",
            "layers",
            "bidirectional",
            "bias",
            "batch_first",
            "bias_convention",
            "proj",
            "vocab",
            "head",
            "attention",
            "attention_units",
            "attention_placement",
        ],
        "gru" => &[
            "input",
            "hidden",
            "layers",
            "bidirectional",
            "bias",
            "batch_first",
            "bias_convention",
            "reset",
            "vocab",
            "head",
            "attention",
            "attention_units",
            "attention_placement",
        ],
        "rnn" => &[
            "input",
            "hidden",
            "layers",
            "bidirectional",
            "bias",
            "batch_first",
            "bias_convention",
            "nonlinearity",
            "vocab",
            "head",
            "attention",
            "attention_units",
            "attention_placement",
        ],
        _ => &[
            "input",
            "hidden",
            "layers",
            "bidirectional",
            "batch_first",
            "vocab",
            "head",
            "attention",
            "attention_units",
            "attention_placement",
        ],
    }
}

/// Whether `key` is a setting of `kind`.
fn is_setting(kind: &str, key: &str) -> bool {
    settings_of(kind).contains(&key) || (kind == "lstm" && key == "proj_size")
}

/// `": did you mean `s`?"` when one of `candidates` is close to `word`, else nothing.
fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    suggest(word, candidates).map_or_else(String::new, |s| format!(": did you mean `{s}`?"))
}

/// Parses a model declaration from source text (a `.rnn` file).
pub fn parse_str(source: &str) -> Result<ModelSpec, Error> {
    let tokens = TokenStream::from_str(source).map_err(|e| {
        // Brackets that do not nest are what usually stops the tokenizer: say which one.
        let found = delimiter_errors(source);
        if !found.is_empty() {
            return Error::Parse(found);
        }
        let start = e.span().start();
        let at = source
            .lines()
            .nth(start.line.wrapping_sub(1))
            .and_then(|l| l.chars().nth(start.column))
            .map_or_else(String::new, |c| format!(" at `{c}`"));
        Error::Parse(vec![Diagnostic {
            message: format!("cannot tokenize the declaration{at}: {e}"),
            line: start.line,
            column: start.column + 1,
            span: Some(e.span()),
        }])
    })?;
    parse_model(tokens)
}

/// The brackets of `source` that do not nest (a `{` never closed, a `)` that closes nothing),
/// and a comment or string never closed (which would hide the brackets after it), in source
/// order. Empty when there are none.
///
/// Comments, strings and character literals are skipped as Rust's tokenizer skips them. A
/// closer that does not match the innermost open bracket but an outer one closes that one, and
/// the brackets between are the ones never closed (`{ h = tanh(x }`: the `(`).
fn delimiter_errors(source: &str) -> Vec<Diagnostic> {
    let chars: Vec<char> = source.chars().collect();
    // The 1-based line and column of every character.
    let mut at = Vec::with_capacity(chars.len());
    let (mut line, mut column) = (1, 1);
    for &c in &chars {
        at.push((line, column));
        if c == '\n' {
            (line, column) = (line + 1, 1);
        } else {
            column += 1;
        }
    }
    let report = |i: usize, message: String| Diagnostic {
        message,
        line: at[i].0,
        column: at[i].1,
        span: None,
    };
    let place = |i: usize| format!("{}:{}", at[i].0, at[i].1);
    let get = |i: usize| chars.get(i).copied();
    let ident_char = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let closer = |c: char| match c {
        '(' => ')',
        '[' => ']',
        _ => '}',
    };
    let mut errors = Vec::new();
    let mut open: Vec<(char, usize)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '/' if get(i + 1) == Some('/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if get(i + 1) == Some('*') => {
                let start = i;
                let mut depth = 0;
                loop {
                    match (get(i), get(i + 1)) {
                        (None, _) => {
                            errors.push(report(start, "this `/*` comment is never closed".into()));
                            return errors;
                        }
                        (Some('/'), Some('*')) => (depth, i) = (depth + 1, i + 2),
                        (Some('*'), Some('/')) => (depth, i) = (depth - 1, i + 2),
                        _ => i += 1,
                    }
                    if depth == 0 {
                        break;
                    }
                }
            }
            '"' | 'r' => {
                // A string `"..."`, or a raw string `r"..."`, `r#"..."#` (`b` prefixes are
                // identifier characters before them).
                let hashes = if c == 'r' {
                    let before = if get(i.wrapping_sub(1)) == Some('b') {
                        i.checked_sub(2).and_then(get)
                    } else {
                        i.checked_sub(1).and_then(get)
                    };
                    let n = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
                    if ident_char(before) || get(i + 1 + n) != Some('"') {
                        i += 1;
                        continue;
                    }
                    Some(n)
                } else {
                    None
                };
                let start = i;
                i += hashes.map_or(1, |n| n + 2);
                loop {
                    match get(i) {
                        None => {
                            errors.push(report(start, "this string is never closed".into()));
                            return errors;
                        }
                        Some('\\') if hashes.is_none() => i += 2,
                        Some('"') => {
                            let n = hashes.unwrap_or(0);
                            if (1..=n).all(|k| get(i + k) == Some('#')) {
                                i += n + 1;
                                break;
                            }
                            i += 1;
                        }
                        _ => i += 1,
                    }
                }
                continue;
            }
            '\'' => {
                // A character literal ('{', '\''), else a lifetime or a stray quote.
                if get(i + 1) == Some('\\') {
                    if let Some(end) =
                        (i + 3..(i + 12).min(chars.len())).find(|&k| chars[k] == '\'')
                    {
                        i = end;
                    }
                } else if get(i + 2) == Some('\'') {
                    i += 2;
                }
            }
            '(' | '[' | '{' => open.push((c, i)),
            ')' | ']' | '}' => match open.iter().rposition(|&(o, _)| closer(o) == c) {
                Some(k) => {
                    for &(o, j) in &open[k + 1..] {
                        errors.push(report(
                            j,
                            format!(
                                "this `{o}` is never closed: a `{}` is missing before the `{c}` at {}",
                                closer(o),
                                place(i)
                            ),
                        ));
                    }
                    open.truncate(k);
                }
                None => {
                    let opener = match c {
                        ')' => '(',
                        ']' => '[',
                        _ => '{',
                    };
                    errors.push(report(
                        i,
                        format!("unexpected `{c}`: there is no `{opener}` open for it to close"),
                    ));
                }
            },
            _ => {}
        }
        i += 1;
    }
    for &(o, j) in &open {
        errors.push(report(
            j,
            format!(
                "this `{o}` is never closed: a `{}` is missing at the end",
                closer(o)
            ),
        ));
    }
    errors.sort_by_key(|d| (d.line, d.column));
    errors
}

/// Parses `kind [Name] { items }`.
pub fn parse_model(tokens: TokenStream) -> Result<ModelSpec, Error> {
    let mut p = Parser::new(tokens, Span::call_site());
    let spec = p.model();
    p.finish(spec)
}

/// Parses the braced body of a declaration whose kind (`rnn`, `lstm`, `gru`, `cell`) and name
/// the caller has already read (the macros read `pub struct Name` themselves).
///
/// What the body lacks as a whole (a size, a state) is reported at `kind_span` (the macros pass
/// the model's name), and what it lacks at its end (a value after `hidden:`) at `end_span`, the
/// body's `}`.
pub fn parse_body(
    kind: &str,
    kind_span: Span,
    name: Option<String>,
    body: TokenStream,
    end_span: Span,
) -> Result<ModelSpec, Error> {
    let mut p = Parser::new(body, end_span);
    let spec = p.body(kind, kind_span, name);
    p.finish(spec)
}

/// The span of the token that starts at `loc` in `tokens`, looking inside groups; `None` when no
/// token starts there (or `loc` is unknown).
///
/// This is how a macro puts a lowering error's caret on the user's token: lowering reports only a
/// [`Loc`] (see [`Diagnostic::loc`]), and `tokens` are the ones the spec was parsed from.
pub fn span_at(tokens: &TokenStream, loc: Loc) -> Option<Span> {
    if !loc.is_known() {
        return None;
    }
    tokens.clone().into_iter().find_map(|t| {
        if loc_of(t.span()) == loc {
            return Some(t.span());
        }
        match t {
            TokenTree::Group(g) => span_at(&g.stream(), loc),
            _ => None,
        }
    })
}

/// Where `span` starts, as recorded in the spec (unknown when the span has no location).
fn loc_of(span: Span) -> Loc {
    let start = span.start();
    if start.line == 0 {
        return Loc::UNKNOWN;
    }
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Loc::new(clamp(start.line), clamp(start.column + 1))
}

/// The float32 a number literal stands for, or why it stands for none: it is not a number, or
/// float32 cannot hold it (too large, or so small that it would silently become 0).
fn float_literal(text: &str) -> Result<f32, String> {
    let Ok(wide) = text.parse::<f64>() else {
        return Err(format!("expected a number, found `{text}`"));
    };
    let n = wide as f32;
    if !n.is_finite() {
        return Err(format!(
            "`{text}` is out of float32's range (largest magnitude {:e})",
            f32::MAX
        ));
    }
    if n == 0.0 && wide != 0.0 {
        return Err(format!(
            "`{text}` is too small for float32: it would be 0 (smallest magnitude {:e})",
            f32::from_bits(1)
        ));
    }
    Ok(n)
}

fn diag(span: Span, message: impl Into<String>) -> Diagnostic {
    let start = span.start();
    Diagnostic {
        message: message.into(),
        line: start.line,
        column: start.column + 1,
        span: Some(span),
    }
}

struct Parser {
    tokens: Vec<TokenTree>,
    pos: usize,
    end_span: Span,
    errors: Vec<Diagnostic>,
    /// Whether a group inside the expression being read had a mistake: the expression is read
    /// on past it (its mistakes after the group are reported too) but is not used.
    damaged: bool,
    /// The delimiter that closes the tokens, for a parser of a group's contents.
    close: Option<char>,
    /// How many groups this parser's tokens sit inside.
    depth: usize,
    /// The nodes the equation being read may still make, shared with the parsers of its
    /// groups: an expression tree is walked recursively (checked, lowered, dropped), so its size
    /// is bounded.
    budget: Rc<Cell<usize>>,
}

/// The most nodes (names, numbers, operators, calls, slices) one equation may have.
pub const MAX_EXPRESSION_NODES: usize = 1000;
/// The deepest groups (`(..)`, `[..]`) may nest in a declaration.
pub const MAX_NESTING: usize = 64;

type PResult<T> = Result<T, ()>;

impl Parser {
    fn new(tokens: TokenStream, end_span: Span) -> Self {
        Parser {
            tokens: tokens.into_iter().collect(),
            pos: 0,
            end_span,
            errors: Vec::new(),
            damaged: false,
            close: None,
            depth: 0,
            budget: Rc::new(Cell::new(MAX_EXPRESSION_NODES)),
        }
    }

    /// Counts one node of the expression being read, or fails once it has too many.
    fn node(&mut self, span: Span) -> PResult<()> {
        match self.budget.get() {
            0 => {
                self.budget.set(usize::MAX); // one report per equation
                self.error(
                    span,
                    format!("this equation is too long: more than {MAX_EXPRESSION_NODES} names, numbers and operations; split it into several equations"),
                )
            }
            usize::MAX => Err(()),
            n => {
                self.budget.set(n - 1);
                Ok(())
            }
        }
    }

    fn finish(mut self, spec: Option<ModelSpec>) -> Result<ModelSpec, Error> {
        match spec {
            Some(spec) if self.errors.is_empty() => Ok(spec),
            _ => {
                // In source order, as a reader goes through them.
                self.errors.sort_by_key(|d| (d.line, d.column));
                Err(Error::Parse(self.errors))
            }
        }
    }

    fn peek(&self) -> Option<&TokenTree> {
        self.tokens.get(self.pos)
    }

    fn span(&self) -> Span {
        self.peek().map_or(self.end_span, |t| t.span())
    }

    fn error<T>(&mut self, span: Span, message: impl Into<String>) -> PResult<T> {
        self.errors.push(diag(span, message));
        Err(())
    }

    fn describe(&self) -> String {
        match self.peek() {
            None => match self.close {
                Some(c) => format!("`{c}`"),
                None => "the end of the declaration".into(),
            },
            Some(t) => format!("`{t}`"),
        }
    }

    fn is_punct(&self, c: char) -> bool {
        matches!(self.peek(), Some(TokenTree::Punct(p)) if p.as_char() == c)
    }

    fn eat_punct(&mut self, c: char) -> bool {
        let hit = self.is_punct(c);
        if hit {
            self.pos += 1;
        }
        hit
    }

    fn require_punct(&mut self, c: char, context: &str) -> PResult<()> {
        if self.eat_punct(c) {
            return Ok(());
        }
        let found = self.describe();
        self.error(
            self.span(),
            format!("expected `{c}` {context}, found {found}"),
        )
    }

    fn ident(&mut self, what: &str) -> PResult<(String, Span)> {
        if let Some(TokenTree::Ident(i)) = self.peek() {
            let r = (i.to_string(), i.span());
            self.pos += 1;
            return Ok(r);
        }
        let found = self.describe();
        self.error(self.span(), format!("expected {what}, found {found}"))
    }

    fn group(&mut self, delim: Delimiter, what: &str) -> PResult<Group> {
        if let Some(TokenTree::Group(g)) = self.peek()
            && g.delimiter() == delim
        {
            let g = g.clone();
            self.pos += 1;
            return Ok(g);
        }
        let found = self.describe();
        self.error(self.span(), format!("expected {what}, found {found}"))
    }

    /// Whether the next tokens start an item: `name =`, `name :`, or a keyword and a name
    /// (`param W`). Where a mistake leaves the parser, the next item is where it goes on.
    fn at_item_start(&self) -> bool {
        let Some(TokenTree::Ident(word)) = self.peek() else {
            return false;
        };
        match self.tokens.get(self.pos + 1) {
            Some(TokenTree::Punct(p)) => matches!(p.as_char(), '=' | ':'),
            Some(TokenTree::Ident(_)) => KEYWORDS.iter().any(|k| word == k),
            _ => false,
        }
    }

    /// Skips to the next `,` or `;` between items, or the next item, whichever comes first.
    fn skip_to_item(&mut self) {
        while self.peek().is_some()
            && !self.is_punct(',')
            && !self.is_punct(';')
            && !self.at_item_start()
        {
            self.pos += 1;
        }
    }

    /// Skips the rest of an item, to the next `,` or `;`.
    fn skip_item(&mut self) {
        while self.peek().is_some() && !self.is_punct(',') && !self.is_punct(';') {
            self.pos += 1;
        }
    }

    /// Parses the contents of `group` (`[...]`, `(...)`) with `f` on a parser of its own. The
    /// inner parser's diagnostics always join this one's, whatever `f` returns, and tokens `f`
    /// leaves unread are an error: nothing inside a group is dropped silently.
    fn nested<T>(
        &mut self,
        group: &Group,
        f: impl FnOnce(&mut Parser) -> PResult<T>,
    ) -> PResult<T> {
        let close = match group.delimiter() {
            Delimiter::Parenthesis => ')',
            Delimiter::Bracket => ']',
            Delimiter::Brace => '}',
            Delimiter::None => ' ',
        };
        let mut inner = Parser::new(group.stream(), group.span_close());
        inner.close = Some(close);
        inner.depth = self.depth + 1;
        inner.budget = self.budget.clone();
        if inner.depth > MAX_NESTING {
            return self.error(
                group.span_open(),
                format!("groups nest more than {MAX_NESTING} deep here"),
            );
        }
        let result = f(&mut inner);
        if result.is_ok()
            && let Some(t) = inner.peek()
        {
            let (span, found) = (t.span(), t.to_string());
            let _ = inner.error::<()>(span, format!("unexpected `{found}` before `{close}`"));
        }
        let failed = !inner.errors.is_empty();
        self.errors.append(&mut inner.errors);
        if failed { Err(()) } else { result }
    }

    /// The comma-separated elements of a group's contents (all of self's tokens), each parsed
    /// by `f`. A mistake in one element is reported, and the next is parsed after the next `,`:
    /// every mistake inside the group is reported, not only the first.
    fn list<T>(
        &mut self,
        between: &str,
        mut f: impl FnMut(&mut Parser) -> PResult<T>,
    ) -> PResult<Vec<T>> {
        let mut items = Vec::new();
        let mut failed = false;
        while self.peek().is_some() {
            match f(self) {
                Ok(t) => items.push(t),
                Err(()) => {
                    failed = true;
                    while self.peek().is_some() && !self.is_punct(',') {
                        self.pos += 1;
                    }
                }
            }
            if self.peek().is_some() && self.require_punct(',', between).is_err() {
                failed = true;
                while self.peek().is_some() && !self.eat_punct(',') {
                    self.pos += 1;
                }
            }
        }
        if failed { Err(()) } else { Ok(items) }
    }

    fn model(&mut self) -> Option<ModelSpec> {
        let (word, kind_span) = self
            .ident("a model kind: `rnn`, `lstm`, `gru` or `cell`")
            .ok()?;
        let kind = if KINDS.contains(&word.as_str()) {
            word
        } else {
            // A misspelt kind is reported, and the body is read as the kind meant, so that its
            // own mistakes are reported too.
            let meant = suggest(&word, KINDS);
            let hint = meant.map_or_else(String::new, |k| format!("did you mean `{k}`? "));
            let _ = self.error::<()>(
                kind_span,
                format!(
                    "unknown model kind `{word}`: {hint}expected `rnn`, `lstm`, `gru` or `cell`"
                ),
            );
            meant?.to_string()
        };
        let name = match self.peek() {
            Some(TokenTree::Ident(_)) => Some(self.ident("a name").ok()?.0),
            _ => None,
        };
        let body = self
            .group(Delimiter::Brace, "`{` opening the declaration's body")
            .ok()?;
        if let Some(t) = self.peek() {
            let span = t.span();
            let _ = self.error::<()>(span, "unexpected tokens after the declaration's `}`");
        }
        let mut inner = Parser::new(body.stream(), body.span_close());
        let spec = inner.body(&kind, kind_span, name);
        self.errors.append(&mut inner.errors);
        spec
    }

    /// Parses the items of a body (self holds the body's tokens).
    fn body(&mut self, kind: &str, kind_span: Span, name: Option<String>) -> Option<ModelSpec> {
        let mut b = BodyBuilder::default();
        while self.peek().is_some() {
            if self.item(kind, &mut b).is_err() {
                // Go on at the next separator or item, so that later mistakes are reported too.
                let failed_at = self.pos;
                self.skip_to_item();
                if self.pos == failed_at && self.at_item_start() {
                    // The item stopped short at the next one (`h = W @` then `a = h`): that
                    // is its mistake, reported already, not a missing separator.
                    continue;
                }
            }
            if self.peek().is_none() || self.eat_punct(',') || self.eat_punct(';') {
                continue;
            }
            let found = self.describe();
            let _ = self.error::<()>(
                self.span(),
                format!("expected `,` or `;` between items, found {found}"),
            );
            if !self.at_item_start() {
                self.skip_to_item();
                let _ = self.eat_punct(',') || self.eat_punct(';');
            }
        }
        self.build(kind, kind_span, name, b)
    }

    fn item(&mut self, kind: &str, b: &mut BodyBuilder) -> PResult<()> {
        let Ok((mut word, span)) = self.ident(
            "a setting (`hidden: 256`), or in a `cell` a `param`, `state`, `output` or equation",
        ) else {
            b.doubtful = true;
            return Err(());
        };
        // `parm W: [..]`: a keyword misspelt, followed by the name it declares.
        if !KEYWORDS.contains(&word.as_str())
            && matches!(self.peek(), Some(TokenTree::Ident(_)))
            && let Some(meant) = suggest(&word, KEYWORDS)
        {
            let _ = self.error::<()>(
                span,
                format!("unknown keyword `{word}`: did you mean `{meant}`?"),
            );
            if kind != "cell" {
                self.skip_item();
                return Err(());
            }
            // Read the item as what was meant, so that its name is declared: its uses are
            // then not reported as unknown.
            word = meant.to_string();
        }
        let custom_only = |p: &mut Parser, what: &str| {
            if kind != "cell" {
                // The rest of the item is not read: its name is not the next item.
                p.skip_item();
                return p.error(
                    span,
                    format!("{what} are only allowed in `cell` declarations; `{kind}` is a standard cell"),
                );
            }
            Ok(())
        };
        match word.as_str() {
            "param" if matches!(self.peek(), Some(TokenTree::Ident(_))) => {
                custom_only(self, "parameters")?;
                let (name, nspan) = self.ident("a parameter name")?;
                let r = self.param(name.clone(), nspan, b);
                if r.is_err() {
                    b.broken.push(name);
                }
                r
            }
            "state" if matches!(self.peek(), Some(TokenTree::Ident(_))) => {
                custom_only(self, "states")?;
                let (name, nspan) = self.ident("a state name")?;
                let dim = if self.eat_punct(':') {
                    match self.dim() {
                        Ok(d) => d,
                        Err(()) => {
                            b.broken.push(name);
                            b.broken_state = true;
                            return Err(());
                        }
                    }
                } else {
                    Dim::Hidden
                };
                if b.states.iter().any(|s| s.0 == name) {
                    return self.error(nspan, format!("state `{name}` is declared twice"));
                }
                b.states.push((name, dim, nspan));
                Ok(())
            }
            "output" if matches!(self.peek(), Some(TokenTree::Ident(_))) => {
                custom_only(self, "`output` declarations")?;
                let (name, nspan) = self.ident("the name of the output")?;
                let twice = b.output.is_some();
                if twice {
                    let _ = self.error::<()>(nspan, "`output` is given twice");
                } else {
                    b.output = Some((name.clone(), nspan));
                }
                let r = if self.eat_punct('=') {
                    b.output_equation = true;
                    self.equation(name, nspan, b)
                } else {
                    Ok(())
                };
                if twice { Err(()) } else { r }
            }
            _ if self.is_punct('=') => {
                custom_only(self, "equations")?;
                self.pos += 1;
                self.equation(word, span, b)
            }
            _ if self.is_punct(':') => {
                self.pos += 1;
                let value = match self.peek() {
                    Some(TokenTree::Literal(l)) => (l.to_string(), l.span()),
                    Some(TokenTree::Ident(i)) => (i.to_string(), i.span()),
                    _ => {
                        b.doubtful = true;
                        let found = self.describe();
                        return self.error(
                            self.span(),
                            format!("expected a value for `{word}`, found {found}"),
                        );
                    }
                };
                self.pos += 1;
                if let Some((_, first, _, _)) = b.settings.iter().find(|s| s.0 == word) {
                    return self.error(
                        span,
                        format!("`{word}` is given twice (`{word}: {first}` above): keep one"),
                    );
                }
                b.settings.push((word, value.0, value.1, span));
                Ok(())
            }
            _ => {
                b.doubtful = true;
                let found = self.describe();
                self.error(
                    self.span(),
                    format!("expected `:` after the setting `{word}` (or `=` for an equation), found {found}"),
                )
            }
        }
    }

    /// The rest of `param name`: `: [dims]`, then `= value` if given.
    fn param(&mut self, name: String, nspan: Span, b: &mut BodyBuilder) -> PResult<()> {
        self.require_punct(':', "after the parameter name")?;
        let dims = self.group(
            Delimiter::Bracket,
            "`[` starting the parameter's shape, e.g. `[hidden, input]`",
        )?;
        let dspan = dims.span();
        let shape = self.nested(&dims, |p| p.list("between dimensions", Parser::dim));
        // The initial value is read even after a bad shape, to go on after it.
        let init = if self.eat_punct('=') {
            Some(self.number("the parameter's initial value")?)
        } else {
            None
        };
        let shape = shape?;
        if shape.len() > 2 {
            return self.error(
                dspan,
                "a parameter has no dimension (a scalar, `[]`), one (a vector) or two (a matrix `[out, in]`)",
            );
        }
        if b.params.iter().any(|p| p.name == name) {
            return self.error(nspan, format!("parameter `{name}` is declared twice"));
        }
        b.params.push(CustomParam {
            name,
            dims: shape,
            init,
            loc: loc_of(nspan),
        });
        Ok(())
    }

    /// The expression of `target = expr`. The equation is recorded even when its expression
    /// does not parse, so that its target counts as assigned: its uses and its state are not
    /// reported again.
    fn equation(&mut self, target: String, span: Span, b: &mut BodyBuilder) -> PResult<()> {
        self.damaged = false;
        self.budget.set(MAX_EXPRESSION_NODES);
        let e = self.expr().ok().filter(|_| !self.damaged);
        let ok = e.is_some();
        b.equations.push((target, e, span));
        if ok { Ok(()) } else { Err(()) }
    }

    fn dim(&mut self) -> PResult<Dim> {
        let mut d = self.dterm()?;
        while self.eat_punct('+') {
            d = Dim::Add(Box::new(d), Box::new(self.dterm()?));
        }
        Ok(d)
    }

    fn dterm(&mut self) -> PResult<Dim> {
        let mut d = self.datom()?;
        while self.eat_punct('*') {
            d = Dim::Mul(Box::new(d), Box::new(self.datom()?));
        }
        Ok(d)
    }

    fn datom(&mut self) -> PResult<Dim> {
        match self.peek().cloned() {
            Some(TokenTree::Literal(l)) => {
                self.pos += 1;
                let text = l.to_string();
                // `2h` is short for `2 * hidden`.
                let hidden_multiple = text.strip_suffix('h').and_then(|n| n.parse::<usize>().ok());
                match (text.parse::<usize>(), hidden_multiple) {
                    (Ok(n), _) => Ok(Dim::Lit(n)),
                    (_, Some(n)) => Ok(Dim::Mul(Box::new(Dim::Lit(n)), Box::new(Dim::Hidden))),
                    _ => self.error(
                        l.span(),
                        format!("expected a whole number as a size, found `{l}`"),
                    ),
                }
            }
            Some(TokenTree::Ident(i)) if i == "input" => {
                self.pos += 1;
                Ok(Dim::Input)
            }
            Some(TokenTree::Ident(i)) if i == "hidden" || i == "h" => {
                self.pos += 1;
                Ok(Dim::Hidden)
            }
            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Parenthesis => {
                self.pos += 1;
                self.nested(&g, Parser::dim)
            }
            t => {
                let found = self.describe();
                let hint = match t {
                    Some(TokenTree::Ident(i)) => did_you_mean(&i.to_string(), ["input", "hidden"]),
                    _ => String::new(),
                };
                self.error(
                    self.span(),
                    format!("expected a size: a number, `input` or `hidden`, found {found}{hint}"),
                )
            }
        }
    }

    fn expr(&mut self) -> PResult<Expr> {
        let mut e = self.term()?;
        loop {
            let span = self.span();
            let op = if self.eat_punct('+') {
                BinOp::Add
            } else if self.eat_punct('-') {
                BinOp::Sub
            } else {
                return Ok(e);
            };
            self.node(span)?;
            let rhs = self.term()?;
            e = Expr::Binary(op, Box::new(e), Box::new(rhs), loc_of(span));
        }
    }

    fn term(&mut self) -> PResult<Expr> {
        let mut e = self.unary()?;
        loop {
            let span = self.span();
            let op = if self.eat_punct('*') {
                BinOp::Mul
            } else if self.eat_punct('@') {
                BinOp::MatMul
            } else if self.eat_punct('/') {
                BinOp::Div
            } else {
                return Ok(e);
            };
            self.node(span)?;
            let rhs = self.unary()?;
            e = Expr::Binary(op, Box::new(e), Box::new(rhs), loc_of(span));
        }
    }

    fn unary(&mut self) -> PResult<Expr> {
        let span = self.span();
        if self.eat_punct('-') {
            self.node(span)?;
            return Ok(Expr::Neg(Box::new(self.unary()?), loc_of(span)));
        }
        self.postfix()
    }

    /// An atom followed by any number of slices: `g[hidden .. 2 * hidden]`, `W[0 .. hidden, ..]`.
    fn postfix(&mut self) -> PResult<Expr> {
        let span = self.span();
        self.node(span)?;
        let mut e = self.atom()?;
        while let Some(TokenTree::Group(g)) = self.peek().cloned()
            && g.delimiter() == Delimiter::Bracket
        {
            self.pos += 1;
            self.node(g.span())?;
            let ranges = self.nested(&g, |p| p.list("between the axes of a slice", Parser::range));
            let Ok(ranges) = ranges else {
                // Reported; the expression goes on after the `]`.
                self.damaged = true;
                continue;
            };
            if ranges.is_empty() || ranges.len() > 2 {
                return self.error(
                    g.span(),
                    "a slice takes one range (`g[hidden .. 2 * hidden]`) or, for a matrix, two (`W[0 .. hidden, ..]`)",
                );
            }
            e = Expr::Index(Box::new(e), ranges, loc_of(g.span()));
        }
        Ok(e)
    }

    /// `a .. b`, `a ..`, `.. b`, `..` or a single index `i`.
    fn range(&mut self) -> PResult<Range> {
        let dots = |p: &mut Parser| {
            let two = matches!(p.tokens.get(p.pos..p.pos + 2), Some([TokenTree::Punct(a), TokenTree::Punct(b)]) if a.as_char() == '.' && b.as_char() == '.');
            if two {
                p.pos += 2;
            }
            two
        };
        let ends = |p: &Parser| p.peek().is_none() || p.is_punct(',');
        if dots(self) {
            let end = if ends(self) { None } else { Some(self.dim()?) };
            return Ok(Range {
                start: None,
                end,
                single: false,
            });
        }
        let start = self.dim()?;
        if dots(self) {
            let end = if ends(self) { None } else { Some(self.dim()?) };
            return Ok(Range {
                start: Some(start),
                end,
                single: false,
            });
        }
        if self.is_punct('.') {
            let found = self.describe();
            return self.error(
                self.span(),
                format!("expected `..` in a range, found {found}"),
            );
        }
        Ok(Range {
            start: Some(start),
            end: None,
            single: true,
        })
    }

    /// A number, possibly negative (a parameter's initial value).
    fn number(&mut self, what: &str) -> PResult<f32> {
        let negative = self.eat_punct('-');
        match self.peek().cloned() {
            Some(TokenTree::Literal(l)) => {
                self.pos += 1;
                match float_literal(&l.to_string()) {
                    Ok(n) => Ok(if negative { -n } else { n }),
                    Err(why) => self.error(l.span(), format!("{why} as {what}")),
                }
            }
            _ => {
                let found = self.describe();
                self.error(
                    self.span(),
                    format!("expected a number as {what}, found {found}"),
                )
            }
        }
    }

    fn atom(&mut self) -> PResult<Expr> {
        match self.peek().cloned() {
            Some(TokenTree::Literal(l)) => {
                self.pos += 1;
                match float_literal(&l.to_string()) {
                    Ok(n) => Ok(Expr::Num(n, loc_of(l.span()))),
                    Err(why) => self.error(l.span(), why),
                }
            }
            // `h = W @` then `b = ...` on the next line: the expression is unfinished, and the
            // next item is left for the body to read.
            Some(TokenTree::Ident(i)) if self.at_item_start() => self.error(
                i.span(),
                format!("expected an expression, found the start of the next item `{i}`"),
            ),
            Some(TokenTree::Ident(i)) => {
                self.pos += 1;
                let name = i.to_string();
                if let Some(TokenTree::Group(g)) = self.peek().cloned()
                    && g.delimiter() == Delimiter::Parenthesis
                {
                    self.pos += 1;
                    let args = self.nested(&g, |p| p.list("between arguments", Parser::expr));
                    // A mistake inside is reported; the expression goes on after the `)`.
                    self.damaged |= args.is_err();
                    let args = args.unwrap_or_default();
                    return Ok(Expr::Call(name, args, loc_of(i.span())));
                }
                Ok(Expr::Var(name, loc_of(i.span())))
            }
            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Parenthesis => {
                self.pos += 1;
                let e = self.nested(&g, Parser::expr);
                // A mistake inside is reported; the expression goes on after the `)`.
                self.damaged |= e.is_err();
                Ok(e.unwrap_or(Expr::Num(0.0, loc_of(g.span()))))
            }
            _ => {
                let found = self.describe();
                self.error(
                    self.span(),
                    format!(
                        "expected an expression: a name, a number, a call or `(`, found {found}"
                    ),
                )
            }
        }
    }

    fn build(
        &mut self,
        kind: &str,
        kind_span: Span,
        name: Option<String>,
        b: BodyBuilder,
    ) -> Option<ModelSpec> {
        let mut cell = match kind {
            "rnn" => CellKind::RnnTanh,
            "lstm" => CellKind::Lstm,
            "gru" => CellKind::Gru,
            _ => CellKind::Custom(CustomCell {
                params: Vec::new(),
                states: Vec::new(),
                equations: Vec::new(),
                output: (String::new(), loc_of(kind_span)),
            }),
        };
        let mut spec = ModelSpec::new(cell.clone(), 0, 0);
        // The attention's units and placement refine its score, wherever they are written.
        let refines = |key: &str| matches!(key, "attention_units" | "attention_placement");
        let (first, then): (Vec<_>, Vec<_>) = b.settings.iter().partition(|s| !refines(&s.0));
        for (key, value, vspan, kspan) in first.into_iter().chain(then) {
            let _ = self.setting(kind, &mut spec, &mut cell, key, value, *vspan, *kspan);
        }
        if let Some(s) = b
            .settings
            .iter()
            .find(|s| s.0 == "proj" || s.0 == "proj_size")
            && spec.hidden_size > 0
            && spec.proj_size >= spec.hidden_size
        {
            let _ = self.error::<()>(
                s.2,
                format!(
                    "`{}` must be smaller than `hidden` ({}), found {}",
                    s.0, spec.hidden_size, spec.proj_size
                ),
            );
        }
        if !spec.bias
            && let Some(s) = b.settings.iter().find(|s| s.0 == "bias_convention")
        {
            let _ = self.error::<()>(
                s.3,
                "`bias_convention` means nothing with `bias: false`: there are no biases to count; leave one of the two out",
            );
        }
        // A size given with a bad value has its own error already. A missing one is often a
        // misspelt one (`hiden: 4`), or in an item that did not parse: reported only when no
        // such item exists.
        let doubtful = b.doubtful
            || b.settings
                .iter()
                .any(|s| !KINDS.iter().any(|k| is_setting(k, &s.0)));
        for (size, what) in [
            ("input", "the number of input features"),
            ("hidden", "the number of hidden features"),
        ] {
            if !doubtful && !b.settings.iter().any(|s| s.0 == size) {
                let _ = self.error::<()>(kind_span, format!("`{kind}` needs `{size}: N`, {what}"));
            }
        }
        if let CellKind::Custom(c) = &mut cell {
            if b.states.is_empty() && !b.broken_state {
                let _ = self.error::<()>(
                    kind_span,
                    "a `cell` needs at least one `state`, e.g. `state h`",
                );
            }
            if b.equations.is_empty() {
                let _ = self.error::<()>(
                    kind_span,
                    "a `cell` needs equations, e.g. `h = tanh(W @ x + U @ h + b)`",
                );
            }
            for (state, _, sspan) in &b.states {
                if !b.equations.iter().any(|e| e.0 == *state) {
                    let _ = self.error::<()>(
                        *sspan,
                        format!(
                            "state `{state}` is never assigned: add an equation `{state} = ...`"
                        ),
                    );
                }
            }
            self.check_names(&b);
            c.output = match b.output {
                Some((o, ospan)) => {
                    let known = b.states.iter().any(|s| s.0 == o)
                        || b.equations.iter().any(|e| e.0 == o)
                        || b.broken.contains(&o);
                    if !known {
                        let names = b.states.iter().map(|s| s.0.as_str());
                        let names = names.chain(b.equations.iter().map(|e| e.0.as_str()));
                        let message = match suggest(&o, names) {
                            Some(s) => format!("`output {o}` names nothing: did you mean `{s}`?"),
                            None => format!(
                                "`output {o}`: the output must be a declared state or a name an equation assigns (`output y = W_hy @ h + b_y`)"
                            ),
                        };
                        let _ = self.error::<()>(ospan, message);
                    }
                    let taken = if b.states.iter().any(|s| s.0 == o) {
                        Some("a state: this equation would replace its update")
                    } else if b.params.iter().any(|p| p.name == o) {
                        Some("a parameter")
                    } else if o == "x" {
                        Some("the step input")
                    } else {
                        None
                    };
                    if let (true, Some(what)) = (b.output_equation, taken) {
                        let _ = self.error::<()>(
                            ospan,
                            format!("`output {o} = ...`: `{o}` is {what}; an output computed by its own equation needs a name of its own (`output y = ...`), or write `output {o}` to output it"),
                        );
                    }
                    (o, loc_of(ospan))
                }
                None => b
                    .states
                    .first()
                    .map_or((String::new(), loc_of(kind_span)), |s| {
                        (s.0.clone(), loc_of(s.2))
                    }),
            };
            c.params = b.params;
            c.states = b
                .states
                .into_iter()
                .map(|(name, dim, span)| (name, dim, loc_of(span)))
                .collect();
            c.equations = b
                .equations
                .into_iter()
                .filter_map(|(target, e, span)| Some((target, e?, loc_of(span))))
                .collect();
        }
        spec.cell = cell;
        spec.name = name;
        if let Err(m) = spec.validate()
            && self.errors.is_empty()
        {
            let _ = self.error::<()>(kind_span, m);
        }
        if self.errors.is_empty() {
            Some(spec)
        } else {
            None
        }
    }

    /// The names and functions of a custom cell's equations, checked as lowering checks them
    /// (see [`crate::lower`]'s `check_names`) on everything that parsed, so that their mistakes
    /// are reported with the parser's. Declarations and equations that did not parse are known
    /// names without a value: their uses are not reported again.
    fn check_names(&mut self, b: &BodyBuilder) {
        let params: Vec<(&str, Loc)> = b.params.iter().map(|p| (p.name.as_str(), p.loc)).collect();
        let states: Vec<(&str, Loc)> = b
            .states
            .iter()
            .map(|s| (s.0.as_str(), loc_of(s.2)))
            .collect();
        let broken: Vec<&str> = b
            .broken
            .iter()
            .map(String::as_str)
            .filter(|n| !params.iter().chain(&states).any(|d| d.0 == *n))
            .collect();
        let equations: Vec<(&str, Option<&Expr>, Loc)> = b
            .equations
            .iter()
            .map(|(t, e, span)| (t.as_str(), e.as_ref(), loc_of(*span)))
            .collect();
        let (found, _) = crate::lower::check_names(&params, &states, &broken, &equations);
        let tokens: TokenStream = self.tokens.iter().cloned().collect();
        for mut d in found {
            d.span = span_at(&tokens, d.loc());
            self.errors.push(d);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setting(
        &mut self,
        kind: &str,
        spec: &mut ModelSpec,
        cell: &mut CellKind,
        key: &str,
        value: &str,
        vspan: Span,
        kspan: Span,
    ) -> PResult<()> {
        let number = |p: &mut Parser| -> PResult<usize> {
            match value.parse::<usize>() {
                Ok(n) => Ok(n),
                Err(_) => p.error(
                    vspan,
                    format!("`{key}` takes a whole number, found `{value}`"),
                ),
            }
        };
        // A size, from `least` to the largest supported: checked here, at its value, rather
        // than by `ModelSpec::validate`, which knows no spans.
        let size = |p: &mut Parser, least: usize| -> PResult<usize> {
            let n = number(p)?;
            if n < least {
                return p.error(
                    vspan,
                    format!("`{key}` must be at least {least}, found `{value}`"),
                );
            }
            if n > ModelSpec::MAX_SIZE {
                return p.error(
                    vspan,
                    format!(
                        "`{key}` is {n}, more than the largest size supported ({})",
                        ModelSpec::MAX_SIZE
                    ),
                );
            }
            Ok(n)
        };
        // `value` as one of `options`, else an error saying `takes` and what was probably meant.
        let choice = |p: &mut Parser, options: &[&'static str], takes: &str| -> PResult<usize> {
            match options.iter().position(|o| *o == value) {
                Some(k) => Ok(k),
                None => {
                    let hint = did_you_mean(value, options.iter().copied());
                    p.error(
                        vspan,
                        format!("`{key}` takes {takes}, found `{value}`{hint}"),
                    )
                }
            }
        };
        let boolean = |p: &mut Parser| -> PResult<bool> {
            Ok(choice(p, &["true", "false"], "`true` or `false`")? == 0)
        };
        if kind == "cell"
            && let Some(why) = refused_in_cell(key)
        {
            return self.error(kspan, format!("a `cell` takes no `{key}`: {why}"));
        }
        match key {
            "input" => spec.input_size = size(self, 1)?,
            "hidden" => spec.hidden_size = size(self, 1)?,
            "layers" => spec.num_layers = size(self, 1)?,
            "bidirectional" => spec.bidirectional = boolean(self)?,
            "bias" => spec.bias = boolean(self)?,
            "batch_first" => spec.batch_first = boolean(self)?,
            "vocab" => spec.vocab = Some(size(self, 1)?),
            "head" => spec.head = Some(size(self, 1)?),
            "attention" => {
                // Its units and placement are applied after it (`build`), wherever written.
                let takes = "`dot`, `general` (Luong) or `additive` (Bahdanau)";
                let score = match choice(self, &["dot", "general", "additive"], takes)? {
                    0 => Score::Dot,
                    1 => Score::General,
                    _ => Score::Additive(DEFAULT_ATTENTION_UNITS),
                };
                spec.attention = Some(Attention::new(score, 0));
            }
            "attention_placement" => {
                let takes = "`output` (after the stack, Luong) or `input` (in the step, Bahdanau)";
                let placement = match choice(self, &["output", "input"], takes)? {
                    0 => Placement::Output,
                    _ => Placement::Input,
                };
                match &mut spec.attention {
                    Some(a) => a.placement = placement,
                    None => {
                        return self.error(
                            kspan,
                            "`attention_placement` places an attention: declare `attention` too"
                                .to_string(),
                        );
                    }
                }
            }
            "attention_units" => {
                let u = size(self, 1)?;
                match &mut spec.attention {
                    Some(Attention {
                        score: Score::Additive(units),
                        ..
                    }) => *units = u,
                    _ => {
                        return self.error(
                            kspan,
                            "`attention_units` sizes an additive score: declare `attention: additive` too".to_string(),
                        );
                    }
                }
            }
            "proj" | "proj_size" if kind == "lstm" => spec.proj_size = size(self, 0)?,
            "reset" if kind == "gru" => {
                let takes = "`after` (PyTorch) or `before` (Cho et al.)";
                spec.gru_reset = match choice(self, &["after", "before"], takes)? {
                    0 => GruReset::AfterMatmul,
                    _ => GruReset::BeforeMatmul,
                }
            }
            "nonlinearity" if kind == "rnn" => {
                *cell = match choice(self, &["tanh", "relu"], "`tanh` or `relu`")? {
                    0 => CellKind::RnnTanh,
                    _ => CellKind::RnnRelu,
                }
            }
            "bias_convention" => {
                let takes = "`two` (PyTorch) or `one` (Keras)";
                spec.bias_convention = match choice(self, &["two", "one"], takes)? {
                    0 => BiasConvention::Two,
                    _ => BiasConvention::One,
                }
            }
            _ => {
                let allowed = settings_of(kind);
                let owners: Vec<&str> = KINDS
                    .into_iter()
                    .filter(|k| *k != kind && is_setting(k, key))
                    .collect();
                let why = match suggest(key, allowed.iter().copied()) {
                    _ if !owners.is_empty() => {
                        format!(": it is a setting of `{}` only;", owners.join("` and `"))
                    }
                    Some(s) => format!(": did you mean `{s}`?"),
                    None => ";".into(),
                };
                return self.error(
                    kspan,
                    format!(
                        "unknown setting `{key}` for `{kind}`{why} expected one of: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Why a `cell` refuses the standard cells' setting `key`, if it does: the equations say what
/// these settings choose for a standard cell.
fn refused_in_cell(key: &str) -> Option<&'static str> {
    Some(match key {
        "bias" => {
            "a custom cell's biases are the parameters its equations add (`param b: [hidden]`, then `... + b`); there is nothing for `bias` to switch on or off"
        }
        "bias_convention" => {
            "a custom cell's biases are the parameters its equations add, as many as they add; there is no convention to choose"
        }
        "proj" | "proj_size" => {
            "`proj` projects an LSTM's output; in a `cell`, write the projection as an equation (`output y = W_hy @ h`)"
        }
        "reset" => {
            "`reset` places a GRU's reset gate; in a `cell`, the equations place it (`W @ (r * h)` or `r * (W @ h)`)"
        }
        "nonlinearity" => {
            "`nonlinearity` picks an `rnn`'s activation; in a `cell`, the equations apply their own (`h = tanh(...)`)"
        }
        _ => return None,
    })
}

#[derive(Default)]
struct BodyBuilder {
    settings: Vec<(String, String, Span, Span)>,
    params: Vec<CustomParam>,
    /// Spans until the spec is built: unassigned states are reported at their names.
    states: Vec<(String, Dim, Span)>,
    /// `target = expr` in order, `None` when the expression did not parse (its target still
    /// counts as assigned, so that no "never assigned" or "unknown name" follows).
    equations: Vec<(String, Option<Expr>, Span)>,
    output: Option<(String, Span)>,
    /// Whether the output was given with its own equation (`output y = ...`).
    output_equation: bool,
    /// Parameters and states whose declarations did not parse after their names: known names
    /// without a value.
    broken: Vec<String>,
    /// Whether a state's declaration did not parse (no "needs at least one state" then).
    broken_state: bool,
    /// Whether an item failed where a setting could have been: a missing size may be in it, and
    /// is not reported.
    doubtful: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowering_error_maps_back_to_the_users_token() {
        let src = "cell C {\n  input: 3, hidden: 4,\n  param W: [hidden, input],\n  state h,\n  h = tanh(W @ x + W @ h)\n}";
        let tokens = TokenStream::from_str(src).unwrap();
        let spec = parse_model(tokens.clone()).unwrap();
        let Err(Error::Parse(d)) = crate::lower::lower(&spec, 3) else {
            panic!("`W @ h` multiplies [4, 3] by 4 features: lowering must fail");
        };
        assert_eq!((d[0].line, d[0].column), (5, 22));
        assert!(d[0].span.is_none(), "lowering has no span to give");
        assert_eq!(d[0].loc(), Loc::new(5, 22));
        let span = span_at(&tokens, d[0].loc()).expect("a token starts there");
        // The token itself, found inside the braces and the call's parentheses.
        assert_eq!(span.source_text().as_deref(), Some("@"));
        assert_eq!(loc_of(span), Loc::new(5, 22));
    }

    #[test]
    fn name_errors_found_by_the_shared_check_get_the_tokens_span() {
        let Err(Error::Parse(d)) = parse_str(
            "cell C { input: 3, hidden: 4, param W_xh: [hidden, input], state h, h = tanh(W_hx @ x) }",
        ) else {
            panic!("`W_hx` is undeclared");
        };
        let span = d[0]
            .span
            .expect("the parser maps the place back to the token");
        assert_eq!(span.source_text().as_deref(), Some("W_hx"));
    }

    #[test]
    fn span_at_finds_groups_and_nothing_else() {
        let tokens = TokenStream::from_str("lstm { input: [3] }").unwrap();
        let at =
            |line, column| span_at(&tokens, Loc::new(line, column)).and_then(|s| s.source_text());
        assert_eq!(at(1, 1).as_deref(), Some("lstm"));
        assert_eq!(at(1, 15).as_deref(), Some("[3]"));
        assert_eq!(at(1, 16).as_deref(), Some("3"));
        assert_eq!(at(1, 2), None, "no token starts inside `lstm`");
        assert_eq!(at(2, 1), None);
        assert!(span_at(&tokens, Loc::UNKNOWN).is_none());
    }

    #[test]
    fn parser_errors_keep_their_span() {
        let Err(Error::Parse(d)) = parse_str("lstm { input: 3, hiden: 4 }") else {
            panic!("a misspelt setting must be rejected");
        };
        let span = d[0].span.expect("the parser has the token");
        assert_eq!(span.source_text().as_deref(), Some("hiden"));
        assert_eq!(d[0].loc(), Loc::new(1, 18));
    }

    #[test]
    fn equal_sources_give_equal_specs() {
        let src =
            "cell C { input: 3, hidden: 4, param W: [hidden, input], state h, h = tanh(W @ x) }";
        assert_eq!(parse_str(src).unwrap(), parse_str(src).unwrap());
    }

    /// The delimiter scan's findings as `line:column: message`.
    fn delimiters(src: &str) -> Vec<String> {
        delimiter_errors(src)
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn delimiters_in_comments_strings_and_characters_do_not_count() {
        assert!(delimiters("lstm { // }\n input: 3 /* ( /* [ */ */ }").is_empty());
        assert!(delimiters("lstm { \"}\" '}' '\\'' r#\"}\"# br\"(\" 'a }").is_empty());
        assert_eq!(
            delimiters("lstm { /* }"),
            vec!["1:8: this `/*` comment is never closed"]
        );
        assert_eq!(
            delimiters("lstm { \"}"),
            vec!["1:8: this string is never closed"]
        );
    }

    #[test]
    fn delimiters_report_the_one_never_closed_and_the_one_closing_nothing() {
        assert_eq!(
            delimiters("cell C {\n  h = tanh(x,\n}"),
            vec!["2:11: this `(` is never closed: a `)` is missing before the `}` at 3:1"]
        );
        assert_eq!(
            delimiters("lstm { input: [3, (4 }"),
            vec![
                "1:15: this `[` is never closed: a `]` is missing before the `}` at 1:22",
                "1:19: this `(` is never closed: a `)` is missing before the `}` at 1:22"
            ]
        );
        assert_eq!(
            delimiters("lstm { input: 3 ] }"),
            vec!["1:17: unexpected `]`: there is no `[` open for it to close"]
        );
        assert_eq!(
            delimiters("é { (\n"),
            vec![
                "1:3: this `{` is never closed: a `}` is missing at the end",
                "1:5: this `(` is never closed: a `)` is missing at the end"
            ]
        );
    }
}

//! The DSL parser, on `proc_macro2` tokens, shared by `.rnn` files and the macros.
//!
//! # Grammar
//! ```text
//! model    := kind [Name] '{' item ((',' | ';') item)* [',' | ';'] '}'
//! kind     := 'rnn' | 'lstm' | 'gru' | 'cell'
//! item     := setting | param | state | output | equation
//! setting  := key ':' (integer | 'true' | 'false' | identifier)
//! param    := 'param' name ':' '[' dim (',' dim)? ']'        (cell only)
//! state    := 'state' name [':' dim]                          (cell only; default size `hidden`)
//! output   := 'output' name                                   (cell only; default the first state)
//! equation := name '=' expr                                   (cell only)
//! dim      := dterm ('+' dterm)* ;  dterm := datom ('*' datom)* ;
//! datom    := integer | 'input' | 'hidden' | '(' dim ')'
//! expr     := term (('+' | '-') term)* ;  term := unary (('*' | '@') unary)* ;
//! unary    := '-' unary | atom ;  atom := number | name | name '(' expr (',' expr)* ')' | '(' expr ')'
//! ```
//! Settings: `input`, `hidden` (required), `layers`, `bidirectional`, `bias`, `batch_first`,
//! `proj` (LSTM), `reset: after | before` (GRU), `nonlinearity: tanh | relu` (rnn),
//! `bias_convention: two | one`. In a `cell`, `x` is the step input; naming a state on the left
//! of `=` gives its next value, and later equations see the new value.
//!
//! ```text
//! lstm Encoder { input: 128, hidden: 256, layers: 2, bidirectional: true }
//! cell Elman { input: 4, hidden: 8,
//!     param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b: [hidden],
//!     state h,
//!     h = relu(W_hh @ h + W_xh @ x + b) }
//! ```
//! Every mistake is reported, each at its token, with what was expected.
//!
//! The spec keeps no spans: each token's span becomes a [`Loc`] (line and column) as the spec is
//! built, and [`span_at`] finds the token again, for a macro to point at a mistake lowering found.

use crate::error::{Diagnostic, Error};
use crate::spec::{
    BiasConvention, BinOp, CellKind, CustomCell, CustomParam, Dim, Expr, GruReset, Loc, ModelSpec,
    Range,
};
use proc_macro2::{Delimiter, Span, TokenStream, TokenTree};
use std::str::FromStr;

/// Parses a model declaration from source text (a `.rnn` file).
pub fn parse_str(source: &str) -> Result<ModelSpec, Error> {
    let tokens = TokenStream::from_str(source).map_err(|e| {
        let start = e.span().start();
        Error::Parse(vec![Diagnostic {
            message: format!("cannot tokenize the declaration: {e}"),
            line: start.line,
            column: start.column + 1,
            span: Some(e.span()),
        }])
    })?;
    parse_model(tokens)
}

/// Parses `kind [Name] { items }`.
pub fn parse_model(tokens: TokenStream) -> Result<ModelSpec, Error> {
    let mut p = Parser::new(tokens, Span::call_site());
    let spec = p.model();
    p.finish(spec)
}

/// Parses the braced body of a declaration whose kind (`rnn`, `lstm`, `gru`, `cell`) and name
/// the caller has already read (the macros read `pub struct Name` themselves).
pub fn parse_body(
    kind: &str,
    kind_span: Span,
    name: Option<String>,
    body: TokenStream,
) -> Result<ModelSpec, Error> {
    let mut p = Parser::new(body, kind_span);
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
}

type PResult<T> = Result<T, ()>;

impl Parser {
    fn new(tokens: TokenStream, end_span: Span) -> Self {
        Parser {
            tokens: tokens.into_iter().collect(),
            pos: 0,
            end_span,
            errors: Vec::new(),
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
            None => "the end of the declaration".into(),
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

    fn group(&mut self, delim: Delimiter, what: &str) -> PResult<(TokenStream, Span)> {
        if let Some(TokenTree::Group(g)) = self.peek()
            && g.delimiter() == delim
        {
            let r = (g.stream(), g.span());
            self.pos += 1;
            return Ok(r);
        }
        let found = self.describe();
        self.error(self.span(), format!("expected {what}, found {found}"))
    }

    /// Parses the contents of a group (`[...]`, `(...)`) with `f` on a parser of its own. The
    /// inner parser's diagnostics always join this one's, whatever `f` returns, and tokens `f`
    /// leaves unread are an error: nothing inside a group is dropped silently.
    fn nested<T>(
        &mut self,
        tokens: TokenStream,
        span: Span,
        close: char,
        f: impl FnOnce(&mut Parser) -> PResult<T>,
    ) -> PResult<T> {
        let mut inner = Parser::new(tokens, span);
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

    fn model(&mut self) -> Option<ModelSpec> {
        let (kind, kind_span) = self
            .ident("a model kind: `rnn`, `lstm`, `gru` or `cell`")
            .ok()?;
        if !matches!(kind.as_str(), "rnn" | "lstm" | "gru" | "cell") {
            let _ = self.error::<()>(
                kind_span,
                format!("unknown model kind `{kind}`: expected `rnn`, `lstm`, `gru` or `cell`"),
            );
            return None;
        }
        let name = match self.peek() {
            Some(TokenTree::Ident(_)) => Some(self.ident("a name").ok()?.0),
            _ => None,
        };
        let (body, _) = self
            .group(Delimiter::Brace, "`{` opening the declaration's body")
            .ok()?;
        if let Some(t) = self.peek() {
            let span = t.span();
            let _ = self.error::<()>(span, "unexpected tokens after the declaration's `}`");
        }
        let mut inner = Parser::new(body, kind_span);
        let spec = inner.body(&kind, kind_span, name);
        self.errors.append(&mut inner.errors);
        spec
    }

    /// Parses the items of a body (self holds the body's tokens).
    fn body(&mut self, kind: &str, kind_span: Span, name: Option<String>) -> Option<ModelSpec> {
        let mut b = BodyBuilder::default();
        while self.peek().is_some() {
            if self.item(kind, &mut b).is_err() {
                // Resynchronise at the next separator so that later mistakes are reported too.
                while self.peek().is_some() && !self.is_punct(',') && !self.is_punct(';') {
                    self.pos += 1;
                }
            }
            if self.peek().is_some() && !self.eat_punct(',') && !self.eat_punct(';') {
                let found = self.describe();
                let _ = self.error::<()>(
                    self.span(),
                    format!("expected `,` or `;` between items, found {found}"),
                );
                while self.peek().is_some() && !self.is_punct(',') && !self.is_punct(';') {
                    self.pos += 1;
                }
                self.pos += 1;
            }
        }
        self.build(kind, kind_span, name, b)
    }

    fn item(&mut self, kind: &str, b: &mut BodyBuilder) -> PResult<()> {
        let (word, span) = self.ident(
            "a setting (`hidden: 256`), or in a `cell` a `param`, `state`, `output` or equation",
        )?;
        let custom_only = |p: &mut Parser, what: &str| {
            if kind != "cell" {
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
                self.require_punct(':', "after the parameter name")?;
                let (dims, dspan) = self.group(
                    Delimiter::Bracket,
                    "`[` starting the parameter's shape, e.g. `[hidden, input]`",
                )?;
                let shape = self.nested(dims, dspan, ']', |p| {
                    let mut shape = Vec::new();
                    while p.peek().is_some() {
                        shape.push(p.dim()?);
                        if p.peek().is_some() {
                            p.require_punct(',', "between dimensions")?;
                        }
                    }
                    Ok(shape)
                })?;
                if shape.len() > 2 {
                    return self.error(
                        dspan,
                        "a parameter has no dimension (a scalar, `[]`), one (a vector) or two (a matrix `[out, in]`)",
                    );
                }
                let init = if self.eat_punct('=') {
                    Some(self.number("the parameter's initial value")?)
                } else {
                    None
                };
                if b.params.iter().any(|p| p.name == name) {
                    return self.error(nspan, format!("parameter `{name}` is declared twice"));
                }
                b.params.push(CustomParam {
                    name,
                    dims: shape,
                    init,
                    loc: loc_of(nspan),
                });
            }
            "state" if matches!(self.peek(), Some(TokenTree::Ident(_))) => {
                custom_only(self, "states")?;
                let (name, nspan) = self.ident("a state name")?;
                let dim = if self.eat_punct(':') {
                    self.dim()?
                } else {
                    Dim::Hidden
                };
                if b.states.iter().any(|s| s.0 == name) {
                    return self.error(nspan, format!("state `{name}` is declared twice"));
                }
                b.states.push((name, dim, nspan));
            }
            "output" if matches!(self.peek(), Some(TokenTree::Ident(_))) => {
                custom_only(self, "`output` declarations")?;
                let (name, nspan) = self.ident("the name of the output")?;
                if b.output.is_some() {
                    return self.error(nspan, "`output` is given twice");
                }
                b.output = Some((name.clone(), nspan));
                if self.eat_punct('=') {
                    b.assigned.push(name.clone());
                    let e = self.expr()?;
                    b.equations.push((name, e, loc_of(nspan)));
                }
            }
            _ if self.is_punct('=') => {
                custom_only(self, "equations")?;
                self.pos += 1;
                // Counted even if the expression fails, so that no "never assigned" follows.
                b.assigned.push(word.clone());
                let e = self.expr()?;
                b.equations.push((word, e, loc_of(span)));
            }
            _ if self.is_punct(':') => {
                self.pos += 1;
                let value = match self.peek() {
                    Some(TokenTree::Literal(l)) => {
                        let s = l.to_string();
                        let sp = l.span();
                        self.pos += 1;
                        (s, sp)
                    }
                    Some(TokenTree::Ident(i)) => {
                        let r = (i.to_string(), i.span());
                        self.pos += 1;
                        r
                    }
                    _ => {
                        let found = self.describe();
                        return self.error(
                            self.span(),
                            format!("expected a value for `{word}`, found {found}"),
                        );
                    }
                };
                if b.settings.iter().any(|(k, _, _, _)| *k == word) {
                    return self.error(span, format!("`{word}` is given twice"));
                }
                b.settings.push((word, value.0, value.1, span));
            }
            _ => {
                let found = self.describe();
                return self.error(
                    self.span(),
                    format!("expected `:` after the setting `{word}` (or `=` for an equation), found {found}"),
                );
            }
        }
        Ok(())
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
                self.nested(g.stream(), g.span(), ')', Parser::dim)
            }
            _ => {
                let found = self.describe();
                self.error(
                    self.span(),
                    format!("expected a size: a number, `input` or `hidden`, found {found}"),
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
            let rhs = self.unary()?;
            e = Expr::Binary(op, Box::new(e), Box::new(rhs), loc_of(span));
        }
    }

    fn unary(&mut self) -> PResult<Expr> {
        let span = self.span();
        if self.eat_punct('-') {
            return Ok(Expr::Neg(Box::new(self.unary()?), loc_of(span)));
        }
        self.postfix()
    }

    /// An atom followed by any number of slices: `g[hidden .. 2 * hidden]`, `W[0 .. hidden, ..]`.
    fn postfix(&mut self) -> PResult<Expr> {
        let mut e = self.atom()?;
        while let Some(TokenTree::Group(g)) = self.peek().cloned()
            && g.delimiter() == Delimiter::Bracket
        {
            self.pos += 1;
            let ranges = self.nested(g.stream(), g.span(), ']', |p| {
                let mut ranges = Vec::new();
                while p.peek().is_some() {
                    ranges.push(p.range()?);
                    if p.peek().is_some() {
                        p.require_punct(',', "between the axes of a slice")?;
                    }
                }
                Ok(ranges)
            })?;
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
                match l.to_string().parse::<f32>() {
                    Ok(n) if n.is_finite() => Ok(if negative { -n } else { n }),
                    _ => self.error(
                        l.span(),
                        format!("expected a number as {what}, found `{l}`"),
                    ),
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
                match l.to_string().parse::<f32>() {
                    Ok(n) if n.is_finite() => Ok(Expr::Num(n, loc_of(l.span()))),
                    _ => self.error(l.span(), format!("expected a number, found `{l}`")),
                }
            }
            Some(TokenTree::Ident(i)) => {
                self.pos += 1;
                let name = i.to_string();
                if let Some(TokenTree::Group(g)) = self.peek().cloned()
                    && g.delimiter() == Delimiter::Parenthesis
                {
                    self.pos += 1;
                    let args = self.nested(g.stream(), g.span(), ')', |p| {
                        let mut args = Vec::new();
                        while p.peek().is_some() {
                            args.push(p.expr()?);
                            if p.peek().is_some() {
                                p.require_punct(',', "between arguments")?;
                            }
                        }
                        Ok(args)
                    })?;
                    return Ok(Expr::Call(name, args, loc_of(i.span())));
                }
                Ok(Expr::Var(name, loc_of(i.span())))
            }
            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Parenthesis => {
                self.pos += 1;
                self.nested(g.stream(), g.span(), ')', Parser::expr)
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
        for (key, value, vspan, kspan) in &b.settings {
            let _ = self.setting(kind, &mut spec, &mut cell, key, value, *vspan, *kspan);
        }
        // A size given with a bad value has its own error already.
        let have_input = b.settings.iter().any(|s| s.0 == "input");
        let have_hidden = b.settings.iter().any(|s| s.0 == "hidden");
        // A missing size is often a misspelt one: report it only when nothing else is wrong.
        let clean = self.errors.is_empty();
        if clean && !have_input {
            let _ = self.error::<()>(
                kind_span,
                format!("`{kind}` needs `input: N`, the number of input features"),
            );
        }
        if clean && !have_hidden {
            let _ = self.error::<()>(
                kind_span,
                format!("`{kind}` needs `hidden: N`, the number of hidden features"),
            );
        }
        if let CellKind::Custom(c) = &mut cell {
            if b.states.is_empty() {
                let _ = self.error::<()>(
                    kind_span,
                    "a `cell` needs at least one `state`, e.g. `state h`",
                );
            }
            if b.assigned.is_empty() {
                let _ = self.error::<()>(
                    kind_span,
                    "a `cell` needs equations, e.g. `h = tanh(W @ x + U @ h + b)`",
                );
            }
            for (state, _, sspan) in &b.states {
                if !b.assigned.contains(state) {
                    let _ = self.error::<()>(
                        *sspan,
                        format!(
                            "state `{state}` is never assigned: add an equation `{state} = ...`"
                        ),
                    );
                }
            }
            c.output = match b.output {
                Some((o, ospan)) => {
                    if !b.states.iter().any(|s| s.0 == o) && !b.assigned.contains(&o) {
                        let _ = self.error::<()>(
                            ospan,
                            format!("`output {o}`: the output must be a declared state or a name an equation assigns (`output y = W_hy @ h + b_y`)"),
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
            c.equations = b.equations;
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
        let boolean = |p: &mut Parser| -> PResult<bool> {
            match value {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => p.error(
                    vspan,
                    format!("`{key}` takes `true` or `false`, found `{value}`"),
                ),
            }
        };
        match key {
            "input" => spec.input_size = number(self)?,
            "hidden" => spec.hidden_size = number(self)?,
            "layers" => spec.num_layers = number(self)?,
            "bidirectional" => spec.bidirectional = boolean(self)?,
            "bias" => spec.bias = boolean(self)?,
            "batch_first" => spec.batch_first = boolean(self)?,
            "proj" | "proj_size" if kind == "lstm" => spec.proj_size = number(self)?,
            "reset" if kind == "gru" => spec.gru_reset = match value {
                "after" => GruReset::AfterMatmul,
                "before" => GruReset::BeforeMatmul,
                _ => return self.error(
                    vspan,
                    format!(
                        "`reset` takes `after` (PyTorch) or `before` (Cho et al.), found `{value}`"
                    ),
                ),
            },
            "nonlinearity" if kind == "rnn" => {
                *cell = match value {
                    "tanh" => CellKind::RnnTanh,
                    "relu" => CellKind::RnnRelu,
                    _ => {
                        return self.error(
                            vspan,
                            format!("`nonlinearity` takes `tanh` or `relu`, found `{value}`"),
                        );
                    }
                }
            }
            "bias_convention" if kind != "cell" => spec.bias_convention = match value {
                "two" => BiasConvention::Two,
                "one" => BiasConvention::One,
                _ => return self.error(
                    vspan,
                    format!(
                        "`bias_convention` takes `two` (PyTorch) or `one` (Keras), found `{value}`"
                    ),
                ),
            },
            _ => {
                let allowed = match kind {
                    "lstm" => {
                        "input, hidden, layers, bidirectional, bias, batch_first, bias_convention, proj"
                    }
                    "gru" => {
                        "input, hidden, layers, bidirectional, bias, batch_first, bias_convention, reset"
                    }
                    "rnn" => {
                        "input, hidden, layers, bidirectional, bias, batch_first, bias_convention, nonlinearity"
                    }
                    _ => "input, hidden, layers, bidirectional, batch_first",
                };
                return self.error(
                    kspan,
                    format!("unknown setting `{key}` for `{kind}`; expected one of: {allowed}"),
                );
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct BodyBuilder {
    settings: Vec<(String, String, Span, Span)>,
    params: Vec<CustomParam>,
    /// Spans until the spec is built: unassigned states are reported at their names.
    states: Vec<(String, Dim, Span)>,
    equations: Vec<(String, Expr, Loc)>,
    output: Option<(String, Span)>,
    /// Every name an equation assigns, including equations that did not parse.
    assigned: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowering_error_maps_back_to_the_users_token() {
        let src = "cell C {\n  input: 3, hidden: 4,\n  param W: [hidden, input],\n  state h,\n  h = tanh(W @ x + V @ h)\n}";
        let tokens = TokenStream::from_str(src).unwrap();
        let spec = parse_model(tokens.clone()).unwrap();
        let Err(Error::Parse(d)) = crate::lower::lower(&spec, 3) else {
            panic!("`V` is undeclared: lowering must fail");
        };
        assert_eq!((d[0].line, d[0].column), (5, 20));
        assert!(d[0].span.is_none(), "lowering has no span to give");
        assert_eq!(d[0].loc(), Loc::new(5, 20));
        let span = span_at(&tokens, d[0].loc()).expect("a token starts there");
        // The token itself, found inside the braces and the call's parentheses.
        assert_eq!(span.source_text().as_deref(), Some("V"));
        assert_eq!(loc_of(span), Loc::new(5, 20));
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
}

//! `ModelSpec`: what the user declared — the cell (a standard one or equations), its sizes, layers,
//! directions and conventions — before anything is lowered.
//!
//! A spec is plain data (`Clone + Debug + PartialEq + Send + Sync`, no `proc_macro2` types): a
//! custom cell remembers where each name and operator was written as a [`Loc`], a line and
//! column, so that lowering can report its mistakes at the user's token.

use std::fmt;

/// A place in the declaration's source: the line and column of a token's first character.
///
/// Both are 1-based; the column counts characters, not bytes. [`Loc::UNKNOWN`] (0:0, also the
/// default) is for specs built in code. The parser makes these from token spans, and
/// [`parse::span_at`](crate::parse::span_at) maps one back to the token's span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Loc {
    /// 1-based line (0 when unknown).
    pub line: u32,
    /// 1-based column, in characters (0 when unknown).
    pub column: u32,
}

impl Loc {
    /// No place in any source (0:0): what a spec built in code carries.
    pub const UNKNOWN: Loc = Loc { line: 0, column: 0 };

    /// The place at 1-based `line` and `column`.
    pub const fn new(line: u32, column: u32) -> Loc {
        Loc { line, column }
    }

    /// Whether this is a real place rather than [`Loc::UNKNOWN`] (any loc on line 0 is unknown).
    pub const fn is_known(self) -> bool {
        self.line > 0
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// The recurrent cell of a model.
#[derive(Clone, Debug, PartialEq)]
pub enum CellKind {
    /// `h' = tanh(W_ih x + b_ih + W_hh h + b_hh)` (PyTorch `nn.RNN`, the default nonlinearity).
    RnnTanh,
    /// `h' = relu(W_ih x + b_ih + W_hh h + b_hh)` (`nn.RNN(nonlinearity="relu")`).
    RnnRelu,
    /// PyTorch's `nn.LSTM`: gates `i, f, g, o` stacked in that order.
    Lstm,
    /// PyTorch's `nn.GRU`: gates `r, z, n` stacked in that order.
    Gru,
    /// A cell written as equations.
    Custom(CustomCell),
}

impl CellKind {
    /// The name used on the command line and in `.rnn` files.
    pub fn name(&self) -> &'static str {
        match self {
            CellKind::RnnTanh => "rnn_tanh",
            CellKind::RnnRelu => "rnn_relu",
            CellKind::Lstm => "lstm",
            CellKind::Gru => "gru",
            CellKind::Custom(_) => "cell",
        }
    }

    /// The standard cell called `name` (`rnn_tanh`, `rnn_relu`, `lstm`, `gru`): the inverse of
    /// [`CellKind::name`].
    pub fn from_name(name: &str) -> Option<CellKind> {
        [
            CellKind::RnnTanh,
            CellKind::RnnRelu,
            CellKind::Lstm,
            CellKind::Gru,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }

    /// Gate blocks stacked in `weight_ih` (1, 4 or 3); `None` for custom cells.
    pub fn gates(&self) -> Option<usize> {
        match self {
            CellKind::RnnTanh | CellKind::RnnRelu => Some(1),
            CellKind::Lstm => Some(4),
            CellKind::Gru => Some(3),
            CellKind::Custom(_) => None,
        }
    }
}

/// Where a GRU applies its reset gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GruReset {
    /// PyTorch's form (ONNX `linear_before_reset = 1`): `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`.
    #[default]
    AfterMatmul,
    /// Cho et al.'s form, the chapter's formula: `n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)`.
    BeforeMatmul,
}

/// How many bias vectors each layer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BiasConvention {
    /// PyTorch's: `bias_ih` and `bias_hh`, both added.
    #[default]
    Two,
    /// Keras's (and the chapter's parameter counts): one bias, stored as `bias_ih`.
    One,
}

/// A model declaration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The declared name, if any.
    pub name: Option<String>,
    /// The cell.
    pub cell: CellKind,
    /// Features of the input `x_t`.
    pub input_size: usize,
    /// Features of the hidden state.
    pub hidden_size: usize,
    /// Stacked layers (at least 1).
    pub num_layers: usize,
    /// Whether every layer also runs backwards in time.
    pub bidirectional: bool,
    /// Whether the cell has biases.
    pub bias: bool,
    /// LSTM only: project `h` to this many features (0: no projection).
    pub proj_size: usize,
    /// One or two biases per gate.
    pub bias_convention: BiasConvention,
    /// GRU only: where the reset gate applies.
    pub gru_reset: GruReset,
    /// Whether inputs and outputs are `(batch, time, features)` rather than `(time, batch, features)`.
    pub batch_first: bool,
    /// An embedding in front of the stack: the input is token ids below `vocab`, each looked up
    /// in a `vocab × input` table (`torch.nn.Embedding(vocab, input)`).
    pub vocab: Option<usize>,
    /// A linear head behind the stack: `head` features (a vocabulary's logits) from each step's
    /// output (`torch.nn.Linear(directions · output, head)`, always with its bias: `bias`
    /// switches the cell's biases only).
    pub head: Option<usize>,
    /// Attention over a memory (an encoder's outputs) between the stack and the head.
    pub attention: Option<Attention>,
}

/// How an attention scores a query (a decoder's output `h`) against a memory row `m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    /// Luong's dot: `m · h` (the memory and the query have one size).
    Dot,
    /// Luong's general: `(W_a m) · h`.
    General,
    /// Bahdanau's additive (Luong's concat), with this many units: `v · tanh(W_1 m + W_2 h)`.
    Additive(usize),
}

/// An attention over a memory (an encoder's outputs): a query scores each memory row, a
/// softmax over the source positions (those past a sequence's source length weigh 0) weighs
/// them into a context `c`. Where the query comes from and where the context goes is its
/// [`Placement`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attention {
    /// The score.
    pub score: Score,
    /// Features of a memory row (an encoder's outputs, both directions).
    pub memory: usize,
    /// Where the attention sits.
    pub placement: Placement,
}

impl Attention {
    /// An attention of `score` over rows of `memory` features, after the stack (Luong's
    /// placement).
    pub fn new(score: Score, memory: usize) -> Attention {
        Attention {
            score,
            memory,
            placement: Placement::Output,
        }
    }
}

/// Where an attention sits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// After the stack (Luong et al.'s global attention): at every step the stack's output `h`
    /// is the query, and `tanh(W_c [c; h])` replaces `h` as what the head reads
    /// (`combine.weight`).
    #[default]
    Output,
    /// In the step (Bahdanau et al.'s placement, the decoder of PyTorch's seq2seq tutorial):
    /// the previous step's output (at the first step, the initial value of the top layer's
    /// output state) is the query, and the context joins the step's input, `x_t = [e_t; c_t]`;
    /// the head reads the stack's output. The stack's input is then `input + memory` features.
    Input,
}

impl ModelSpec {
    /// A one-layer, one-direction model of `cell` with PyTorch's defaults.
    pub fn new(cell: CellKind, input_size: usize, hidden_size: usize) -> Self {
        ModelSpec {
            name: None,
            cell,
            input_size,
            hidden_size,
            num_layers: 1,
            bidirectional: false,
            bias: true,
            proj_size: 0,
            bias_convention: BiasConvention::Two,
            gru_reset: GruReset::AfterMatmul,
            batch_first: false,
            vocab: None,
            head: None,
            attention: None,
        }
    }

    /// Whether the declaration has layers around its recurrent stack (an embedding, a head),
    /// which [`crate::model::Model`] runs.
    pub fn has_model_layers(&self) -> bool {
        self.vocab.is_some() || self.head.is_some() || self.attention.is_some()
    }

    /// The recurrent stack alone: this declaration without its embedding and head. An
    /// attention in the step widens the stack's input by the context (the memory's features).
    pub fn stack(&self) -> ModelSpec {
        let context = match self.attention {
            Some(a) if a.placement == Placement::Input => a.memory,
            _ => 0,
        };
        ModelSpec {
            vocab: None,
            head: None,
            attention: None,
            input_size: self.input_size + context,
            ..self.clone()
        }
    }

    /// 2 when bidirectional, else 1.
    pub fn directions(&self) -> usize {
        if self.bidirectional { 2 } else { 1 }
    }

    /// Features of each direction's output `y_t` (the hidden size, or the projection).
    pub fn output_size(&self) -> usize {
        match &self.cell {
            CellKind::Custom(c) => c.output_size(self.input_size, self.hidden_size),
            _ if self.proj_size > 0 => self.proj_size,
            _ => self.hidden_size,
        }
    }

    /// Features of the input of layer `layer`: the model's input, then both directions' outputs.
    pub fn layer_input_size(&self, layer: usize) -> usize {
        if layer == 0 {
            self.input_size
        } else {
            self.output_size() * self.directions()
        }
    }

    /// The suffix PyTorch gives the parameters of `layer` and `direction`: `_l1`, `_l1_reverse`.
    pub fn param_suffix(layer: usize, direction: usize) -> String {
        if direction == 0 {
            format!("_l{layer}")
        } else {
            format!("_l{layer}_reverse")
        }
    }

    /// The largest size accepted for any dimension (2²⁴): far beyond any real RNN, and small
    /// enough that no product of sizes overflows.
    pub const MAX_SIZE: usize = 1 << 24;

    /// Checks the sizes and options are meaningful together.
    pub fn validate(&self) -> Result<(), String> {
        for (name, n) in [
            ("input", self.input_size),
            ("hidden", self.hidden_size),
            ("layers", self.num_layers),
            ("proj", self.proj_size),
            ("vocab", self.vocab.unwrap_or(0)),
            ("head", self.head.unwrap_or(0)),
        ] {
            if n > Self::MAX_SIZE {
                return Err(format!(
                    "`{name}` is {n}, more than the largest size supported ({})",
                    Self::MAX_SIZE
                ));
            }
        }
        if self.input_size == 0 {
            return Err("`input` must be at least 1".into());
        }
        if self.hidden_size == 0 {
            return Err("`hidden` must be at least 1".into());
        }
        if self.num_layers == 0 {
            return Err("`layers` must be at least 1".into());
        }
        if self.vocab == Some(0) {
            return Err("`vocab` must be at least 1".into());
        }
        if self.head == Some(0) {
            return Err("`head` must be at least 1".into());
        }
        if let Some(a) = self.attention {
            // A memory of size 0 is one a declaration leaves to its encoder-decoder
            // (`Seq2Seq::new` sizes it); `Model::compile` refuses it.
            if a.memory > Self::MAX_SIZE {
                return Err(format!(
                    "an attention's memory must have 1 ..= {} features, found {}",
                    Self::MAX_SIZE,
                    a.memory
                ));
            }
            if let Score::Additive(u) = a.score
                && (u == 0 || u > Self::MAX_SIZE)
            {
                return Err(format!(
                    "an additive attention needs 1 ..= {} units, found {u}",
                    Self::MAX_SIZE
                ));
            }
            if a.score == Score::Dot
                && a.memory != 0
                && a.memory != self.output_size() * self.directions()
            {
                return Err(format!(
                    "a dot attention needs memory rows of the stack's output size ({}), found {}: use `general` or `additive` to bridge the sizes",
                    self.output_size() * self.directions(),
                    a.memory
                ));
            }
        }
        if self.proj_size > 0 && !matches!(self.cell, CellKind::Lstm) {
            return Err("`proj` (proj_size) is only defined for LSTM cells".into());
        }
        if self.proj_size >= self.hidden_size && self.proj_size > 0 {
            return Err(format!(
                "`proj` must be smaller than `hidden` ({}), found {}",
                self.hidden_size, self.proj_size
            ));
        }
        if self.gru_reset == GruReset::BeforeMatmul && !matches!(self.cell, CellKind::Gru) {
            return Err("`reset` is only defined for GRU cells".into());
        }
        Ok(())
    }
}

/// A size written in a custom cell: `hidden`, `4 * hidden`, `input + hidden`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    /// A literal.
    Lit(usize),
    /// The layer's input size.
    Input,
    /// The hidden size.
    Hidden,
    /// A sum.
    Add(Box<Dim>, Box<Dim>),
    /// A product.
    Mul(Box<Dim>, Box<Dim>),
}

impl Dim {
    /// The size for a layer with `input` features and `hidden` hidden features; `None` when it
    /// exceeds [`ModelSpec::MAX_SIZE`].
    pub fn eval(&self, input: usize, hidden: usize) -> Option<usize> {
        let n = match self {
            Dim::Lit(n) => *n,
            Dim::Input => input,
            Dim::Hidden => hidden,
            Dim::Add(a, b) => a.eval(input, hidden)?.checked_add(b.eval(input, hidden)?)?,
            Dim::Mul(a, b) => a.eval(input, hidden)?.checked_mul(b.eval(input, hidden)?)?,
        };
        (n <= ModelSpec::MAX_SIZE).then_some(n)
    }
}

/// A binary operator of the equation language.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*` (element-wise)
    Mul,
    /// `/` (element-wise)
    Div,
    /// `@` (matrix product)
    MatMul,
}

/// An expression of a custom cell's equations; each node remembers where it was written.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// A parameter, state, `x` or earlier equation's name.
    Var(String, Loc),
    /// A number.
    Num(f32, Loc),
    /// `a op b` (the loc is the operator's).
    Binary(BinOp, Box<Expr>, Box<Expr>, Loc),
    /// `-a` (the loc is the `-`).
    Neg(Box<Expr>, Loc),
    /// `f(args)`: a function of the language (`sigmoid`, `exp`, `mean`, `max`, `concat`, ...;
    /// the loc is the function's name).
    Call(String, Vec<Expr>, Loc),
    /// `a[ranges]`: a slice along the feature axis (`g[hidden .. 2 * hidden]`) or, for a
    /// matrix, its rows (`W[0 .. hidden, ..]`); the loc is the `[`.
    Index(Box<Expr>, Vec<Range>, Loc),
}

/// One axis of a slice: `start .. end`, either bound left out (`..`, `a ..`, `.. b`), or a
/// single index `i` (taken as `i .. i + 1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// The first index taken (0 when left out).
    pub start: Option<Dim>,
    /// One past the last index taken (the axis's length when left out).
    pub end: Option<Dim>,
    /// Whether it was written as a single index rather than a range.
    pub single: bool,
}

impl Expr {
    /// Where the expression's operator or name was written, for error messages.
    pub fn loc(&self) -> Loc {
        match self {
            Expr::Var(_, l)
            | Expr::Num(_, l)
            | Expr::Binary(_, _, _, l)
            | Expr::Neg(_, l)
            | Expr::Call(_, _, l)
            | Expr::Index(_, _, l) => *l,
        }
    }
}

/// A parameter of a custom cell.
#[derive(Clone, Debug, PartialEq)]
pub struct CustomParam {
    /// Its name.
    pub name: String,
    /// Its dimensions (none: a scalar; one: a vector; two: a matrix `(out, in)`).
    pub dims: Vec<Dim>,
    /// The value every element starts at (`param g: [hidden] = 1`), if the declaration gives
    /// one; otherwise initialisation draws it.
    pub init: Option<f32>,
    /// Where its name was declared.
    pub loc: Loc,
}

/// A cell written as equations.
#[derive(Clone, Debug, PartialEq)]
pub struct CustomCell {
    /// Declared parameters, in declaration order.
    pub params: Vec<CustomParam>,
    /// Declared recurrent states, their sizes and where each name was declared, in order.
    pub states: Vec<(String, Dim, Loc)>,
    /// `target = expr` and where the target was written, in order; assigning a state's name
    /// gives its next value. `output y = expr` is the equation `y = expr` with `y` the output.
    pub equations: Vec<(String, Expr, Loc)>,
    /// The name whose value is the step's output (default: the first state): a state, or any
    /// name an equation assigns (`output y = W_hy @ h + b_y`, of its own size); and where it was
    /// written (the first state's, or the declaration's kind, when defaulted).
    pub output: (String, Loc),
}

impl CustomCell {
    /// Features of the output for a layer with `input` input features (0 when the cell does not
    /// lower, which lowering reports). An output that is a state has the state's size; any other
    /// is found by lowering the cell.
    pub fn output_size(&self, input: usize, hidden: usize) -> usize {
        if let Some((_, d, _)) = self.states.iter().find(|(n, _, _)| *n == self.output.0) {
            return d.eval(input, hidden).unwrap_or(0);
        }
        crate::lower::custom_output_size(self, input, hidden).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if `T` is plain data that can cross threads.
    fn plain_data<T: Clone + fmt::Debug + PartialEq + Send + Sync + 'static>() {}

    #[test]
    fn a_spec_is_plain_data() {
        plain_data::<ModelSpec>();
        plain_data::<CellKind>();
        plain_data::<CustomCell>();
        plain_data::<CustomParam>();
        plain_data::<Expr>();
        plain_data::<Dim>();
        plain_data::<Loc>();
    }

    #[test]
    fn specs_compare_by_value() {
        let cell = |loc| {
            CellKind::Custom(CustomCell {
                params: Vec::new(),
                states: vec![("h".into(), Dim::Hidden, loc)],
                equations: vec![("h".into(), Expr::Var("x".into(), loc), loc)],
                output: ("h".into(), loc),
            })
        };
        let a = ModelSpec::new(cell(Loc::UNKNOWN), 3, 3);
        assert_eq!(a, a.clone());
        assert_ne!(a, ModelSpec::new(cell(Loc::new(1, 1)), 3, 3));
        assert_ne!(a, ModelSpec::new(CellKind::Lstm, 3, 3));
        assert_eq!(Loc::default(), Loc::UNKNOWN);
        assert!(!Loc::UNKNOWN.is_known() && Loc::new(2, 5).is_known());
        assert_eq!(Loc::new(2, 5).to_string(), "2:5");
    }
}

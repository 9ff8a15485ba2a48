//! The step IR: one time step of one recurrent cell as a graph of SSA values.
//!
//! A [`Graph`] is an arena of values. Each [`Value`] is a `u32` index into that arena (printed
//! `v3`), defined exactly once by one [`Op`] applied to earlier values, so the arena order is a
//! topological order and a graph cannot hold a cycle. Indices are cheap to copy, to compare and to
//! use as keys in side tables (`Vec` indexed by value), which is how every pass and the
//! interpreter keep per-value facts; nothing holds a reference into the graph.
//!
//! Every value has a static [`Shape`]. A recurrent step works on a batch of rows whose count is
//! only known when the step runs, so batched values have the shape `Batch(n)`: `rows × n` at run
//! time. Parameters and values computed from parameters alone are unbatched (`Vector`, `Matrix`).
//!
//! The roles of a graph's inputs and outputs ([`Role`], [`OutRole`]) say what they mean to the
//! sequence-level [`Program`](crate::program::Program): a parameter, the step's input `x_t`, the
//! previous recurrent state, or (in a backward graph) a saved forward value or the gradient flowing
//! into a forward output.

pub mod dataflow;
mod print;
mod verify;

pub use verify::verify;

use std::fmt;

/// An SSA value: an index into its graph's arena, printed `v{index}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Value(u32);

impl Value {
    /// The value with arena index `index`.
    pub fn new(index: usize) -> Self {
        Value(u32::try_from(index).expect("graph larger than u32::MAX values"))
    }
    /// The arena index of this value.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// The static shape of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A single number, broadcast against any shape (only constants have it).
    Scalar,
    /// An unbatched vector of `n` elements (a bias, a peephole weight).
    Vector(usize),
    /// An unbatched `rows × cols` matrix (a weight), PyTorch layout `(out, in)`.
    Matrix(usize, usize),
    /// `n` features for each row of the batch: `rows × n` at run time.
    Batch(usize),
    /// One token id for each row of the batch: a non-negative integer below the vocabulary's
    /// size (or a loss's ignore index), held exactly in one `f32` lane (every id below 2²⁴ is).
    /// Only the ops that read or make ids take it ([`Op::Gather`], [`Op::Pick`], [`Op::Place`],
    /// [`Op::ScatterRows`], [`Op::ArgMax`]); arithmetic on ids is ill-typed, and no gradient
    /// flows into them.
    Tokens,
    /// An attention's memory: `n` features at each source position of each sequence, `S × B`
    /// rows of `n` at run time (source positions outer, `S` known only at run time). Only a
    /// layer around the stack ([`crate::model`]) reads one.
    Memory(usize),
    /// `n` features for each (row, source position) pair: `rows × S` rows of `n`, row `r`'s
    /// positions together (`Pairs(1)` holds an attention's scores and weights).
    Pairs(usize),
}

impl Shape {
    /// Whether the value has one row per batch element.
    pub fn is_batched(self) -> bool {
        matches!(
            self,
            Shape::Batch(_) | Shape::Tokens | Shape::Memory(_) | Shape::Pairs(_)
        )
    }

    /// The kind of rows a batched shape has (`Batch` and `Tokens` share the batch's rows;
    /// a memory's and pairs' rows are their own), or `None` for an unbatched shape.
    pub fn rows_kind(self) -> Option<u8> {
        match self {
            Shape::Batch(_) | Shape::Tokens => Some(0),
            Shape::Memory(_) => Some(1),
            Shape::Pairs(_) => Some(2),
            _ => None,
        }
    }
    /// The length of the leading feature axis: `n` for vectors and batches, rows for matrices.
    pub fn features(self) -> usize {
        match self {
            Shape::Scalar | Shape::Tokens => 1,
            Shape::Vector(n) | Shape::Batch(n) | Shape::Memory(n) | Shape::Pairs(n) => n,
            Shape::Matrix(r, _) => r,
        }
    }
    /// The same kind of shape with the leading feature axis set to `n`.
    pub fn with_features(self, n: usize) -> Shape {
        match self {
            Shape::Scalar => Shape::Scalar,
            Shape::Tokens => Shape::Tokens,
            Shape::Vector(_) => Shape::Vector(n),
            Shape::Batch(_) => Shape::Batch(n),
            Shape::Memory(_) => Shape::Memory(n),
            Shape::Pairs(_) => Shape::Pairs(n),
            Shape::Matrix(_, c) => Shape::Matrix(n, c),
        }
    }
    /// Elements of one feature of the leading axis: a matrix's row length, 1 otherwise (a
    /// slice or a concatenation along the features moves by this many elements per feature).
    pub fn feature_len(self) -> usize {
        match self {
            Shape::Matrix(_, c) => c,
            _ => 1,
        }
    }
    /// Elements per row (batched) or in total (unbatched).
    pub fn row_len(self) -> usize {
        match self {
            Shape::Scalar | Shape::Tokens => 1,
            Shape::Vector(n) | Shape::Batch(n) | Shape::Memory(n) | Shape::Pairs(n) => n,
            Shape::Matrix(r, c) => r * c,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Scalar => write!(f, "scalar"),
            Shape::Vector(n) => write!(f, "[{n}]"),
            Shape::Matrix(r, c) => write!(f, "[{r}, {c}]"),
            Shape::Batch(n) => write!(f, "batch[{n}]"),
            Shape::Tokens => write!(f, "tokens"),
            Shape::Memory(n) => write!(f, "memory[{n}]"),
            Shape::Pairs(n) => write!(f, "pairs[{n}]"),
        }
    }
}

/// What an input value stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Parameter number `p` of the graph's parameter table.
    Param(u32),
    /// The step's input `x_t`.
    Input,
    /// Recurrent state number `k` as it was before this step.
    State(u32),
    /// The target tokens of a loss (`Shape::Tokens`): what the output should have predicted.
    Target,
    /// An attention's memory (`Shape::Memory`): the encoder's outputs.
    Memory,
    /// (Backward graphs) the value `v` of the forward graph at this step.
    Saved(Value),
    /// (Backward graphs) the gradient flowing into the forward output with this role.
    Cotangent(OutRole),
}

/// What an output value stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutRole {
    /// Recurrent state number `k` after this step.
    State(u32),
    /// The step's output `y_t`.
    Output,
    /// (Backward graphs) this step's contribution to the gradient of parameter `p`; summed over time.
    ParamGrad(u32),
    /// (Backward graphs) the gradient of the step's input `x_t`.
    InputGrad,
    /// (Backward graphs) the gradient of recurrent state `k` as it was before this step.
    StateGrad(u32),
    /// (Backward graphs) the gradient of the attention's memory.
    MemoryGrad,
}

/// An operation. Element-wise binary ops broadcast `Scalar` against anything, `Vector(n)`
/// against `Batch(n)` (a vector on every row), and a value of one feature (`Vector(1)`,
/// `Batch(1)`: a scalar parameter, a per-row mean) against any number of features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A graph input.
    Input(Role),
    /// The constant `f32::from_bits(bits)`, filling the value's shape.
    Const(u32),
    /// `[w: Matrix(o, i), x: Batch(i)] -> Batch(o)`: `x · wᵀ`, PyTorch's `Linear`.
    MatMul,
    /// `[w: Matrix(o, i), d: Batch(o)] -> Batch(i)`: `d · w`.
    MatMulT,
    /// `[d: Batch(o), x: Batch(i)] -> Matrix(o, i)`: `dᵀ · x`, summed over the rows.
    OuterSum,
    /// `[d: Batch(n)] -> Vector(n)`: the sum over the rows.
    SumRows,
    /// `[v: Vector(n)] -> Batch(n)`: `v` repeated on every row.
    Broadcast,
    /// Element-wise `a + b`.
    Add,
    /// Element-wise `a - b`.
    Sub,
    /// Element-wise `a * b`.
    Mul,
    /// Element-wise `a / b`.
    Div,
    /// Element-wise `-a`.
    Neg,
    /// Element-wise `e^a`.
    Exp,
    /// Element-wise natural logarithm.
    Log,
    /// Element-wise square root.
    Sqrt,
    /// Element-wise `ln(1 + e^a)`, and `a` itself above 20 (PyTorch's `softplus` threshold).
    Softplus,
    /// Element-wise `|a|`.
    Abs,
    /// Element-wise sign: `1` above zero, `-1` below, `0` at zero (the derivative of `abs`).
    Sign,
    /// Element-wise `max(a, c)` against the constant `c = f32::from_bits(bits)`.
    Max(u32),
    /// Element-wise `min(a, c)` against the constant `c = f32::from_bits(bits)`.
    Min(u32),
    /// `[a: Batch(n) | Vector(n)] -> Batch(1) | Vector(1)`: the sum over the feature axis of each
    /// row (a mean divides it by `n`). Rows stay independent: it is not a reduction over rows.
    SumFeatures,
    /// `[a: Batch(1) | Vector(1)] -> Batch(n) | Vector(n)`: the one feature repeated `n` times on
    /// its row (the backward of [`Op::SumFeatures`]).
    Spread(u32),
    /// Element-wise `1 / (1 + exp(-a))`.
    Sigmoid,
    /// Element-wise `tanh(a)`.
    Tanh,
    /// Element-wise `max(a, 0)`.
    Relu,
    /// Element-wise `1` where `a > 0`, else `0`: the derivative of `relu`.
    Step,
    /// Features `start .. start + len` of the leading feature axis.
    Slice {
        /// First feature taken.
        start: u32,
        /// Number of features taken.
        len: u32,
    },
    /// The arguments joined along the leading feature axis.
    Concat,
    /// `[table: Matrix(v, e), ids: Tokens] -> Batch(e)`: row `ids[r]` of the table on row `r`,
    /// an embedding lookup (`torch.nn.Embedding`).
    Gather,
    /// `[d: Batch(e), ids: Tokens] -> Matrix(v, e)`: row `r` of `d` added into row `ids[r]` of a
    /// zero `v × e` matrix, summed over the rows (the backward of [`Op::Gather`]).
    ScatterRows(u32),
    /// `[a: Batch(n) | Vector(n)] -> same`: `a - ln Σ_features e^a` on each row, computed
    /// around the row's maximum (`torch.log_softmax` over the last axis).
    LogSoftmax,
    /// `[a: Batch(n), ids: Tokens] -> Batch(1)`: feature `ids[r]` of row `r`, and `0` on a row
    /// whose id is `ignore` (the negative log-likelihood's pick, with PyTorch's
    /// `ignore_index`).
    Pick {
        /// The id whose rows pick nothing.
        ignore: i32,
    },
    /// `[d: Batch(1), ids: Tokens] -> Batch(n)`: `d` at feature `ids[r]` of row `r`, zero
    /// elsewhere and on rows whose id is `ignore` (the backward of [`Op::Pick`]).
    Place {
        /// Features of the result.
        n: u32,
        /// The id whose rows get nothing.
        ignore: i32,
    },
    /// `[a: Batch(n)] -> Tokens`: the feature holding each row's largest element, the first
    /// when several tie; a NaN counts as the largest (`torch.argmax`). No gradient flows
    /// through it.
    ArgMax,
    /// `[m: Memory(n)] -> Pairs(n)`: each row's sequence's memory, position by position.
    MemoryToPairs,
    /// `[p: Pairs(n)] -> Memory(n)`: the pairs of each sequence's rows summed into its memory
    /// (the backward of [`Op::MemoryToPairs`]).
    PairsToMemory,
    /// `[q: Batch(n)] -> Pairs(n)`: each row repeated at every source position.
    SpreadPositions,
    /// `[p: Pairs(n)] -> Batch(n)`: each row's pairs summed over the source positions (the
    /// backward of [`Op::SpreadPositions`]).
    SumPositions,
    /// `[m: Memory(n), q: Batch(n)] -> Pairs(1)`: the dot product of each row with its
    /// sequence's memory at every position (Luong's dot score).
    PairDot,
    /// `[a: Pairs(1), m: Memory(n)] -> Batch(n)`: each row's weighted sum of its sequence's
    /// memory (an attention's context).
    Context,
    /// `[a: Pairs(1), d: Batch(n)] -> Memory(n)`: each row `d` spread over its sequence's
    /// positions by its weights, summed over the sequence's rows (the memory's gradient of
    /// [`Op::Context`]).
    ContextT,
    /// `[s: Pairs(1)] -> Pairs(1)`: a softmax over each row's source positions, the positions
    /// past its sequence's source length weighing 0.
    SoftmaxPositions,
}

impl Op {
    /// The mnemonic used by the printer.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Const(_) => "const",
            Op::MatMul => "matmul",
            Op::MatMulT => "matmul_t",
            Op::OuterSum => "outer_sum",
            Op::SumRows => "sum_rows",
            Op::Broadcast => "broadcast",
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::Neg => "neg",
            Op::Exp => "exp",
            Op::Log => "log",
            Op::Sqrt => "sqrt",
            Op::Softplus => "softplus",
            Op::Abs => "abs",
            Op::Sign => "sign",
            Op::Max(_) => "max",
            Op::Min(_) => "min",
            Op::SumFeatures => "sum_features",
            Op::Spread(_) => "spread",
            Op::Sigmoid => "sigmoid",
            Op::Tanh => "tanh",
            Op::Relu => "relu",
            Op::Step => "step",
            Op::Slice { .. } => "slice",
            Op::Concat => "concat",
            Op::Gather => "gather",
            Op::ScatterRows(_) => "scatter_rows",
            Op::LogSoftmax => "log_softmax",
            Op::Pick { .. } => "pick",
            Op::Place { .. } => "place",
            Op::ArgMax => "argmax",
            Op::MemoryToPairs => "memory_to_pairs",
            Op::PairsToMemory => "pairs_to_memory",
            Op::SpreadPositions => "spread_positions",
            Op::SumPositions => "sum_positions",
            Op::PairDot => "pair_dot",
            Op::Context => "context",
            Op::ContextT => "context_t",
            Op::SoftmaxPositions => "softmax_positions",
        }
    }

    /// Whether the op sums over the rows of a batch (and so mixes batch elements and time steps).
    pub fn is_reduction(&self) -> bool {
        matches!(self, Op::OuterSum | Op::SumRows | Op::ScatterRows(_))
    }

    /// Whether each element of the result depends only on the same element of each argument
    /// (a one-element argument spread over all): arithmetic and the one-argument functions.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Add
                | Op::Sub
                | Op::Mul
                | Op::Div
                | Op::Neg
                | Op::Exp
                | Op::Log
                | Op::Sqrt
                | Op::Softplus
                | Op::Abs
                | Op::Sign
                | Op::Max(_)
                | Op::Min(_)
                | Op::Sigmoid
                | Op::Tanh
                | Op::Relu
                | Op::Step
        )
    }

    /// Whether the op belongs to the layers around a recurrent cell (embedding, vocabulary
    /// head, loss, decoding) rather than to a cell's step: the interpreter runs these; the code
    /// generators refuse a step graph that holds one, with a typed error.
    pub fn is_model_op(&self) -> bool {
        matches!(
            self,
            Op::Gather
                | Op::ScatterRows(_)
                | Op::LogSoftmax
                | Op::Pick { .. }
                | Op::Place { .. }
                | Op::ArgMax
                | Op::MemoryToPairs
                | Op::PairsToMemory
                | Op::SpreadPositions
                | Op::SumPositions
                | Op::PairDot
                | Op::Context
                | Op::ContextT
                | Op::SoftmaxPositions
        )
    }

    /// Whether the op reads or makes an attention's memory or pairs, so that evaluating it
    /// needs the memory's extent ([`crate::interp::Extent`]).
    pub fn is_attention_op(&self) -> bool {
        matches!(
            self,
            Op::MemoryToPairs
                | Op::PairsToMemory
                | Op::SpreadPositions
                | Op::SumPositions
                | Op::PairDot
                | Op::Context
                | Op::ContextT
                | Op::SoftmaxPositions
        )
    }

    /// Whether `op(a, b) == op(b, a)`.
    pub fn is_commutative(&self) -> bool {
        matches!(self, Op::Add | Op::Mul)
    }

    /// The shape of `self` applied to arguments of shapes `args`, or why it is ill-typed.
    pub fn infer(&self, args: &[Shape]) -> Result<Shape, String> {
        let arity = |n: usize| {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "`{}` takes {n} argument(s), found {}",
                    self.mnemonic(),
                    args.len()
                ))
            }
        };
        match *self {
            Op::Input(_) | Op::Const(_) => {
                arity(0)?;
                Err("inputs and constants carry their shape; it is not inferred".into())
            }
            Op::MatMul => {
                arity(2)?;
                match (args[0], args[1]) {
                    (Shape::Matrix(o, i), Shape::Batch(n) | Shape::Memory(n) | Shape::Pairs(n))
                        if i == n =>
                    {
                        Ok(args[1].with_features(o))
                    }
                    (a, b) => Err(format!("matmul needs [o, i] @ batch[i], found {a} @ {b}")),
                }
            }
            Op::MatMulT => {
                arity(2)?;
                match (args[0], args[1]) {
                    (Shape::Matrix(o, i), Shape::Batch(n) | Shape::Memory(n) | Shape::Pairs(n))
                        if o == n =>
                    {
                        Ok(args[1].with_features(i))
                    }
                    (a, b) => Err(format!(
                        "matmul_t needs [o, i] and batch[o], found {a} and {b}"
                    )),
                }
            }
            Op::OuterSum => {
                arity(2)?;
                match (args[0], args[1]) {
                    (a, b)
                        if a.rows_kind().is_some()
                            && a.rows_kind() == b.rows_kind()
                            && a != Shape::Tokens
                            && b != Shape::Tokens =>
                    {
                        Ok(Shape::Matrix(a.features(), b.features()))
                    }
                    (a, b) => Err(format!("outer_sum needs two batches, found {a} and {b}")),
                }
            }
            Op::SumRows => {
                arity(1)?;
                match args[0] {
                    Shape::Batch(n) | Shape::Memory(n) | Shape::Pairs(n) => Ok(Shape::Vector(n)),
                    a => Err(format!("sum_rows needs a batch, found {a}")),
                }
            }
            Op::Broadcast => {
                arity(1)?;
                match args[0] {
                    Shape::Vector(n) => Ok(Shape::Batch(n)),
                    a => Err(format!("broadcast needs a vector, found {a}")),
                }
            }
            Op::Add | Op::Sub | Op::Mul | Op::Div => {
                arity(2)?;
                broadcast(args[0], args[1]).ok_or_else(|| {
                    format!(
                        "`{}` cannot combine shapes {} and {}",
                        self.mnemonic(),
                        args[0],
                        args[1]
                    )
                })
            }
            Op::Neg
            | Op::Sigmoid
            | Op::Tanh
            | Op::Relu
            | Op::Step
            | Op::Exp
            | Op::Log
            | Op::Sqrt
            | Op::Softplus
            | Op::Abs
            | Op::Sign
            | Op::Max(_)
            | Op::Min(_) => {
                arity(1)?;
                match args[0] {
                    Shape::Tokens => Err(format!(
                        "`{}` is arithmetic, and token ids are not numbers to compute with",
                        self.mnemonic()
                    )),
                    a => Ok(a),
                }
            }
            Op::SumFeatures => {
                arity(1)?;
                match args[0] {
                    a @ (Shape::Vector(_)
                    | Shape::Batch(_)
                    | Shape::Memory(_)
                    | Shape::Pairs(_)) => Ok(a.with_features(1)),
                    a => Err(format!(
                        "a sum over the features needs a vector or a batch, found {a}"
                    )),
                }
            }
            Op::Spread(n) => {
                arity(1)?;
                match args[0] {
                    _ if n == 0 => Err("spread needs at least one feature".into()),
                    a @ (Shape::Vector(1)
                    | Shape::Batch(1)
                    | Shape::Memory(1)
                    | Shape::Pairs(1)) => Ok(a.with_features(n as usize)),
                    a => Err(format!("spread needs one feature, found {a}")),
                }
            }
            Op::Slice { start, len } => {
                arity(1)?;
                let (start, len) = (start as usize, len as usize);
                let a = args[0];
                if matches!(a, Shape::Scalar | Shape::Tokens) {
                    return Err(format!("cannot slice {a}"));
                }
                if len == 0 || start + len > a.features() {
                    return Err(format!(
                        "slice {start}..{} is out of range for {a}",
                        start + len
                    ));
                }
                Ok(a.with_features(len))
            }
            Op::Concat => {
                if args.is_empty() {
                    return Err("concat needs at least one argument".into());
                }
                let first = args[0];
                if matches!(first, Shape::Scalar | Shape::Tokens) {
                    return Err(format!("cannot concatenate {first}"));
                }
                let mut total = 0;
                for &a in args {
                    if a.with_features(0) != first.with_features(0) {
                        return Err(format!("concat cannot join {first} and {a}"));
                    }
                    total += a.features();
                }
                Ok(first.with_features(total))
            }
            Op::Gather => {
                arity(2)?;
                match (args[0], args[1]) {
                    (Shape::Matrix(_, e), Shape::Tokens) => Ok(Shape::Batch(e)),
                    (a, b) => Err(format!("gather needs [v, e] and tokens, found {a} and {b}")),
                }
            }
            Op::ScatterRows(v) => {
                arity(2)?;
                match (args[0], args[1]) {
                    _ if v == 0 => Err("scatter_rows needs at least one row".into()),
                    (Shape::Batch(e), Shape::Tokens) => Ok(Shape::Matrix(v as usize, e)),
                    (a, b) => Err(format!(
                        "scatter_rows needs a batch and tokens, found {a} and {b}"
                    )),
                }
            }
            Op::LogSoftmax => {
                arity(1)?;
                match args[0] {
                    a @ (Shape::Batch(_) | Shape::Vector(_)) => Ok(a),
                    a => Err(format!("log_softmax needs a batch or a vector, found {a}")),
                }
            }
            Op::Pick { .. } => {
                arity(2)?;
                match (args[0], args[1]) {
                    (Shape::Batch(_), Shape::Tokens) => Ok(Shape::Batch(1)),
                    (a, b) => Err(format!("pick needs a batch and tokens, found {a} and {b}")),
                }
            }
            Op::Place { n, .. } => {
                arity(2)?;
                match (args[0], args[1]) {
                    _ if n == 0 => Err("place needs at least one feature".into()),
                    (Shape::Batch(1), Shape::Tokens) => Ok(Shape::Batch(n as usize)),
                    (a, b) => Err(format!(
                        "place needs batch[1] and tokens, found {a} and {b}"
                    )),
                }
            }
            Op::ArgMax => {
                arity(1)?;
                match args[0] {
                    Shape::Batch(_) => Ok(Shape::Tokens),
                    a => Err(format!("argmax needs a batch, found {a}")),
                }
            }
            Op::MemoryToPairs => {
                arity(1)?;
                match args[0] {
                    Shape::Memory(n) => Ok(Shape::Pairs(n)),
                    a => Err(format!("memory_to_pairs needs a memory, found {a}")),
                }
            }
            Op::PairsToMemory => {
                arity(1)?;
                match args[0] {
                    Shape::Pairs(n) => Ok(Shape::Memory(n)),
                    a => Err(format!("pairs_to_memory needs pairs, found {a}")),
                }
            }
            Op::SpreadPositions => {
                arity(1)?;
                match args[0] {
                    Shape::Batch(n) => Ok(Shape::Pairs(n)),
                    a => Err(format!("spread_positions needs a batch, found {a}")),
                }
            }
            Op::SumPositions => {
                arity(1)?;
                match args[0] {
                    Shape::Pairs(n) => Ok(Shape::Batch(n)),
                    a => Err(format!("sum_positions needs pairs, found {a}")),
                }
            }
            Op::PairDot => {
                arity(2)?;
                match (args[0], args[1]) {
                    (Shape::Memory(m), Shape::Batch(n)) if m == n => Ok(Shape::Pairs(1)),
                    (a, b) => Err(format!(
                        "pair_dot needs memory[n] and batch[n], found {a} and {b}"
                    )),
                }
            }
            Op::Context => {
                arity(2)?;
                match (args[0], args[1]) {
                    (Shape::Pairs(1), Shape::Memory(n)) => Ok(Shape::Batch(n)),
                    (a, b) => Err(format!(
                        "context needs pairs[1] and a memory, found {a} and {b}"
                    )),
                }
            }
            Op::ContextT => {
                arity(2)?;
                match (args[0], args[1]) {
                    (Shape::Pairs(1), Shape::Batch(n)) => Ok(Shape::Memory(n)),
                    (a, b) => Err(format!(
                        "context_t needs pairs[1] and a batch, found {a} and {b}"
                    )),
                }
            }
            Op::SoftmaxPositions => {
                arity(1)?;
                match args[0] {
                    Shape::Pairs(1) => Ok(Shape::Pairs(1)),
                    a => Err(format!("softmax_positions needs pairs[1], found {a}")),
                }
            }
        }
    }
}

/// The shape of an element-wise combination of `a` and `b`, if they broadcast.
///
/// Equal shapes combine; a scalar combines with anything; vectors and batches combine when
/// they have the same number of features or one of them has one feature, and the result is
/// batched if either is. Matrices combine only with their own shape and scalars.
pub fn broadcast(a: Shape, b: Shape) -> Option<Shape> {
    match (a, b) {
        (Shape::Tokens, _) | (_, Shape::Tokens) => None,
        _ if a == b => Some(a),
        (Shape::Scalar, s) | (s, Shape::Scalar) => Some(s),
        (Shape::Matrix(..), _) | (_, Shape::Matrix(..)) => None,
        // Rows of different kinds (a batch's, a memory's, pairs') do not pair up.
        _ if a.rows_kind().is_some()
            && b.rows_kind().is_some()
            && a.rows_kind() != b.rows_kind() =>
        {
            None
        }
        _ => {
            let (fa, fb) = (a.features(), b.features());
            let n = if fa == fb || fb == 1 {
                fa
            } else if fa == 1 {
                fb
            } else {
                return None;
            };
            Some(match (a.rows_kind(), b.rows_kind()) {
                (Some(_), _) => a.with_features(n),
                (_, Some(_)) => b.with_features(n),
                _ => Shape::Vector(n),
            })
        }
    }
}

/// One value's definition.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueData {
    /// The op defining the value.
    pub op: Op,
    /// Its arguments; each is an earlier value of the same graph.
    pub args: Vec<Value>,
    /// Its static shape, which `op.infer` of the argument shapes must give (inputs and constants
    /// state theirs).
    pub shape: Shape,
    /// A name for printing (the DSL variable or gate it came from); no meaning to the semantics.
    pub name: Option<String>,
}

/// A parameter of a cell: a name local to the cell (`weight_ih`), its shape and how it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// The local name; the program adds the layer and direction suffixes.
    pub name: String,
    /// The shape (`Vector` or `Matrix`); a scalar parameter is a `Vector(1)`.
    pub shape: Shape,
    /// Whether the parameter is a scalar, stored as a 0-dimensional tensor (shape `[]`) though
    /// the graph sees it as `Vector(1)`.
    pub scalar: bool,
    /// The value every element starts at, when the declaration gives one (`= 1` for a
    /// LayerNorm gain); otherwise initialisation draws it (PyTorch's uniform rule).
    pub init: Option<f32>,
}

impl ParamInfo {
    /// The dimensions of the stored tensor: `[]` for a scalar, `[n]` for a vector, `[r, c]` for
    /// a matrix.
    pub fn dims(&self) -> Vec<usize> {
        match self.shape {
            _ if self.scalar => Vec::new(),
            Shape::Scalar | Shape::Tokens => Vec::new(),
            Shape::Vector(n) | Shape::Batch(n) | Shape::Memory(n) | Shape::Pairs(n) => vec![n],
            Shape::Matrix(r, c) => vec![r, c],
        }
    }
}

/// One output of a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Output {
    /// What it stands for.
    pub role: OutRole,
    /// The value returned.
    pub value: Value,
}

/// One step of a recurrent cell (or its backward step) as an SSA graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    /// The arena: `values[i]` defines `Value(i)`; arguments always precede their users.
    pub(crate) values: Vec<ValueData>,
    /// The parameter table indexed by `Role::Param(p)`; each entry's shape matches its input's.
    pub(crate) params: Vec<ParamInfo>,
    /// The graph's results; roles are unique.
    pub(crate) outputs: Vec<Output>,
    /// The size of each recurrent state, indexed by `Role::State(k)`, and its name.
    pub(crate) states: Vec<(String, usize)>,
    /// The number of features of the step input `x_t` (`Role::Input` has shape `Batch(input_size)`).
    pub(crate) input_size: usize,
    /// Whether the step input is token ids (`Shape::Tokens`) rather than `input_size` features.
    pub(crate) input_tokens: bool,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty graph with the parameters, states and input size of `g`: what a pass that
    /// rewrites `g` starts from.
    pub fn with_signature_of(g: &Graph) -> Self {
        Graph {
            values: Vec::with_capacity(g.len()),
            params: g.params.clone(),
            outputs: Vec::new(),
            states: g.states.clone(),
            input_size: g.input_size,
            input_tokens: g.input_tokens,
        }
    }

    /// The parameter table, indexed by `Role::Param(p)`.
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    /// The graph's results.
    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    /// Each recurrent state's name and size, indexed by `Role::State(k)`.
    pub fn states(&self) -> &[(String, usize)] {
        &self.states
    }

    /// The number of features of the step input `x_t` (1 when it is token ids).
    pub fn input_size(&self) -> usize {
        self.input_size
    }

    /// Whether the step input is token ids (`Shape::Tokens`, [`Graph::tokens`]).
    pub fn input_is_tokens(&self) -> bool {
        self.input_tokens
    }

    /// The shape of the step input: `Tokens`, or `Batch(input_size)`.
    pub fn input_shape(&self) -> Shape {
        if self.input_tokens {
            Shape::Tokens
        } else {
            Shape::Batch(self.input_size)
        }
    }

    /// Declares recurrent state `name` of `size` features without an input for it (a backward
    /// graph reads the gradient of the state, `Role::Cotangent(OutRole::State(k))`), and
    /// returns its number `k`.
    pub fn declare_state(&mut self, name: &str, size: usize) -> u32 {
        self.states.push((name.to_string(), size));
        self.states.len() as u32 - 1
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the graph has no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The definition of `v`.
    pub fn data(&self, v: Value) -> &ValueData {
        &self.values[v.index()]
    }

    /// The shape of `v`.
    pub fn shape(&self, v: Value) -> Shape {
        self.values[v.index()].shape
    }

    /// All values in arena (topological) order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Value> + '_ {
        (0..self.values.len()).map(Value::new)
    }

    /// The value output with `role`, if any.
    pub fn output(&self, role: OutRole) -> Option<Value> {
        self.outputs
            .iter()
            .find(|o| o.role == role)
            .map(|o| o.value)
    }

    /// The input value with `role`, if any.
    pub fn input(&self, role: Role) -> Option<Value> {
        self.iter().find(|&v| self.data(v).op == Op::Input(role))
    }

    /// The first value whose op a code generator cannot compile inside a step
    /// ([`Op::is_model_op`]), with a message naming it; `None` when every op is a cell's.
    pub fn codegen_unsupported(&self, backend: &str) -> Option<String> {
        self.iter().find(|&v| self.data(v).op.is_model_op()).map(|v| {
            format!(
                "{v} = {}: the {backend} does not compile `{}` inside a recurrent step; run this graph on the interpreter",
                self.data(v).op.mnemonic(),
                self.data(v).op.mnemonic()
            )
        })
    }

    /// Appends a value with an explicit shape, without checks (passes that copy verified
    /// values use it; everything else goes through [`Graph::push`]).
    pub(crate) fn push_raw(
        &mut self,
        op: Op,
        args: Vec<Value>,
        shape: Shape,
        name: Option<String>,
    ) -> Value {
        self.values.push(ValueData {
            op,
            args,
            shape,
            name,
        });
        Value::new(self.values.len() - 1)
    }

    /// Appends `op(args)`, inferring and checking its shape.
    pub fn push(&mut self, op: Op, args: &[Value]) -> Result<Value, IrError> {
        for &a in args {
            if a.index() >= self.values.len() {
                return Err(IrError::new(
                    None,
                    op,
                    format!("argument {a} is not defined"),
                ));
            }
        }
        let shapes: Vec<Shape> = args.iter().map(|&a| self.shape(a)).collect();
        let shape = op.infer(&shapes).map_err(|m| IrError::new(None, op, m))?;
        Ok(self.push_raw(op, args.to_vec(), shape, None))
    }

    /// Declares parameter `name` of `shape` and returns its input value.
    pub fn param(&mut self, name: &str, shape: Shape) -> Value {
        self.declare_param(ParamInfo {
            name: name.to_string(),
            shape,
            scalar: false,
            init: None,
        })
    }

    /// Declares the parameter `info` describes and returns its input value.
    pub fn declare_param(&mut self, info: ParamInfo) -> Value {
        let p = self.params.len() as u32;
        let (name, shape) = (info.name.clone(), info.shape);
        self.params.push(info);
        self.push_raw(Op::Input(Role::Param(p)), vec![], shape, Some(name))
    }

    /// Declares recurrent state `name` of `size` features and returns its previous value.
    pub fn state(&mut self, name: &str, size: usize) -> Value {
        let k = self.declare_state(name, size);
        self.push_raw(
            Op::Input(Role::State(k)),
            vec![],
            Shape::Batch(size),
            Some(name.to_string()),
        )
    }

    /// Declares the step input `x_t` of `size` features and returns it.
    pub fn x(&mut self, size: usize) -> Value {
        self.input_size = size;
        self.push_raw(
            Op::Input(Role::Input),
            vec![],
            Shape::Batch(size),
            Some("x".into()),
        )
    }

    /// Declares the step input as token ids (one per row) and returns it.
    pub fn tokens(&mut self) -> Value {
        self.input_size = 1;
        self.input_tokens = true;
        self.push_raw(
            Op::Input(Role::Input),
            vec![],
            Shape::Tokens,
            Some("ids".into()),
        )
    }

    /// Declares the target tokens of a loss ([`Role::Target`]) and returns them.
    pub fn target(&mut self) -> Value {
        self.push_raw(
            Op::Input(Role::Target),
            vec![],
            Shape::Tokens,
            Some("target".into()),
        )
    }

    /// An input with `role` and `shape` (parameters and states are declared with
    /// [`Graph::param`] and [`Graph::state`]).
    pub fn input_value(&mut self, role: Role, shape: Shape, name: Option<String>) -> Value {
        self.push_raw(Op::Input(role), vec![], shape, name)
    }

    /// The constant `c` filling `shape`.
    pub fn constant(&mut self, c: f32, shape: Shape) -> Value {
        self.push_raw(Op::Const(c.to_bits()), vec![], shape, None)
    }

    /// Marks `value` as the output with `role`.
    pub fn set_output(&mut self, role: OutRole, value: Value) {
        self.outputs.retain(|o| o.role != role);
        self.outputs.push(Output { role, value });
    }

    /// Names `value` for printing.
    pub fn set_name(&mut self, value: Value, name: &str) {
        self.values[value.index()].name = Some(name.to_string());
    }

    /// For each value, the values that use it, in arena order.
    pub fn users(&self) -> Vec<Vec<Value>> {
        let mut users = vec![Vec::new(); self.values.len()];
        for v in self.iter() {
            for &a in &self.data(v).args {
                if users[a.index()].last() != Some(&v) {
                    users[a.index()].push(v);
                }
            }
        }
        users
    }
}

/// Shorthands for building graphs; each checks shapes like [`Graph::push`].
impl Graph {
    /// `x · wᵀ`.
    pub fn matmul(&mut self, w: Value, x: Value) -> Result<Value, IrError> {
        self.push(Op::MatMul, &[w, x])
    }
    /// `a + b`.
    pub fn add(&mut self, a: Value, b: Value) -> Result<Value, IrError> {
        self.push(Op::Add, &[a, b])
    }
    /// `a - b`.
    pub fn sub(&mut self, a: Value, b: Value) -> Result<Value, IrError> {
        self.push(Op::Sub, &[a, b])
    }
    /// `a * b`.
    pub fn mul(&mut self, a: Value, b: Value) -> Result<Value, IrError> {
        self.push(Op::Mul, &[a, b])
    }
    /// `sigmoid(a)`.
    pub fn sigmoid(&mut self, a: Value) -> Result<Value, IrError> {
        self.push(Op::Sigmoid, &[a])
    }
    /// `tanh(a)`.
    pub fn tanh(&mut self, a: Value) -> Result<Value, IrError> {
        self.push(Op::Tanh, &[a])
    }
    /// `relu(a)`.
    pub fn relu(&mut self, a: Value) -> Result<Value, IrError> {
        self.push(Op::Relu, &[a])
    }
    /// Features `start .. start + len` of `a`.
    pub fn slice(&mut self, a: Value, start: usize, len: usize) -> Result<Value, IrError> {
        self.push(
            Op::Slice {
                start: start as u32,
                len: len as u32,
            },
            &[a],
        )
    }
}

/// An ill-formed IR graph: the value and op at fault and what is wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct IrError {
    /// The offending value, when there is one.
    pub value: Option<Value>,
    /// The op being built or checked.
    pub op: Op,
    /// What is wrong.
    pub message: String,
}

impl IrError {
    /// An error about `op` (defining `value`, if known).
    pub fn new(value: Option<Value>, op: Op, message: impl Into<String>) -> Self {
        IrError {
            value,
            op,
            message: message.into(),
        }
    }
}

impl fmt::Display for IrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(v) => write!(f, "{v} = {}: {}", self.op.mnemonic(), self.message),
            None => write!(f, "{}: {}", self.op.mnemonic(), self.message),
        }
    }
}

impl std::error::Error for IrError {}

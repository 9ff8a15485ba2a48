//! Errors: one enum for everything a user can get wrong, grouped by kind. Each message names the
//! thing at fault (tensor, argument, value) and the expected and found values.

pub use crate::graph::IrError;
use crate::spec::Loc;
use std::fmt;

/// One mistake in a declaration (found by the parser or by lowering), with the place in the
/// source it points at.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    /// A sentence saying what was expected.
    pub message: String,
    /// 1-based line of the offending token (0 when unknown).
    pub line: usize,
    /// 1-based column of the offending token (0 when unknown).
    pub column: usize,
    /// The offending token's span, for macros to point `compile_error!` at it: `Some` when the
    /// parser found the mistake; `None` when lowering did, which knows only the [`Loc`] (map it
    /// back with [`parse::span_at`](crate::parse::span_at)), and for brackets of a `.rnn` file
    /// that do not nest, found before there are tokens.
    pub span: Option<proc_macro2::Span>,
}

impl Diagnostic {
    /// A diagnostic at `loc` with no span: what lowering reports.
    pub fn at(loc: Loc, message: impl Into<String>) -> Self {
        Diagnostic {
            message: message.into(),
            line: loc.line as usize,
            column: loc.column as usize,
            span: None,
        }
    }

    /// Where it points, as a [`Loc`] ([`Loc::UNKNOWN`] when unknown).
    pub fn loc(&self) -> Loc {
        if self.line == 0 {
            return Loc::UNKNOWN;
        }
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Loc::new(clamp(self.line), clamp(self.column))
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        } else {
            write!(f, "{}", self.message)
        }
    }
}

/// Everything that can go wrong in `rnn-ir`.
#[derive(Debug)]
pub enum Error {
    // --- declarations ---
    /// The declaration does not parse; every mistake found is listed.
    Parse(Vec<Diagnostic>),
    /// The declaration parses but describes no valid model (a size of zero, an unknown option).
    Spec(String),
    /// A graph failed verification; this is a bug in a pass or in the lowering.
    Ir(IrError),

    // --- weight files ---
    /// A weight file is not a readable safetensors file (truncated, corrupted header).
    WeightFile(String),
    /// A tensor the model needs is not in the weights.
    MissingTensor {
        /// The PyTorch name.
        name: String,
        /// The shape it must have.
        expected: Vec<usize>,
    },
    /// The weights hold a tensor the model has no use for (a misspelt name, another model's file).
    UnexpectedTensor {
        /// The name found.
        name: String,
    },
    /// A tensor has the wrong shape.
    TensorShape {
        /// The tensor or argument.
        name: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A tensor has the wrong element type.
    TensorDtype {
        /// The tensor or argument.
        name: String,
        /// The element type required.
        expected: String,
        /// The element type found.
        found: String,
    },
    /// The weights do not describe a model this cell can be (e.g. 3 gates asked of an LSTM).
    WeightsMismatch(String),

    // --- run-time arguments ---
    /// An `.npy` file is malformed or of the wrong type.
    Npy(String),
    /// An input holds NaN or infinity.
    NonFinite {
        /// The argument.
        name: String,
        /// The flat index of the first bad element.
        index: usize,
        /// The bad element.
        found: f32,
    },
    /// A sequence length is zero, negative or longer than the input.
    Length {
        /// The batch element.
        index: usize,
        /// The length given.
        found: i64,
        /// The largest length allowed (the input's time steps).
        max: usize,
    },
    /// A token id is outside the vocabulary it indexes (an embedding's table, a head's classes).
    Token {
        /// The argument (`src`, `targets`, `sos`).
        name: String,
        /// The flat index of the first bad id.
        index: usize,
        /// The id found.
        found: i64,
        /// The vocabulary's size: ids are `0 ..= vocab - 1`.
        vocab: usize,
    },
    /// An argument is inconsistent with the model or with the other arguments.
    Argument(String),
    /// The JIT could not compile the program for this machine.
    Jit(String),
    /// A checkpoint does not belong here (another model's, another optimiser's) or is
    /// incomplete.
    Checkpoint(String),
    /// Reading or writing a file failed.
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn dims(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Parse(diags) => {
                let lines: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
                write!(f, "{}", lines.join("; "))
            }
            Error::Spec(m) => write!(f, "invalid model: {m}"),
            Error::Ir(e) => write!(f, "invalid IR (a compiler bug): {e}"),
            Error::WeightFile(m) => write!(f, "not a valid safetensors file: {m}"),
            Error::MissingTensor { name, expected } => {
                write!(
                    f,
                    "missing tensor `{name}` (expected shape {})",
                    dims(expected)
                )
            }
            Error::UnexpectedTensor { name } => {
                write!(
                    f,
                    "unexpected tensor `{name}`: the model has no parameter of that name"
                )
            }
            Error::TensorShape {
                name,
                expected,
                found,
            } => write!(
                f,
                "`{name}` has shape {}, expected {}",
                dims(found),
                dims(expected)
            ),
            Error::TensorDtype {
                name,
                expected,
                found,
            } => {
                write!(f, "`{name}` has dtype {found}, expected {expected}")
            }
            Error::WeightsMismatch(m) => write!(f, "weights do not fit the model: {m}"),
            Error::Npy(m) => write!(f, "{m}"),
            Error::NonFinite { name, index, found } => {
                write!(
                    f,
                    "`{name}` holds {found} at flat index {index}; inputs must be finite"
                )
            }
            Error::Length { index, found, max } => write!(
                f,
                "`lengths[{index}]` is {found}, expected a length in 1..={max} (the input's time steps)"
            ),
            Error::Token {
                name,
                index,
                found,
                vocab,
            } => write!(
                f,
                "`{name}` holds the token id {found} at flat index {index}, outside the vocabulary of {vocab} (ids 0..={})",
                vocab.saturating_sub(1)
            ),
            Error::Argument(m) => write!(f, "{m}"),
            Error::Jit(m) => write!(f, "{m}"),
            Error::Checkpoint(m) => write!(f, "checkpoint: {m}"),
            Error::Io { path, source } => write!(f, "{path}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Ir(e) => Some(e),
            _ => None,
        }
    }
}

impl From<IrError> for Error {
    fn from(e: IrError) -> Self {
        Error::Ir(e)
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The candidate closest to `word`, if one is close enough to be what was meant (Jaro-Winkler
/// similarity of at least 0.8, via `strsim`): the "did you mean" of every unknown keyword,
/// setting, function and name.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

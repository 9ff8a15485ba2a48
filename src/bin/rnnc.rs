//! `rnnc`: the `rnn` command line.
//!
//! - `rnnc run`: a model (declared in a `.rnn` file with `--model`, or a PyTorch `nn.RNN` /
//!   `nn.LSTM` / `nn.GRU` inferred from its state dict), its weights and a `.npy` input in;
//!   outputs, final states and (with `--grad-output`) every gradient out, as safetensors.
//! - `rnnc init`: initial weights for a declared model, with its parameters' names.
//! - `rnnc inspect`: a model's spec, parameter count and compiled IR.
//! - `rnnc bench`: the workloads W1–W8.
//! - `rnnc train`: train a model on the copy or reversal task (an encoder-decoder, with or
//!   without attention) or as a character language model, with a progress bar, a loss log,
//!   checkpoints and `--resume`.
//! - `rnnc seq2seq`: decode source token ids with an encoder-decoder's PyTorch state dict
//!   (greedy, or beam search), tokens out as int64 `.npy`.
//! - `rnnc tour` (and `rnnc` alone, what `cargo run --release` runs): the chapter's experiments,
//!   measured, with a summary table and a report folder of Markdown and PNG plots.
//!
//! Any bad input (command-line mistakes included) exits with code 2 and one line on stderr
//! naming the file, flag or tensor at fault. `--out` never overwrites an input. Output to a pipe
//! closed early (`rnnc inspect ... | head -1`) ends the command quietly.

use clap::{Args, Parser, Subcommand, ValueEnum};
use rnn::bench::{self, WORKLOADS};
use rnn::ir::spec::{BiasConvention, GruReset};
use rnn::ir::{npy, weights};
use rnn::{CellKind, Error, Exec, ModelSpec, Program, Request, Tensor, Weights};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rnnc",
    version,
    about = "A compiler for recurrent neural networks: PyTorch-exact RNN, LSTM and GRU."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Cell {
    /// `nn.RNN` with tanh (the fixtures' `meta.json` spelling; `rnn-tanh` is an alias).
    #[value(name = "rnn_tanh", alias = "rnn-tanh")]
    RnnTanh,
    /// `nn.RNN(nonlinearity="relu")` (`rnn-relu` is an alias).
    #[value(name = "rnn_relu", alias = "rnn-relu")]
    RnnRelu,
    /// `nn.LSTM`.
    Lstm,
    /// `nn.GRU`.
    Gru,
}

impl Cell {
    fn kind(self) -> CellKind {
        match self {
            Cell::RnnTanh => CellKind::RnnTanh,
            Cell::RnnRelu => CellKind::RnnRelu,
            Cell::Lstm => CellKind::Lstm,
            Cell::Gru => CellKind::Gru,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// The reference interpreter.
    Interp,
    /// The Cranelift JIT (float32 only).
    Jit,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchBackend {
    /// The reference interpreter.
    Interp,
    /// The Rust the macros emit, for the workloads' models declared in the facade.
    Macro,
    /// The Cranelift JIT.
    Jit,
}

impl BenchBackend {
    fn name(self) -> &'static str {
        match self {
            BenchBackend::Interp => "interp",
            BenchBackend::Macro => "macro",
            BenchBackend::Jit => "jit",
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a model (a `.rnn` file, or a PyTorch RNN/LSTM/GRU state dict) on an input; optionally
    /// compute gradients.
    Run(RunArgs),
    /// Write initial weights for a `.rnn` model (PyTorch's initialisation, from a seed).
    Init(InitArgs),
    /// Print a model's spec, its parameter count and the IR of its step and backward step.
    Inspect(InspectArgs),
    /// Print the Rust that `rnn!` / `lstm!` / `gru!` would emit for a model (or a model
    /// around its stack, from a file with `vocab` or `head`), formatted.
    Emit(EmitArgs),
    /// Time the workloads W1–W8 (all the backend runs when none is named).
    Bench(BenchArgs),
    /// Decode source token ids with an encoder-decoder (a PyTorch state dict with
    /// `encoder.embedding`, `encoder.rnn`, `decoder.embedding`, `decoder.rnn`, `decoder.fc`):
    /// greedy, or beam search with `--beam`; the tokens are written as int64 (batch, steps).
    Seq2seq(Seq2seqArgs),
    /// The chapter, measured: one experiment per section, a report folder with plots, a
    /// summary on the terminal (what `cargo run --release` runs).
    Tour(TourArgs),
    /// Train a model on a task: `copy` or `reverse` (an encoder-decoder) or `charlm` (a
    /// character language model); writes `loss.csv` and checkpoints into `--out`.
    Train(TrainArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TrainTask {
    /// Copy a random string of symbols (an encoder-decoder).
    Copy,
    /// Reverse a random string of symbols (an encoder-decoder).
    Reverse,
    /// Predict the next character of a text (a language model).
    Charlm,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AttentionScore {
    /// Luong's dot score.
    Dot,
    /// Luong's general score.
    General,
    /// Bahdanau's additive score.
    Additive,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum AttentionPlacement {
    /// After the decoder's stack, the combined context replacing its output (Luong).
    #[default]
    Output,
    /// In the decoder's step: the previous output queries, the context joins the input
    /// (Bahdanau, PyTorch's seq2seq tutorial).
    Input,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OptimizerKind {
    /// Adam (PyTorch's defaults but `--lr`).
    Adam,
    /// AdamW (weight decay 0.01).
    Adamw,
    /// SGD with momentum 0.9.
    Sgd,
}

#[derive(Args)]
struct TrainArgs {
    /// The task.
    #[arg(long, value_enum)]
    task: TrainTask,
    /// The text of `charlm` (UTF-8); the first 100 kB of the Shakespeare corpus when absent.
    #[arg(long, value_name = "FILE.txt")]
    text: Option<PathBuf>,
    /// The cell of every stack.
    #[arg(long, value_enum, default_value = "lstm")]
    cell: Cell,
    /// Embedding features.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    embedding: usize,
    /// Hidden features (the encoder's; a decoder after a bidirectional encoder has twice as
    /// many).
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    hidden: usize,
    /// Stacked layers.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    layers: usize,
    /// A bidirectional encoder (copy and reverse).
    #[arg(long)]
    bidirectional: bool,
    /// The decoder attends over the encoder's outputs with this score (copy and reverse).
    #[arg(long, value_enum)]
    attention: Option<AttentionScore>,
    /// Units of the additive score.
    #[arg(long, default_value_t = rnn::ir::parse::DEFAULT_ATTENTION_UNITS, value_parser = at_least_one)]
    attention_units: usize,
    /// Where the attention sits (copy and reverse, with `--attention`).
    #[arg(long, value_enum, default_value_t = AttentionPlacement::Output)]
    attention_placement: AttentionPlacement,
    /// Distinct symbols of copy and reverse.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    symbols: usize,
    /// The shortest source of copy and reverse.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    min_len: usize,
    /// The longest source of copy and reverse.
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    max_len: usize,
    /// Characters per training window of charlm.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    batch: usize,
    /// Optimisation steps in all (a resumed run continues up to it).
    #[arg(long, default_value_t = 1000, value_parser = at_least_one_step)]
    steps: u64,
    /// The optimiser.
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: OptimizerKind,
    /// The learning rate.
    #[arg(long, default_value_t = 2e-3, allow_negative_numbers = true)]
    lr: f64,
    /// Clip the gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    clip: f32,
    /// The seed of the initial weights and of the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The folder of `loss.csv`, the checkpoints `checkpoint-STEP.safetensors` and (charlm)
    /// `samples-STEPS.txt`; created if missing. Nothing in it is overwritten: a resumed run may
    /// continue the folder of the run it resumes (its log is appended to).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Evaluate (token accuracy of greedy decoding, or the held-out loss) every this many
    /// steps, and at the end.
    #[arg(long, default_value_t = 100, value_parser = at_least_one_step)]
    eval_every: u64,
    /// Write a checkpoint every this many steps, and at the end.
    #[arg(long, default_value_t = 500, value_parser = at_least_one_step)]
    checkpoint_every: u64,
    /// Continue from this checkpoint (weights, optimiser state, step, data position); the
    /// model and task flags must be those of the run that wrote it (the checkpoint records
    /// them, and another value is refused).
    #[arg(long, value_name = "CKPT.safetensors")]
    resume: Option<PathBuf>,
    /// The backend that runs the stacks.
    #[arg(long, value_enum, default_value = "jit")]
    backend: Backend,
    /// The temperature of the text sampled after a charlm run.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Characters sampled after a charlm run.
    #[arg(long, default_value_t = 300)]
    sample_len: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct Seq2seqArgs {
    /// The weights (safetensors, float32): the encoder-decoder's `state_dict`.
    #[arg(long, value_name = "W.safetensors")]
    weights: PathBuf,
    /// The source token ids, integer `.npy` (batch, src_len).
    #[arg(long, value_name = "S.npy")]
    src: PathBuf,
    /// Per-sequence source lengths, integer `.npy` (batch,): packed sources.
    #[arg(long, value_name = "L.npy")]
    src_lengths: Option<PathBuf>,
    /// Tokens to produce per sequence (at least 1).
    #[arg(long, value_parser = at_least_one)]
    steps: usize,
    /// The start token fed to the decoder first.
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    sos: i64,
    /// The end token: a sequence that produces it produces it again at every later step, and
    /// decoding stops once every sequence has.
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    eos: Option<i64>,
    /// Beam search with this many hypotheses per sequence (1 is greedy decoding).
    #[arg(long, value_name = "N")]
    beam: Option<usize>,
    /// The length normalisation of beam search: hypotheses are ranked by their summed
    /// log-probability divided by length^ALPHA (0: the raw sum).
    #[arg(
        long,
        value_name = "ALPHA",
        default_value_t = 1.0,
        requires = "beam",
        allow_negative_numbers = true
    )]
    length_penalty: f64,
    /// Where to write the tokens, int64 `.npy` (batch, steps); never one of the inputs.
    #[arg(long, value_name = "T.npy")]
    out: PathBuf,
    /// The cell, where the weights' shapes do not settle it (an RNN's nonlinearity).
    #[arg(long, value_enum)]
    cell: Option<Cell>,
    /// The backend that runs the encoder's and the decoder's recurrent stacks.
    #[arg(long, value_enum, default_value = "interp")]
    backend: Backend,
}

#[derive(Args)]
struct RunArgs {
    /// The model, declared in a `.rnn` file (any cell, custom ones included). Without it the
    /// model is a PyTorch RNN/LSTM/GRU inferred from the weights' names and shapes.
    #[arg(long, value_name = "FILE.rnn")]
    model: Option<PathBuf>,
    /// The weights (safetensors, float32): a PyTorch `state_dict`, or `rnnc init`'s output.
    #[arg(long, value_name = "W.safetensors")]
    weights: PathBuf,
    /// Only the tensors under this module prefix of a whole model's `state_dict` (`rnn.` for
    /// `rnn.weight_ih_l0`), with it stripped; tensors outside it (`fc.weight`) are ignored.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// The input, float32 `.npy`: (T, B, I), or (B, T, I) with --batch-first.
    #[arg(long, value_name = "X.npy")]
    input: PathBuf,
    /// Where to write `output`, the final states and the gradients (safetensors); never one of
    /// the inputs.
    #[arg(long, value_name = "OUT.safetensors")]
    out: PathBuf,
    /// The cell, where the weights' shapes do not settle it (an RNN's nonlinearity; default
    /// tanh). Not with --model, whose file declares the cell.
    #[arg(long, value_enum)]
    cell: Option<Cell>,
    /// Input and output are (batch, time, features) (with --model, also when the file says
    /// `batch_first: true`).
    #[arg(long)]
    batch_first: bool,
    /// Initial hidden state `h`, float32 `.npy` (layers·directions, B, H).
    #[arg(long, value_name = "H.npy")]
    h0: Option<PathBuf>,
    /// Initial cell state `c` (LSTM), float32 `.npy` (layers·directions, B, H).
    #[arg(long, value_name = "C.npy")]
    c0: Option<PathBuf>,
    /// The initial value of the state the model declares as NAME, float32 `.npy`
    /// (layers·directions, B, size); repeatable. `--h0 H.npy` is `--state h=H.npy`.
    #[arg(long = "state", value_name = "NAME=S.npy")]
    states: Vec<String>,
    /// Per-sequence lengths, integer `.npy` (B,): packed-sequence semantics.
    #[arg(long, value_name = "L.npy")]
    lengths: Option<PathBuf>,
    /// With it, write the gradients of sum(output * G), float32 `.npy` shaped like the output.
    #[arg(long, value_name = "G.npy")]
    grad_output: Option<PathBuf>,
    /// The backend that executes the model.
    #[arg(long, value_enum, default_value = "interp")]
    backend: Backend,
    /// The arithmetic the model runs in; results are written as float32 either way. `f64`
    /// gives results exact to float32's precision where float32 arithmetic is ill-conditioned
    /// (a layer norm's gradients).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

/// The arithmetic of `rnnc run`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Precision {
    /// float32, as PyTorch's default.
    F32,
    /// float64.
    F64,
}

#[derive(Args)]
struct InitArgs {
    /// The model, declared in a `.rnn` file.
    #[arg(long, value_name = "FILE.rnn")]
    model: PathBuf,
    /// The seed: the same seed gives the same weights on every platform.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the weights (safetensors, float32, the model's parameter names).
    #[arg(long, value_name = "W.safetensors")]
    out: PathBuf,
}

/// A model given as a `.rnn` file or by flags (`inspect`, `emit`).
#[derive(Args)]
struct ModelArgs {
    /// A `.rnn` declaration file (instead of the flags below).
    file: Option<PathBuf>,
    /// The standard cell.
    #[arg(
        long,
        value_enum,
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    cell: Option<Cell>,
    /// Input features.
    #[arg(long, required_unless_present = "file")]
    input_size: Option<usize>,
    /// Hidden features.
    #[arg(long, required_unless_present = "file")]
    hidden_size: Option<usize>,
    /// Stacked layers.
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// Run every layer in both directions.
    #[arg(long)]
    bidirectional: bool,
    /// LSTM projection size.
    #[arg(long, default_value_t = 0)]
    proj_size: usize,
    /// One bias per gate (Keras, the chapter's counts) instead of PyTorch's two.
    #[arg(long)]
    one_bias: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print the graphs before optimisation (no passes, no hoisting).
    #[arg(long)]
    no_passes: bool,
    /// Also print the CLIF of every kernel the JIT compiles (per layer: inference, training
    /// and backward plans, each before the loop, one step, after the loop).
    #[arg(long)]
    clif: bool,
}

#[derive(Args)]
struct EmitArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The declared struct's name (default: the `.rnn` file's model name, else `Model`).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Args)]
struct TourArgs {
    /// Seconds instead of minutes: every training and timing cut short (for CI; its verdicts
    /// on learning mean little).
    #[arg(long)]
    quick: bool,
    /// Only these sections, by name or the chapter's number: cell (2), gradients (3),
    /// properties (4), bidirectional (5), seq2seq (6, 8), sequential (7), packing, charlm.
    #[arg(long, value_delimiter = ',', value_parser = parse_section)]
    only: Vec<rnn::tour::Section>,
    /// The seed of every weight, datum and batch.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The report folder: `report.md`, the PNG plots and `summary.json` (a new or empty
    /// folder, or one an earlier tour wrote).
    #[arg(long, default_value = "tour-report")]
    out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

impl Default for TourArgs {
    fn default() -> Self {
        TourArgs {
            quick: false,
            only: Vec::new(),
            seed: 1,
            out: PathBuf::from("tour-report"),
            quiet: false,
        }
    }
}

fn parse_section(s: &str) -> Result<rnn::tour::Section, String> {
    s.parse()
}

#[derive(Args)]
struct BenchArgs {
    /// Workloads by id or name (W1 … W8, lstm_fwd_seed …).
    workloads: Vec<String>,
    /// The backend to time.
    #[arg(long, value_enum, default_value = "interp")]
    backend: BenchBackend,
    /// Threads for the matrix products (at least 1).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    threads: usize,
    /// Timed repetitions after one warm-up (at least 1).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    reps: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// A step count that must be at least 1.
fn at_least_one_step(s: &str) -> Result<u64, String> {
    at_least_one(s).map(|n| n as u64)
}

/// A count that must be at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number of at least 1".into()),
    }
}

/// A failure: the file or argument at fault and what is wrong with it; or standard output closed
/// by its reader, which ends the command quietly.
struct Failure {
    place: String,
    error: String,
    /// Further mistakes found with the first (a declaration's every parse error), one line each.
    more: Vec<String>,
    closed: bool,
}

fn fail(place: &Path, error: impl ToString) -> Failure {
    Failure {
        place: place.display().to_string(),
        error: error.to_string(),
        more: Vec::new(),
        closed: false,
    }
}

/// A failure reading or compiling a declaration: every mistake the parser or lowering found,
/// each on its own line at its `line:column`.
fn fail_model(place: &Path, error: Error) -> Failure {
    match error {
        Error::Parse(diags) if diags.len() > 1 => {
            let mut lines = diags.iter().map(|d| d.to_string());
            let first = lines.next().unwrap_or_default();
            Failure {
                more: lines.collect(),
                ..fail(place, first)
            }
        }
        e => fail(place, e),
    }
}

/// A failure of a flag rather than a file.
fn fail_at(flag: &str, error: impl ToString) -> Failure {
    fail(Path::new(flag), error)
}

fn read(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| fail(path, e))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_failure(e),
    };
    let result = match cli.command {
        None => tour(&TourArgs::default()),
        Some(Command::Run(args)) => run(&args),
        Some(Command::Init(args)) => init(&args),
        Some(Command::Inspect(args)) => inspect(&args),
        Some(Command::Emit(args)) => emit(&args),
        Some(Command::Bench(args)) => run_bench(&args),
        Some(Command::Seq2seq(args)) => seq2seq(&args),
        Some(Command::Train(args)) => train(&args),
        Some(Command::Tour(args)) => tour(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if f.closed => ExitCode::SUCCESS,
        Err(f) => {
            let message = if f.place.is_empty() {
                f.error
            } else {
                format!("{}: {}", f.place, f.error)
            };
            complain(&message);
            for line in &f.more {
                complain(&format!("{}: {line}", f.place));
            }
            ExitCode::from(2)
        }
    }
}

/// One line on stderr (which may itself be closed: then nothing).
fn complain(message: &str) {
    let _ = writeln!(std::io::stderr(), "rnnc: {}", message.replace('\n', " "));
}

/// A command-line mistake as one line, like every other bad input (exit code 2); help and the
/// version are printed as clap prints them.
fn usage_failure(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Printing ignores a closed pipe (`rnnc --help | head -1`).
            let _ = e.print();
            ExitCode::from(e.exit_code().clamp(0, 255) as u8)
        }
        _ => {
            // The first paragraph of clap's text (the error and any list under it), without
            // the usage and tips after it.
            let text = e.to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let message = lines.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            complain(&format!("{message} (see `rnnc help`)"));
            ExitCode::from(2)
        }
    }
}

/// Writes `text` to standard output. A reader that stops early (`rnnc inspect ... | head -1`)
/// ends the command quietly: the failure returned is the `closed` one.
fn say(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure {
            place: String::new(),
            error: String::new(),
            more: Vec::new(),
            closed: true,
        }),
        Err(e) => Err(fail(Path::new("stdout"), e)),
    }
}

/// Whether `a` and `b` are the same file: the same path, the same file by another path (`./w`,
/// `../dir/w`, a symbolic link) or, on Unix, a hard link to it.
fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    if let (Ok(x), Ok(y)) = (std::fs::canonicalize(a), std::fs::canonicalize(b))
        && x == y
    {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}

/// Refuses an output file that is one of the inputs (by any path), before anything is read or
/// written.
fn refuse_overwrite(out: &Path, inputs: &[(String, &Path)]) -> Result<(), Failure> {
    match inputs.iter().find(|(_, input)| same_file(out, input)) {
        Some((flag, input)) => Err(fail(
            out,
            format!(
                "`--out` is the file given to `{flag}` ({}): writing there would overwrite an input; choose another output file",
                input.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Per-sequence lengths from an integer `.npy` vector `(B,)`, when a file is given.
fn read_lengths(path: Option<&Path>) -> Result<Option<Vec<i64>>, Failure> {
    let Some(p) = path else {
        return Ok(None);
    };
    let (shape, data) = npy::read_i64(&read(p)?).map_err(|e| fail(p, e))?;
    if shape.len() != 1 {
        return Err(fail(
            p,
            format!("lengths must be a vector (B,), found shape {shape:?}"),
        ));
    }
    Ok(Some(data))
}

/// Reads and parses a `.rnn` declaration.
fn read_model(path: &Path) -> Result<ModelSpec, Failure> {
    let text =
        String::from_utf8(read(path)?).map_err(|_| fail(path, "the file is not UTF-8 text"))?;
    rnn::parse_str(&text).map_err(|e| fail_model(path, e))
}

/// A weights error with the names spelt as in the file (the stripped `prefix` put back); when
/// names are missing or unexpected and the file holds the `wanted` ones under a module prefix,
/// it says which `--prefix` to pass.
fn weights_failure(path: &Path, e: Error, w: &Weights, wanted: &[&str], prefix: &str) -> Failure {
    let names_differ = matches!(
        e,
        Error::MissingTensor { .. } | Error::UnexpectedTensor { .. }
    );
    let e = match e {
        Error::MissingTensor { name, expected } => Error::MissingTensor {
            name: format!("{prefix}{name}"),
            expected,
        },
        Error::UnexpectedTensor { name } => Error::UnexpectedTensor {
            name: format!("{prefix}{name}"),
        },
        Error::TensorShape {
            name,
            expected,
            found,
        } => Error::TensorShape {
            name: format!("{prefix}{name}"),
            expected,
            found,
        },
        Error::NonFinite { name, index, found } => Error::NonFinite {
            name: format!("{prefix}{name}"),
            index,
            found,
        },
        other => other,
    };
    let mut message = e.to_string();
    if names_differ {
        let held: Vec<String> =
            weights::prefixes_holding(w.tensors.keys().map(String::as_str), wanted)
                .into_iter()
                .map(|p| format!("{prefix}{p}"))
                .collect();
        match held.as_slice() {
            [] => {}
            [one] => message.push_str(&format!(
                "; the file's parameters are under the prefix `{one}`: pass `--prefix {one}`"
            )),
            many => {
                let list: Vec<String> = many.iter().map(|p| format!("`{p}`")).collect();
                message.push_str(&format!(
                    "; the file holds parameters under the prefixes {}: pass `--prefix` with the one to run",
                    list.join(", ")
                ));
            }
        }
    }
    fail(path, message)
}

fn run(args: &RunArgs) -> Result<(), Failure> {
    let (weights_path, input_path, out_path) = (
        args.weights.as_path(),
        args.input.as_path(),
        args.out.as_path(),
    );
    let (lengths_path, grad_path) = (args.lengths.as_deref(), args.grad_output.as_deref());
    if let (Some(model), Some(_)) = (&args.model, args.cell) {
        return Err(fail_at(
            "--cell",
            format!(
                "the model file `{}` declares the cell: give `--model` or `--cell`, not both",
                model.display()
            ),
        ));
    }
    // Initial states by declared name: `--h0`, `--c0`, then each `--state NAME=FILE`.
    let mut given: Vec<(String, String, &Path)> = Vec::new();
    for (name, flag, path) in [("h", "--h0", &args.h0), ("c", "--c0", &args.c0)] {
        if let Some(p) = path {
            given.push((name.to_string(), flag.to_string(), p.as_path()));
        }
    }
    for s in &args.states {
        let (name, file) = s
            .split_once('=')
            .filter(|(n, f)| !n.is_empty() && !f.is_empty())
            .ok_or_else(|| {
                fail_at(
                    "--state",
                    format!("`{s}` is not NAME=FILE.npy (a state's declared name, `=`, then the file of its initial value)"),
                )
            })?;
        given.push((name.to_string(), format!("--state {name}"), Path::new(file)));
    }
    for (i, (name, flag, _)) in given.iter().enumerate() {
        if let Some((_, first, _)) = given[..i].iter().find(|g| g.0 == *name) {
            return Err(fail_at(
                flag,
                format!("the initial value of state `{name}` is already given by `{first}`"),
            ));
        }
    }
    let mut inputs: Vec<(String, &Path)> = vec![
        ("--weights".into(), weights_path),
        ("--input".into(), input_path),
    ];
    inputs.extend(args.model.as_deref().map(|p| ("--model".to_string(), p)));
    inputs.extend(lengths_path.map(|p| ("--lengths".to_string(), p)));
    inputs.extend(grad_path.map(|p| ("--grad-output".to_string(), p)));
    inputs.extend(given.iter().map(|(_, flag, p)| (flag.clone(), *p)));
    refuse_overwrite(out_path, &inputs)?;

    let mut weights = Weights {
        tensors: weights::read_safetensors(&read(weights_path)?)
            .map_err(|e| fail(weights_path, e))?,
    };
    let prefix = weights::module_prefix(args.prefix.as_deref().unwrap_or(""));
    if !prefix.is_empty() {
        weights = weights
            .strip_prefix(&prefix)
            .map_err(|e| fail(weights_path, e))?;
    }
    let (spec, spec_path) = match args.model.as_deref() {
        Some(path) => {
            let mut spec = read_model(path)?;
            spec.batch_first |= args.batch_first;
            (spec, path)
        }
        None => {
            let mut spec = weights::infer_spec(&weights.tensors, args.cell.map(Cell::kind))
                .map_err(|e| {
                    let missing = matches!(e, Error::MissingTensor { .. });
                    let mut f = weights_failure(
                        weights_path,
                        e,
                        &weights,
                        &["weight_ih_l0", "weight_hh_l0"],
                        &prefix,
                    );
                    // Inference looks for the first layer's matrices, of shapes it cannot know yet.
                    f.error = f.error.replace(" (expected shape [])", " (a matrix)");
                    if missing && !f.error.contains("--prefix") {
                        f.error.push_str(
                            "; without `--model` the weights must be a PyTorch nn.RNN, nn.LSTM or nn.GRU state dict (for another model, give its `.rnn` file with `--model`)",
                        );
                    }
                    f
                })?;
            spec.batch_first = args.batch_first;
            (spec, weights_path)
        }
    };
    let program = Program::compile(&spec).map_err(|e| fail_model(spec_path, e))?;
    let names: Vec<String> = program.parameters().into_iter().map(|(n, _)| n).collect();
    let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    weights
        .check(&program)
        .map_err(|e| weights_failure(weights_path, e, &weights, &wanted, &prefix))?;
    // Each given state by its place among the model's states.
    let states = program.states();
    let mut state_paths: Vec<Option<&Path>> = vec![None; states.len()];
    for (name, flag, path) in &given {
        let Some(k) = states.iter().position(|s| s.0 == *name) else {
            let names: Vec<String> = states.iter().map(|s| format!("`{}`", s.0)).collect();
            return Err(fail_at(
                flag,
                format!(
                    "the model has no state `{name}`; its states are {}",
                    names.join(", ")
                ),
            ));
        };
        state_paths[k] = Some(*path);
    }
    let load =
        |p: &Path| -> Result<Tensor, Failure> { npy::read_f32(&read(p)?).map_err(|e| fail(p, e)) };
    let input = load(input_path)?;
    let initial: Vec<Option<Tensor>> = state_paths
        .iter()
        .map(|p| p.map(load).transpose())
        .collect::<Result<_, _>>()?;
    let lengths = read_lengths(lengths_path)?;
    let grad_output = grad_path.map(load).transpose()?;
    let req = Request {
        input: Some(&input),
        initial_states: initial.iter().map(Option::as_ref).collect(),
        lengths: lengths.as_deref(),
        grad_output: grad_output.as_ref(),
        grad_final_states: vec![],
    };
    let exec = Exec::default();
    let out = match (args.backend, args.precision) {
        (Backend::Interp, Precision::F32) => {
            program.bind::<f32>(&weights).map(|b| b.run(&req, &exec))
        }
        (Backend::Interp, Precision::F64) => {
            program.bind::<f64>(&weights).map(|b| b.run(&req, &exec))
        }
        (Backend::Jit, Precision::F32) => {
            let jit = rnn::jit::Jit::compile(&program).map_err(|e| fail(spec_path, e))?;
            std::sync::Arc::new(jit)
                .bind(&weights)
                .map(|model| model.run(&req))
        }
        (Backend::Jit, Precision::F64) => {
            return Err(fail_at(
                "--precision",
                "the JIT computes in float32: run `--precision f64` on `--backend interp`",
            ));
        }
    }
    .map_err(|e| fail(weights_path, e))?;
    let out = out.map_err(|e| {
        let place = match &e {
            Error::Length { .. } => lengths_path,
            Error::NonFinite { name, .. } | Error::TensorShape { name, .. } => {
                match name.as_str() {
                    "input" => Some(input_path),
                    "lengths" => lengths_path,
                    "grad_output" => grad_path,
                    // An initial state: `h0` for the state `h`.
                    state => states
                        .iter()
                        .position(|s| format!("{}0", s.0) == state)
                        .and_then(|k| state_paths[k]),
                }
            }
            _ => Some(input_path),
        };
        fail(place.unwrap_or(input_path), e)
    })?;

    let given: Vec<bool> = state_paths.iter().map(Option::is_some).collect();
    let results = out.into_named(states, &given);
    let bytes = weights::write_safetensors(&results).map_err(|e| fail(out_path, e))?;
    std::fs::write(out_path, bytes).map_err(|e| fail(out_path, e))
}

fn seq2seq(args: &Seq2seqArgs) -> Result<(), Failure> {
    use rnn::ir::model::{Ids, Recurrent};
    use rnn::ir::seq2seq::{Beam, BoundSeq2Seq, Decode, Seq2Seq};
    let (weights_path, src_path, out_path) = (
        args.weights.as_path(),
        args.src.as_path(),
        args.out.as_path(),
    );
    let mut inputs: Vec<(String, &Path)> = vec![
        ("--weights".into(), weights_path),
        ("--src".into(), src_path),
    ];
    inputs.extend(
        args.src_lengths
            .as_deref()
            .map(|p| ("--src-lengths".to_string(), p)),
    );
    refuse_overwrite(out_path, &inputs)?;
    let weights = Weights {
        tensors: weights::read_safetensors(&read(weights_path)?)
            .map_err(|e| fail(weights_path, e))?,
    };
    let model = Seq2Seq::from_state_dict(&weights, args.cell.map(Cell::kind))
        .map_err(|e| fail(weights_path, e))?;
    let (shape, data) = npy::read_i64(&read(src_path)?).map_err(|e| fail(src_path, e))?;
    if shape.len() != 2 {
        return Err(fail(
            src_path,
            format!("the source must be token ids (batch, src_len), found shape {shape:?}"),
        ));
    }
    let src = Ids::new(shape, data).map_err(|e| fail(src_path, e))?;
    let lengths = read_lengths(args.src_lengths.as_deref())?;
    let decode = Decode {
        steps: args.steps,
        sos: args.sos,
        eos: args.eos,
    };
    fn go<R: Recurrent>(
        bound: &BoundSeq2Seq<'_, R>,
        src: &Ids,
        lengths: Option<&[i64]>,
        decode: &Decode,
        beam: Option<Beam>,
    ) -> rnn::ir::Result<Ids> {
        match beam {
            None => bound.greedy(src, lengths, decode),
            Some(beam) => Ok(bound.beam(src, lengths, decode, &beam)?.0),
        }
    }
    let beam = args.beam.map(|width| Beam {
        width,
        alpha: args.length_penalty,
    });
    let lengths = lengths.as_deref();
    let tokens = match args.backend {
        Backend::Interp => {
            let bound = model
                .bind_interp(&weights, Exec::default())
                .map_err(|e| fail(weights_path, e))?;
            go(&bound, &src, lengths, &decode, beam)
        }
        Backend::Jit => {
            let bound = model
                .bind(&weights, rnn::jit::bind_stack)
                .map_err(|e| fail(weights_path, e))?;
            go(&bound, &src, lengths, &decode, beam)
        }
    }
    .map_err(|e| {
        let place = match &e {
            Error::Token { name, .. } if name == "sos" => "--sos".to_string(),
            Error::Token { name, .. } if name == "eos" => "--eos".to_string(),
            Error::Length { .. } => args
                .src_lengths
                .as_deref()
                .map_or_else(|| "--src-lengths".into(), |p| p.display().to_string()),
            Error::Argument(m) if m.contains("beam width") => "--beam".to_string(),
            Error::Argument(m) if m.starts_with("`steps`") => "--steps".to_string(),
            Error::Argument(m) if m.contains("normalisation") => "--length-penalty".to_string(),
            _ => src_path.display().to_string(),
        };
        fail(Path::new(&place), e)
    })?;
    let bytes = npy::write_i64(&tokens.shape, &tokens.data);
    std::fs::write(out_path, bytes).map_err(|e| fail(out_path, e))
}

/// The text `rnnc train --task charlm` learns when no `--text` is given.
const SHAKESPEARE: &str = include_str!("../../data/shakespeare_100k.txt");

/// What a training run trains.
enum Trainee<'m> {
    Seq2seq(rnn::train::Seq2SeqRunner<'m>, rnn::train::SeqTask),
    Lm(rnn::train::LmRunner<'m>, rnn::train::CharText),
}

fn train(args: &TrainArgs) -> Result<(), Failure> {
    use rnn::ir::checkpoint::Checkpoint;
    use rnn::ir::model::Model;
    use rnn::ir::optim::{Adam, Optimizer, Rule, Sgd};
    use rnn::ir::seq2seq::Seq2Seq;
    use rnn::ir::spec::{Attention, Placement, Score};
    use rnn::train::{
        Backend as TrainBackend, CharText, LmRunner, Seq2SeqRunner, SeqTask, TaskKind,
        token_accuracy, train_step,
    };

    let seq_task = matches!(args.task, TrainTask::Copy | TrainTask::Reverse);
    if !seq_task && (args.attention.is_some() || args.bidirectional) {
        return Err(fail_at(
            if args.attention.is_some() {
                "--attention"
            } else {
                "--bidirectional"
            },
            "a character language model has no encoder: attention and a bidirectional encoder are for `copy` and `reverse`",
        ));
    }
    if args.attention.is_none() && args.attention_placement != AttentionPlacement::Output {
        return Err(fail_at(
            "--attention-placement",
            "it places an attention: give `--attention dot|general|additive` too",
        ));
    }
    if seq_task && args.text.is_some() {
        return Err(fail_at("--text", "only `--task charlm` reads a text"));
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        return Err(fail_at(
            "--lr",
            format!(
                "the learning rate must be positive and finite, found {}",
                args.lr
            ),
        ));
    }
    if !(args.clip >= 0.0 && args.clip.is_finite()) {
        return Err(fail_at(
            "--clip",
            format!(
                "the clipping norm must be finite and at least 0, found {}",
                args.clip
            ),
        ));
    }
    let backend = match args.backend {
        Backend::Interp => TrainBackend::Interp,
        Backend::Jit => TrainBackend::Jit,
    };
    let cell = |input: usize, hidden: usize| {
        let mut spec = ModelSpec::new(args.cell.kind(), input, hidden);
        spec.num_layers = args.layers;
        spec
    };

    // The model and its data.
    let (seq2seq, lm, task, text);
    let params: Vec<(String, Vec<usize>)>;
    if seq_task {
        let t = SeqTask {
            kind: if args.task == TrainTask::Copy {
                TaskKind::Copy
            } else {
                TaskKind::Reverse
            },
            symbols: args.symbols,
            min_len: args.min_len,
            max_len: args.max_len,
        };
        t.check().map_err(|e| fail_at("--min-len", e))?;
        let vocab = t.vocab();
        let mut enc = cell(args.embedding, args.hidden);
        enc.vocab = Some(vocab);
        enc.bidirectional = args.bidirectional;
        enc.batch_first = true;
        let dirs = if args.bidirectional { 2 } else { 1 };
        let mut dec = cell(args.embedding, args.hidden * dirs);
        dec.vocab = Some(vocab);
        dec.head = Some(vocab);
        dec.batch_first = true;
        dec.attention = args.attention.map(|a| Attention {
            score: match a {
                AttentionScore::Dot => Score::Dot,
                AttentionScore::General => Score::General,
                AttentionScore::Additive => Score::Additive(args.attention_units),
            },
            memory: 1,
            placement: match args.attention_placement {
                AttentionPlacement::Output => Placement::Output,
                AttentionPlacement::Input => Placement::Input,
            },
        });
        let m = Seq2Seq::new(&enc, &dec).map_err(|e| fail_at("--hidden", e))?;
        params = m.parameters();
        seq2seq = Some(m);
        lm = None;
        task = Some(t);
        text = None;
    } else {
        let source = match &args.text {
            Some(p) => String::from_utf8(read(p)?).map_err(|_| fail(p, "the text is not UTF-8"))?,
            None => SHAKESPEARE.to_string(),
        };
        let place = args.text.clone().unwrap_or_else(|| PathBuf::from("--text"));
        let data = CharText::new(&source, args.seq_len).map_err(|e| fail(&place, e))?;
        let v = data.vocab();
        let mut spec = cell(args.embedding, args.hidden);
        spec.vocab = Some(v);
        spec.head = Some(v);
        let m = Model::compile(&spec).map_err(|e| fail_at("--hidden", e))?;
        params = m.parameters();
        lm = Some(m);
        seq2seq = None;
        task = None;
        text = Some(data);
    }
    let trainee = match (&seq2seq, &lm) {
        (Some(m), _) => Trainee::Seq2seq(
            Seq2SeqRunner::new(m, backend).map_err(|e| fail_at("--backend", e))?,
            task.expect("a task"),
        ),
        (_, Some(m)) => Trainee::Lm(
            LmRunner::new(m, backend).map_err(|e| fail_at("--backend", e))?,
            text.clone().expect("a text"),
        ),
        _ => unreachable!("a model was made"),
    };

    // The settings the data stream and the steps depend on, recorded in every checkpoint and
    // compared on resuming (the model's sizes are in its parameters' shapes).
    let mut settings: std::collections::BTreeMap<String, String> = [
        ("task", format!("{:?}", args.task).to_lowercase()),
        ("seed", args.seed.to_string()),
        ("batch", args.batch.to_string()),
        ("clip", args.clip.to_string()),
        ("cell", format!("{:?}", args.cell).to_lowercase()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if seq_task {
        for (k, v) in [
            ("symbols", args.symbols),
            ("min-len", args.min_len),
            ("max-len", args.max_len),
        ] {
            settings.insert(k.into(), v.to_string());
        }
        settings.insert(
            "attention".into(),
            format!("{:?}", args.attention).to_lowercase(),
        );
        // Recorded only when not the default, so that earlier runs resume as they were.
        if args.attention_placement != AttentionPlacement::Output {
            settings.insert("attention-placement".into(), "input".into());
        }
    } else {
        settings.insert("seq-len".into(), args.seq_len.to_string());
        // The text by a 64-bit FNV-1a hash of its characters' ids and its vocabulary.
        let t = text.as_ref().expect("a text");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for c in t.chars.iter().map(|&c| c as u64).chain(t.encode_all()) {
            h = (h ^ c).wrapping_mul(0x0100_0000_01b3);
        }
        settings.insert("text".into(), format!("{h:016x}"));
    }
    // Every size is checked before any work: one batch, the held-out windows, the sample.
    match &trainee {
        Trainee::Seq2seq(_, t) => {
            t.batch(args.seed, 0, args.batch)
                .map_err(|e| fail_at("--batch", e))?;
        }
        Trainee::Lm(_, t) => {
            t.train_batch(args.seed, 0, args.batch, args.seq_len)
                .map_err(|e| fail_at("--batch", e))?;
            if !(args.temperature > 0.0 && args.temperature.is_finite()) {
                return Err(fail_at(
                    "--temperature",
                    format!(
                        "the temperature must be positive and finite, found {}",
                        args.temperature
                    ),
                ));
            }
            if args.sample_len > ModelSpec::MAX_SIZE {
                return Err(fail_at(
                    "--sample-len",
                    format!(
                        "at most {} characters are sampled, found {}",
                        ModelSpec::MAX_SIZE,
                        args.sample_len
                    ),
                ));
            }
        }
    }

    // Where it starts: a checkpoint, or fresh weights and optimiser.
    let rule = match args.optimizer {
        OptimizerKind::Adam => Rule::Adam(Adam {
            lr: args.lr,
            ..Adam::default()
        }),
        OptimizerKind::Adamw => Rule::AdamW(Adam {
            lr: args.lr,
            ..Adam::adamw()
        }),
        OptimizerKind::Sgd => Rule::Sgd(Sgd {
            lr: args.lr,
            momentum: 0.9,
            ..Sgd::default()
        }),
    };
    let (mut weights, mut opt, start) = match &args.resume {
        Some(p) => {
            let c = Checkpoint::from_safetensors_for(&read(p)?, &params).map_err(|e| fail(p, e))?;
            if c.optimizer.rule() != rule {
                return Err(fail(
                    p,
                    "the checkpoint's optimiser or learning rate differs from the flags': give the run's own `--optimizer` and `--lr`",
                ));
            }
            if c.step != c.data_position || c.run.is_empty() {
                return Err(fail(
                    p,
                    "the checkpoint was not written by `rnnc train` (its data position is not its step, or it records no run settings)",
                ));
            }
            if let Some((k, v)) = settings.iter().find(|(k, v)| c.run.get(*k) != Some(*v)) {
                let theirs = c.run.get(k).map_or("nothing", String::as_str);
                return Err(fail(
                    p,
                    format!(
                        "the checkpoint's run had `{k}` {theirs}, these flags give {v}: resume with the run's own flags (`--{k}`), or the data would not continue where it stopped"
                    ),
                ));
            }
            (c.weights, c.optimizer, c.step)
        }
        None => {
            let w = match (&seq2seq, &lm) {
                (Some(m), _) => m.init(args.seed),
                (_, Some(m)) => m.init(args.seed),
                _ => unreachable!("a model was made"),
            }
            .map_err(|e| fail_at("--hidden", e))?;
            (w, Optimizer::new(rule).map_err(|e| fail_at("--lr", e))?, 0)
        }
    };
    if start >= args.steps {
        return Err(fail_at(
            "--steps",
            format!("the checkpoint is at step {start}: `--steps` must be more to train further"),
        ));
    }

    // The outputs: the loss log is appended to, never rewritten; checkpoints are new files.
    // Everything the run would clash with is found before it starts.
    std::fs::create_dir_all(&args.out).map_err(|e| fail(&args.out, e))?;
    let log_path = args.out.join("loss.csv");
    let logged = if log_path.exists() {
        let text = std::fs::read_to_string(&log_path).map_err(|e| fail(&log_path, e))?;
        let last = text
            .lines()
            .filter_map(|l| l.split(',').next()?.parse::<u64>().ok())
            .max();
        if args.resume.is_none() {
            return Err(fail(
                &log_path,
                "exists: a run already wrote here; pass `--resume` with its checkpoint, or another `--out`",
            ));
        }
        if let Some(last) = last.filter(|&l| l > start) {
            return Err(fail(
                &log_path,
                format!(
                    "already records step {last}, past the checkpoint's step {start}: resume into another `--out`"
                ),
            ));
        }
        true
    } else {
        false
    };
    let sample_path = args.out.join(format!("samples-{}.txt", args.steps));
    let clash = (start + 1..=args.steps)
        .filter(|d| d % args.checkpoint_every == 0 || *d == args.steps)
        .map(|d| args.out.join(format!("checkpoint-{d}.safetensors")))
        .chain((!seq_task).then(|| sample_path.clone()))
        .find(|p| p.exists());
    if let Some(p) = clash {
        return Err(fail(
            &p,
            "exists: the run would write it, and nothing is overwritten; choose another `--out`",
        ));
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| fail(&log_path, e))?;
    if !logged {
        let eval = if seq_task {
            "token_accuracy"
        } else {
            "held_out_loss"
        };
        writeln!(log, "step,loss,grad_norm,{eval},seconds").map_err(|e| fail(&log_path, e))?;
    }
    let held = match &text {
        Some(t) => t
            .held_out(64, args.seq_len)
            .map_err(|e| fail_at("--seq-len", e))?,
        None => Vec::new(),
    };
    let evaluate = |weights: &Weights| -> Result<f64, Error> {
        match &trainee {
            Trainee::Seq2seq(r, t) => {
                let (mut right, mut total) = (0, 0);
                for e in 0..4 {
                    let b = t.batch(args.seed ^ 0x6576_616c, e, 64)?;
                    let (a, n) = token_accuracy(&r.greedy(weights, &b)?, &b);
                    right += a;
                    total += n;
                }
                Ok(right as f64 / total.max(1) as f64)
            }
            Trainee::Lm(r, _) => r.evaluate(weights, &held),
        }
    };
    let save = |weights: &Weights, opt: &Optimizer, step: u64| -> Result<(), Failure> {
        let path = args.out.join(format!("checkpoint-{step}.safetensors"));
        if path.exists() || args.resume.as_deref().is_some_and(|r| same_file(r, &path)) {
            return Err(fail(
                &path,
                "exists: a checkpoint is never overwritten; choose another `--out`",
            ));
        }
        let c = Checkpoint {
            weights: weights.clone(),
            optimizer: opt.clone(),
            step,
            data_position: step,
            run: settings.clone(),
        };
        let bytes = c.to_safetensors_for(&params).map_err(|e| fail(&path, e))?;
        std::fs::write(&path, bytes).map_err(|e| fail(&path, e))
    };

    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(args.steps)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    let clock = std::time::Instant::now();
    let mut last = None;
    for step in start..args.steps {
        let loss = match &trainee {
            Trainee::Seq2seq(r, t) => t
                .batch(args.seed, step, args.batch)
                .and_then(|b| r.loss(&weights, &b)),
            Trainee::Lm(r, text) => text
                .train_batch(args.seed, step, args.batch, args.seq_len)
                .and_then(|(x, y)| r.loss(&weights, &x, &y)),
        }
        .map_err(|e| fail_at("train", e))?;
        let value = loss.loss;
        let clip = (args.clip > 0.0).then_some(args.clip);
        let norm =
            train_step(&mut weights, &mut opt, loss, clip).map_err(|e| fail_at("train", e))?;
        let done = step + 1;
        let eval = if done % args.eval_every == 0 || done == args.steps {
            Some(evaluate(&weights).map_err(|e| fail_at("train", e))?)
        } else {
            None
        };
        let shown = eval.map_or_else(String::new, |e| format!("{e:.4}"));
        writeln!(
            log,
            "{done},{value:.6},{norm:.6},{shown},{:.3}",
            clock.elapsed().as_secs_f64()
        )
        .map_err(|e| fail(&log_path, e))?;
        if let Some(e) = eval {
            last = Some(e);
        }
        bar.set_message(match last {
            Some(e) if seq_task => format!("loss {value:.4}, accuracy {e:.3}"),
            Some(e) => format!("loss {value:.4}, held-out {e:.4}"),
            None => format!("loss {value:.4}"),
        });
        bar.inc(1);
        if done % args.checkpoint_every == 0 || done == args.steps {
            save(&weights, &opt, done)?;
        }
    }
    bar.finish();
    let mut summary = match last {
        Some(e) if seq_task => format!("token accuracy {e:.4} after {} steps\n", args.steps),
        Some(e) => format!(
            "held-out loss {e:.4} nats per character after {} steps\n",
            args.steps
        ),
        None => String::new(),
    };
    if let Trainee::Lm(r, text) = &trainee {
        let prompt = text
            .encode("\n")
            .or_else(|_| Ok::<_, Error>(vec![0]))
            .unwrap_or_default();
        let ids = r
            .sample(
                &weights,
                &prompt,
                args.sample_len,
                args.temperature,
                args.seed,
            )
            .map_err(|e| fail_at("--temperature", e))?;
        let sample = text.decode(&ids);
        let path = sample_path;
        if path.exists() {
            return Err(fail(
                &path,
                "exists: never overwritten; choose another `--out`",
            ));
        }
        std::fs::write(&path, format!("{sample}\n")).map_err(|e| fail(&path, e))?;
        summary.push_str(&format!(
            "sample at temperature {}:\n{sample}\n",
            args.temperature
        ));
    }
    say(&summary)
}

fn init(args: &InitArgs) -> Result<(), Failure> {
    let (model, out) = (args.model.as_path(), args.out.as_path());
    refuse_overwrite(out, &[("--model".into(), model)])?;
    let program = Program::compile(&read_model(model)?).map_err(|e| fail_model(model, e))?;
    let weights = Weights::init(&program, args.seed).map_err(|e| fail(model, e))?;
    let bytes = weights::write_safetensors(&weights.tensors).map_err(|e| fail(out, e))?;
    std::fs::write(out, bytes).map_err(|e| fail(out, e))
}

/// The model `args` give: a `.rnn` file's, or the one the flags describe.
fn model_spec(args: &ModelArgs) -> Result<ModelSpec, Failure> {
    let here = Path::new("");
    match args.file.as_deref() {
        Some(path) => read_model(path),
        None => {
            let (Some(cell), Some(input), Some(hidden)) =
                (args.cell, args.input_size, args.hidden_size)
            else {
                return Err(fail(
                    here,
                    "give a `.rnn` file, or `--cell`, `--input-size` and `--hidden-size`",
                ));
            };
            let mut spec = ModelSpec::new(cell.kind(), input, hidden);
            spec.num_layers = args.layers;
            spec.bidirectional = args.bidirectional;
            spec.proj_size = args.proj_size;
            if args.one_bias {
                spec.bias_convention = BiasConvention::One;
            }
            Ok(spec)
        }
    }
}

fn emit(args: &EmitArgs) -> Result<(), Failure> {
    let here = Path::new("");
    let file = args.model.file.as_deref();
    let spec = model_spec(&args.model)?;
    let name = args
        .name
        .clone()
        .or_else(|| spec.name.clone())
        .unwrap_or_else(|| "Model".into());
    let code = match file {
        // A model around its stack: what the macros emit for it, the file its runtime text.
        Some(path) if spec.has_model_layers() => {
            let model = rnn::ir::model::Model::compile(&spec).map_err(|e| fail_model(path, e))?;
            let source = std::fs::read_to_string(path).map_err(|e| fail(path, e))?;
            rnn::emit::rust_model(&model, &name, &source)
        }
        _ => {
            let program =
                Program::compile(&spec).map_err(|e| fail_model(file.unwrap_or(here), e))?;
            rnn::emit::rust(&program, &name)
        }
    }
    .map_err(|e| fail(here, e))?;
    say(code.trim_end())
}

fn inspect(args: &InspectArgs) -> Result<(), Failure> {
    let file = args.model.file.as_deref();
    let here = Path::new("");
    let spec = model_spec(&args.model)?;
    let options = rnn::CompileOptions {
        optimize: !args.no_passes,
    };
    let program =
        Program::compile_with(&spec, options).map_err(|e| fail_model(file.unwrap_or(here), e))?;
    // The model, its parameter count, then the whole plan: each layer's scheduled forward and
    // backward step with its storage plan (the contract every backend reads).
    let mut text = format!(
        "{}\nparameters: {}\n\n{program}",
        describe(&program),
        program.parameter_count()
    );
    if args.clif {
        let jit = rnn::jit::Jit::compile(&program).map_err(|e| fail(file.unwrap_or(here), e))?;
        for (name, clif) in jit.clif() {
            text.push_str(&format!("\n; {name}\n{clif}"));
        }
    }
    say(&text)
}

/// The model as declared, in the `.rnn` language's own spellings (`reset: after`,
/// `bias_convention: two`), one setting a line.
fn describe(program: &Program) -> String {
    let spec = &program.spec;
    let (kind, nonlinearity) = match spec.cell {
        CellKind::RnnTanh => ("rnn", Some("tanh")),
        CellKind::RnnRelu => ("rnn", Some("relu")),
        ref cell => (cell.name(), None),
    };
    let name = spec
        .name
        .as_deref()
        .map(|n| format!(" {n}"))
        .unwrap_or_default();
    let mut lines = vec![
        format!("model: {kind}{name}"),
        format!("  input: {}", spec.input_size),
        format!("  hidden: {}", spec.hidden_size),
        format!("  layers: {}", spec.num_layers),
        format!("  bidirectional: {}", spec.bidirectional),
    ];
    if let CellKind::Custom(_) = spec.cell {
        let states: Vec<String> = program
            .states()
            .iter()
            .map(|(n, size)| format!("{n} ({size})"))
            .collect();
        lines.push(format!("  states: {}", states.join(", ")));
    } else {
        lines.push(format!("  bias: {}", spec.bias));
        lines.push(match spec.bias_convention {
            BiasConvention::Two => "  bias_convention: two (PyTorch: bias_ih and bias_hh)".into(),
            BiasConvention::One => "  bias_convention: one (Keras: one bias per gate)".into(),
        });
    }
    if let Some(n) = nonlinearity {
        lines.push(format!("  nonlinearity: {n}"));
    }
    if spec.proj_size > 0 {
        lines.push(format!("  proj: {}", spec.proj_size));
    }
    if let CellKind::Gru = spec.cell {
        lines.push(match spec.gru_reset {
            GruReset::AfterMatmul => {
                "  reset: after (PyTorch: the reset gate scales W_hn h + b_hn)".into()
            }
            GruReset::BeforeMatmul => {
                "  reset: before (Cho et al.: W_hn applies to the reset r * h)".into()
            }
        });
    }
    lines.push(format!("  batch_first: {}", spec.batch_first));
    lines.join("\n")
}

fn run_bench(args: &BenchArgs) -> Result<(), Failure> {
    let (names, threads, reps, json) = (&args.workloads, args.threads, args.reps, args.json);
    let here = Path::new("");
    let chosen = if names.is_empty() {
        // Every workload the backend runs.
        WORKLOADS
            .iter()
            .copied()
            .filter(|&w| bench::runs(args.backend.name(), w))
            .collect::<Vec<_>>()
    } else {
        names
            .iter()
            .map(|n| {
                bench::workload(n)
                    .ok_or_else(|| fail(here, format!("unknown workload `{n}`: expected W1 … W8")))
            })
            .collect::<Result<_, _>>()?
    };
    let lstm = chosen.iter().any(|w| w.id == "W1" || w.id == "W2");
    for w in chosen {
        let m = bench::measure(w, args.backend.name(), threads, reps).map_err(|e| fail(here, e))?;
        say(&format!("{}\n", if json { m.json() } else { m.line() }))?;
    }
    if lstm && args.backend.name() == "jit" {
        // The JIT's compilation of that LSTM, beside its run times.
        let t = bench::jit_compile(reps).map_err(|e| fail(here, e))?;
        let (median, min, max) = (t[t.len() / 2], t[0], t[t.len() - 1]);
        say(&if json {
            format!(
                "{{\"workload\": \"jit_compile\", \"backend\": \"jit\", \"threads\": 1, \"median_s\": {median}, \"min_s\": {min}, \"max_s\": {max}, \"reps\": {reps}}}\n"
            )
        } else {
            format!(
                "jit_compile         LSTM 256/256, inference, training and backward plans: median {:.2} ms (min {:.2} ms, max {:.2} ms, {reps} reps)\n",
                median * 1e3,
                min * 1e3,
                max * 1e3
            )
        })?;
    }
    Ok(())
}

/// `rnnc` with no command: the chapter's parameter counts and its vanishing-gradient experiment,
/// on this project's compiler and interpreter.
fn tour(args: &TourArgs) -> Result<(), Failure> {
    use rnn::tour::{Options, TourError, run, summary_table};
    let opts = Options {
        quick: args.quick,
        seed: args.seed,
        out: args.out.clone(),
        only: args.only.clone(),
        progress: !args.quiet,
    };
    say(&format!(
        "rnn: the chapter, measured{} (seed {}); the report goes to {}\n",
        if args.quick { " (quick)" } else { "" },
        args.seed,
        args.out.display()
    ))?;
    let mut printed = Ok(());
    let findings = run(&opts, |f| {
        if printed.is_ok() {
            printed = say(&format!(
                "  {:<8} {:<14} {:>6.1} s  {}: {}\n",
                f.section.place(),
                f.section.name(),
                f.seconds,
                f.verdict,
                f.measured
            ));
        }
    })
    .map_err(|e| match e {
        TourError::Out(p, e) => fail(&p, e),
        TourError::Model(s, e) => fail_at(&format!("tour {s}"), e),
    })?;
    printed?;
    say(&format!(
        "\n{}\nThe report: {}\n",
        summary_table(&findings),
        args.out.join("report.md").display()
    ))
}

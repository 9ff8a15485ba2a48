//! `rnnc`: the `rnn` command line.
//!
//! - `rnnc run`: a PyTorch `nn.RNN` / `nn.LSTM` / `nn.GRU` state dict and a `.npy` input in,
//!   outputs, final states and (with `--grad-output`) every gradient out, as safetensors.
//! - `rnnc inspect`: a model's spec, parameter count and compiled IR.
//! - `rnnc bench`: the workloads W1–W6.
//! - `rnnc` alone: a short demonstration (parameter counts and vanishing gradients).
//!
//! Any bad input exits with code 2 and one line on stderr naming the file or tensor at fault.

use clap::{Args, Parser, Subcommand, ValueEnum};
use rnn::bench::{self, WORKLOADS};
use rnn::ir::spec::BiasConvention;
use rnn::ir::{npy, weights};
use rnn::{CellKind, Error, Exec, ModelSpec, Program, Request, Tensor, Weights};
use std::collections::BTreeMap;
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
}

#[derive(Subcommand)]
enum Command {
    /// Run a PyTorch RNN/LSTM/GRU state dict on an input; optionally compute gradients.
    Run(RunArgs),
    /// Print a model's spec, its parameter count and the IR of its step and backward step.
    Inspect(InspectArgs),
    /// Time the workloads W1–W6 (all when none is named).
    Bench(BenchArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The PyTorch `state_dict` (safetensors, float32).
    #[arg(long, value_name = "W.safetensors")]
    weights: PathBuf,
    /// The input, float32 `.npy`: (T, B, I), or (B, T, I) with --batch-first.
    #[arg(long, value_name = "X.npy")]
    input: PathBuf,
    /// Where to write `output`, `h_n`, `c_n` and the gradients (safetensors).
    #[arg(long, value_name = "OUT.safetensors")]
    out: PathBuf,
    /// The cell, where the weights' shapes do not settle it (an RNN's nonlinearity; default tanh).
    #[arg(long, value_enum)]
    cell: Option<Cell>,
    /// Input and output are (batch, time, features).
    #[arg(long)]
    batch_first: bool,
    /// Initial hidden state, float32 `.npy` (layers·directions, B, H).
    #[arg(long, value_name = "H.npy")]
    h0: Option<PathBuf>,
    /// Initial cell state (LSTM), float32 `.npy` (layers·directions, B, H).
    #[arg(long, value_name = "C.npy")]
    c0: Option<PathBuf>,
    /// Per-sequence lengths, int64 `.npy` (B,): packed-sequence semantics.
    #[arg(long, value_name = "L.npy")]
    lengths: Option<PathBuf>,
    /// With it, write the gradients of sum(output * G), float32 `.npy` shaped like the output.
    #[arg(long, value_name = "G.npy")]
    grad_output: Option<PathBuf>,
    /// The backend that executes the model.
    #[arg(long, value_enum, default_value = "interp")]
    backend: Backend,
}

#[derive(Args)]
struct InspectArgs {
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
    /// Print the graphs before optimisation (no passes, no hoisting).
    #[arg(long)]
    no_passes: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Workloads by id or name (W1 … W6, lstm_fwd_seed …).
    workloads: Vec<String>,
    /// The backend to time.
    #[arg(long, value_enum, default_value = "interp")]
    backend: Backend,
    /// Threads for the matrix products.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// A failure: the file or argument at fault and what is wrong with it.
struct Failure {
    place: String,
    error: String,
}

fn fail(place: &Path, error: impl ToString) -> Failure {
    Failure {
        place: place.display().to_string(),
        error: error.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| fail(path, e))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => demo(),
        Some(Command::Run(args)) => run(&args),
        Some(Command::Inspect(args)) => inspect(&args),
        Some(Command::Bench(args)) => run_bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let message = if f.place.is_empty() {
                f.error
            } else {
                format!("{}: {}", f.place, f.error)
            };
            eprintln!("rnnc: {}", message.replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

fn run(args: &RunArgs) -> Result<(), Failure> {
    let (weights_path, input_path, out_path) = (
        args.weights.as_path(),
        args.input.as_path(),
        args.out.as_path(),
    );
    let (cell, batch_first) = (args.cell, args.batch_first);
    let (h0_path, c0_path) = (args.h0.as_deref(), args.c0.as_deref());
    let (lengths_path, grad_path) = (args.lengths.as_deref(), args.grad_output.as_deref());
    let tensors =
        weights::read_safetensors(&read(weights_path)?).map_err(|e| fail(weights_path, e))?;
    let mut spec =
        weights::infer_spec(&tensors, cell.map(Cell::kind)).map_err(|e| fail(weights_path, e))?;
    spec.batch_first = batch_first;
    let program = Program::compile(&spec).map_err(|e| fail(weights_path, e))?;
    let weights = Weights { tensors };
    let bound = program
        .bind::<f32>(&weights)
        .map_err(|e| fail(weights_path, e))?;

    let load =
        |p: &Path| -> Result<Tensor, Failure> { npy::read_f32(&read(p)?).map_err(|e| fail(p, e)) };
    let input = load(input_path)?;
    let h0 = h0_path.map(load).transpose()?;
    let c0 = c0_path.map(load).transpose()?;
    if c0.is_some() && program.states().len() < 2 {
        return Err(fail(
            c0_path.unwrap(),
            "an initial cell state is only meaningful for an LSTM",
        ));
    }
    let lengths = match lengths_path {
        None => None,
        Some(p) => {
            let (shape, data) = npy::read_i64(&read(p)?).map_err(|e| fail(p, e))?;
            if shape.len() != 1 {
                return Err(fail(
                    p,
                    format!("lengths must be a vector (B,), found shape {shape:?}"),
                ));
            }
            Some(data)
        }
    };
    let grad_output = grad_path.map(load).transpose()?;
    let req = Request {
        input: Some(&input),
        initial_states: vec![h0.as_ref(), c0.as_ref()],
        lengths: lengths.as_deref(),
        grad_output: grad_output.as_ref(),
        grad_final_states: vec![],
    };
    let out = bound.run(&req, &Exec::default()).map_err(|e| {
        let place = match &e {
            Error::Length { .. } => lengths_path,
            Error::NonFinite { name, .. } | Error::TensorShape { name, .. } => {
                match name.as_str() {
                    "input" => Some(input_path),
                    "h0" => h0_path,
                    "c0" => c0_path,
                    "lengths" => lengths_path,
                    "grad_output" => grad_path,
                    _ => None,
                }
            }
            _ => Some(input_path),
        };
        fail(place.unwrap_or(input_path), e)
    })?;

    let mut results = BTreeMap::new();
    results.insert("output".to_string(), out.output);
    for (k, s) in out.final_states.into_iter().enumerate() {
        results.insert(format!("{}_n", program.states()[k].0), s);
    }
    if let Some(grads) = out.grads {
        results.insert("grad.input".into(), grads.input);
        for (k, g) in grads.initial_states.into_iter().enumerate() {
            if [h0_path, c0_path][k].is_some() {
                results.insert(format!("grad.{}0", program.states()[k].0), g);
            }
        }
        for (name, g) in grads.params {
            results.insert(format!("grad.{name}"), g);
        }
    }
    let bytes = weights::write_safetensors(&results).map_err(|e| fail(out_path, e))?;
    std::fs::write(out_path, bytes).map_err(|e| fail(out_path, e))
}

fn inspect(args: &InspectArgs) -> Result<(), Failure> {
    let file = args.file.as_deref();
    let here = Path::new("");
    let spec = match file {
        Some(path) => {
            let text = String::from_utf8(read(path)?)
                .map_err(|_| fail(path, "the file is not UTF-8 text"))?;
            rnn::parse_str(&text).map_err(|e| fail(path, e))?
        }
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
            spec
        }
    };
    let options = rnn::CompileOptions {
        optimize: !args.no_passes,
    };
    let program =
        Program::compile_with(&spec, options).map_err(|e| fail(file.unwrap_or(here), e))?;
    // The model, its parameter count, then the whole plan: each layer's scheduled forward and
    // backward step with its storage plan (the contract every backend reads).
    let text = format!(
        "{}\nparameters: {}\n\n{program}",
        describe(&program.spec),
        program.parameter_count()
    );
    write_stdout(&text)
}

/// Writes `text` to standard output; a closed pipe (`rnnc inspect ... | head`) ends quietly.
fn write_stdout(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(fail(Path::new("stdout"), e)),
        _ => Ok(()),
    }
}

fn describe(spec: &ModelSpec) -> String {
    let mut s = format!(
        "model: {}{}\n  input: {}\n  hidden: {}\n  layers: {}\n  bidirectional: {}\n  bias: {} ({})\n  batch_first: {}",
        spec.cell.name(),
        spec.name
            .as_deref()
            .map(|n| format!(" {n}"))
            .unwrap_or_default(),
        spec.input_size,
        spec.hidden_size,
        spec.num_layers,
        spec.bidirectional,
        spec.bias,
        match spec.bias_convention {
            BiasConvention::Two => "two per gate, PyTorch",
            BiasConvention::One => "one per gate, Keras",
        },
        spec.batch_first
    );
    if spec.proj_size > 0 {
        s.push_str(&format!("\n  proj: {}", spec.proj_size));
    }
    if let CellKind::Gru = spec.cell {
        s.push_str(&format!("\n  reset: {:?}", spec.gru_reset));
    }
    s
}

fn run_bench(args: &BenchArgs) -> Result<(), Failure> {
    let (names, threads, reps, json) = (&args.workloads, args.threads, args.reps, args.json);
    let here = Path::new("");
    let chosen = if names.is_empty() {
        WORKLOADS.to_vec()
    } else {
        names
            .iter()
            .map(|n| {
                bench::workload(n)
                    .ok_or_else(|| fail(here, format!("unknown workload `{n}`: expected W1 … W6")))
            })
            .collect::<Result<_, _>>()?
    };
    if threads == 0 {
        return Err(fail(here, "--threads must be at least 1"));
    }
    for w in chosen {
        let m = bench::measure(w, "interp", threads, reps).map_err(|e| fail(here, e))?;
        println!("{}", if json { m.json() } else { m.line() });
    }
    Ok(())
}

/// `rnnc` with no command: the chapter's parameter counts and its vanishing-gradient experiment,
/// on this project's compiler and interpreter.
fn demo() -> Result<(), Failure> {
    let here = Path::new("");
    println!("rnn: a compiler for recurrent networks (see `rnnc --help`).\n");
    println!(
        "Parameters for input 128, hidden 256, one layer (PyTorch's two biases; one bias as the chapter counts):"
    );
    for cell in [CellKind::RnnTanh, CellKind::Lstm, CellKind::Gru] {
        let mut spec = ModelSpec::new(cell, 128, 256);
        let two = Program::compile(&spec)
            .map_err(|e| fail(here, e))?
            .parameter_count();
        spec.bias_convention = BiasConvention::One;
        let one = Program::compile(&spec)
            .map_err(|e| fail(here, e))?
            .parameter_count();
        println!("  {:<9} {two:>8}  (one bias: {one})", spec.cell.name());
    }
    println!(
        "\nVanishing gradients: tanh RNN, input 32, hidden 64, length 100, loss = sum of the last output."
    );
    println!("Norm of d(loss)/d(x_t), computed by BPTT through the compiled backward step:");
    let program =
        Program::compile(&ModelSpec::new(CellKind::RnnTanh, 32, 64)).map_err(|e| fail(here, e))?;
    let weights = Weights::init(&program, 7).map_err(|e| fail(here, e))?;
    let x = bench::random_tensor(vec![100, 1, 32], 8);
    let norms = bench::gradient_norms(&program, &weights, &x).map_err(|e| fail(here, e))?;
    for t in [99, 90, 75, 50, 25, 10, 0] {
        println!("  t = {t:>2}: {:.3e}", norms[t]);
    }
    Ok(())
}

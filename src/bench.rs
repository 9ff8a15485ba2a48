//! The benchmark workloads W1–W8 (`docs/workloads.md`) and their measurement: median, min and max time over
//! repetitions, GFLOP/s, and the fraction of this machine's single-core limit.

use crate::ir::graph::{Graph, OutRole, Role, Shape};
use crate::ir::interp::eval_graph;
use crate::ir::weights::SeededUniform;
use crate::{CellKind, Exec, ModelSpec, Program, Request, Result, Tensor, Weights};
use std::collections::HashMap;
use std::time::Instant;

/// The single-core f32 limit of the reference machine (2 × 256-bit FMA per cycle at 3.2 GHz).
pub const LIMIT_GFLOPS: f64 = 103.0;

/// A benchmark workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `W1` … `W6`.
    pub id: &'static str,
    /// The long name (`lstm_fwd_seed`).
    pub name: &'static str,
    /// What is measured.
    pub what: &'static str,
}

/// Every workload, in order.
pub const WORKLOADS: [Workload; 8] = [
    Workload {
        id: "W1",
        name: "lstm_fwd_seed",
        what: "LSTM forward, input 256, hidden 256, batch 32, length 512",
    },
    Workload {
        id: "W2",
        name: "lstm_train_seed",
        what: "W1 forward + backward (all weight and input gradients)",
    },
    Workload {
        id: "W3",
        name: "gru_stream",
        what: "GRU one step per call, input 64, hidden 128, batch 1, 1000 steps",
    },
    Workload {
        id: "W4",
        name: "lstm_stream",
        what: "LSTM one step per call, input 256, hidden 256, batch 1, 1000 steps",
    },
    Workload {
        id: "W5",
        name: "rnn_vanish",
        what: "tanh RNN forward + backward to the input, input 32, hidden 64, batch 1, length 100",
    },
    Workload {
        id: "W6",
        name: "linear_seed",
        what: "Linear 256→256 on a (32, 512, 256) tensor",
    },
    Workload {
        id: "W7",
        name: "seq2seq_train",
        what: "the chapter's seq2seq (LSTM encoder and decoder, vocabularies 5000 → 6000, embedding 64, hidden 128), batch 32, source and target 30: teacher-forced forward, cross-entropy, backward, one Adam step",
    },
    Workload {
        id: "W8",
        name: "seq2seq_greedy",
        what: "the W7 model, batch 1, source 30: encode, then 30 greedy decoding steps",
    },
];

/// Looks a workload up by id (`W1`) or name (`lstm_fwd_seed`), case-insensitively.
pub fn workload(key: &str) -> Option<Workload> {
    WORKLOADS
        .iter()
        .copied()
        .find(|w| w.id.eq_ignore_ascii_case(key) || w.name.eq_ignore_ascii_case(key))
}

/// One measurement of one workload.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// The workload.
    pub workload: Workload,
    /// The backend (`interp`).
    pub backend: String,
    /// Threads used.
    pub threads: usize,
    /// Median seconds per repetition (per step for the streaming workloads W3 and W4).
    pub median_s: f64,
    /// Fastest repetition.
    pub min_s: f64,
    /// Slowest repetition.
    pub max_s: f64,
    /// Repetitions timed (after one warm-up).
    pub reps: usize,
    /// Floating-point operations per repetition (per step for W3, W4).
    pub flops: f64,
}

impl Measurement {
    /// GFLOP/s at the median time.
    pub fn gflops(&self) -> f64 {
        self.flops / self.median_s / 1e9
    }

    /// `gflops / LIMIT_GFLOPS`.
    pub fn limit_fraction(&self) -> f64 {
        self.gflops() / LIMIT_GFLOPS
    }

    /// One JSON object, the format of `rnnc bench --json`.
    pub fn json(&self) -> String {
        format!(
            "{{\"workload\": \"{}\", \"backend\": \"{}\", \"threads\": {}, \"median_s\": {:.6e}, \"min_s\": {:.6e}, \"max_s\": {:.6e}, \"reps\": {}, \"gflops\": {:.3}, \"limit_fraction\": {:.4}}}",
            self.workload.id,
            self.backend,
            self.threads,
            self.median_s,
            self.min_s,
            self.max_s,
            self.reps,
            self.gflops(),
            self.limit_fraction()
        )
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let unit = if matches!(self.workload.id, "W3" | "W4") {
            "per step"
        } else {
            "per run"
        };
        format!(
            "{} {:<16} {:<7} {} thread(s)  median {:>10} {unit} (min {}, max {}, {} reps)  {:>7.2} GFLOP/s  {:.3} of the {LIMIT_GFLOPS} GFLOP/s limit",
            self.workload.id,
            self.workload.name,
            self.backend,
            self.threads,
            human(self.median_s),
            human(self.min_s),
            human(self.max_s),
            self.reps,
            self.gflops(),
            self.limit_fraction()
        )
    }
}

fn human(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.2} µs", s * 1e6)
    }
}

/// A tensor of uniform values in `[-1, 1)` from `seed`.
pub fn random_tensor(shape: Vec<usize>, seed: u64) -> Tensor {
    let n = shape.iter().product();
    let data = SeededUniform::new(seed).take(n).map(|u| u as f32).collect();
    Tensor { shape, data }
}

/// The gradient seed of a loss that is the sum of the last step's output: ones on the last step,
/// zeros elsewhere. Its gradient reaches earlier steps through the recurrence alone, which is
/// what shows vanishing gradients.
pub fn last_step_seed(steps: usize, batch: usize, width: usize) -> Tensor {
    let mut gy = Tensor::zeros(vec![steps, batch, width]);
    gy.data[(steps - 1) * batch * width..].fill(1.0);
    gy
}

/// FLOPs of one forward pass of a one-layer cell with `gates` gate blocks.
pub fn cell_flops(gates: usize, input: usize, hidden: usize, batch: usize, steps: usize) -> f64 {
    // In floating point: the count is only ever used as one, and cannot wrap around.
    2.0 * gates as f64
        * hidden as f64
        * (input as f64 + hidden as f64)
        * batch as f64
        * steps as f64
}

/// `reps` timed calls of `f` after one untimed call, in seconds, in the order they ran.
pub(crate) fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// Times `reps` compilations (after a warm-up) by the JIT of W1's LSTM (input 256, hidden 256):
/// its inference, training and backward plans, from the `Program` to callable code. Seconds.
pub fn jit_compile(reps: usize) -> Result<Vec<f64>> {
    let program = Program::compile(&spec(CellKind::Lstm, 256, 256))?;
    let mut times = time(reps, || Ok(crate::jit::Jit::compile(&program).map(drop)?))?;
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Times `reps` passes of `xs` (after a warm-up) through an emitted model's `step`, each pass
/// from the state `zero`.
fn time_steps<const I: usize, S: Copy, Y>(
    reps: usize,
    xs: &[Vec<f32>],
    zero: S,
    step: impl Fn(&[f32; I], &mut S) -> Y,
) -> Result<Vec<f64>> {
    let xs: Vec<[f32; I]> = xs.iter().map(|x| std::array::from_fn(|k| x[k])).collect();
    time(reps, || {
        let mut state = zero;
        for x in &xs {
            std::hint::black_box(step(x, &mut state));
        }
        Ok(())
    })
}

fn spec(cell: CellKind, input: usize, hidden: usize) -> ModelSpec {
    ModelSpec::new(cell, input, hidden)
}

/// The backends [`measure`] times.
pub const BACKENDS: [&str; 3] = ["interp", "macro", "jit"];

/// Whether `backend` runs workload `w`: every backend runs every workload but the macro
/// backend W6 (a Linear layer, not a recurrent model).
pub fn runs(backend: &str, w: Workload) -> bool {
    !(backend == "macro" && w.id == "W6")
}

/// The chapter's encoder-decoder of W7 and W8 (batch-first LSTMs).
pub fn seq2seq_model() -> Result<crate::ir::seq2seq::Seq2Seq> {
    let mut enc = spec(CellKind::Lstm, 64, 128);
    enc.vocab = Some(5000);
    enc.batch_first = true;
    let mut dec = spec(CellKind::Lstm, 64, 128);
    dec.vocab = Some(6000);
    dec.head = Some(6000);
    dec.batch_first = true;
    crate::ir::seq2seq::Seq2Seq::new(&enc, &dec)
}

/// `n` random ids below `vocab` from `seed`.
fn random_ids(shape: Vec<usize>, vocab: usize, seed: u64) -> crate::ir::model::Ids {
    let n: usize = shape.iter().product();
    let data = SeededUniform::new(seed)
        .take(n)
        .map(|u| (((u + 1.0) / 2.0 * vocab as f64) as i64).min(vocab as i64 - 1))
        .collect();
    crate::ir::model::Ids { shape, data }
}

/// The workloads' models declared with the macros at the workloads' sizes: the `macro`
/// backend runs the code they emit.
pub(crate) mod models {
    crate::lstm! { pub struct Lstm256 { input: 256, hidden: 256 } }
    crate::gru! { pub struct Gru64x128 { input: 64, hidden: 128 } }
    crate::rnn! { pub struct Rnn32x64 { input: 32, hidden: 64 } }
    // W7 and W8: the same declaration as `seq2seq_model`.
    crate::seq2seq! {
        pub struct ChapterSeq2Seq {
            encoder: lstm { vocab: 5000, input: 64, hidden: 128, batch_first: true },
            decoder: lstm { vocab: 6000, input: 64, hidden: 128, head: 6000, batch_first: true },
        }
    }
}

/// Runs workload `w` on `backend` (`interp`, `macro` or `jit`) with `threads` threads for `reps` timed
/// repetitions (after one warm-up). Zero repetitions or threads, an unknown backend, or a
/// workload the backend does not run are an [`Error::Argument`](crate::Error::Argument).
pub fn measure(w: Workload, backend: &str, threads: usize, reps: usize) -> Result<Measurement> {
    measure_at(w, backend, threads, reps, 512)
}

/// [`measure`] with W1, W2 and W6 at sequence length `steps` (their own is 512; the tour
/// times the sequential cost against the length). Other workloads ignore it. A length of 0
/// is an [`Error::Argument`](crate::Error::Argument).
pub fn measure_at(
    w: Workload,
    backend: &str,
    threads: usize,
    reps: usize,
    steps: usize,
) -> Result<Measurement> {
    if steps == 0 || steps > crate::ModelSpec::MAX_SIZE {
        return Err(crate::Error::Argument(format!(
            "a sequence length of {steps}: it must be 1 ..= {}",
            crate::ModelSpec::MAX_SIZE
        )));
    }
    if !BACKENDS.contains(&backend) {
        return Err(crate::Error::Argument(format!(
            "unknown backend `{backend}`: expected one of {}",
            BACKENDS.join(", ")
        )));
    }
    if reps == 0 {
        return Err(crate::Error::Argument(
            "`reps` is 0: at least one timed repetition is needed for a measurement".into(),
        ));
    }
    if threads == 0 {
        return Err(crate::Error::Argument(
            "`threads` is 0: at least 1 is needed".into(),
        ));
    }
    let emitted = backend == "macro";
    let jit = backend == "jit";
    if emitted && threads != 1 {
        return Err(crate::Error::Argument(format!(
            "the {backend} backend runs on one thread; {threads} were asked for"
        )));
    }
    if !runs(backend, w) {
        return Err(crate::Error::Argument(format!(
            "the {backend} backend does not run {} ({}): W6 is not a recurrent model",
            w.id, w.name
        )));
    }
    // The JIT's model of a workload's program, compiled once before timing.
    let compiled = |program: &Program, weights: &Weights| -> Result<crate::jit::JitModel> {
        std::sync::Arc::new(crate::jit::Jit::compile(program)?)
            .bind(weights)?
            .with_threads(threads)
    };
    let exec = Exec { threads };
    let (times, flops, per_step) = match w.id {
        "W1" | "W2" => {
            let (i, h, b, t) = (256, 256, 32, steps);
            let program = Program::compile(&spec(CellKind::Lstm, i, h))?;
            let weights = Weights::init(&program, 1)?;
            let bound = program.bind::<f32>(&weights)?;
            let x = random_tensor(vec![t, b, i], 2);
            let gy = random_tensor(vec![t, b, h], 3);
            let train = w.id == "W2";
            let req = Request {
                input: Some(&x),
                grad_output: train.then_some(&gy),
                ..Default::default()
            };
            let fwd = cell_flops(4, i, h, b, t);
            let times = if emitted {
                let model = models::Lstm256::from_weights(&weights)?;
                time(reps, || model.run(&req).map(drop))?
            } else if jit {
                let model = compiled(&program, &weights)?;
                time(reps, || model.run(&req).map(drop))?
            } else {
                time(reps, || bound.run(&req, &exec).map(drop))?
            };
            (times, if train { 3.0 * fwd } else { fwd }, 1)
        }
        "W3" | "W4" => {
            let (cell, gates, i, h) = if w.id == "W3" {
                (CellKind::Gru, 3, 64, 128)
            } else {
                (CellKind::Lstm, 4, 256, 256)
            };
            let steps = 1000;
            let program = Program::compile(&spec(cell, i, h))?;
            let weights = Weights::init(&program, 1)?;
            let bound = program.bind::<f32>(&weights)?;
            let xs: Vec<Vec<f32>> = (0..steps)
                .map(|s| random_tensor(vec![1, 1, i], 10 + s as u64).data)
                .collect();
            let times = match (emitted, w.id) {
                (true, "W3") => {
                    let model = models::Gru64x128::from_weights(&weights)?;
                    time_steps(reps, &xs, models::Gru64x128State::ZERO, |x, s| {
                        model.step(x, s)
                    })?
                }
                (true, _) => {
                    let model = models::Lstm256::from_weights(&weights)?;
                    time_steps(reps, &xs, models::Lstm256State::ZERO, |x, s| {
                        model.step(x, s)
                    })?
                }
                _ if jit => {
                    let model = compiled(&program, &weights)?;
                    time(reps, || {
                        let mut state = model.zero_state();
                        for x in &xs {
                            model.step(&mut state, x)?;
                        }
                        Ok(())
                    })?
                }
                _ => {
                    // The streaming API: bound once, one call per step, nothing allocated per
                    // step.
                    let mut stream = bound.stream(1, exec)?;
                    time(reps, || {
                        let mut state = stream.zero_state();
                        for x in &xs {
                            stream.step(&mut state, x)?;
                        }
                        Ok(())
                    })?
                }
            };
            (times, cell_flops(gates, i, h, 1, 1), steps)
        }
        "W5" => {
            let (i, h, b, t) = (32, 64, 1, 100);
            let program = Program::compile(&spec(CellKind::RnnTanh, i, h))?;
            let weights = Weights::init(&program, 1)?;
            let bound = program.bind::<f32>(&weights)?;
            let x = random_tensor(vec![t, b, i], 2);
            let gy = last_step_seed(t, b, h);
            let req = Request {
                input: Some(&x),
                grad_output: Some(&gy),
                ..Default::default()
            };
            let times = if emitted {
                let model = models::Rnn32x64::from_weights(&weights)?;
                time(reps, || model.run(&req).map(drop))?
            } else if jit {
                let model = compiled(&program, &weights)?;
                time(reps, || model.run(&req).map(drop))?
            } else {
                time(reps, || bound.run(&req, &exec).map(drop))?
            };
            (times, 3.0 * cell_flops(1, i, h, b, t), 1)
        }
        "W6" => {
            let (rows, n) = (32 * steps, 256);
            let mut g = Graph::new();
            let x = g.x(n);
            let wt = g.param("weight", Shape::Matrix(n, n));
            let bias = g.param("bias", Shape::Vector(n));
            let y = g.matmul(wt, x)?;
            let y = g.add(y, bias)?;
            g.set_output(OutRole::Output, y);
            let mut inputs = HashMap::new();
            inputs.insert(Role::Input, random_tensor(vec![rows, n], 1).data);
            inputs.insert(Role::Param(0), random_tensor(vec![n, n], 2).data);
            inputs.insert(Role::Param(1), random_tensor(vec![n], 3).data);
            let times = if jit {
                // The same Linear layer as a cell whose state does not feed back: its one
                // product runs over all the rows (16,384 at length 512) before the loop.
                let text = format!(
                    "cell Linear {{ input: {n}, hidden: {n}, param weight: [hidden, input], \
                     param bias: [hidden], state y, y = weight @ x + bias }}"
                );
                let program = Program::compile(&crate::parse_str(&text)?)?;
                let weights = Weights::init(&program, 1)?;
                let model = compiled(&program, &weights)?;
                let x = random_tensor(vec![steps, 32, n], 1);
                let req = Request {
                    input: Some(&x),
                    ..Default::default()
                };
                time(reps, || model.forward(&req).map(drop))?
            } else {
                time(reps, || {
                    eval_graph::<f32>(&g, rows, &inputs, &exec).map(drop)
                })?
            };
            (times, 2.0 * (rows * n * n) as f64, 1)
        }
        "W7" => {
            use crate::ir::optim::{Adam, Optimizer, Rule};
            use crate::train::{Backend, Seq2SeqRunner, SeqBatch};
            let model = seq2seq_model()?;
            let mut weights = model.init(1)?;
            let runner =
                Seq2SeqRunner::new(&model, if jit { Backend::Jit } else { Backend::Interp })?
                    .with_threads(threads);
            let (b, t) = (32, 30);
            let tgt = random_ids(vec![b, t + 1], 6000, 3);
            let column = |range: std::ops::Range<usize>| crate::ir::model::Ids {
                shape: vec![b, t],
                data: tgt
                    .data
                    .chunks(t + 1)
                    .flat_map(|row| row[range.clone()].to_vec())
                    .collect(),
            };
            let batch = SeqBatch {
                src: random_ids(vec![b, t], 5000, 2),
                lengths: vec![t as i64; b],
                tgt_in: column(0..t),
                tgt_out: column(1..t + 1),
            };
            let mut opt = Optimizer::new(Rule::Adam(Adam {
                lr: 1e-3,
                ..Adam::default()
            }))?;
            let times = if emitted {
                // The weights live in the model: bound, stepped, and put back every step.
                let mut model = models::ChapterSeq2Seq::from_weights(&weights)?;
                time(reps, || {
                    let loss = model.bind()?.loss(
                        &batch.src,
                        Some(&batch.lengths),
                        &batch.tgt_in,
                        &batch.tgt_out,
                        crate::train::IGNORE,
                    )?;
                    crate::train::train_step(&mut weights, &mut opt, loss, None)?;
                    model.load(&weights)
                })?
            } else {
                time(reps, || {
                    let loss = runner.loss(&weights, &batch)?;
                    crate::train::train_step(&mut weights, &mut opt, loss, None).map(drop)
                })?
            };
            let lstm = cell_flops(4, 64, 128, b, t);
            (
                times,
                3.0 * (2.0 * lstm + 2.0 * 128.0 * 6000.0 * (b * t) as f64),
                1,
            )
        }
        "W8" => {
            use crate::train::{Backend, Seq2SeqRunner};
            let model = seq2seq_model()?;
            let weights = model.init(1)?;
            let runner =
                Seq2SeqRunner::new(&model, if jit { Backend::Jit } else { Backend::Interp })?
                    .with_threads(threads);
            let src = random_ids(vec![1, 30], 5000, 2);
            let decode = crate::ir::seq2seq::Decode {
                steps: 30,
                sos: 1,
                eos: None,
            };
            let times = if emitted {
                let model = models::ChapterSeq2Seq::from_weights(&weights)?;
                let bound = model.bind()?;
                time(reps, || bound.greedy(&src, None, &decode).map(drop))?
            } else {
                let bound = runner.bound(&weights)?;
                time(reps, || bound.greedy(&src, None, &decode).map(drop))?
            };
            let flops = cell_flops(4, 64, 128, 1, 60) + 2.0 * 128.0 * 6000.0 * 30.0;
            (times, flops, 1)
        }
        other => {
            return Err(crate::Error::Argument(format!(
                "unknown workload `{other}`"
            )));
        }
    };
    let mut per: Vec<f64> = times.iter().map(|t| t / per_step as f64).collect();
    per.sort_by(f64::total_cmp);
    Ok(Measurement {
        workload: w,
        backend: backend.to_string(),
        threads,
        median_s: per[per.len() / 2],
        min_s: per[0],
        max_s: per[per.len() - 1],
        reps,
        flops,
    })
}

/// The gradient norm of the loss (the last step's summed output) with respect to each input
/// step `x_t`, for a tanh RNN of the W5 shape: the chapter's vanishing-gradient experiment.
pub fn gradient_norms(program: &Program, weights: &Weights, x: &Tensor) -> Result<Vec<f64>> {
    if program.spec.batch_first || x.shape.len() != 3 {
        return Err(crate::Error::Argument(
            "the gradient norms take a time-major model and a (T, B, I) input".into(),
        ));
    }
    let (t, b) = (x.shape[0], x.shape[1]);
    let width = program.output_size() * program.spec.directions();
    let gy = last_step_seed(t, b, width);
    let req = Request {
        input: Some(x),
        grad_output: Some(&gy),
        ..Default::default()
    };
    let grads = program
        .run::<f32>(weights, &req, &Exec::default())?
        .grads
        .expect("gradients were asked for");
    Ok(grads.input_norms(false))
}

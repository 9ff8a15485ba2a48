//! `peers`: times candle, burn and tract on the rnn project's benchmark workloads W1–W6 and prints one
//! JSON object per line in the format of `rnnc bench --json` (see README.md).

use anyhow::{Result, anyhow};
use clap::Parser;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Instant;

/// The single-core f32 limit of the reference machine, GFLOP/s (the same as `rnn::bench`).
const LIMIT_GFLOPS: f64 = 103.0;

/// The workloads, in order.
const WORKLOADS: [&str; 6] = ["W1", "W2", "W3", "W4", "W5", "W6"];

/// The libraries, in order: `burn` is burn on its ndarray backend, `burn-flex` on its flex one.
const LIBS: [&str; 4] = ["candle", "burn", "burn-flex", "tract"];

/// Steps per repetition of the streaming workloads W3 and W4.
const STEPS: usize = 1000;

// W1, W2 and W4: LSTM input and hidden sizes; W1 and W2 batch and length.
const LSTM_I: usize = 256;
const LSTM_H: usize = 256;
const SEQ_B: usize = 32;
const SEQ_T: usize = 512;
// W3: GRU.
const GRU_I: usize = 64;
const GRU_H: usize = 128;
// W5: tanh RNN (batch 1).
const RNN_I: usize = 32;
const RNN_H: usize = 64;
const RNN_T: usize = 100;
// W6: Linear 256 → 256 on (32, 512, 256).
const LIN: usize = 256;

#[derive(Parser)]
#[command(
    name = "peers",
    about = "Times candle, burn and tract on the workloads W1–W6 (one JSON object per line)"
)]
struct Args {
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Threads for the libraries' thread pools (rayon, matrixmultiply, tract's executor).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Only these workloads, comma-separated (W1,W3).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these libraries, comma-separated (candle, burn, burn-flex, tract).
    #[arg(long, value_delimiter = ',')]
    libs: Vec<String>,
    /// The directory of the ONNX models `make_onnx.py` writes (tract's workloads need it).
    #[arg(long)]
    onnx: Option<PathBuf>,
}

/// What one library did with one workload.
enum Outcome {
    /// Seconds per repetition (per step for W3 and W4), and the process's CPU time over the wall
    /// time of the timed repetitions (about 1 for one thread).
    Times(Vec<f64>, Option<f64>),
    /// Why the library does not run the workload.
    Unsupported(String),
}

/// FLOPs of one forward pass of a one-layer cell with `gates` gate blocks.
fn cell_flops(gates: usize, input: usize, hidden: usize, batch: usize, steps: usize) -> f64 {
    2.0 * gates as f64 * hidden as f64 * (input + hidden) as f64 * batch as f64 * steps as f64
}

/// FLOPs per repetition (per step for W3 and W4).
fn flops(w: &str) -> f64 {
    match w {
        "W1" => cell_flops(4, LSTM_I, LSTM_H, SEQ_B, SEQ_T),
        "W2" => 3.0 * cell_flops(4, LSTM_I, LSTM_H, SEQ_B, SEQ_T),
        "W3" => cell_flops(3, GRU_I, GRU_H, 1, 1),
        "W4" => cell_flops(4, LSTM_I, LSTM_H, 1, 1),
        "W5" => 3.0 * cell_flops(1, RNN_I, RNN_H, 1, RNN_T),
        "W6" => 2.0 * (LIN * LIN * SEQ_B * SEQ_T) as f64,
        _ => unreachable!("unknown workload {w}"),
    }
}

/// `n` uniform values in `[-1, 1)` from `seed` (xorshift64*).
fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// User plus system CPU seconds of this process, all threads (from `/proc/self/stat`).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses: field 3 (state) is index 0, so
    // utime (14) and stime (15) are 11 and 12. Both count clock ticks of 1/100 s (USER_HZ).
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Runs `f` once as a warm-up, then `reps` timed times; each time is divided by `per` (the steps
/// of a streaming workload, else 1).
fn time(reps: usize, per: usize, mut f: impl FnMut() -> Result<()>) -> Result<Outcome> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    let cpu0 = cpu_seconds();
    let wall0 = Instant::now();
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() / per as f64);
    }
    let wall = wall0.elapsed().as_secs_f64();
    let ratio = match (cpu0, cpu_seconds()) {
        // Ticks are 10 ms: below a quarter of a second the ratio says little.
        (Some(a), Some(b)) if wall >= 0.25 => Some((b - a) / wall),
        _ => None,
    };
    Ok(Outcome::Times(times, ratio))
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
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

/// Runs workload `w` on library `lib`; a panic inside the library becomes a failure.
fn run(w: &str, lib: &str, reps: usize, onnx: Option<&std::path::Path>) -> Result<Outcome> {
    std::panic::catch_unwind(AssertUnwindSafe(|| match lib {
        "candle" => candle_runs::run(w, reps),
        "burn" => burn_runs::run(w, reps, false),
        "burn-flex" => burn_runs::run(w, reps, true),
        "tract" => tract_runs::run(w, reps, onnx),
        _ => unreachable!("unknown library {lib}"),
    }))
    .unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(anyhow!("panicked: {msg}"))
    })
}

fn main() {
    if let Err(e) = peers(Args::parse()) {
        eprintln!("peers: {e:#}");
        std::process::exit(2);
    }
}

fn peers(args: Args) -> Result<()> {
    if args.reps == 0 || args.threads == 0 {
        anyhow::bail!("--reps and --threads must be at least 1");
    }
    let pick = |asked: &[String], all: &[&'static str], what: &str| -> Result<Vec<&'static str>> {
        if asked.is_empty() {
            return Ok(all.to_vec());
        }
        asked
            .iter()
            .map(|a| {
                all.iter()
                    .copied()
                    .find(|x| x.eq_ignore_ascii_case(a.trim()))
                    .ok_or_else(|| {
                        anyhow!("unknown {what} `{a}`: expected one of {}", all.join(", "))
                    })
            })
            .collect()
    };
    let workloads = pick(&args.only, &WORKLOADS, "workload")?;
    let libs = pick(&args.libs, &LIBS, "library")?;

    // Every thread pool the libraries use is sized before any of them starts: candle's gemm
    // (RAYON_NUM_THREADS / CANDLE_NUM_THREADS), burn-ndarray's matrixmultiply (MATMUL_NUM_THREADS),
    // rayon's global pool (burn-ndarray's and burn-flex's parallel loops, candle's), and tract's
    // executor (single-threaded unless asked).
    let n = args.threads.to_string();
    // SAFETY: at the start of `main`, before any other thread of this process exists.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &n);
        std::env::set_var("CANDLE_NUM_THREADS", &n);
        std::env::set_var("MATMUL_NUM_THREADS", &n);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()?;
    if args.threads > 1 {
        use tract_onnx::prelude::tract_linalg::multithread::{Executor, set_default_executor};
        set_default_executor(Executor::multithread(args.threads));
    }

    for &w in &workloads {
        for &lib in &libs {
            let line = match run(w, lib, args.reps, args.onnx.as_deref()) {
                Ok(Outcome::Times(mut times, ratio)) => {
                    times.sort_by(f64::total_cmp);
                    let median = times[times.len() / 2];
                    let gflops = flops(w) / median / 1e9;
                    eprintln!(
                        "peers: {w} {lib}: median {} {}, {gflops:.2} GFLOP/s{}",
                        human(median),
                        if matches!(w, "W3" | "W4") {
                            "per step"
                        } else {
                            "per run"
                        },
                        ratio.map_or(String::new(), |r| format!(", CPU/wall {r:.2}")),
                    );
                    if let Some(r) = ratio
                        && r > args.threads as f64 * 1.2
                    {
                        eprintln!(
                            "peers: warning: {w} {lib} kept {r:.2} cores busy with --threads {}",
                            args.threads
                        );
                    }
                    format!(
                        "{{\"workload\": \"{w}\", \"backend\": \"{lib}\", \"threads\": {}, \"median_s\": {:.6e}, \"min_s\": {:.6e}, \"max_s\": {:.6e}, \"reps\": {}, \"gflops\": {:.3}, \"limit_fraction\": {:.4}}}",
                        args.threads,
                        median,
                        times[0],
                        times[times.len() - 1],
                        args.reps,
                        gflops,
                        gflops / LIMIT_GFLOPS,
                    )
                }
                Ok(Outcome::Unsupported(why)) => unsupported(w, lib, &why),
                Err(e) => unsupported(w, lib, &format!("failed: {e:#}")),
            };
            println!("{line}");
        }
    }
    Ok(())
}

fn unsupported(w: &str, lib: &str, why: &str) -> String {
    eprintln!("peers: {w} {lib}: unsupported: {why}");
    format!(
        "{{\"workload\": \"{w}\", \"backend\": \"{lib}\", \"unsupported\": {}}}",
        json_str(why)
    )
}

/// candle (CPU backend): `candle_nn`'s LSTM, GRU and Linear; the tanh RNN of W5 by hand.
mod candle_runs {
    use super::*;
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{GRUConfig, LSTMConfig, Module, RNN, VarBuilder, VarMap};
    use std::hint::black_box;

    pub fn run(w: &str, reps: usize) -> Result<Outcome> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        match w {
            "W1" | "W2" => {
                let lstm = candle_nn::lstm(LSTM_I, LSTM_H, LSTMConfig::default(), vb.pp("lstm"))?;
                // candle's `seq` is batch-first: (B, T, I).
                let x = Tensor::from_vec(
                    uniform(SEQ_B * SEQ_T * LSTM_I, 1),
                    (SEQ_B, SEQ_T, LSTM_I),
                    &dev,
                )?;
                if w == "W1" {
                    return time(reps, 1, || {
                        let states = lstm.seq(&x)?;
                        black_box(lstm.states_to_tensor(&states)?);
                        Ok(())
                    });
                }
                let x = Var::from_tensor(&x)?;
                let vars = vm.all_vars();
                time(reps, 1, || {
                    let states = lstm.seq(x.as_tensor())?;
                    let loss = lstm.states_to_tensor(&states)?.sum_all()?;
                    let grads = loss.backward()?;
                    if grads.get(x.as_tensor()).is_none()
                        || vars.iter().any(|v| grads.get(v.as_tensor()).is_none())
                    {
                        anyhow::bail!("a gradient is missing");
                    }
                    black_box(grads);
                    Ok(())
                })
            }
            "W3" => {
                let gru = candle_nn::gru(GRU_I, GRU_H, GRUConfig::default(), vb.pp("gru"))?;
                let xs = (0..STEPS)
                    .map(|s| Tensor::from_vec(uniform(GRU_I, 10 + s as u64), (1, GRU_I), &dev))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                time(reps, STEPS, || {
                    let mut state = gru.zero_state(1)?;
                    for x in &xs {
                        state = gru.step(x, &state)?;
                    }
                    black_box(state);
                    Ok(())
                })
            }
            "W4" => {
                let lstm = candle_nn::lstm(LSTM_I, LSTM_H, LSTMConfig::default(), vb.pp("lstm"))?;
                let xs = (0..STEPS)
                    .map(|s| Tensor::from_vec(uniform(LSTM_I, 10 + s as u64), (1, LSTM_I), &dev))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                time(reps, STEPS, || {
                    let mut state = lstm.zero_state(1)?;
                    for x in &xs {
                        state = lstm.step(x, &state)?;
                    }
                    black_box(state);
                    Ok(())
                })
            }
            "W5" => {
                // h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), PyTorch's nn.RNN, written
                // step by step the way candle_nn's own cells are.
                let k = 1.0 / (RNN_H as f32).sqrt();
                let param = |shape: &[usize]| -> Result<Var> {
                    Ok(Var::from_tensor(&Tensor::rand(-k, k, shape, &dev)?)?)
                };
                let (w_ih, w_hh) = (param(&[RNN_H, RNN_I])?, param(&[RNN_H, RNN_H])?);
                let (b_ih, b_hh) = (param(&[RNN_H])?, param(&[RNN_H])?);
                let x = Var::from_tensor(&Tensor::from_vec(
                    uniform(RNN_T * RNN_I, 2),
                    (RNN_T, 1, RNN_I),
                    &dev,
                )?)?;
                time(reps, 1, || {
                    let (w_ih_t, w_hh_t) = (w_ih.t()?, w_hh.t()?);
                    let mut h = Tensor::zeros((1, RNN_H), DType::F32, &dev)?;
                    for t in 0..RNN_T {
                        let xt = x.as_tensor().get(t)?;
                        let pre = (xt.matmul(&w_ih_t)?.broadcast_add(&b_ih)?
                            + h.matmul(&w_hh_t)?.broadcast_add(&b_hh)?)?;
                        h = pre.tanh()?;
                    }
                    // The loss is the last step's summed output; the gradient norm per input step.
                    let grads = h.sum_all()?.backward()?;
                    let g = grads
                        .get(x.as_tensor())
                        .ok_or_else(|| anyhow!("no input gradient"))?;
                    black_box(g.sqr()?.sum((1, 2))?.sqrt()?.to_vec1::<f32>()?);
                    Ok(())
                })
            }
            "W6" => {
                let linear = candle_nn::linear(LIN, LIN, vb.pp("linear"))?;
                let x =
                    Tensor::from_vec(uniform(SEQ_B * SEQ_T * LIN, 1), (SEQ_B, SEQ_T, LIN), &dev)?;
                time(reps, 1, || {
                    black_box(linear.forward(&x)?);
                    Ok(())
                })
            }
            _ => unreachable!(),
        }
    }
}

/// burn 0.22 on its ndarray backend (`Device::ndarray()`, deprecated since 0.22 but still the
/// classic pure-Rust CPU backend) or its flex one (`Device::flex()`, the replacement), with the
/// autodiff decorator for the gradients: `burn::nn`'s Lstm, Gru, Rnn and Linear.
mod burn_runs {
    use super::*;
    use burn::nn::{GruConfig, LinearConfig, LstmConfig, LstmState, RnnConfig};
    use burn::tensor::{Device, Tensor, TensorData};
    use std::hint::black_box;

    fn sync(dev: &Device) -> Result<()> {
        dev.sync().map_err(|e| anyhow!("sync: {e:?}"))
    }

    fn tensor<const D: usize>(data: Vec<f32>, shape: [usize; D], dev: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(data, shape), dev)
    }

    #[allow(deprecated)] // `Device::ndarray`: deprecated in favour of flex, timed as well
    fn device(flex: bool) -> Device {
        if flex {
            Device::flex()
        } else {
            Device::ndarray()
        }
    }

    pub fn run(w: &str, reps: usize, flex: bool) -> Result<Outcome> {
        let dev = device(flex);
        match w {
            "W1" => {
                let lstm = LstmConfig::new(LSTM_I, LSTM_H, true).init(&dev);
                // burn's Lstm is batch-first by default: (B, T, I).
                let x = tensor(
                    uniform(SEQ_B * SEQ_T * LSTM_I, 1),
                    [SEQ_B, SEQ_T, LSTM_I],
                    &dev,
                );
                time(reps, 1, || {
                    black_box(lstm.forward(x.clone(), None));
                    sync(&dev)
                })
            }
            "W2" => {
                let ad = dev.autodiff();
                let lstm = LstmConfig::new(LSTM_I, LSTM_H, true).init(&ad);
                let x = tensor(
                    uniform(SEQ_B * SEQ_T * LSTM_I, 1),
                    [SEQ_B, SEQ_T, LSTM_I],
                    &ad,
                )
                .require_grad();
                time(reps, 1, || {
                    let (y, _) = lstm.forward(x.clone(), None);
                    let grads = y.sum().backward();
                    let gx = x.grad(&grads);
                    let gw = lstm.cell_gate.hidden_transform.weight.val().grad(&grads);
                    if gx.is_none() || gw.is_none() {
                        anyhow::bail!("a gradient is missing");
                    }
                    black_box((gx, gw, grads));
                    sync(&ad)
                })
            }
            "W3" => {
                let gru = GruConfig::new(GRU_I, GRU_H, true).init(&dev);
                let xs: Vec<Tensor<3>> = (0..STEPS)
                    .map(|s| tensor(uniform(GRU_I, 10 + s as u64), [1, 1, GRU_I], &dev))
                    .collect();
                time(reps, STEPS, || {
                    let mut h = Tensor::<2>::zeros([1, GRU_H], &dev);
                    for x in &xs {
                        h = gru.forward(x.clone(), Some(h)).reshape([1, GRU_H]);
                    }
                    black_box(h);
                    sync(&dev)
                })
            }
            "W4" => {
                let lstm = LstmConfig::new(LSTM_I, LSTM_H, true).init(&dev);
                let xs: Vec<Tensor<3>> = (0..STEPS)
                    .map(|s| tensor(uniform(LSTM_I, 10 + s as u64), [1, 1, LSTM_I], &dev))
                    .collect();
                time(reps, STEPS, || {
                    let mut state = LstmState::new(
                        Tensor::<2>::zeros([1, LSTM_H], &dev),
                        Tensor::<2>::zeros([1, LSTM_H], &dev),
                    );
                    for x in &xs {
                        state = lstm.forward(x.clone(), Some(state)).1;
                    }
                    black_box(state);
                    sync(&dev)
                })
            }
            "W5" => {
                let ad = dev.autodiff();
                let rnn = RnnConfig::new(RNN_I, RNN_H, true)
                    .with_batch_first(false)
                    .init(&ad);
                let x = tensor(uniform(RNN_T * RNN_I, 2), [RNN_T, 1, RNN_I], &ad).require_grad();
                time(reps, 1, || {
                    let (_, state) = rnn.forward(x.clone(), None);
                    // The loss is the last step's summed output; the gradient norm per input step.
                    let grads = state.hidden.sum().backward();
                    let g = x.grad(&grads).ok_or_else(|| anyhow!("no input gradient"))?;
                    black_box(g.clone().mul(g).sum_dim(2).sqrt().into_data());
                    Ok(())
                })
            }
            "W6" => {
                let linear = LinearConfig::new(LIN, LIN).init(&dev);
                let x = tensor(uniform(SEQ_B * SEQ_T * LIN, 1), [SEQ_B, SEQ_T, LIN], &dev);
                time(reps, 1, || {
                    black_box(linear.forward(x.clone()));
                    sync(&dev)
                })
            }
            _ => unreachable!(),
        }
    }
}

/// tract (inference only) on the ONNX models of `make_onnx.py`, each optimised once.
mod tract_runs {
    use super::*;
    use std::hint::black_box;
    use std::path::Path;
    use tract_onnx::prelude::*;

    const NO_BACKWARD: &str = "tract is an inference engine: it has no backward pass (autodiff)";

    pub fn run(w: &str, reps: usize, onnx: Option<&Path>) -> Result<Outcome> {
        let file = match w {
            "W1" => "w1_lstm_fwd.onnx",
            "W3" => "w3_gru_step.onnx",
            "W4" => "w4_lstm_step.onnx",
            "W6" => "w6_linear.onnx",
            "W2" => {
                return Ok(Outcome::Unsupported(format!(
                    "{NO_BACKWARD}, and W2 needs the gradients"
                )));
            }
            "W5" => {
                return Ok(Outcome::Unsupported(format!(
                    "{NO_BACKWARD}, and W5 needs the gradient with respect to the input"
                )));
            }
            _ => unreachable!(),
        };
        let Some(dir) = onnx else {
            return Ok(Outcome::Unsupported(
                "no --onnx DIR given: tract loads ONNX models; write them with make_onnx.py".into(),
            ));
        };
        let path = dir.join(file);
        if !path.is_file() {
            return Ok(Outcome::Unsupported(format!(
                "{} not found: write the models with `python3 make_onnx.py {}`",
                path.display(),
                dir.display()
            )));
        }
        let plan = tract_onnx::onnx()
            .model_for_path(&path)?
            .into_optimized()?
            .into_runnable()?;
        let mut state = plan.spawn()?;
        let value = |shape: &[usize], seed: u64| -> Result<TValue> {
            let n = shape.iter().product();
            Ok(Tensor::from_shape(shape, &uniform(n, seed))?.into_tvalue())
        };
        let zeros =
            |shape: &[usize]| -> Result<TValue> { Ok(Tensor::zero::<f32>(shape)?.into_tvalue()) };
        match w {
            "W1" => {
                // ONNX's LSTM is time-major: (T, B, I).
                let x = value(&[SEQ_T, SEQ_B, LSTM_I], 1)?;
                time(reps, 1, || {
                    black_box(state.run(tvec![x.clone()])?);
                    Ok(())
                })
            }
            "W3" => {
                let xs = (0..STEPS)
                    .map(|s| value(&[1, 1, GRU_I], 10 + s as u64))
                    .collect::<Result<Vec<_>>>()?;
                let h0 = zeros(&[1, 1, GRU_H])?;
                time(reps, STEPS, || {
                    let mut h = h0.clone();
                    for x in &xs {
                        // Outputs: y, h_n.
                        let mut out = state.run(tvec![x.clone(), h])?;
                        h = out.remove(1);
                    }
                    black_box(h);
                    Ok(())
                })
            }
            "W4" => {
                let xs = (0..STEPS)
                    .map(|s| value(&[1, 1, LSTM_I], 10 + s as u64))
                    .collect::<Result<Vec<_>>>()?;
                let zero = zeros(&[1, 1, LSTM_H])?;
                time(reps, STEPS, || {
                    let (mut h, mut c) = (zero.clone(), zero.clone());
                    for x in &xs {
                        // Outputs: y, h_n, c_n.
                        let mut out = state.run(tvec![x.clone(), h, c])?;
                        c = out.remove(2);
                        h = out.remove(1);
                    }
                    black_box((h, c));
                    Ok(())
                })
            }
            "W6" => {
                let x = value(&[SEQ_B, SEQ_T, LIN], 1)?;
                time(reps, 1, || {
                    black_box(state.run(tvec![x.clone()])?);
                    Ok(())
                })
            }
            _ => unreachable!(),
        }
    }
}

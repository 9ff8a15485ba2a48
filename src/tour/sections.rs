//! The tour's experiments, one function per section of the chapter.

use super::plot::{Chart, Corner, Series, line_chart};
use super::{Finding, Section, Verdict};
use crate::bench::{self, measure_at, workload};
use crate::ir::model::{Ids, Model};
use crate::ir::optim::{Adam, Optimizer, Rule};
use crate::ir::seq2seq::Decode;
use crate::ir::spec::BiasConvention;
use crate::ir::weights::seeded_normals;
use crate::jit::Jit;
use crate::train::{Backend, CharText, IGNORE, LmRunner, Reversal, Rng, Seq2SeqRunner, train_step};
use crate::{CellKind, Error, ModelSpec, Program, Request, Tensor, Weights};
use std::path::PathBuf;
use std::sync::Arc;

/// What every section reads: the budget, the seed, where plots go.
pub(crate) struct Ctx {
    pub quick: bool,
    pub seed: u64,
    pub out: PathBuf,
    pub progress: bool,
}

/// A section's failure.
pub(crate) enum Failure {
    Model(Error),
    Out(PathBuf, String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Model(e)
    }
}

impl From<rnn_jit::JitError> for Failure {
    fn from(e: rnn_jit::JitError) -> Failure {
        Failure::Model(e.into())
    }
}

type R<T> = Result<T, Failure>;

impl Ctx {
    /// The full budget, or the quick one.
    fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    /// A seed of its own for each use, all from the tour's seed.
    fn seed(&self, salt: u64) -> u64 {
        self.seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(salt)
    }

    /// A progress bar over `len` steps (drawn on a terminal only).
    fn bar(&self, len: u64, what: &str) -> indicatif::ProgressBar {
        let bar = if self.progress {
            indicatif::ProgressBar::new(len)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("  {prefix:<34} {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(what.to_string());
        bar
    }

    /// Draws `chart` into the report folder as `file`; returns the file's name.
    fn plot(&self, file: &str, chart: &Chart) -> R<String> {
        let path = self.out.join(file);
        line_chart(&path, chart).map_err(|e| Failure::Out(path, e))?;
        Ok(file.to_string())
    }
}

/// Runs one section.
pub(crate) fn run(ctx: &Ctx, section: Section) -> R<Finding> {
    match section {
        Section::Cell => cell(ctx),
        Section::Gradients => gradients(ctx),
        Section::Properties => properties(ctx),
        Section::Bidirectional => bidirectional(ctx),
        Section::Seq2seq => seq2seq(ctx),
        Section::Sequential => sequential(ctx),
        Section::Packing => packing(ctx),
        Section::Charlm => charlm(ctx),
    }
}

fn finding(section: Section, backend: &str) -> Finding {
    Finding {
        section,
        backend: backend.to_string(),
        claim: String::new(),
        measured: String::new(),
        verdict: Verdict::Differs,
        why: String::new(),
        body: String::new(),
        numbers: Vec::new(),
        plots: Vec::new(),
        seconds: 0.0,
    }
}

/// The median of `reps` timed calls of `f` (after one untimed call), in seconds: the lower
/// of the two middle ones for an even count.
fn median_time(reps: usize, f: impl FnMut() -> crate::Result<()>) -> R<f64> {
    let mut t = bench::time(reps.max(1), f)?;
    t.sort_by(f64::total_cmp);
    Ok(t[(t.len() - 1) / 2])
}

fn spec(cell: &CellKind, input: usize, hidden: usize) -> ModelSpec {
    ModelSpec::new(cell.clone(), input, hidden)
}

fn cell_name(cell: &CellKind) -> &'static str {
    match cell {
        CellKind::Lstm => "LSTM",
        CellKind::Gru => "GRU",
        _ => "RNN",
    }
}

const CELLS: [CellKind; 3] = [CellKind::RnnTanh, CellKind::Lstm, CellKind::Gru];

fn adam(lr: f64) -> R<Optimizer> {
    Ok(Optimizer::new(Rule::Adam(Adam {
        lr,
        ..Adam::default()
    }))?)
}

/// A number with thousands separated, as the chapter prints parameter counts.
fn grouped(n: u128) -> String {
    let s = n.to_string();
    let mut o = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            o.push(',');
        }
        o.push(c);
    }
    o
}

/// The JIT model of `program` bound to `weights`.
fn jit_model(program: &Program, weights: &Weights) -> R<crate::jit::JitModel> {
    Ok(Arc::new(Jit::compile(program)?).bind(weights)?)
}

// ---------------------------------------------------------------------------------------------
// §2 The vanilla cell and the parameter table.

mod models {
    crate::rnn! {
        /// The chapter's vanilla cell: 10 input features, 20 hidden.
        pub struct ChapterCell { input: 10, hidden: 20 }
    }
}

/// The chapter's parameter counts (Code Fragment 3.1.14), as printed.
const CHAPTER_COUNTS: [(CellKind, u128); 3] = [
    (CellKind::RnnTanh, 98_560),
    (CellKind::Lstm, 394_240),
    (CellKind::Gru, 295_680),
];

/// The chapter's printed hidden-state norms (Code Fragment 3.1.1).
const CHAPTER_NORMS: [f64; 5] = [2.7983, 3.4521, 3.1892, 3.6104, 3.3276];

fn cell(ctx: &Ctx) -> R<Finding> {
    let mut f = finding(
        Section::Cell,
        "macro (the emitted `step`), checked on the JIT",
    );
    // The cell stepped over five tokens of ten features, from a zero state.
    let program = Program::compile(&spec(&CellKind::RnnTanh, 10, 20))?;
    let weights = Weights::init(&program, ctx.seed(1))?;
    let cell = models::ChapterCell::from_weights(&weights)?;
    let xs = seeded_normals(ctx.seed(2), 5 * 10);
    let mut state = models::ChapterCellState::ZERO;
    let mut hs = Vec::new();
    for t in 0..5 {
        let x: &[f32; 10] = xs[t * 10..t * 10 + 10].try_into().expect("ten features");
        hs.push(cell.step(x, &mut state));
    }
    let norms: Vec<f64> = hs
        .iter()
        .map(|h| h.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
        .collect();
    // The same five steps as one whole-sequence call on the JIT.
    let x = Tensor::new(vec![5, 1, 10], xs.clone()).expect("5 x 10 numbers");
    let out = jit_model(&program, &weights)?.run(&Request {
        input: Some(&x),
        ..Default::default()
    })?;
    let agree = hs
        .iter()
        .flatten()
        .zip(&out.output.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max) as f64;
    let bound = 20f64.sqrt();
    let mut body = String::from(
        "The cell `h_t = tanh(W_hh h_{t-1} + W_xh x_t + b)` (input 10, hidden 20, PyTorch's \
         initialisation), stepped over five tokens drawn from a standard normal, from a zero \
         state:\n\n| step | ‖h‖ (measured) | h[:3] | ‖h‖ (the chapter's print) |\n|---|---|---|---|\n",
    );
    for (t, h) in hs.iter().enumerate() {
        body.push_str(&format!(
            "| {t} | {:.4} | [{:.4}, {:.4}, {:.4}] | {:.4} |\n",
            norms[t], h[0], h[1], h[2], CHAPTER_NORMS[t]
        ));
    }
    body.push_str(&format!(
        "\nThe JIT's whole-sequence run of the same cell agrees with the stepped one to \
         {agree:.1e} (largest absolute difference).\n\n"
    ));
    // The parameter table at 128 -> 256.
    body.push_str(
        "Parameters at input 128, hidden 256, one layer:\n\n| cell | PyTorch (two biases) | \
         one bias | the chapter prints | ≈ multiple of the RNN |\n|---|---|---|---|---|\n",
    );
    let mut chapter_is_one_bias = true;
    let mut counts = Vec::new();
    let mut extra = Vec::new();
    let mut ratios = Vec::new();
    let mut rnn_count = 1;
    for (cell, printed) in CHAPTER_COUNTS {
        let mut s = spec(&cell, 128, 256);
        let two = Program::compile(&s)?.parameter_count();
        s.bias_convention = BiasConvention::One;
        let one = Program::compile(&s)?.parameter_count();
        if cell == CellKind::RnnTanh {
            rnn_count = two;
        }
        chapter_is_one_bias &= one == printed && two != printed;
        counts.push(grouped(two));
        extra.push(format!("{} ({})", grouped(two - one), cell_name(&cell)));
        ratios.push(two as f64 / rnn_count as f64);
        body.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} |\n",
            cell_name(&cell),
            grouped(two),
            grouped(one),
            grouped(printed),
            two as f64 / rnn_count as f64
        ));
        f.numbers.push((
            format!("parameters_{}", cell_name(&cell).to_lowercase()),
            two as f64,
        ));
    }
    for (t, n) in norms.iter().enumerate() {
        f.numbers.push((format!("h_norm_step_{t}"), *n));
    }
    f.numbers.push(("jit_agreement".into(), agree));
    // The state moves at every step, and stays inside tanh's bound.
    let moves = hs
        .windows(2)
        .all(|w| w[0].iter().zip(&w[1]).any(|(a, b)| a != b));
    let bounded = moves && norms.iter().all(|&n| n > 0.0 && n <= bound);
    // The chapter's "about 4×" and "about 3×", within 5%.
    let ratios_hold = (ratios[1] / 4.0 - 1.0).abs() < 0.05 && (ratios[2] / 3.0 - 1.0).abs() < 0.05;
    f.numbers.push(("lstm_over_rnn".into(), ratios[1]));
    f.numbers.push(("gru_over_rnn".into(), ratios[2]));
    f.claim = "each step mixes the token with the previous state through tanh (its printed \
               norms lie between 2.8 and 3.6); an LSTM has about 4× and a GRU about 3× the \
               RNN's parameters: 98,560 / 394,240 / 295,680 at 128 → 256."
        .into();
    f.measured = format!(
        "‖h‖ {:.2}–{:.2} over 5 steps; {} parameters (PyTorch's RNN / LSTM / GRU)",
        norms.iter().copied().fold(f64::INFINITY, f64::min),
        norms.iter().copied().fold(0.0, f64::max),
        counts.join(" / ")
    );
    f.verdict = match (bounded && ratios_hold, chapter_is_one_bias) {
        (true, true) => Verdict::Partly,
        (true, false) => Verdict::Holds,
        (false, _) => Verdict::Differs,
    };
    f.why = format!(
        "{} Its values depend on the random weights and tokens, so the chapter's printed \
         numbers cannot be reproduced, only their kind. {} The LSTM has {:.2}× and the GRU \
         {:.2}× the RNN's parameters{}.",
        if bounded {
            format!(
                "The state changes at every step and stays inside tanh's bound (‖h‖ ≤ √20 = \
                 {bound:.2})."
            )
        } else {
            "The state did not behave as a tanh cell's should (it stood still, or left tanh's \
             bound)."
                .to_string()
        },
        if chapter_is_one_bias {
            format!(
                "The chapter's parameter counts are the one-bias figures: PyTorch's modules \
                 carry two biases per gate (`bias_ih` and `bias_hh`), {} more parameters than \
                 it prints.",
                extra.join(", ")
            )
        } else {
            "The chapter's parameter counts were compared as printed.".to_string()
        },
        ratios[1],
        ratios[2],
        if ratios_hold {
            ": the chapter's ≈4× and ≈3× (the biases scale with the gates too)"
        } else {
            ", not the chapter's ≈4× and ≈3×"
        }
    );
    f.plots.push(ctx.plot(
        "cell_state_norms.png",
        &Chart {
            title: "§2 The vanilla cell: ‖h_t‖ over five steps (10 → 20)".into(),
            x_label: "time step t".into(),
            y_label: "‖h_t‖".into(),
            y_range: Some((0.0, bound * 1.15)),
            integer_x: true,
            legend: Corner::LowerRight,
            series: vec![
                Series::measured(
                    "measured (this run)",
                    norms.iter().enumerate().map(|(t, &n)| (t as f64, n)).collect(),
                ),
                Series::reference(
                    "the chapter's print",
                    CHAPTER_NORMS
                        .iter()
                        .enumerate()
                        .map(|(t, &n)| (t as f64, n))
                        .collect(),
                ),
                Series::reference("bound √20 (every unit at ±1)", vec![(0.0, bound), (4.0, bound)]),
            ],
            ..Chart::default()
        },
    )?);
    f.body = body;
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// §3 Vanishing and exploding gradients.

/// The norm of d(sum of the last output)/d(x_t) for every step t, on the JIT.
fn input_gradient_norms(program: &Program, weights: &Weights, x: &Tensor) -> R<Vec<f64>> {
    let (t, b) = (x.shape[0], x.shape[1]);
    let gy = bench::last_step_seed(t, b, program.output_size());
    let out = jit_model(program, weights)?.run(&Request {
        input: Some(x),
        grad_output: Some(&gy),
        ..Default::default()
    })?;
    let grads = out
        .grads
        .ok_or_else(|| Error::Argument("the run returned no gradients".into()))?;
    Ok(grads.input_norms(false))
}

/// The per-step factor by which the gradient shrinks going back (below 1: vanishing; above:
/// exploding), from the last step to the earliest step with a non-zero gradient, and that
/// step.
fn decay_rate(norms: &[f64]) -> (f64, usize) {
    let last = norms.len() - 1;
    let first = norms.iter().position(|&n| n > 0.0).unwrap_or(last);
    if first == last || norms[last] <= 0.0 {
        return (0.0, first);
    }
    (
        (norms[first] / norms[last]).powf(1.0 / (last - first) as f64),
        first,
    )
}

/// The scale of the recurrent weights that puts the cells into the exploding regime.
const EXPLODING_SCALE: f32 = 4.0;

/// A scale of the tanh RNN's recurrent weights between its initialisation and the exploding
/// regime: the razor-thin margin between vanishing and exploding.
const MIDDLE_SCALE: f32 = 2.0;

fn gradients(ctx: &Ctx) -> R<Finding> {
    let mut f = finding(Section::Gradients, "JIT (Cranelift)");
    let scale = EXPLODING_SCALE;
    let (input, hidden, steps) = (32, 64, 100);
    let x = Tensor::new(
        vec![steps, 1, input],
        seeded_normals(ctx.seed(3), steps * input),
    )
    .expect("a (100, 1, 32) input");
    let mut series = Vec::new();
    let mut body = format!(
        "Input 32, hidden 64, one sequence of {steps} standard-normal steps, loss = the sum of \
         the last step's output (the chapter's Code Fragment 3.1.2), PyTorch's initialisation; \
         then the same with every recurrent weight (`weight_hh_l0`) scaled by {scale}. \
         ‖∂loss/∂x_t‖:\n\n| model | t = 0 | t = 10 | t = 25 | t = 50 | t = 75 | t = 99 | \
         per-step factor | steps at exactly 0 |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut rates = Vec::new();
    let mut middle = None;
    for (k, cells) in [
        (1.0, &CELLS[..]),
        (scale, &CELLS[..]),
        (MIDDLE_SCALE, &CELLS[..1]),
    ] {
        let scaled = k != 1.0;
        let label = if scaled {
            format!(" ×{k}")
        } else {
            String::new()
        };
        for (i, cell) in cells.iter().cloned().enumerate() {
            let program = Program::compile(&spec(&cell, input, hidden))?;
            let mut weights = Weights::init(&program, ctx.seed(10 + i as u64))?;
            if scaled {
                for (name, t) in weights.tensors.iter_mut() {
                    if name.starts_with("weight_hh") {
                        t.data.iter_mut().for_each(|w| *w *= k);
                    }
                }
            }
            let norms = input_gradient_norms(&program, &weights, &x)?;
            let (rate, first) = decay_rate(&norms);
            let name = format!("{}{label}", cell_name(&cell));
            body.push_str(&format!(
                "| {name} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {:.2e} | {rate:.3} | {first} |\n",
                norms[0], norms[10], norms[25], norms[50], norms[75], norms[99]
            ));
            let key = format!(
                "{}{}",
                cell_name(&cell).to_lowercase(),
                if scaled {
                    format!("_x{k}")
                } else {
                    String::new()
                }
            );
            if k == MIDDLE_SCALE {
                middle = Some(rate);
            }
            f.numbers.push((format!("{key}_grad_t0"), norms[0]));
            f.numbers.push((format!("{key}_grad_t99"), norms[99]));
            f.numbers.push((format!("{key}_factor"), rate));
            f.numbers.push((format!("{key}_zero_steps"), first as f64));
            rates.push((name.clone(), rate, first, norms[0], norms[99]));
            series.push(Series::measured(
                name,
                norms
                    .iter()
                    .enumerate()
                    .filter(|&(_, &n)| n > 0.0)
                    .map(|(t, &n)| (t as f64, n.log10()))
                    .collect(),
            ));
        }
    }
    let (rnn_rate, rnn_zero, rnn_0, rnn_99) = (rates[0].1, rates[0].2, rates[0].3, rates[0].4);
    let exploding = rates[3].1;
    let middle = middle.unwrap_or(f64::NAN);
    // The chapter's arithmetic, from the RNN's last-step gradient.
    for (r, name) in [(0.9f64, "0.9 per step"), (1.1, "1.1 per step")] {
        series.push(Series::reference(
            format!("{name} (the chapter's arithmetic)"),
            (0..steps)
                .map(|t| (t as f64, (rnn_99 * r.powi((steps - 1 - t) as i32)).log10()))
                .collect(),
        ));
    }
    body.push_str(&format!(
        "\nThe chapter's arithmetic: 0.9¹⁰⁰ = {:.3e} and 1.1¹⁰⁰ = {:.0}. The per-step factor is \
         (‖g_first‖ / ‖g_99‖)^(1/(99 − first)) over the steps whose gradient is not exactly \
         zero; in float32 a gradient smaller than about 1e-45 is zero.\n",
        0.9f64.powi(100),
        1.1f64.powi(100)
    ));
    f.claim = "shrinking by 10% per step leaves 0.9¹⁰⁰ ≈ 0.0000266 after 100 steps (the printed \
               gradient at step 0 is 0.000023, 362,637× smaller than at step 99); growing by 10% \
               gives 1.1¹⁰⁰ ≈ 13,781, an explosion."
        .into();
    let ratio = if rnn_0 > 0.0 {
        rnn_99 / rnn_0
    } else {
        f64::INFINITY
    };
    f.measured = format!(
        "RNN factor {rnn_rate:.3}/step{}; ×{scale} weights: {exploding:.3}/step",
        if rnn_zero > 0 {
            format!(", exactly 0 at steps 0–{}", rnn_zero - 1)
        } else {
            format!(", step 99/step 0 = {ratio:.1e}")
        }
    );
    let vanishes = rnn_rate < 1.0 && (rnn_0 == 0.0 || ratio > 1e3);
    f.verdict = match (vanishes, exploding > 1.0) {
        (true, true) => Verdict::Holds,
        (true, false) | (false, true) => Verdict::Partly,
        _ => Verdict::Differs,
    };
    f.why = format!(
        "The tanh RNN's gradient shrinks by a factor of {rnn_rate:.3} per step going back \
         ({}). {} With the recurrent weights scaled by {scale}, the RNN's factor is \
         {exploding:.3}: {}; scaled by {MIDDLE_SCALE}, {middle:.3}{}. The gated cells at \
         initialisation: LSTM {:.3}, GRU {:.3} per step{}.",
        if rnn_zero > 0 {
            format!(
                "the chapter prints 0.000023 at step 0; in float32 the gradient underflows to \
                 exactly 0 for steps 0–{}",
                rnn_zero - 1
            )
        } else {
            format!("step 99 is {ratio:.1e}× step 0, the chapter prints 362,637×")
        },
        if (0.85..0.95).contains(&rnn_rate) {
            "That is the chapter's 10% per step."
        } else {
            "That is not the chapter's 10% per step: the factor depends on the weights' scale \
             (PyTorch's uniform ±1/√64) and on how saturated tanh is."
        },
        if exploding > 1.0 {
            "the gradient grows going back, an explosion"
        } else {
            "tanh's saturation keeps it from exploding at this scale"
        },
        if middle < 1.0 && exploding > 1.0 {
            format!(
                ": the margin between vanishing and exploding lies within a factor of \
                 {:.0} of the weights' scale",
                EXPLODING_SCALE / MIDDLE_SCALE
            )
        } else {
            String::new()
        },
        rates[1].1,
        rates[2].1,
        if rates[1].1 < 1.0 && rates[2].1 < 1.0 {
            " (their gates start near σ(0) = 0.5, so untrained gated cells forget fast too; \
             §4 measures what training makes of them)"
        } else {
            ""
        }
    );
    f.plots.push(ctx.plot(
        "gradients.png",
        &Chart {
            title: "§3 ‖∂loss/∂x_t‖ through 100 steps (exact zeros not drawn)".into(),
            x_label: "time step t (the loss reads step 99)".into(),
            y_label: "gradient norm (log scale)".into(),
            log10_y: true,
            series,
            legend: Corner::LowerRight,
            ..Chart::default()
        },
    )?);
    f.body = body;
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// §4 The property table, measured.

/// The recall task: the first token is one of `classes` symbols, then `len - 1` distractors
/// from the other symbols; the target at the last step is the first token (time-major).
fn recall_batch(
    seed: u64,
    position: u64,
    batch: usize,
    len: usize,
    classes: usize,
    vocab: usize,
) -> R<(Ids, Ids)> {
    let mut rng = Rng::at(seed, position);
    let mut x = vec![0i64; len * batch];
    let mut y = vec![IGNORE; len * batch];
    for b in 0..batch {
        let c = rng.below(classes) as i64;
        x[b] = c;
        for t in 1..len {
            x[t * batch + b] = (classes + rng.below(vocab - classes)) as i64;
        }
        y[(len - 1) * batch + b] = c;
    }
    Ok((
        Ids::new(vec![len, batch], x)?,
        Ids::new(vec![len, batch], y)?,
    ))
}

/// The fraction of counted targets an LM predicts.
fn lm_accuracy(runner: &LmRunner, w: &Weights, batches: &[(Ids, Ids)]) -> R<f64> {
    let (mut right, mut total) = (0usize, 0usize);
    for (x, y) in batches {
        let p = runner.predict(w, x)?;
        for (a, b) in p.data.iter().zip(&y.data) {
            if *b != IGNORE {
                total += 1;
                right += usize::from(a == b);
            }
        }
    }
    Ok(right as f64 / total.max(1) as f64)
}

/// Trains a language-model-shaped `model` (embedding, stack, head) on `data(step)` for
/// `steps` steps with Adam and clipping at 1; every `every` steps (and at the end) records the
/// accuracy on `held`.
#[allow(clippy::too_many_arguments)]
fn train_lm(
    ctx: &Ctx,
    model: &Model,
    seed: u64,
    steps: u64,
    lr: f64,
    every: u64,
    data: impl Fn(u64) -> R<(Ids, Ids)>,
    held: &[(Ids, Ids)],
    what: &str,
    forget_bias: f32,
) -> R<Vec<(u64, f64)>> {
    let runner = LmRunner::new(model, Backend::Jit)?;
    let mut w = model.init(seed)?;
    if forget_bias != 0.0 {
        let h = model.spec.hidden_size;
        for (name, t) in w.tensors.iter_mut() {
            if name.ends_with("bias_ih_l0") {
                t.data[h..2 * h].iter_mut().for_each(|b| *b = forget_bias);
            }
        }
    }
    let mut opt = adam(lr)?;
    let bar = ctx.bar(steps, what);
    let mut curve = vec![(0, lm_accuracy(&runner, &w, held)?)];
    for step in 0..steps {
        let (x, y) = data(step)?;
        let loss = runner.loss(&w, &x, &y)?;
        train_step(&mut w, &mut opt, loss, Some(1.0))?;
        bar.inc(1);
        if (step + 1) % every == 0 || step + 1 == steps {
            let a = lm_accuracy(&runner, &w, held)?;
            bar.set_message(format!("accuracy {a:.3}"));
            curve.push((step + 1, a));
        }
    }
    bar.finish_and_clear();
    Ok(curve)
}

fn properties(ctx: &Ctx) -> R<Finding> {
    let mut f = finding(Section::Properties, "JIT (Cranelift)");
    // Step times at input 128, hidden 256, batch 32.
    let (i, h, b) = (128, 256, 32);
    let t = ctx.pick(64, 16);
    let reps = ctx.pick(5, 2);
    let x = Tensor::new(vec![t, b, i], seeded_normals(ctx.seed(20), t * b * i)).expect("an input");
    let gy = Tensor::new(vec![t, b, h], seeded_normals(ctx.seed(22), t * b * h)).expect("a seed");
    let mut body = format!(
        "Input 128, hidden 256, batch 32, {t} steps, one thread: the time of one step, forward \
         and forward + backward (BPTT, every weight's gradient).\n\n| cell | parameters \
         (PyTorch) | ≈ × RNN | forward µs/step | train µs/step |\n|---|---|---|---|---|\n"
    );
    let mut train_times = Vec::new();
    let mut rnn_params = 1;
    for cell in CELLS {
        let program = Program::compile(&spec(&cell, i, h))?;
        let params = program.parameter_count();
        if cell == CellKind::RnnTanh {
            rnn_params = params;
        }
        let weights = Weights::init(&program, ctx.seed(21))?;
        let model = jit_model(&program, &weights)?;
        let fwd = median_time(reps, || {
            model.run(&Request {
                input: Some(&x),
                ..Default::default()
            })?;
            Ok(())
        })? / t as f64;
        let train = median_time(reps, || {
            model.run(&Request {
                input: Some(&x),
                grad_output: Some(&gy),
                ..Default::default()
            })?;
            Ok(())
        })? / t as f64;
        train_times.push(train);
        body.push_str(&format!(
            "| {} | {} | {:.2} | {:.1} | {:.1} |\n",
            cell_name(&cell),
            grouped(params),
            params as f64 / rnn_params as f64,
            fwd * 1e6,
            train * 1e6
        ));
        let key = cell_name(&cell).to_lowercase();
        f.numbers
            .push((format!("{key}_forward_us_per_step"), fwd * 1e6));
        f.numbers
            .push((format!("{key}_train_us_per_step"), train * 1e6));
    }
    // Long-range learning: recall the first token.
    let lengths = [10usize, 20, 50, 100];
    let (classes, vocab, batch) = (4, 8, 64);
    let steps = ctx.pick(300, 6);
    let (lr, hid) = (3e-3, 64);
    body.push_str(&format!(
        "\nLong-range learning, measured: the first token is one of {classes} symbols, then \
         come distractors from {} others; the model (an embedding of 8, the cell with hidden \
         64, a head) must name the first token at the last step. Each cell is trained {steps} \
         steps (batch {batch}, Adam 3e-3, clipping at 1, seed fixed by the tour's seed) per \
         length; accuracy on 512 held-out sequences (chance {:.2}). The fourth row is the LSTM \
         with its forget gates' bias set to 1 at initialisation (Jozefowicz et al., 2015) \
         instead of PyTorch's uniform one:\n\n| cell | {} |\n|---|{}\n",
        vocab - classes,
        1.0 / classes as f64,
        lengths
            .iter()
            .map(|l| format!("length {l}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(lengths.len())
    ));
    let mut acc = Vec::new();
    let mut series = Vec::new();
    for (cell, fb) in [
        (CellKind::RnnTanh, 0.0),
        (CellKind::Lstm, 0.0),
        (CellKind::Gru, 0.0),
        (CellKind::Lstm, 1.0),
    ] {
        let label = if fb == 0.0 {
            cell_name(&cell).to_string()
        } else {
            format!("{}, forget bias {fb}", cell_name(&cell))
        };
        let key = label
            .to_lowercase()
            .replace(", forget bias 1", "_forget_bias_1");
        let mut row = Vec::new();
        for &len in &lengths {
            let mut s = spec(&cell, 8, hid);
            s.vocab = Some(vocab);
            s.head = Some(vocab);
            let model = Model::compile(&s)?;
            let data_seed = ctx.seed(1000 + len as u64);
            let held: Vec<(Ids, Ids)> = (0..4)
                .map(|e| recall_batch(data_seed ^ 0xe7a1, e, 128, len, classes, vocab))
                .collect::<R<_>>()?;
            let curve = train_lm(
                ctx,
                &model,
                ctx.seed(31),
                steps,
                lr,
                steps,
                |step| recall_batch(data_seed, step, batch, len, classes, vocab),
                &held,
                &format!("§4 {label} recall, length {len}"),
                fb,
            )?;
            let a = curve.last().map_or(0.0, |c| c.1);
            f.numbers.push((format!("{key}_recall_length_{len}"), a));
            row.push(a);
        }
        body.push_str(&format!(
            "| {} | {} |\n",
            label,
            row.iter()
                .map(|a| format!("{a:.3}"))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        series.push(Series::measured(
            label.clone(),
            lengths
                .iter()
                .zip(&row)
                .map(|(&l, &a)| (l as f64, a))
                .collect(),
        ));
        acc.push(row);
    }
    series.push(Series::reference(
        "chance",
        vec![(10.0, 1.0 / classes as f64), (100.0, 1.0 / classes as f64)],
    ));
    // How far each cell learns: the longest length whose accuracy is at least 0.9.
    let reach = |row: &[f64]| {
        lengths
            .iter()
            .zip(row)
            .filter(|&(_, &a)| a >= 0.9)
            .map(|(&l, _)| l)
            .max()
            .unwrap_or(0)
    };
    let shown = |r: usize| {
        if r == 0 {
            "none".to_string()
        } else {
            r.to_string()
        }
    };
    let (rnn, lstm, gru, lstm_fb) = (
        reach(&acc[0]),
        reach(&acc[1]),
        reach(&acc[2]),
        reach(&acc[3]),
    );
    for (name, r) in [
        ("rnn", rnn),
        ("lstm", lstm),
        ("gru", gru),
        ("lstm_forget_bias_1", lstm_fb),
    ] {
        f.numbers.push((format!("{name}_reach"), r as f64));
    }
    let gated = [lstm.max(lstm_fb), gru];
    let long_range = if gated.iter().all(|&g| g > rnn) {
        Verdict::Holds
    } else if gated.iter().any(|&g| g > rnn) {
        Verdict::Partly
    } else {
        Verdict::Differs
    };
    let order = train_times[0] < train_times[2] && train_times[2] < train_times[1];
    f.verdict = match (long_range, order) {
        (Verdict::Holds, true) => Verdict::Holds,
        (Verdict::Differs, false) => Verdict::Differs,
        _ => Verdict::Partly,
    };
    f.claim = "parameters ~n², ~4n², ~3n²; long-range learning poor for the RNN, good for the \
               LSTM and the GRU; training speed: the RNN fastest, the LSTM slowest, the GRU in \
               the middle."
        .into();
    f.measured = format!(
        "longest recall ≥ 90%: RNN {}, LSTM {} ({} with forget bias 1), GRU {}; train step \
         RNN {:.0} / GRU {:.0} / LSTM {:.0} µs",
        shown(rnn),
        shown(lstm),
        shown(lstm_fb),
        shown(gru),
        train_times[0] * 1e6,
        train_times[2] * 1e6,
        train_times[1] * 1e6
    );
    f.why = format!(
        "Parameters: the ratios are the chapter's, 4 and 3 exactly (§2). Long-range learning, \
         as the longest length each cell learns to recall on this budget: {} Training speed: {} \
         (the step's work is in the ratio 1 : 4 : 3 of the gates).",
        match long_range {
            Verdict::Holds => format!(
                "both gated cells reach further than the RNN (RNN {}, LSTM {}, GRU {}).{}",
                shown(rnn),
                shown(lstm.max(lstm_fb)),
                shown(gru),
                if gru > lstm.max(lstm_fb) {
                    format!(
                        " But \"good\" is not the same for both on this budget: the GRU \
                         recalls up to length {}, the LSTM (its forget gates start near σ(0) = \
                         0.5) up to {}{}.",
                        shown(gru),
                        shown(lstm),
                        if lstm_fb > lstm {
                            format!(", {} with its forget bias started at 1", shown(lstm_fb))
                        } else {
                            String::new()
                        }
                    )
                } else {
                    String::new()
                }
            ),
            Verdict::Partly => format!(
                "only one gated cell reaches further than the RNN (RNN {}, LSTM {}, GRU {}).",
                shown(rnn),
                shown(lstm.max(lstm_fb)),
                shown(gru)
            ),
            _ => format!(
                "no gated cell reaches further than the RNN (RNN {}, LSTM {}, GRU {}).",
                shown(rnn),
                shown(lstm.max(lstm_fb)),
                shown(gru)
            ),
        },
        if order {
            "the RNN is fastest, the LSTM slowest, the GRU between, as the chapter says"
        } else {
            "the measured order differs from the chapter's"
        }
    );
    f.plots.push(ctx.plot(
        "properties_recall.png",
        &Chart {
            title: "§4 Recall the first token: accuracy against sequence length".into(),
            x_label: "sequence length".into(),
            y_label: "held-out accuracy".into(),
            y_range: Some((0.0, 1.05)),
            series,
            legend: Corner::MiddleRight,
            ..Chart::default()
        },
    )?);
    f.body = body;
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// §5 Bidirectional.

/// Tag every token with its right neighbour: the target at t is the token at t + 1 (none at
/// the last step). Time-major.
fn neighbour_batch(
    seed: u64,
    position: u64,
    batch: usize,
    len: usize,
    vocab: usize,
) -> R<(Ids, Ids)> {
    let mut rng = Rng::at(seed, position);
    let x: Vec<i64> = (0..len * batch).map(|_| rng.below(vocab) as i64).collect();
    let y: Vec<i64> = (0..len * batch)
        .map(|i| {
            if i + batch < len * batch {
                x[i + batch]
            } else {
                IGNORE
            }
        })
        .collect();
    Ok((
        Ids::new(vec![len, batch], x)?,
        Ids::new(vec![len, batch], y)?,
    ))
}

fn bidirectional(ctx: &Ctx) -> R<Finding> {
    let mut f = finding(Section::Bidirectional, "JIT (Cranelift)");
    let (vocab, len, batch) = (8, 20, 32);
    let steps = ctx.pick(200, 6);
    let every = ctx.pick(20, 3);
    let data_seed = ctx.seed(40);
    let held: Vec<(Ids, Ids)> = (0..4)
        .map(|e| neighbour_batch(data_seed ^ 0xe7a1, e, 64, len, vocab))
        .collect::<R<_>>()?;
    let mut curves = Vec::new();
    for bi in [false, true] {
        let mut s = spec(&CellKind::Lstm, 8, 32);
        s.vocab = Some(vocab);
        s.head = Some(vocab);
        s.bidirectional = bi;
        let model = Model::compile(&s)?;
        curves.push(train_lm(
            ctx,
            &model,
            ctx.seed(41),
            steps,
            1e-2,
            every,
            |step| neighbour_batch(data_seed, step, batch, len, vocab),
            &held,
            if bi {
                "§5 bidirectional LSTM"
            } else {
                "§5 unidirectional LSTM"
            },
            0.0,
        )?);
    }
    let chance = 1.0 / vocab as f64;
    let (uni, bi) = (
        curves[0].last().map_or(0.0, |c| c.1),
        curves[1].last().map_or(0.0, |c| c.1),
    );
    f.numbers.push(("unidirectional_accuracy".into(), uni));
    f.numbers.push(("bidirectional_accuracy".into(), bi));
    f.claim = "a bidirectional RNN's state at t encodes the tokens before and after t; a \
               unidirectional one knows nothing of the tokens after t."
        .into();
    f.measured = format!(
        "naming the next token: unidirectional {uni:.3}, bidirectional {bi:.3} (chance {chance:.3})"
    );
    f.verdict = if bi >= 0.9 && uni <= chance + 0.1 {
        Verdict::Holds
    } else if bi > uni + 0.2 {
        Verdict::Partly
    } else {
        Verdict::Differs
    };
    f.why = format!(
        "The task (tag each token with the token to its right, {vocab} symbols, length {len}) \
         needs only right context, which a unidirectional LSTM cannot see: it scored \
         {uni:.3} against a chance of {chance:.3}. The bidirectional one (the same cell, hidden \
         32 each way, its head reading both directions' states) scored {bi:.3}{}",
        if bi >= 0.9 {
            ": it reads the neighbour from its backward half."
        } else {
            ": on this budget it has not learnt to read its backward half."
        }
    );
    f.body = format!(
        "Both LSTMs: an embedding of 8, hidden 32, a head over the {vocab} symbols; {steps} \
         steps of batch {batch}, Adam 1e-2, clipping at 1; accuracy on 256 held-out sequences \
         every {every} steps.\n\n| model | accuracy |\n|---|---|\n| unidirectional | {uni:.3} |\n\
         | bidirectional | {bi:.3} |\n| chance | {chance:.3} |\n"
    );
    let series = vec![
        Series::measured(
            "unidirectional LSTM",
            curves[0].iter().map(|&(s, a)| (s as f64, a)).collect(),
        ),
        Series::measured(
            "bidirectional LSTM",
            curves[1].iter().map(|&(s, a)| (s as f64, a)).collect(),
        ),
        Series::reference("chance", vec![(0.0, chance), (steps as f64, chance)]),
    ];
    f.plots.push(ctx.plot(
        "bidirectional.png",
        &Chart {
            title: "§5 Tag each token with its right neighbour".into(),
            x_label: "training step".into(),
            y_label: "held-out accuracy".into(),
            y_range: Some((0.0, 1.05)),
            series,
            legend: Corner::MiddleRight,
            ..Chart::default()
        },
    )?);
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// §6 and §8 The encoder-decoder and the bottleneck.

/// Trains a reversal model on sources of exactly `len` symbols; the greedy token accuracy on
/// 256 held-out sources.
fn reversal(ctx: &Ctx, len: usize, attention: bool, steps: u64) -> R<f64> {
    let bar = ctx.bar(
        steps,
        &format!(
            "§8 reversal, length {len}, {}",
            if attention { "attention" } else { "plain" }
        ),
    );
    let run = Reversal {
        len,
        attention,
        steps,
        hidden: 64,
        init_seed: ctx.seed(50),
        data_seed: ctx.seed(51),
        held_seed: ctx.seed(51) ^ 0xe7a1,
    };
    let accuracy = run.accuracy(|| bar.inc(1))?;
    bar.finish_and_clear();
    Ok(accuracy)
}

fn seq2seq(ctx: &Ctx) -> R<Finding> {
    let mut f = finding(Section::Seq2seq, "JIT (Cranelift)");
    // The chapter's model and its three greedy steps.
    let model = bench::seq2seq_model()?;
    let weights = model.init(ctx.seed(52))?;
    let runner = Seq2SeqRunner::new(&model, Backend::Jit)?;
    let bound = runner.bound(&weights)?;
    let src = Ids::new(vec![1, 3], vec![12, 457, 89])?;
    let decode = Decode {
        steps: 3,
        sos: 1,
        eos: None,
    };
    let tokens = bound.greedy(&src, None, &decode)?;
    let states = match &bound {
        crate::train::Bound::Interp(b) => b.encode(&src, None)?,
        crate::train::Bound::Jit(b) => b.encode(&src, None)?,
    };
    let shapes: Vec<String> = states.iter().map(|s| format!("{:?}", s.shape)).collect();
    let src30 = {
        let mut rng = Rng::new(ctx.seed(53));
        Ids::new(
            vec![1, 30],
            (0..30).map(|_| rng.below(5000) as i64).collect(),
        )?
    };
    let decode30 = Decode {
        steps: 30,
        sos: 1,
        eos: None,
    };
    let greedy = median_time(ctx.pick(11, 3), || {
        bound.greedy(&src30, None, &decode30)?;
        Ok(())
    })?;
    let mut body = format!(
        "The chapter's model (Code Fragment 3.1.11): an LSTM encoder over 5,000 source tokens \
         and an LSTM decoder over 6,000 target tokens, embeddings of 64, hidden 128, \
         initialised from the tour's seed. Encoding \"the cat sat\" (ids 12, 457, 89) and \
         decoding three tokens greedily from `<SOS>` = 1 gives the tokens {:?}; the encoder \
         hands the decoder its final states, shaped {} (h and c: layers, batch, hidden), and \
         nothing else: that is the bottleneck. Greedy decoding of 30 tokens from a source of \
         30 takes {:.2} ms (W8, one thread).\n\n",
        tokens.data,
        shapes.join(" and "),
        greedy * 1e3
    );
    f.numbers.push(("greedy_30_tokens_ms".into(), greedy * 1e3));
    for (i, t) in tokens.data.iter().enumerate() {
        f.numbers.push((format!("decoded_token_{i}"), *t as f64));
    }
    // The bottleneck.
    let lengths = [5usize, 10, 20, 40];
    let steps = ctx.pick(400, 5);
    let mut plain = Vec::new();
    let mut attn = Vec::new();
    for &len in &lengths {
        plain.push(reversal(ctx, len, false, steps)?);
        attn.push(reversal(ctx, len, true, steps)?);
    }
    body.push_str(&format!(
        "The bottleneck, measured: reversing strings of 10 symbols of a fixed length, an LSTM \
         encoder-decoder (embeddings 32, hidden 64) without and with Luong's general attention \
         over the encoder's outputs, each trained {steps} steps (batch 32, Adam 3e-3, clipping \
         at 1); greedy token accuracy on 256 held-out strings:\n\n| source length | plain | \
         attention |\n|---|---|---|\n"
    ));
    for (k, &len) in lengths.iter().enumerate() {
        body.push_str(&format!("| {len} | {:.3} | {:.3} |\n", plain[k], attn[k]));
        f.numbers.push((format!("plain_length_{len}"), plain[k]));
        f.numbers.push((format!("attention_length_{len}"), attn[k]));
    }
    let n = lengths.len() - 1;
    let degrades = plain[n] < plain[0] - 0.2;
    let rescued = attn[n] >= plain[n] + 0.2;
    f.claim = "the decoder sees only the encoder's final state, a fixed-size vector, so quality \
               degrades as the source grows (sharply past about 20 words, Cho et al.); \
               attention over all the encoder's states removes the bottleneck."
        .into();
    f.measured = format!(
        "reversal accuracy, length 5 → 40: plain {:.2} → {:.2}, attention {:.2} → {:.2}",
        plain[0], plain[n], attn[0], attn[n]
    );
    f.verdict = match (degrades, rescued) {
        (true, true) => Verdict::Holds,
        (false, false) => Verdict::Differs,
        _ => Verdict::Partly,
    };
    f.why = format!(
        "{} {}",
        if degrades {
            format!(
                "Without attention, the accuracy falls from {:.2} at length 5 to {:.2} at 40: \
                 hidden 64 cannot carry 40 symbols.",
                plain[0], plain[n]
            )
        } else {
            "Without attention, the accuracy does not fall clearly with the length on this \
             budget."
                .to_string()
        },
        if rescued {
            format!(
                "With attention it stays at {:.2} at length 40: each decoding step reads the \
                 encoder's state at the position it needs.",
                attn[n]
            )
        } else {
            "With attention it is not clearly better at length 40 on this budget.".to_string()
        }
    );
    f.plots.push(ctx.plot(
        "seq2seq_bottleneck.png",
        &Chart {
            title: "§8 Reversal accuracy against source length".into(),
            x_label: "source length (symbols)".into(),
            y_label: "greedy token accuracy".into(),
            y_range: Some((0.0, 1.05)),
            series: vec![
                Series::measured(
                    "plain encoder-decoder",
                    lengths.iter().zip(&plain).map(|(&l, &a)| (l as f64, a)).collect(),
                ),
                Series::measured(
                    "with attention",
                    lengths.iter().zip(&attn).map(|(&l, &a)| (l as f64, a)).collect(),
                ),
            ],
            ..Chart::default()
        },
    )?);
    f.body = body;
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// §7 The cost of sequential computation.

fn sequential(ctx: &Ctx) -> R<Finding> {
    let mut f = finding(Section::Sequential, "interpreter, macro and JIT");
    let t = ctx.pick(512, 64);
    let reps = ctx.pick(5, 1);
    let w1 = workload("W1").ok_or_else(|| Error::Argument("W1".into()))?;
    let w6 = workload("W6").ok_or_else(|| Error::Argument("W6".into()))?;
    // The arithmetic of each, by the workloads' own count: the LSTM's over the Linear's.
    let lstm_flops = bench::cell_flops(4, 256, 256, 32, t);
    let arithmetic = lstm_flops / (2.0 * 256.0 * 256.0 * (32 * t) as f64);
    let mut body = format!(
        "The chapter's Code Fragment 3.1.4: an LSTM (256 → 256) against a Linear layer (256 → \
         256) over a (32, {t}, 256) batch, forward only, one thread, median of {reps}. At these \
         shapes the LSTM does {arithmetic}× the Linear's arithmetic (4 gates, each reading 256 \
         inputs and 256 states), so a ratio above {arithmetic} is the price of order: the LSTM's {t} \
         steps are {t} small products one after another, the Linear one large product.\n\n\
         | backend | LSTM ms | LSTM GFLOP/s | Linear ms | Linear GFLOP/s | LSTM / Linear |\n\
         |---|---|---|---|---|---|\n"
    );
    let bar = ctx.bar(5, "§7 LSTM and Linear, every backend");
    let lin_jit = measure_at(w6, "jit", 1, reps, t)?;
    bar.inc(1);
    let lin_interp = measure_at(w6, "interp", 1, reps, t)?;
    bar.inc(1);
    let mut best: Option<(String, f64)> = None;
    for backend in ["interp", "macro", "jit"] {
        let lstm = measure_at(w1, backend, 1, reps, t)?;
        bar.inc(1);
        // The macro backend compiles recurrent models only: its Linear is the JIT's.
        let lin = if backend == "interp" {
            &lin_interp
        } else {
            &lin_jit
        };
        let ratio = lstm.median_s / lin.median_s;
        body.push_str(&format!(
            "| {backend}{} | {:.2} | {:.1} | {:.2} | {:.1} | {ratio:.1}× |\n",
            if backend == "macro" {
                " (Linear: JIT)"
            } else {
                ""
            },
            lstm.median_s * 1e3,
            lstm.gflops(),
            lin.median_s * 1e3,
            lin.gflops()
        ));
        f.numbers
            .push((format!("{backend}_lstm_ms"), lstm.median_s * 1e3));
        f.numbers.push((format!("{backend}_ratio"), ratio));
        if best.as_ref().is_none_or(|b| lstm.median_s < b.1) {
            best = Some((backend.to_string(), lstm.median_s));
        }
    }
    bar.finish_and_clear();
    let (fastest, lstm_best) = best.expect("three backends ran");
    // The three backends compute the same LSTM: on seeded weights and input, the largest
    // difference between the emitted code's, the JIT's and the interpreter's outputs.
    let agreement = {
        let program = Program::compile(&spec(&CellKind::Lstm, 256, 256))?;
        let weights = Weights::init(&program, ctx.seed(80))?;
        let x = Tensor::new(vec![8, 32, 256], seeded_normals(ctx.seed(81), 8 * 32 * 256))
            .expect("an input");
        let req = Request {
            input: Some(&x),
            ..Default::default()
        };
        let emitted = bench::models::Lstm256::from_weights(&weights)?.run(&req)?;
        let jit = jit_model(&program, &weights)?.run(&req)?;
        let interp = program
            .bind::<f32>(&weights)?
            .run(&req, &crate::Exec::default())?;
        let diff = |a: &Tensor, b: &Tensor| {
            a.data
                .iter()
                .zip(&b.data)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max) as f64
        };
        diff(&emitted.output, &jit.output).max(diff(&jit.output, &interp.output))
    };
    f.numbers
        .push(("backends_max_difference".into(), agreement));
    body.push_str(&format!(
        "\nThe three backends compute the same LSTM: on weights and an input of 8 steps drawn \
         from the tour's seed, their outputs differ by at most {agreement:.1e}.\n"
    ));
    let (lin_best, lin_backend, lin_gflops) = if lin_jit.median_s <= lin_interp.median_s {
        (lin_jit.median_s, "jit", lin_jit.gflops())
    } else {
        (lin_interp.median_s, "interp", lin_interp.gflops())
    };
    let lstm_gflops = lstm_flops / lstm_best / 1e9;
    let ratio = lstm_best / lin_best;
    f.numbers.push(("linear_ms".into(), lin_best * 1e3));
    f.numbers.push(("fastest_ratio".into(), ratio));
    // Time per step against the sequence length, on the JIT.
    let lengths: Vec<usize> = if ctx.quick {
        vec![8, 16, 32, 64]
    } else {
        vec![8, 16, 32, 64, 128, 256, 512]
    };
    let bar = ctx.bar(lengths.len() as u64, "§7 time per step against length");
    let (mut lstm_pts, mut lin_pts) = (Vec::new(), Vec::new());
    body.push_str(
        "\nTime per step (per position for the Linear) against the sequence length, JIT, batch \
         32:\n\n| length | LSTM µs/step | Linear µs/position |\n|---|---|---|\n",
    );
    for &len in &lengths {
        let l = measure_at(w1, "jit", 1, reps, len)?;
        let m = measure_at(w6, "jit", 1, reps, len)?;
        let (a, b) = (l.median_s / len as f64 * 1e6, m.median_s / len as f64 * 1e6);
        body.push_str(&format!("| {len} | {a:.1} | {b:.2} |\n"));
        lstm_pts.push((len as f64, a));
        lin_pts.push((len as f64, b));
        bar.inc(1);
    }
    bar.finish_and_clear();
    f.claim = "the LSTM must take its steps in order; at (32, 512, 256) its forward pass takes \
               12.8 ms against 0.9 ms for a Linear layer: 14.2× slower."
        .into();
    f.measured = format!(
        "LSTM {:.1} ms ({fastest}) against Linear {:.2} ms ({lin_backend}): {ratio:.1}× at \
         length {t}",
        lstm_best * 1e3,
        lin_best * 1e3
    );
    f.verdict = if (14.2 / 2.0..=14.2 * 2.0).contains(&ratio) && ratio / arithmetic >= 1.15 {
        Verdict::Holds
    } else if ratio > 1.0 {
        Verdict::Partly
    } else {
        Verdict::Differs
    };
    // The chapter's LSTM at its own shapes: (32, 512, 256).
    let flops = bench::cell_flops(4, 256, 256, 32, 512);
    let order_cost = ratio / arithmetic;
    f.why = format!(
        "The LSTM is {ratio:.1}× slower, and it does {arithmetic}× the Linear's arithmetic, so per \
         FLOP it runs at {:.2}× the Linear's speed. {} The chapter's absolute times are not one \
         CPU core's: its 12.8 ms would be {:.0} GFLOP/s for the LSTM, far beyond the 103 GFLOP/s \
         single-core limit of the machine `docs/workloads.md` describes (a GPU's figure, or an \
         illustration); one core takes {:.0} ms here.{}",
        1.0 / order_cost,
        if order_cost < 1.15 {
            format!(
                "On one CPU core the order costs next to nothing: the LSTM ran at {lstm_gflops:.0} \
                 GFLOP/s against the Linear's {lin_gflops:.0}, because the input projection of \
                 all the steps is one large product and each step's recurrent product (32 rows \
                 by 256 by 1,024) is large enough for the matrix product's speed. The gap the \
                 chapter describes is a parallel machine's: a Linear layer spreads over all of \
                 a GPU's cores at once, the LSTM's steps cannot."
            )
        } else {
            format!("The rest of the gap, {order_cost:.1}×, is the price of order.")
        },
        flops / 0.0128 / 1e9,
        lstm_best * 1e3,
        if ctx.quick {
            " (Quick run: length 64, not the chapter's 512.)"
        } else {
            ""
        }
    );
    f.plots.push(ctx.plot(
        "sequential.png",
        &Chart {
            title: "§7 Time per step against sequence length (JIT, batch 32)".into(),
            x_label: "sequence length (log scale)".into(),
            y_label: "µs per step".into(),
            log_x: true,
            y_range: Some((0.0, lstm_pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2)),
            series: vec![
                Series::measured("LSTM 256 → 256", lstm_pts),
                Series::measured("Linear 256 → 256", lin_pts),
            ],
            ..Chart::default()
        },
    )?);
    f.body = body;
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// The packing tip.

fn packing(ctx: &Ctx) -> R<Finding> {
    let mut f = finding(Section::Packing, "JIT (Cranelift)");
    let (i, h, b) = (64, 128, 32);
    let t = ctx.pick(256, 32);
    let reps = ctx.pick(5, 1);
    let program = Program::compile(&spec(&CellKind::Lstm, i, h))?;
    let weights = Weights::init(&program, ctx.seed(60))?;
    let jit = Arc::new(Jit::compile(&program)?);
    let shrinks = jit.shrinks_packed_batches();
    let model = jit.bind(&weights)?;
    let mut rng = Rng::new(ctx.seed(61));
    let x = Tensor::new(vec![t, b, i], seeded_normals(ctx.seed(62), t * b * i)).expect("an input");
    let gy = Tensor::new(vec![t, b, h], seeded_normals(ctx.seed(63), t * b * h)).expect("a seed");
    let skews: Vec<f64> = if ctx.quick {
        vec![1.0, 4.0]
    } else {
        vec![0.5, 1.0, 2.0, 4.0, 8.0]
    };
    let mut body = format!(
        "An LSTM (64 → 128, JIT, one thread), batch {b}, training step (forward and backward). \
         Lengths drawn as ⌈{t}·u^k⌉ with u uniform on (0, 1): the larger k, the more short \
         sequences; one sequence of each batch has the full length {t}, to which the padded \
         batch is padded, and the batch is ordered by decreasing length, as PyTorch packs one. \
         Padded: every sequence runs {t} steps. Packed: each runs its own length (PyTorch's \
         packed semantics: outputs zero past each length, final states at each sequence's last \
         step).\n\n| k | padding | padded ms | packed ms | time saved |\n|---|---|---|---|---|\n"
    );
    let bar = ctx.bar(skews.len() as u64, "packing: padded against packed");
    let (mut pts, mut ideal) = (Vec::new(), Vec::new());
    let mut saved_at_high = Vec::new();
    for &k in &skews {
        let mut lengths: Vec<i64> = (0..b)
            .map(|_| ((t as f64 * rng.uniform().powf(k)).ceil() as i64).clamp(1, t as i64))
            .collect();
        lengths[0] = t as i64;
        // By decreasing length, as PyTorch packs a batch (it sorts one that is not).
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        let padding = 1.0 - lengths.iter().sum::<i64>() as f64 / (b * t) as f64;
        let padded = median_time(reps, || {
            model.run(&Request {
                input: Some(&x),
                grad_output: Some(&gy),
                ..Default::default()
            })?;
            Ok(())
        })?;
        let packed = median_time(reps, || {
            model.run(&Request {
                input: Some(&x),
                grad_output: Some(&gy),
                lengths: Some(&lengths),
                ..Default::default()
            })?;
            Ok(())
        })?;
        let saved = 1.0 - packed / padded;
        body.push_str(&format!(
            "| {k} | {:.0}% | {:.2} | {:.2} | {:.0}% |\n",
            padding * 100.0,
            padded * 1e3,
            packed * 1e3,
            saved * 100.0
        ));
        f.numbers.push((format!("padding_k{k}"), padding));
        f.numbers.push((format!("saved_k{k}"), saved));
        pts.push((padding, saved));
        ideal.push((padding, padding));
        if padding >= 0.3 {
            saved_at_high.push(saved);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    ideal.sort_by(|a, b| a.0.total_cmp(&b.0));
    let lo = pts.first().map_or(0.0, |p| p.0);
    let hi = pts.last().map_or(1.0, |p| p.0);
    let best = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    f.claim = "packing variable-length sequences instead of padding them speeds training up \
               by 20 to 40% on datasets with highly variable lengths."
        .into();
    f.measured = format!(
        "packing saves {:.0}% to {:.0}% of the padded time at {:.0}–{:.0}% padding",
        pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) * 100.0,
        best * 100.0,
        lo * 100.0,
        hi * 100.0
    );
    // Judged on the batches with at least 30% padding (the chapter's "highly variable"):
    // their mean saving against the chapter's 20 to 40%, so that the noise of one timing does
    // not decide.
    let mean_high = saved_at_high.iter().sum::<f64>() / saved_at_high.len().max(1) as f64;
    f.numbers
        .push(("mean_saved_at_30pct_padding_or_more".into(), mean_high));
    f.verdict = if !saved_at_high.is_empty() && mean_high >= 0.2 {
        Verdict::Holds
    } else if mean_high >= 0.1 {
        Verdict::Partly
    } else {
        Verdict::Differs
    };
    f.why = if mean_high >= 0.1 {
        format!(
            "Packing saves {:.0}% on average where a third of the batch or more is padding. The \
             JIT runs each step, forward and backward, on the rows still running (the batch is \
             ordered by decreasing length, as PyTorch packs one), so the recurrent steps cost \
             the sequences' own lengths. The saving stays below the padding (the ideal line) \
             because the input projection before the loop and the weight gradients after it \
             are each one product over all the padded rows. The chapter's 20 to 40% is one \
             range of padding; the plot gives the whole curve. (The interpreter and the emitted \
             code still run every row and hold the finished ones: the same results, the padded \
             cost.)",
            mean_high * 100.0
        )
    } else {
        format!(
            "Here packing {} where a third of the batch or more is padding. {}",
            if mean_high >= 0.0 {
                format!(
                    "saves {:.0}% on average, nothing beyond the timings' noise,",
                    mean_high * 100.0
                )
            } else {
                format!(
                    "costs {:.0}% more on average (the copies that hold the finished rows' states),",
                    -mean_high * 100.0
                )
            },
            if shrinks {
                "The JIT ran each step on the running rows only, so what is left is the work \
                 that does not shrink with them (the input projection and the weight \
                 gradients over all the padded rows, and the per-step overhead)."
            } else {
                "This model's JIT plan cannot run a step on the running rows alone \
                 (`Jit::shrinks_packed_batches`), so each step computed every row and held the \
                 finished ones: PyTorch's packed results at the padded batch's cost. PyTorch's \
                 packed kernels shrink the batch at each step instead, which is where its 20 to \
                 40% comes from; the ideal line is what that would save here."
            }
        )
    };
    f.plots.push(ctx.plot(
        "packing.png",
        &Chart {
            title: "Packing: time saved against the padding of the batch".into(),
            x_label: "fraction of the padded batch that is padding".into(),
            y_label: "fraction of the padded time saved".into(),
            y_range: Some((pts.iter().map(|p| p.1 - 0.05).fold(-0.05, f64::min), 1.0)),
            series: vec![
                Series::measured("packed against padded (measured)", pts),
                Series::reference("ideal: saved = padding", ideal),
                Series::reference("the chapter: 20%", vec![(lo, 0.2), (hi, 0.2)]),
                Series::reference("the chapter: 40%", vec![(lo, 0.4), (hi, 0.4)]),
            ],
            ..Chart::default()
        },
    )?);
    f.body = body;
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// Karpathy's character model.

/// The first 100 kB of the Shakespeare corpus (shipped with the repository).
const SHAKESPEARE: &str = include_str!("../../data/shakespeare_100k.txt");

fn charlm(ctx: &Ctx) -> R<Finding> {
    let mut f = finding(Section::Charlm, "JIT (Cranelift)");
    let window = 64;
    let data = CharText::new(SHAKESPEARE, window)?;
    let v = data.vocab();
    let mut s = spec(&CellKind::Lstm, 32, 128);
    s.vocab = Some(v);
    s.head = Some(v);
    let model = Model::compile(&s)?;
    let runner = LmRunner::new(&model, Backend::Jit)?;
    let mut w = model.init(ctx.seed(70))?;
    let mut opt = adam(3e-3)?;
    let steps = ctx.pick(1200, 10);
    let every = ctx.pick(100, 5);
    let held = data.held_out(ctx.pick(64, 8), window)?;
    let held = &held[..held.len().min(ctx.pick(usize::MAX, 1))];
    // The unigram entropy: the loss of knowing only how often each character occurs.
    let mut counts = vec![0usize; v];
    for id in data.encode_all() {
        counts[id as usize] += 1;
    }
    let n: usize = counts.iter().sum();
    let unigram: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum();
    let bar = ctx.bar(steps, "char-rnn on Shakespeare");
    let mut train_curve = Vec::new();
    let mut held_curve = vec![(0.0, runner.evaluate(&w, held)?)];
    let data_seed = ctx.seed(71);
    let mut smooth = None;
    for step in 0..steps {
        let (x, y) = data.train_batch(data_seed, step, 32, window)?;
        let loss = runner.loss(&w, &x, &y)?;
        let value = loss.loss;
        smooth = Some(smooth.map_or(value, |s: f64| 0.9 * s + 0.1 * value));
        train_step(&mut w, &mut opt, loss, Some(1.0))?;
        bar.inc(1);
        if (step + 1) % every == 0 || step + 1 == steps {
            let e = runner.evaluate(&w, held)?;
            bar.set_message(format!("held-out {e:.3} nats/char"));
            held_curve.push(((step + 1) as f64, e));
            train_curve.push(((step + 1) as f64, smooth.unwrap_or(value)));
        }
    }
    bar.finish_and_clear();
    let final_loss = held_curve.last().map_or(f64::NAN, |c| c.1);
    // Samples at two temperatures, and how many of their words are words of the text.
    let words: std::collections::HashSet<String> = SHAKESPEARE
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let prompt = data.encode("\n")?;
    let len = ctx.pick(400, 60);
    let mut samples = Vec::new();
    for (k, temperature) in [0.5, 1.0].into_iter().enumerate() {
        let ids = runner.sample(&w, &prompt, len, temperature, ctx.seed(72 + k as u64))?;
        let text = data.decode(&ids);
        let sampled: Vec<String> = text
            .split(|c: char| !c.is_alphabetic())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        let real = sampled.iter().filter(|w| words.contains(*w)).count() as f64
            / sampled.len().max(1) as f64;
        f.numbers.push((format!("real_words_t{temperature}"), real));
        samples.push((temperature, text, real));
    }
    f.numbers
        .push(("held_out_nats_per_char".into(), final_loss));
    f.numbers.push(("unigram_nats_per_char".into(), unigram));
    f.claim = "(Karpathy's char-rnn, which the chapter's LSTM section rests on) an LSTM trained \
               on raw characters learns to spell and to lay out a play; sampling at a lower \
               temperature gives safer text."
        .into();
    f.measured = format!(
        "held-out {final_loss:.3} nats/char ({:.2} bits) after {steps} steps; real words {:.0}% \
         at T 0.5, {:.0}% at T 1.0",
        final_loss / std::f64::consts::LN_2,
        samples[0].2 * 100.0,
        samples[1].2 * 100.0
    );
    let learnt = final_loss < 2.0 && final_loss < unigram - 0.8 && samples[0].2 >= 0.5;
    let tempered = samples[0].2 >= samples[1].2;
    f.verdict = match (learnt, tempered) {
        (true, true) => Verdict::Holds,
        (false, false) => Verdict::Differs,
        _ => Verdict::Partly,
    };
    f.why = format!(
        "Knowing only the characters' frequencies costs {unigram:.2} nats per character; the \
         LSTM ({v} characters, an embedding of 32, hidden 128, windows of {window}, batch 32, \
         Adam 3e-3) reaches {final_loss:.2} on the held-out tenth of the text. {} {}",
        if learnt {
            "It has learnt far more than the frequencies: most of the words of its colder \
             sample are words of the text."
        } else {
            "On this budget it has not got far past the frequencies (or most of its colder \
             sample's words are not words of the text)."
        },
        if tempered {
            "The colder sample has at least as large a share of real words as the hotter one."
        } else {
            "The colder sample has a smaller share of real words than the hotter one here."
        }
    );
    let mut body = format!(
        "The first 100 kB of the corpus, the last tenth held out; {steps} steps, the held-out \
         loss every {every}.\n"
    );
    for (temperature, text, real) in &samples {
        body.push_str(&format!(
            "\nSample at temperature {temperature} ({:.0}% of its words are words of the text):\n\n```text\n{}\n```\n",
            real * 100.0,
            text.trim_end()
        ));
    }
    f.plots.push(ctx.plot(
        "charlm_loss.png",
        &Chart {
            title: "A character LSTM on Shakespeare: the loss".into(),
            x_label: "training step".into(),
            y_label: "nats per character".into(),
            series: vec![
                Series::measured("training (moving average)", train_curve),
                Series::measured("held-out", held_curve),
                Series::reference(
                    "character frequencies only",
                    vec![(0.0, unigram), (steps as f64, unigram)],
                ),
            ],
            ..Chart::default()
        },
    )?);
    f.body = body;
    Ok(f)
}

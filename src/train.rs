//! Training on the chapter's tasks, on the interpreter or the JIT.
//!
//! - [`SeqTask`]: the copy and reversal tasks of the encoder-decoder chapter. A source is a
//!   random string of symbols of a random length; the target is the same string, or reversed,
//!   then the end token. Token ids: [`PAD`] pads the sources, [`SOS`] starts the decoder,
//!   [`EOS`] ends a target, the symbols start at [`FIRST_SYMBOL`].
//! - [`CharText`]: a character language model's data: a text's characters as ids, the last
//!   tenth held out.
//! - [`LmRunner`] and [`Seq2SeqRunner`]: a model's loss and gradients, evaluation, decoding and
//!   sampling for given weights on either backend ([`Backend`]); the weights change at every
//!   step, so each call binds them (the JIT compiles once, in `new`).
//! - [`train_step`]: one optimisation step (clipping by the global norm, then the optimiser).
//!
//! Every batch is a function of the seed and its position in the data stream, so a run
//! resumed from a checkpoint (which records the position) sees the same batches.

use crate::jit::Jit;
use rnn_ir::model::{BoundModel, Ids, Input, Loss, Model, Recurrent, Run, cross_entropy_fused};
use rnn_ir::optim::{Norm, Optimizer, clip_grad_norm};
use rnn_ir::seq2seq::{BoundSeq2Seq, Decode, Seq2Seq};
use rnn_ir::{Error, Exec, Program, Result, Weights};
use std::sync::Arc;

/// Runs `$body` with `$b` the runner's model bound to `$weights` on its backend: the two
/// bound types differ, so the body is written once and expanded for each.
macro_rules! on_backend {
    ($runner:expr, $weights:expr, |$b:ident| $body:expr) => {
        match $runner.bind_any($weights)? {
            Bound::Interp($b) => {
                let $b = &$b;
                $body
            }
            Bound::Jit($b) => {
                let $b = &$b;
                $body
            }
        }
    };
}

/// A model bound on the interpreter or on the JIT.
pub enum Bound<I, J> {
    /// On the interpreter.
    Interp(I),
    /// On the JIT.
    Jit(J),
}

/// The padding of sources (never a target: targets past the end hold [`IGNORE`]).
pub const PAD: i64 = 0;
/// The start token.
pub const SOS: i64 = 1;
/// The end token.
pub const EOS: i64 = 2;
/// The first symbol's id.
pub const FIRST_SYMBOL: i64 = 3;
/// The ignore index of the targets.
pub const IGNORE: i64 = rnn_ir::model::IGNORE_INDEX;

/// The largest size of a task, a window, a batch or a sample (the compiler's largest size).
const MAX: usize = rnn_ir::ModelSpec::MAX_SIZE;

/// Refuses a batch of `batch` sequences of `len` that cannot be held.
fn room(batch: usize, len: usize) -> Result<()> {
    match batch.checked_mul(len) {
        Some(n) if batch <= MAX && n <= (isize::MAX as usize) / 8 => Ok(()),
        _ => Err(Error::Argument(format!(
            "a batch of {batch} sequences of {len} is more than can be held (batches are at most {MAX})"
        ))),
    }
}

/// A small deterministic generator (SplitMix64) for data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The stream of batch `position` of a run seeded `seed`.
    pub fn at(seed: u64, position: u64) -> Rng {
        let mut r = Rng(seed ^ position.wrapping_mul(0xd1b5_4a32_d192_ed03));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0 .. n` (`n` ≥ 1).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * n as f64) as usize % n.max(1)
    }

    /// A number in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Which string the target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// The source itself.
    Copy,
    /// The source reversed.
    Reverse,
}

/// The copy or reversal task.
#[derive(Clone, Copy, Debug)]
pub struct SeqTask {
    /// Copy or reverse.
    pub kind: TaskKind,
    /// Distinct symbols (ids `FIRST_SYMBOL ..`).
    pub symbols: usize,
    /// The shortest source.
    pub min_len: usize,
    /// The longest source.
    pub max_len: usize,
}

/// One batch of a [`SeqTask`], batch-first.
#[derive(Clone, Debug)]
pub struct SeqBatch {
    /// Sources `(B, max_len)`, padded with [`PAD`].
    pub src: Ids,
    /// Each source's length.
    pub lengths: Vec<i64>,
    /// The decoder's input `(B, max_len + 1)`: [`SOS`], then the target, then [`PAD`].
    pub tgt_in: Ids,
    /// The decoder's targets `(B, max_len + 1)`: the target, [`EOS`], then [`IGNORE`].
    pub tgt_out: Ids,
}

impl SeqTask {
    /// The vocabulary of sources and targets (specials and symbols).
    pub fn vocab(&self) -> usize {
        FIRST_SYMBOL as usize + self.symbols
    }

    /// Checks the task's sizes.
    pub fn check(&self) -> Result<()> {
        if self.symbols == 0 || self.min_len == 0 || self.min_len > self.max_len {
            return Err(Error::Argument(format!(
                "a task needs at least one symbol and lengths 1 <= min <= max, found {} symbols and lengths {}..={}",
                self.symbols, self.min_len, self.max_len
            )));
        }
        if self.symbols > MAX || self.max_len > MAX {
            return Err(Error::Argument(format!(
                "a task's symbols and lengths are at most {MAX}, found {} symbols and length {}",
                self.symbols, self.max_len
            )));
        }
        Ok(())
    }

    /// Batch number `position` of a run seeded `seed`; the task is checked first, and a batch
    /// too large to hold is a typed error.
    pub fn batch(&self, seed: u64, position: u64, batch: usize) -> Result<SeqBatch> {
        self.check()?;
        room(batch, self.max_len + 1)?;
        let mut rng = Rng::at(seed, position);
        let (s, t) = (self.max_len, self.max_len + 1);
        let mut src = vec![PAD; batch * s];
        let mut tgt_in = vec![PAD; batch * t];
        let mut tgt_out = vec![IGNORE; batch * t];
        let mut lengths = Vec::with_capacity(batch);
        for b in 0..batch {
            let len = self.min_len + rng.below(self.max_len - self.min_len + 1);
            lengths.push(len as i64);
            let symbols: Vec<i64> = (0..len)
                .map(|_| FIRST_SYMBOL + rng.below(self.symbols) as i64)
                .collect();
            src[b * s..b * s + len].copy_from_slice(&symbols);
            let mut target = symbols;
            if self.kind == TaskKind::Reverse {
                target.reverse();
            }
            tgt_in[b * t] = SOS;
            tgt_in[b * t + 1..b * t + 1 + len].copy_from_slice(&target);
            tgt_out[b * t..b * t + len].copy_from_slice(&target);
            tgt_out[b * t + len] = EOS;
        }
        Ok(SeqBatch {
            src: Ids {
                shape: vec![batch, s],
                data: src,
            },
            lengths,
            tgt_in: Ids {
                shape: vec![batch, t],
                data: tgt_in,
            },
            tgt_out: Ids {
                shape: vec![batch, t],
                data: tgt_out,
            },
        })
    }
}

/// Token accuracy of `decoded` (`(B, steps)`) on `batch`: the target symbols (not the end
/// token) produced at their positions, and how many there are.
pub fn token_accuracy(decoded: &Ids, batch: &SeqBatch) -> (usize, usize) {
    let (steps, t) = (decoded.shape[1], batch.tgt_out.shape[1]);
    let (mut right, mut total) = (0, 0);
    for (b, &len) in batch.lengths.iter().enumerate() {
        for i in 0..len as usize {
            total += 1;
            if i < steps && decoded.data[b * steps + i] == batch.tgt_out.data[b * t + i] {
                right += 1;
            }
        }
    }
    (right, total)
}

/// A text's characters as token ids, for a character language model.
#[derive(Clone, Debug)]
pub struct CharText {
    /// The vocabulary: every distinct character, sorted; a character's id is its index.
    pub chars: Vec<char>,
    ids: Vec<i64>,
    /// Where the held-out tenth starts.
    split: usize,
}

impl CharText {
    /// The text's vocabulary and ids; the last tenth is held out. Needs two distinct
    /// characters and room for a window of `steps + 1` characters in each part.
    pub fn new(text: &str, steps: usize) -> Result<CharText> {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        if chars.len() < 2 {
            return Err(Error::Argument(
                "the text needs at least two distinct characters".into(),
            ));
        }
        let ids: Vec<i64> = text
            .chars()
            .map(|c| chars.binary_search(&c).map_or(0, |i| i as i64))
            .collect();
        let split = ids.len() - ids.len() / 10;
        if steps == 0 || steps > MAX {
            return Err(Error::Argument(format!(
                "a window holds 1 ..= {MAX} characters, found {steps}"
            )));
        }
        if ids.len() / 10 < steps + 1 {
            return Err(Error::Argument(format!(
                "the text has {} characters: its held-out tenth needs at least {} (a window of `steps` + 1)",
                ids.len(),
                steps + 1
            )));
        }
        Ok(CharText { chars, ids, split })
    }

    /// Every character's id, in the text's order.
    pub fn encode_all(&self) -> impl Iterator<Item = u64> + '_ {
        self.ids.iter().map(|&i| i as u64)
    }

    /// The vocabulary's size.
    pub fn vocab(&self) -> usize {
        self.chars.len()
    }

    /// The ids of `s`, each character in the vocabulary.
    pub fn encode(&self, s: &str) -> Result<Vec<i64>> {
        s.chars()
            .map(|c| {
                self.chars.binary_search(&c).map(|i| i as i64).map_err(|_| {
                    Error::Argument(format!("`{c}` is not a character of the training text"))
                })
            })
            .collect()
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[i64]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{fffd}'))
            .collect()
    }

    /// `(inputs, targets)`, time-major `(steps, batch)`, from `starts` (targets are the
    /// inputs one character on).
    fn windows(&self, starts: &[usize], steps: usize) -> (Ids, Ids) {
        let batch = starts.len();
        let (mut x, mut y) = (vec![0; steps * batch], vec![0; steps * batch]);
        for (b, &s) in starts.iter().enumerate() {
            for t in 0..steps {
                x[t * batch + b] = self.ids[s + t];
                y[t * batch + b] = self.ids[s + t + 1];
            }
        }
        (
            Ids {
                shape: vec![steps, batch],
                data: x,
            },
            Ids {
                shape: vec![steps, batch],
                data: y,
            },
        )
    }

    /// Training batch number `position` of a run seeded `seed`: `batch` windows of `steps`
    /// characters at random places of the training part.
    pub fn train_batch(
        &self,
        seed: u64,
        position: u64,
        batch: usize,
        steps: usize,
    ) -> Result<(Ids, Ids)> {
        self.check_window(steps)?;
        room(batch, steps)?;
        let mut rng = Rng::at(seed, position);
        let span = self.split - steps;
        let starts: Vec<usize> = (0..batch).map(|_| rng.below(span)).collect();
        Ok(self.windows(&starts, steps))
    }

    /// Refuses a window of `steps` that either part of the text cannot hold.
    fn check_window(&self, steps: usize) -> Result<()> {
        let held = self.ids.len() - self.split;
        if steps == 0 || steps >= held || steps >= self.split {
            return Err(Error::Argument(format!(
                "a window of {steps} characters does not fit the text's parts ({} and {} characters; a window needs 1 and one more than its length)",
                self.split, held
            )));
        }
        Ok(())
    }

    /// The held-out part as consecutive windows of `steps` characters, `batch` at a time
    /// (the last batch may be smaller).
    pub fn held_out(&self, batch: usize, steps: usize) -> Result<Vec<(Ids, Ids)>> {
        self.check_window(steps)?;
        room(batch, steps)?;
        let starts: Vec<usize> = (self.split..self.ids.len() - steps)
            .step_by(steps)
            .collect();
        Ok(starts
            .chunks(batch.max(1))
            .map(|c| self.windows(c, steps))
            .collect())
    }
}

/// The backend that runs the recurrent stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter.
    Interp,
    /// The Cranelift JIT.
    Jit,
}

/// A language model (an embedding, a stack and a head) on a backend.
pub struct LmRunner<'m> {
    model: &'m Model,
    jit: Option<Arc<Jit>>,
}

impl<'m> LmRunner<'m> {
    /// Compiles the stack for `backend` (once).
    pub fn new(model: &'m Model, backend: Backend) -> Result<LmRunner<'m>> {
        if model.embedding.is_none() || model.head.is_none() {
            return Err(Error::Argument(
                "a language model needs an embedding (`vocab`) and a head (`head`)".into(),
            ));
        }
        if model.spec.batch_first {
            return Err(Error::Argument(
                "the language-model runner feeds (time, batch) windows: declare the model time-major (no `batch_first`)".into(),
            ));
        }
        let jit = match backend {
            Backend::Interp => None,
            Backend::Jit => Some(Arc::new(Jit::compile(&model.stack)?)),
        };
        Ok(LmRunner { model, jit })
    }

    /// The model bound to `weights` on the runner's backend.
    #[allow(clippy::type_complexity)]
    pub fn bind_any(
        &self,
        weights: &Weights,
    ) -> Result<
        Bound<BoundModel<'m, rnn_ir::model::Interpreted<'m>>, BoundModel<'m, crate::jit::JitModel>>,
    > {
        Ok(match &self.jit {
            None => Bound::Interp(self.model.bind_interp(weights, Exec::default())?),
            Some(j) => Bound::Jit(self.model.bind(weights, |_, w| j.bind(w))?),
        })
    }

    /// The loss of predicting `targets` from `inputs` (time-major ids) and its gradients.
    pub fn loss(&self, weights: &Weights, inputs: &Ids, targets: &Ids) -> Result<Loss> {
        let run = Run::new(Input::Ids(inputs));
        on_backend!(self, weights, |b| b.loss(&run, targets, IGNORE))
    }

    /// The mean loss over `batches`, in nats per character (no gradients).
    pub fn evaluate(&self, weights: &Weights, batches: &[(Ids, Ids)]) -> Result<f64> {
        fn go<R: Recurrent>(b: &BoundModel<'_, R>, batches: &[(Ids, Ids)]) -> Result<f64> {
            let (mut sum, mut count) = (0.0, 0);
            for (x, y) in batches {
                let mut out = b.forward(&Run::new(Input::Ids(x)))?.output;
                let classes = out.shape[2];
                // The training loss's own computation; its gradient (scaled by 0) is not read.
                sum += cross_entropy_fused(&mut out.data, classes, &y.data, IGNORE, 0.0);
                count += y.data.iter().filter(|&&t| t != IGNORE).count();
            }
            Ok(sum / count.max(1) as f64)
        }
        on_backend!(self, weights, |b| go(b, batches))
    }

    /// The most likely id at every position of `inputs` (time-major ids): the arg-max of the
    /// head's logits, shaped like `inputs` (the first of equal maxima).
    pub fn predict(&self, weights: &Weights, inputs: &Ids) -> Result<Ids> {
        fn go<R: Recurrent>(b: &BoundModel<'_, R>, x: &Ids) -> Result<Ids> {
            let out = b.forward(&Run::new(Input::Ids(x)))?.output;
            let classes = out.shape[2];
            let data = out
                .data
                .chunks(classes)
                .map(|row| {
                    let mut best = 0;
                    for (i, &v) in row.iter().enumerate() {
                        if v > row[best] {
                            best = i;
                        }
                    }
                    best as i64
                })
                .collect();
            Ids::new(x.shape.clone(), data)
        }
        on_backend!(self, weights, |b| go(b, inputs))
    }

    /// `n` ids sampled after `prompt` (at least one id), each drawn from the softmax of the
    /// logits divided by `temperature` (> 0).
    pub fn sample(
        &self,
        weights: &Weights,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<i64>> {
        if prompt.is_empty() {
            return Err(Error::Argument(
                "sampling needs a prompt of at least one character".into(),
            ));
        }
        if n > MAX {
            return Err(Error::Argument(format!(
                "at most {MAX} characters are sampled at once, {n} were asked for"
            )));
        }
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::Argument(format!(
                "the temperature must be positive and finite, found {temperature}"
            )));
        }
        fn go<R: Recurrent>(
            b: &BoundModel<'_, R>,
            prompt: &[i64],
            n: usize,
            temperature: f64,
            seed: u64,
        ) -> Result<Vec<i64>> {
            let mut rng = Rng::new(seed);
            let x = Ids::new(vec![prompt.len(), 1], prompt.to_vec())?;
            let mut out = b.forward(&Run::new(Input::Ids(&x)))?;
            let mut sampled = Vec::new();
            for _ in 0..n {
                let classes = out.output.shape[2];
                let last = &out.output.data[out.output.data.len() - classes..];
                let m = last
                    .iter()
                    .map(|&v| v as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = last
                    .iter()
                    .map(|&v| ((v as f64 - m) / temperature).exp())
                    .collect();
                let mut u = rng.uniform() * p.iter().sum::<f64>();
                let mut next = classes - 1;
                for (i, &pi) in p.iter().enumerate() {
                    if u < pi {
                        next = i;
                        break;
                    }
                    u -= pi;
                }
                sampled.push(next as i64);
                let x = Ids::new(vec![1, 1], vec![next as i64])?;
                let states = std::mem::take(&mut out.final_states);
                out = b.forward(&Run {
                    initial_states: states.iter().map(Some).collect(),
                    ..Run::new(Input::Ids(&x))
                })?;
            }
            Ok(sampled)
        }
        on_backend!(self, weights, |b| go(b, prompt, n, temperature, seed))
    }
}

/// An encoder-decoder on a backend.
pub struct Seq2SeqRunner<'m> {
    model: &'m Seq2Seq,
    jits: Option<(Arc<Jit>, Arc<Jit>)>,
    threads: usize,
}

/// An encoder-decoder bound to its weights on either backend ([`Seq2SeqRunner::bound`]).
pub type BoundRunner<'m> =
    Bound<BoundSeq2Seq<'m, rnn_ir::model::Interpreted<'m>>, BoundSeq2Seq<'m, crate::jit::JitModel>>;

impl BoundRunner<'_> {
    /// [`BoundSeq2Seq::greedy`].
    pub fn greedy(&self, src: &Ids, lengths: Option<&[i64]>, decode: &Decode) -> Result<Ids> {
        match self {
            Bound::Interp(b) => b.greedy(src, lengths, decode),
            Bound::Jit(b) => b.greedy(src, lengths, decode),
        }
    }
}

impl<'m> Seq2SeqRunner<'m> {
    /// Compiles the two stacks for `backend` (once).
    pub fn new(model: &'m Seq2Seq, backend: Backend) -> Result<Seq2SeqRunner<'m>> {
        if !model.encoder.spec.batch_first {
            return Err(Error::Argument(
                "the encoder-decoder runner feeds (batch, time) batches: declare both parts `batch_first`".into(),
            ));
        }
        let jits = match backend {
            Backend::Interp => None,
            Backend::Jit => Some((
                Arc::new(Jit::compile(&model.encoder.stack)?),
                Arc::new(Jit::compile(&model.decoder.stack)?),
            )),
        };
        Ok(Seq2SeqRunner {
            model,
            jits,
            threads: 1,
        })
    }

    /// The same runner with `threads` threads for the matrix products (the interpreter's)
    /// or the batch (the JIT's).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Binds `weights` once, for many decodings.
    pub fn bound(&self, weights: &Weights) -> Result<BoundRunner<'m>> {
        match &self.jits {
            None => Ok(Bound::Interp(self.model.bind_interp(
                weights,
                Exec {
                    threads: self.threads,
                },
            )?)),
            Some((enc, dec)) => {
                let encoder = &self.model.encoder.stack;
                let threads = self.threads;
                Ok(Bound::Jit(self.model.bind(weights, |p: &Program, w| {
                    let j = if std::ptr::eq(p, encoder) { enc } else { dec };
                    j.bind(w)?.with_threads(threads)
                })?))
            }
        }
    }

    /// [`Seq2SeqRunner::bound`], for `on_backend!`.
    fn bind_any(&self, weights: &Weights) -> Result<BoundRunner<'m>> {
        self.bound(weights)
    }

    /// The teacher-forced loss of `batch` and its gradients.
    pub fn loss(&self, weights: &Weights, batch: &SeqBatch) -> Result<Loss> {
        let (src, lengths) = (&batch.src, Some(batch.lengths.as_slice()));
        on_backend!(self, weights, |b| b.loss(
            src,
            lengths,
            &batch.tgt_in,
            &batch.tgt_out,
            IGNORE
        ))
    }

    /// Greedy decoding of `batch`'s sources for as many steps as its targets.
    pub fn greedy(&self, weights: &Weights, batch: &SeqBatch) -> Result<Ids> {
        let decode = Decode {
            steps: batch.tgt_out.shape[1],
            sos: SOS,
            eos: Some(EOS),
        };
        self.bound(weights)?
            .greedy(&batch.src, Some(&batch.lengths), &decode)
    }
}

/// One optimisation step from `loss`'s gradients: clipped to the global L2 norm `clip` when
/// given, then applied by `opt`. Returns the gradients' norm before clipping.
pub fn train_step(
    weights: &mut Weights,
    opt: &mut Optimizer,
    loss: Loss,
    clip: Option<f32>,
) -> Result<f32> {
    let mut grads = loss.grads.params;
    let norm = clip_grad_norm(&mut grads, clip.unwrap_or(f32::MAX), Norm::L2)?;
    opt.step(weights, &grads)?;
    // The gradients' buffers serve the next step's (on this thread).
    rnn_ir::pool::recycle(grads.into_values().map(|t| t.data));
    Ok(norm)
}

/// The chapter's bottleneck, as one run: an LSTM encoder-decoder (embeddings of 32, `hidden`
/// features, Luong's general attention over the encoder's outputs when `attention`) trained
/// on the reversal of strings of exactly `len` of 10 symbols, `steps` steps of batch 32
/// (Adam 3e-3, clipping at 1) on the JIT.
#[derive(Clone, Copy, Debug)]
pub struct Reversal {
    /// The strings' length.
    pub len: usize,
    /// With attention.
    pub attention: bool,
    /// Training steps.
    pub steps: u64,
    /// The stacks' hidden size.
    pub hidden: usize,
    /// The initial weights' seed.
    pub init_seed: u64,
    /// The training batches' seed.
    pub data_seed: u64,
    /// The held-out batches' seed.
    pub held_seed: u64,
}

impl Reversal {
    /// Trains the model, calling `step` after each training step, and returns its greedy
    /// token accuracy on 256 held-out strings.
    pub fn accuracy(&self, mut step: impl FnMut()) -> Result<f64> {
        use rnn_ir::optim::{Adam, Rule};
        use rnn_ir::spec::{Attention, Score};
        let task = SeqTask {
            kind: TaskKind::Reverse,
            symbols: 10,
            min_len: self.len,
            max_len: self.len,
        };
        let v = task.vocab();
        let mut enc = rnn_ir::ModelSpec::new(rnn_ir::CellKind::Lstm, 32, self.hidden);
        enc.vocab = Some(v);
        enc.batch_first = true;
        let mut dec = enc.clone();
        dec.head = Some(v);
        dec.attention = self
            .attention
            .then_some(Attention::new(Score::General, self.hidden));
        let model = Seq2Seq::new(&enc, &dec)?;
        let mut w = model.init(self.init_seed)?;
        let runner = Seq2SeqRunner::new(&model, Backend::Jit)?;
        let mut opt = Optimizer::new(Rule::Adam(Adam {
            lr: 3e-3,
            ..Adam::default()
        }))?;
        for s in 0..self.steps {
            let loss = runner.loss(&w, &task.batch(self.data_seed, s, 32)?)?;
            train_step(&mut w, &mut opt, loss, Some(1.0))?;
            step();
        }
        let (mut right, mut total) = (0, 0);
        for e in 0..4 {
            let b = task.batch(self.held_seed, e, 64)?;
            let (r, t) = token_accuracy(&runner.greedy(&w, &b)?, &b);
            right += r;
            total += t;
        }
        Ok(right as f64 / total.max(1) as f64)
    }
}

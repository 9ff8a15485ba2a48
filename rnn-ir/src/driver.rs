//! The sequence driver: layers, directions, per-sequence lengths, initial states, batch-first
//! layout and the backward pass in reverse order of all that, written once, over a
//! [`SequenceExecutor`] that each backend supplies (the interpreter, the emitted Rust and the
//! JIT).
//!
//! What the driver does, for a request:
//! - checks every argument ([`Request`]);
//! - converts batch-first input to time-major, zeroes rows past each length;
//! - for each layer, each direction: the reverse direction reads each sequence reversed within
//!   its own length (and its outputs are reversed back), so every executor only ever runs time
//!   forwards from step 0 with per-row lengths; the layer's output joins both directions'
//!   outputs (forward first) and is the next layer's input;
//! - final states are each direction's carried values after its last step, in PyTorch's
//!   `(layers·directions, B, size)` order;
//! - backward: last layer first; each direction gets its columns of the output gradient
//!   (reversed likewise), its tape, the gradients flowing into its final states, and returns
//!   its parameter, input and initial-state gradients; both directions' input gradients add up
//!   to the layer input's gradient, which is the previous layer's output gradient.
//!
//! What an executor does for one (layer, direction) over `T` steps of `B` rows (time-major,
//! rows past a sequence's length hold zeros): run the cell's forward plan with the carried
//! values frozen on rows past their length and per-step outputs zeroed there, return the
//! outputs, the final carried values and (for training) a tape; run the backward plan in
//! reverse time from the final-state gradients, rows past their length passing the carried
//! gradient through untouched and seeing zero, and return the gradients. Every executor does
//! the per-step part of that with the same three functions: [`any_finished`],
//! [`hold_finished`] and [`restore_finished`].
//!
//! # Why masking is the executor's, not IR
//! Rows past their length could be expressed in the step graph as a select between the new and
//! the carried value. It is not, because of what the code generators need: an unpacked batch (the
//! common case, and every streaming step) has no such rows, and a select in the IR would cost a
//! pass over every carried value at every step for nothing; with masking outside the graph, an
//! executor checks once per step whether any row is finished and only then copies the finished
//! rows' carried values (the interpreter's `Walk`). It also keeps the step graphs, their
//! gradients and their snapshots free of bookkeeping that is not the cell's math.

use crate::error::{Error, Result};
use crate::program::Program;
use crate::spec::ModelSpec;
use crate::tensor::{Real, Tensor};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Whether any row has finished its sequence at step `t` (`t ≥ lengths[b]`): only then does a
/// step need [`hold_finished`] and [`restore_finished`]. The one rule of packed sequences every
/// executor follows (the interpreter, the emitted code and the JIT call these three).
pub fn any_finished(t: usize, lengths: &[usize]) -> bool {
    lengths.iter().any(|&len| t >= len)
}

/// Before step `t` (when [`any_finished`]): keeps a copy of the carried slot `current` (`B`
/// rows of `n`) in `hold`, and, for a backward step (`zero` given), sets the finished rows of
/// `current` to `zero`: a finished row contributes nothing to the step's gradients.
pub fn hold_finished<T: Copy>(
    t: usize,
    lengths: &[usize],
    n: usize,
    current: &mut [T],
    hold: &mut [T],
    zero: Option<T>,
) {
    hold.copy_from_slice(current);
    if let Some(zero) = zero {
        for (b, _) in lengths.iter().enumerate().filter(|&(_, &len)| t >= len) {
            current[b * n..(b + 1) * n].fill(zero);
        }
    }
}

/// After step `t` (when [`any_finished`]): puts the held values back on the finished rows of
/// the carried slot's next value, so that a finished sequence's state stays as it was after
/// its last step (forward) and its state's gradient passes through the step (backward).
pub fn restore_finished<T: Copy>(
    t: usize,
    lengths: &[usize],
    n: usize,
    next: &mut [T],
    hold: &[T],
) {
    for (b, _) in lengths.iter().enumerate().filter(|&(_, &len)| t >= len) {
        next[b * n..(b + 1) * n].copy_from_slice(&hold[b * n..(b + 1) * n]);
    }
}

/// What the driver needs to know of a model: sizes, layout and parameter names, with no graphs.
///
/// A [`Program`] gives it ([`Program::layout`]); code emitted for one model writes it as a
/// constant, so the emitted model and the interpreter run through the same driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout<'a> {
    /// Features of the model's input.
    pub input_size: usize,
    /// Whether inputs and outputs are `(batch, time, features)`.
    pub batch_first: bool,
    /// Directions per layer (1 or 2).
    pub directions: usize,
    /// Features of each direction's output.
    pub output_size: usize,
    /// The recurrent states' names and sizes (`h`, and `c` for an LSTM), the same in every layer.
    pub states: Cow<'a, [(Cow<'a, str>, usize)]>,
    /// Per layer: its input features and its parameters' base names (without the `_l{k}`
    /// suffix) and dimensions, in the cell's parameter order.
    pub layers: Cow<'a, [LayerLayout<'a>]>,
}

/// A parameter's base name and dimensions.
pub type ParamLayout<'a> = (Cow<'a, str>, Cow<'a, [usize]>);

/// One layer of a [`Layout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerLayout<'a> {
    /// Features of the layer's input.
    pub input_size: usize,
    /// The parameters' base names and dimensions, in the cell's parameter order.
    pub params: Cow<'a, [ParamLayout<'a>]>,
}

impl Layout<'_> {
    /// The same layout owning its tables.
    pub fn to_owned_layout(&self) -> Layout<'static> {
        let owned = |s: &Cow<'_, str>| Cow::Owned(s.to_string());
        Layout {
            input_size: self.input_size,
            batch_first: self.batch_first,
            directions: self.directions,
            output_size: self.output_size,
            states: self.states.iter().map(|(n, s)| (owned(n), *s)).collect(),
            layers: self
                .layers
                .iter()
                .map(|l| LayerLayout {
                    input_size: l.input_size,
                    params: l
                        .params
                        .iter()
                        .map(|(n, d)| (owned(n), Cow::Owned(d.to_vec())))
                        .collect(),
                })
                .collect(),
        }
    }
}

impl Program {
    /// The model as the driver sees it.
    pub fn layout(&self) -> Layout<'_> {
        let states = self
            .states()
            .iter()
            .map(|(n, s)| (Cow::Borrowed(n.as_str()), *s))
            .collect();
        let layers = self
            .layers
            .iter()
            .map(|cell| LayerLayout {
                input_size: cell.input_size,
                params: cell
                    .forward
                    .graph
                    .params
                    .iter()
                    .map(|p| (Cow::Borrowed(p.name.as_str()), Cow::Owned(p.dims())))
                    .collect(),
            })
            .collect();
        Layout {
            input_size: self.spec.input_size,
            batch_first: self.spec.batch_first,
            directions: self.spec.directions(),
            output_size: self.output_size(),
            states: Cow::Owned(states),
            layers: Cow::Owned(layers),
        }
    }
}

/// The shape of one run of an executor: `steps` time steps of `batch` rows, row `b` taking
/// part in steps `t < lengths[b]`.
#[derive(Clone, Copy, Debug)]
pub struct Seq<'a> {
    /// Time steps `T`.
    pub steps: usize,
    /// Rows `B`.
    pub batch: usize,
    /// Per-row lengths, each in `1 ..= T`.
    pub lengths: &'a [usize],
}

/// What an executor's forward pass returns.
pub struct Forward<T, Tape> {
    /// The per-step output, `T·B × output`, zero past each length.
    pub output: Vec<T>,
    /// Each carried value after the row's last step, `B × size`.
    pub finals: Vec<Vec<T>>,
    /// What the backward pass reads, when asked for.
    pub tape: Option<Tape>,
}

/// What an executor's backward pass returns.
pub struct Backward<T> {
    /// The gradient of the layer input, `T·B × input`, zero past each length.
    pub input_grad: Vec<T>,
    /// The gradient of each initial carried value, `B × size`.
    pub initial_grads: Vec<Vec<T>>,
    /// Each parameter's gradient, in the cell's parameter order.
    pub param_grads: Vec<Vec<T>>,
}

/// A backend's runner of one cell over one sequence batch (see the module doc).
pub trait SequenceExecutor<T> {
    /// What the forward pass keeps for the backward pass.
    type Tape;

    /// Runs the forward step of `layer` with the parameters of `dir` over `x` (`T·B × input`),
    /// from the carried values `initial`; keeps a tape when `training`.
    fn forward(
        &self,
        layer: usize,
        dir: usize,
        seq: Seq<'_>,
        x: &[T],
        initial: Vec<Vec<T>>,
        training: bool,
    ) -> Result<Forward<T, Self::Tape>>;

    /// Runs the backward step of `layer`/`dir` in reverse time: `x` and `tape` are the forward
    /// pass's, `dy` the output gradient (`T·B × output`), `final_grads` the gradients flowing
    /// into the final carried values.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        layer: usize,
        dir: usize,
        seq: Seq<'_>,
        x: &[T],
        tape: Self::Tape,
        dy: &[T],
        final_grads: Vec<Vec<T>>,
    ) -> Result<Backward<T>>;
}

/// A request to run a model over a batch of sequences.
#[derive(Clone, Debug, Default)]
pub struct Request<'a> {
    /// `(T, B, input)`, or `(B, T, input)` when the model is batch-first.
    pub input: Option<&'a Tensor>,
    /// Per recurrent state (`h`, `c`), its initial value `(layers·directions, B, size)`; zeros
    /// when `None`.
    pub initial_states: Vec<Option<&'a Tensor>>,
    /// Per-sequence lengths (packed-sequence semantics), `1 ..= T` each.
    pub lengths: Option<&'a [i64]>,
    /// With it, gradients of `sum(output * grad_output)` are computed; same shape as the output.
    pub grad_output: Option<&'a Tensor>,
    /// Gradients flowing into the final states (`h_n`, `c_n`), added to the loss's gradient.
    pub grad_final_states: Vec<Option<&'a Tensor>>,
}

/// Gradients of a run.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// Of the input, shaped like it.
    pub input: Tensor,
    /// Of each initial state, shaped like it.
    pub initial_states: Vec<Tensor>,
    /// Of every parameter, by PyTorch name.
    pub params: BTreeMap<String, Tensor>,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct Response {
    /// `(T, B, directions·output_size)` (or batch-first), zero past each sequence's length.
    pub output: Tensor,
    /// Each state at each sequence's last step: `(layers·directions, B, size)`.
    pub final_states: Vec<Tensor>,
    /// Present when the request had `grad_output`.
    pub grads: Option<Gradients>,
}

/// Truncated back-propagation through time: the input `x` of `spec`'s model (`(T, B, I)`, or
/// `(B, T, I)` when batch-first) cut along time into chunks of `len` steps (the last may be
/// shorter). Run each chunk from the previous chunk's [`Response::final_states`] as its initial
/// states: the forward pass is the whole sequence's. Truncation is in the backward pass: each
/// chunk's gradients end at its first step, and the gradients of its initial states
/// ([`Gradients::initial_states`]) are what a truncated run drops. Every sequence must run the
/// whole length (without `lengths`). A bidirectional model cannot be cut this way (its reverse
/// direction reads the sequence from its end): a typed error.
pub fn time_chunks(x: &Tensor, len: usize, spec: &ModelSpec) -> Result<Vec<Tensor>> {
    if len == 0 {
        return Err(Error::Argument(
            "a truncated-BPTT chunk of 0 steps: at least 1 is needed".into(),
        ));
    }
    if spec.bidirectional {
        return Err(Error::Argument(
            "a bidirectional model cannot run in truncated-BPTT chunks: its reverse direction \
             needs the whole sequence"
                .into(),
        ));
    }
    let batch_first = spec.batch_first;
    let [a, b, i] = x.shape[..] else {
        return Err(Error::TensorShape {
            name: "input".into(),
            expected: vec![0, 0, 0],
            found: x.shape.clone(),
        });
    };
    let (steps, rows) = if batch_first { (b, a) } else { (a, b) };
    let count = steps.checked_mul(rows).and_then(|n| n.checked_mul(i));
    if count != Some(x.data.len()) {
        return Err(Error::Argument(format!(
            "`input` has shape {:?} but holds {} elements",
            x.shape,
            x.data.len()
        )));
    }
    let mut chunks = Vec::new();
    let mut t0 = 0;
    while t0 < steps {
        let n = len.min(steps - t0);
        let mut data = Vec::with_capacity(n * rows * i);
        if batch_first {
            for r in 0..rows {
                let start = (r * steps + t0) * i;
                data.extend_from_slice(&x.data[start..start + n * i]);
            }
        } else {
            data.extend_from_slice(&x.data[t0 * rows * i..(t0 + n) * rows * i]);
        }
        let shape = if batch_first {
            vec![rows, n, i]
        } else {
            vec![n, rows, i]
        };
        chunks.push(Tensor { shape, data });
        t0 += n;
    }
    Ok(chunks)
}

impl Gradients {
    /// The per-step gradient-norm record: for each time step `t`, the Euclidean norm of the
    /// loss's gradient with respect to the input `x_t` over the whole batch (in `f64`). The
    /// input is `(T, B, I)`, or `(B, T, I)` when `batch_first` (empty for an input of another
    /// rank). Every backend's gradients give it: the chapter's vanishing and exploding
    /// gradients, measured on any model.
    pub fn input_norms(&self, batch_first: bool) -> Vec<f64> {
        let shape = &self.input.shape;
        let (steps, rows, width) = match shape[..] {
            [a, b, i] if batch_first => (b, a, i),
            [t, b, i] => (t, b, i),
            _ => return Vec::new(),
        };
        let mut sums = vec![0.0f64; steps];
        for r in 0..rows {
            for (t, sum) in sums.iter_mut().enumerate() {
                let row = if batch_first {
                    r * steps + t
                } else {
                    t * rows + r
                };
                *sum += self.input.data[row * width..(row + 1) * width]
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum::<f64>();
            }
        }
        sums.into_iter().map(f64::sqrt).collect()
    }
}

impl Response {
    /// Every tensor under the names `rnnc run` writes and the PyTorch reference cases store:
    /// `output`, `<state>_n` for each of `states` (the model's, `Program::states`), and with
    /// gradients `grad.input`, `grad.<state>0` for each state whose `given` entry is not `false`
    /// (an entry past the end counts as given), and `grad.<parameter>`.
    pub fn into_named(
        self,
        states: &[(String, usize)],
        given: &[bool],
    ) -> BTreeMap<String, Tensor> {
        let mut named = BTreeMap::new();
        named.insert("output".to_string(), self.output);
        for (k, s) in self.final_states.into_iter().enumerate() {
            named.insert(format!("{}_n", states[k].0), s);
        }
        if let Some(grads) = self.grads {
            named.insert("grad.input".into(), grads.input);
            for (k, g) in grads.initial_states.into_iter().enumerate() {
                if given.get(k).copied().unwrap_or(true) {
                    named.insert(format!("grad.{}0", states[k].0), g);
                }
            }
            for (name, g) in grads.params {
                named.insert(format!("grad.{name}"), g);
            }
        }
        named
    }
}

/// Checks a request against the model and returns `(T, B, lengths)`.
fn check_request(p: &Layout, req: &Request) -> Result<(usize, usize, Vec<usize>)> {
    let spec = p;
    let x = req
        .input
        .ok_or_else(|| Error::Argument("no input given".into()))?;
    let layout = if spec.batch_first {
        "(batch, time, features)"
    } else {
        "(time, batch, features)"
    };
    check_elements("input", x)?;
    if x.shape.len() != 3 || x.shape[2] != spec.input_size {
        return Err(Error::Argument(format!(
            "`input` has shape {:?}, expected 3 dimensions {layout} with {} features",
            x.shape, spec.input_size
        )));
    }
    let (t, b) = if spec.batch_first {
        (x.shape[1], x.shape[0])
    } else {
        (x.shape[0], x.shape[1])
    };
    if t == 0 || b == 0 {
        return Err(Error::Argument(format!(
            "`input` has shape {:?}: time and batch must be at least 1",
            x.shape
        )));
    }
    if let Some((index, found)) = x.first_non_finite() {
        return Err(Error::NonFinite {
            name: "input".into(),
            index,
            found,
        });
    }
    let ld = p.layers.len() * p.directions;
    let states = &p.states;
    for list in [&req.initial_states, &req.grad_final_states] {
        if list.iter().skip(states.len()).any(Option::is_some) {
            let names: Vec<&str> = states.iter().map(|s| s.0.as_ref()).collect();
            return Err(Error::Argument(format!(
                "{} states given, but the cell has {} ({})",
                list.len(),
                states.len(),
                names.join(", ")
            )));
        }
    }
    for (k, s) in req.initial_states.iter().enumerate() {
        if let Some(s) = s {
            check_tensor(format!("{}0", states[k].0), s, vec![ld, b, states[k].1])?;
        }
    }
    let lengths = match req.lengths {
        None => vec![t; b],
        Some(l) => {
            if l.len() != b {
                return Err(Error::TensorShape {
                    name: "lengths".into(),
                    expected: vec![b],
                    found: vec![l.len()],
                });
            }
            l.iter()
                .enumerate()
                .map(|(i, &n)| {
                    if n >= 1 && n as u64 <= t as u64 {
                        Ok(n as usize)
                    } else {
                        Err(Error::Length {
                            index: i,
                            found: n,
                            max: t,
                        })
                    }
                })
                .collect::<Result<Vec<_>>>()?
        }
    };
    if let Some(gy) = req.grad_output {
        let width = p.directions * p.output_size;
        let want = if spec.batch_first {
            vec![b, t, width]
        } else {
            vec![t, b, width]
        };
        check_tensor("grad_output".into(), gy, want)?;
    }
    for (k, s) in req.grad_final_states.iter().enumerate() {
        if let Some(s) = s {
            check_tensor(
                format!("grad_{}_n", states[k].0),
                s,
                vec![ld, b, states[k].1],
            )?;
        }
    }
    Ok((t, b, lengths))
}

/// Checks one streaming step's input `x`: `batch` rows of `input` features, every one finite.
/// The interpreter's `Stream::step` and the JIT's `step` report bad input with these errors.
pub fn check_step_input<T: Real>(x: &[T], batch: usize, input: usize) -> Result<()> {
    if Some(x.len()) != batch.checked_mul(input) {
        return Err(Error::TensorShape {
            name: "x".into(),
            expected: vec![batch, input],
            found: vec![x.len()],
        });
    }
    match x.iter().position(|v| !v.to_f64().is_finite()) {
        Some(index) => Err(Error::NonFinite {
            name: "x".into(),
            index,
            found: x[index].to_f32(),
        }),
        None => Ok(()),
    }
}

/// Checks that argument `name` has shape `want` and holds only finite values.
fn check_tensor(name: String, t: &Tensor, want: Vec<usize>) -> Result<()> {
    check_elements(&name, t)?;
    if t.shape != want {
        return Err(Error::TensorShape {
            name,
            expected: want,
            found: t.shape.clone(),
        });
    }
    match t.first_non_finite() {
        Some((index, found)) => Err(Error::NonFinite { name, index, found }),
        None => Ok(()),
    }
}

/// Checks that a tensor holds as many elements as its shape says (its fields are public, so
/// nothing else guarantees it).
fn check_elements(name: &str, t: &Tensor) -> Result<()> {
    let want = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if want != Some(t.data.len()) {
        return Err(Error::Argument(format!(
            "`{name}` has shape {:?} but holds {} elements",
            t.shape,
            t.data.len()
        )));
    }
    Ok(())
}

/// `(T, B, n)` time-major from `(B, T, n)` (or back: the swap is its own inverse).
fn swap_tb<T: Copy>(x: &[T], d0: usize, d1: usize, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for j in 0..d1 {
        for i in 0..d0 {
            out.extend_from_slice(&x[(i * d1 + j) * n..(i * d1 + j + 1) * n]);
        }
    }
    out
}

/// Each sequence reversed within its own length (rows past it are zero): the reverse direction's
/// view of time. Applying it twice gives back the rows within each length.
fn reverse_within<T: Real>(x: &[T], batch: usize, n: usize, lengths: &[usize]) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    for (b, &len) in lengths.iter().enumerate().take(batch) {
        for t in 0..len {
            let (dst, src) = (t * batch + b, (len - 1 - t) * batch + b);
            out[dst * n..(dst + 1) * n].copy_from_slice(&x[src * n..(src + 1) * n]);
        }
    }
    out
}

/// Columns `start .. start + width` of a `rows × n` buffer.
fn columns<T: Copy>(x: &[T], n: usize, start: usize, width: usize) -> Vec<T> {
    x.chunks(n)
        .flat_map(|row| row[start..start + width].iter().copied())
        .collect()
}

fn to_real<T: Real>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

fn to_f32<T: Real>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// A [`Response`] together with the output and final states in the precision computed in.
#[derive(Clone, Debug)]
pub struct RawResponse<T> {
    /// The response, in `f32`.
    pub response: Response,
    /// The output's elements, laid out as `response.output`.
    pub output: Vec<T>,
    /// The final states' elements, laid out as `response.final_states`.
    pub final_states: Vec<Vec<T>>,
}

/// What a forward pass kept for [`backward`]: every (layer, direction)'s tape and input, and
/// the shape of the run.
pub struct Tape<T, E> {
    /// The layout of the model that made it: `backward` refuses a tape of another.
    layout: Layout<'static>,
    steps: usize,
    batch: usize,
    lengths: Vec<usize>,
    packed: bool,
    input_shape: Vec<usize>,
    /// Per (layer, direction): the executor's tape.
    tapes: Vec<E>,
    /// Per (layer, direction): its input as its forward pass read it (reversed for the reverse
    /// direction).
    inputs: Vec<Vec<T>>,
}

impl<T, E> std::fmt::Debug for Tape<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tape")
            .field("steps", &self.steps)
            .field("batch", &self.batch)
            .field("lengths", &self.lengths)
            .field("input_shape", &self.input_shape)
            .finish_non_exhaustive()
    }
}

/// Runs `req` on `program` through `executor` (see the module doc); every argument is checked
/// first. With `req.grad_output`, the backward pass runs too.
pub fn run<T: Real, E: SequenceExecutor<T>>(
    program: &Program,
    executor: &E,
    req: &Request,
) -> Result<RawResponse<T>> {
    run_layout(&program.layout(), executor, req)
}

/// [`run`] for a model given by its [`Layout`].
pub fn run_layout<T: Real, E: SequenceExecutor<T>>(
    layout: &Layout,
    executor: &E,
    req: &Request,
) -> Result<RawResponse<T>> {
    let Some(gy) = req.grad_output else {
        return Ok(forward(layout, executor, req, false)?.0);
    };
    // Every argument, the gradients' included, is checked once, before any work.
    let checked = check_request(layout, req)?;
    let (mut raw, tape) = forward_checked(layout, executor, req, true, checked, true)?;
    let tape = tape.expect("a tape was asked for");
    let grads = backward_checked(layout, executor, tape, gy, &req.grad_final_states)?;
    raw.response.grads = Some(grads);
    Ok(raw)
}

/// The forward pass of `req` (its `grad_output` and `grad_final_states` are not read): outputs
/// and final states, and with `keep` the [`Tape`] that [`backward`] reads.
#[allow(clippy::type_complexity)]
pub fn forward<T: Real, E: SequenceExecutor<T>>(
    layout: &Layout,
    executor: &E,
    req: &Request,
    keep: bool,
) -> Result<(RawResponse<T>, Option<Tape<T, E::Tape>>)> {
    let forward_only = Request {
        grad_output: None,
        grad_final_states: Vec::new(),
        ..req.clone()
    };
    let checked = check_request(layout, &forward_only)?;
    forward_checked(layout, executor, req, keep, checked, true)
}

/// [`forward`] for the `f32` [`Response`] alone: the output is not kept a second time in the
/// precision computed in (for `f32`, the kernels' output becomes the response's, uncopied).
#[allow(clippy::type_complexity)]
pub fn forward_response<T: Real, E: SequenceExecutor<T>>(
    layout: &Layout,
    executor: &E,
    req: &Request,
    keep: bool,
) -> Result<(Response, Option<Tape<T, E::Tape>>)> {
    let forward_only = Request {
        grad_output: None,
        grad_final_states: Vec::new(),
        ..req.clone()
    };
    let checked = check_request(layout, &forward_only)?;
    let (raw, tape) = forward_checked(layout, executor, req, keep, checked, false)?;
    Ok((raw.response, tape))
}

/// [`run_layout`] for the `f32` [`Response`] alone (see [`forward_response`]).
pub fn run_response<T: Real, E: SequenceExecutor<T>>(
    layout: &Layout,
    executor: &E,
    req: &Request,
) -> Result<Response> {
    let Some(gy) = req.grad_output else {
        return Ok(forward_response(layout, executor, req, false)?.0);
    };
    let checked = check_request(layout, req)?;
    let (raw, tape) = forward_checked(layout, executor, req, true, checked, false)?;
    let tape = tape.expect("a tape was asked for");
    let grads = backward_checked(layout, executor, tape, gy, &req.grad_final_states)?;
    let mut response = raw.response;
    response.grads = Some(grads);
    Ok(response)
}

/// [`forward`] of a request [`check_request`] accepted as `(T, B, lengths)`.
#[allow(clippy::type_complexity)]
fn forward_checked<T: Real, E: SequenceExecutor<T>>(
    layout: &Layout,
    executor: &E,
    req: &Request,
    keep: bool,
    (steps, batch, lengths): (usize, usize, Vec<usize>),
    raw: bool,
) -> Result<(RawResponse<T>, Option<Tape<T, E::Tape>>)> {
    let seq = Seq {
        steps,
        batch,
        lengths: &lengths,
    };
    let dirs = layout.directions;
    let out_size = layout.output_size;
    let states = &layout.states;
    let x = req.input.expect("checked");
    // The first layer reads the caller's input where it can (f32, time-major, unpacked).
    let mut layer_in: Cow<'_, [T]> = T::slice_from_f32(&x.data);
    if layout.batch_first {
        layer_in = Cow::Owned(swap_tb(&layer_in, batch, steps, layout.input_size));
    }
    let packed = req.lengths.is_some();
    if packed {
        zero_past(
            packed,
            &lengths,
            steps,
            batch,
            layer_in.to_mut(),
            layout.input_size,
        );
    }

    // Forward, layer by layer; both directions of a layer read the same input.
    let mut finals: Vec<Vec<Vec<T>>> = vec![Vec::new(); states.len()];
    let mut tapes: Vec<E::Tape> = Vec::new();
    // Each (layer, direction)'s input as its forward pass read it (reversed for the
    // reverse direction): the backward pass reads it again.
    let mut inputs: Vec<Vec<T>> = Vec::new();
    for (layer, cell) in layout.layers.iter().enumerate() {
        let in_size = cell.input_size;
        let mut outs = Vec::new();
        for dir in 0..dirs {
            let xs: Cow<'_, [T]> = if dir == 0 {
                Cow::Borrowed(&layer_in)
            } else {
                Cow::Owned(reverse_within(&layer_in, batch, in_size, &lengths))
            };
            let carried = initial(
                states,
                req.initial_states.as_slice(),
                layer * dirs + dir,
                batch,
            );
            let r = executor.forward(layer, dir, seq, &xs, carried, keep)?;
            let mut y = r.output;
            if dir == 1 {
                y = reverse_within(&y, batch, out_size, &lengths);
            }
            outs.push(y);
            for (k, c) in r.finals.into_iter().enumerate() {
                finals[k].push(c);
            }
            if keep {
                tapes.push(
                    r.tape
                        .ok_or_else(|| Error::Argument("the forward pass kept no tape".into()))?,
                );
                inputs.push(xs.into_owned());
            }
        }
        layer_in = Cow::Owned(if dirs == 1 {
            outs.pop().unwrap()
        } else {
            let mut joined = Vec::with_capacity(outs[0].len() * 2);
            for r in 0..steps * batch {
                joined.extend_from_slice(&outs[0][r * out_size..(r + 1) * out_size]);
                joined.extend_from_slice(&outs[1][r * out_size..(r + 1) * out_size]);
            }
            joined
        });
    }
    let width = dirs * out_size;
    let mut output = layer_in.into_owned();
    if layout.batch_first {
        output = swap_tb(&output, steps, batch, width);
    }
    let out_shape = if layout.batch_first {
        vec![batch, steps, width]
    } else {
        vec![steps, batch, width]
    };
    let final_states = per_state_tensors(&finals, states, batch);
    let raw_finals: Vec<Vec<T>> = finals.iter().map(|f| f.concat()).collect();
    let response = Response {
        output: Tensor {
            shape: out_shape,
            data: if raw {
                to_f32(&output)
            } else {
                T::vec_into_f32(std::mem::take(&mut output))
            },
        },
        final_states,
        grads: None,
    };
    let tape = keep.then(|| Tape {
        layout: layout.to_owned_layout(),
        steps,
        batch,
        lengths,
        packed,
        input_shape: x.shape.clone(),
        tapes,
        inputs,
    });
    Ok((
        RawResponse {
            response,
            output,
            final_states: raw_finals,
        },
        tape,
    ))
}

/// The backward pass of a [`forward`] that kept its `tape`: the gradients of
/// `sum(output · grad_output)` plus `sum(h_n · grad_h_n)` for each given final-state gradient,
/// with respect to the input, the initial states and every parameter.
pub fn backward<T: Real, E: SequenceExecutor<T>>(
    layout: &Layout,
    executor: &E,
    tape: Tape<T, E::Tape>,
    grad_output: &Tensor,
    grad_final_states: &[Option<&Tensor>],
) -> Result<Gradients> {
    if tape.layout != layout.to_owned_layout() {
        return Err(Error::Argument(
            "the tape was made by the forward pass of a model of another layout (sizes, layers, \
             directions or parameters): pass `backward` the tape of this model's own \
             `forward_train`"
                .into(),
        ));
    }
    check_backward(
        layout,
        tape.steps,
        tape.batch,
        grad_output,
        grad_final_states,
    )?;
    backward_checked(layout, executor, tape, grad_output, grad_final_states)
}

/// [`backward`] with gradients already checked against the tape's run.
fn backward_checked<T: Real, E: SequenceExecutor<T>>(
    layout: &Layout,
    executor: &E,
    tape: Tape<T, E::Tape>,
    grad_output: &Tensor,
    grad_final_states: &[Option<&Tensor>],
) -> Result<Gradients> {
    let Tape {
        layout: _,
        steps,
        batch,
        lengths,
        packed,
        input_shape,
        tapes,
        inputs,
    } = tape;

    let seq = Seq {
        steps,
        batch,
        lengths: &lengths,
    };
    let dirs = layout.directions;
    let out_size = layout.output_size;
    let width = dirs * out_size;
    let states = &layout.states;
    let layers = layout.layers.len();

    // Backward, last layer first; each direction's input gradient adds into the layer's.
    let mut d_out: Vec<T> = to_real(&grad_output.data);
    if layout.batch_first {
        d_out = swap_tb(&d_out, batch, steps, width);
    }
    zero_past(packed, &lengths, steps, batch, &mut d_out, width);
    let mut params = BTreeMap::new();
    let mut d_initial: Vec<Vec<Vec<T>>> = vec![vec![Vec::new(); layers * dirs]; states.len()];
    let mut tapes: Vec<Option<E::Tape>> = tapes.into_iter().map(Some).collect();
    for (layer, cell) in layout.layers.iter().enumerate().rev() {
        let in_size = cell.input_size;
        let mut d_in = vec![T::ZERO; steps * batch * in_size];
        for dir in 0..dirs {
            let index = layer * dirs + dir;
            let mut dy = if dirs == 1 {
                d_out.clone()
            } else {
                columns(&d_out, width, dir * out_size, out_size)
            };
            if dir == 1 {
                dy = reverse_within(&dy, batch, out_size, &lengths);
            }
            let tape = tapes[index]
                .take()
                .expect("one tape per (layer, direction)");
            let carried = initial(states, grad_final_states, index, batch);
            let r = executor.backward(layer, dir, seq, &inputs[index], tape, &dy, carried)?;
            let suffix = ModelSpec::param_suffix(layer, dir);
            for ((name, dims), grad) in cell.params.iter().zip(r.param_grads) {
                params.insert(
                    format!("{name}{suffix}"),
                    Tensor {
                        shape: dims.to_vec(),
                        data: to_f32(&grad),
                    },
                );
            }
            let mut dx = r.input_grad;
            if dir == 1 {
                dx = reverse_within(&dx, batch, in_size, &lengths);
            }
            for (a, b) in d_in.iter_mut().zip(&dx) {
                *a += *b;
            }
            for (k, c) in r.initial_grads.into_iter().enumerate() {
                d_initial[k][index] = c;
            }
        }
        d_out = d_in;
    }
    if layout.batch_first {
        d_out = swap_tb(&d_out, steps, batch, layout.input_size);
    }
    let initial_states = per_state_tensors(&d_initial, states, batch);
    Ok(Gradients {
        input: Tensor {
            shape: input_shape,
            data: to_f32(&d_out),
        },
        initial_states,
        params,
    })
}

/// Checks the gradients given to [`backward`] against the run its tape came from.
fn check_backward(
    layout: &Layout,
    steps: usize,
    batch: usize,
    grad_output: &Tensor,
    grad_final_states: &[Option<&Tensor>],
) -> Result<()> {
    let width = layout.directions * layout.output_size;
    let want = if layout.batch_first {
        vec![batch, steps, width]
    } else {
        vec![steps, batch, width]
    };
    check_tensor("grad_output".into(), grad_output, want)?;
    let states = &layout.states;
    if grad_final_states
        .iter()
        .skip(states.len())
        .any(Option::is_some)
    {
        let names: Vec<&str> = states.iter().map(|s| s.0.as_ref()).collect();
        return Err(Error::Argument(format!(
            "{} state gradients given, but the cell has {} states ({})",
            grad_final_states.len(),
            states.len(),
            names.join(", ")
        )));
    }
    let ld = layout.layers.len() * layout.directions;
    for (k, s) in grad_final_states.iter().enumerate() {
        if let Some(s) = s {
            check_tensor(
                format!("grad_{}_n", states[k].0),
                s,
                vec![ld, batch, states[k].1],
            )?;
        }
    }
    Ok(())
}

/// Per state, its `(layers·directions, B, size)` tensor from one `B × size` part per
/// (layer, direction): final states, or their gradients' counterparts for initial states.
fn per_state_tensors<T: Real>(
    parts: &[Vec<Vec<T>>],
    states: &[(Cow<'_, str>, usize)],
    batch: usize,
) -> Vec<Tensor> {
    parts
        .iter()
        .zip(states)
        .map(|(p, (_, n))| Tensor {
            shape: vec![p.len(), batch, *n],
            data: p.iter().flat_map(|v| to_f32(v)).collect(),
        })
        .collect()
}

/// Zeroes the rows of a time-major `T·B × n` buffer past each sequence's length (packed runs).
fn zero_past<T: Real>(
    packed: bool,
    lengths: &[usize],
    steps: usize,
    batch: usize,
    buf: &mut [T],
    n: usize,
) {
    if packed {
        for t in 0..steps {
            for b in (0..batch).filter(|&b| t >= lengths[b]) {
                let r = t * batch + b;
                buf[r * n..(r + 1) * n].fill(T::ZERO);
            }
        }
    }
}

/// The carried values for `(layer, direction)` number `index`: slices of the given
/// `(L·D, B, n)` tensors, zeros where none is given.
fn initial<T: Real>(
    states: &[(Cow<'_, str>, usize)],
    given: &[Option<&Tensor>],
    index: usize,
    batch: usize,
) -> Vec<Vec<T>> {
    states
        .iter()
        .enumerate()
        .map(|(k, (_, n))| match given.get(k).copied().flatten() {
            Some(s) => to_real(&s.data[index * batch * n..(index + 1) * batch * n]),
            None => vec![T::ZERO; batch * n],
        })
        .collect()
}

//! The interpreter: the reference executor of a [`Program`], the oracle every other backend is
//! tested against. It is written to be obviously right: each op is a plain loop over strided
//! views (products go to the `gemm` crate), and it follows the Program's plan literally.
//!
//! - `kernels`: one op into its place.
//! - `executor`: one scheduled step graph over a sequence, buffers from its storage plan.
//! - this module: the bind phase ([`Program::bind`] computes every value derived from
//!   parameters alone, once), the interpreter's [`SequenceExecutor`] (layers, directions,
//!   lengths and the backward pass are the shared [`driver`]'s), the streaming
//!   [`Stream`], and single-graph entry points for tests ([`run_sequence`], [`eval_graph`]).

mod attend;
mod executor;
mod kernels;
pub use kernels::{argmax, argmax_f32, lane_max};

use crate::driver::{
    self, Backward, Forward, Gradients, RawResponse, Request, Response, Seq, SequenceExecutor,
};
use crate::error::{Error, Result};
use crate::graph::dataflow::carried_input;
use crate::graph::{Graph, Op, OutRole, Role, Shape, Value};
use crate::plan::StoragePlan;
use crate::program::{CellProgram, Program};
use crate::schedule::Scheduled;
use crate::spec::ModelSpec;
use crate::tensor::{Real, Tensor};
use crate::weights::Weights;
use executor::{Feeds, Walk, Workspace, bind_values};
use kernels::{View, ViewMut};
use std::collections::{BTreeMap, HashMap};

/// Execution settings.
#[derive(Clone, Copy, Debug)]
pub struct Exec {
    /// Threads the matrix products may use.
    pub threads: usize,
}

impl Default for Exec {
    fn default() -> Self {
        Exec { threads: 1 }
    }
}

/// The extent of an attention's memory, for graphs that read one ([`eval_graph_with`]).
#[derive(Clone, Copy, Debug)]
pub struct Extent<'a> {
    /// Source positions `S`.
    pub positions: usize,
    /// Sequences `B`: batch row `r` belongs to sequence `r % B` (rows are time-major).
    pub batch: usize,
    /// Each sequence's source length (`1 ..= S`); positions past it weigh 0. All `S` when
    /// absent.
    pub lengths: Option<&'a [usize]>,
}

/// The parameters and bound values of one layer and direction.
#[derive(Clone, Debug)]
struct BoundCell<T> {
    /// The parameters in the cell's parameter order.
    params: Vec<Vec<T>>,
    /// The bound values of the inference, training and backward plans.
    inference: Vec<Vec<T>>,
    training: Vec<Vec<T>>,
    backward: Vec<Vec<T>>,
}

/// A program with its weights checked, converted to precision `T`, and every value derived from
/// parameters alone computed (fused weights, bias sums, slices of biases): compile once, bind
/// once, run many times.
#[derive(Clone, Debug)]
pub struct Bound<'p, T> {
    program: &'p Program,
    /// Per layer, per direction (`layer · directions + direction`).
    cells: Vec<BoundCell<T>>,
}

impl Program {
    /// Checks `weights` against the program (every parameter present, right shape, finite,
    /// nothing else), converts them to `T` and computes the bound values of every plan.
    pub fn bind<T: Real>(&self, weights: &Weights) -> Result<Bound<'_, T>> {
        weights.check(self)?;
        for cell in &self.layers {
            for g in [&cell.forward.graph, &cell.backward.graph] {
                if let Some(v) = g.iter().find(|&v| g.data(v).op.is_attention_op()) {
                    return Err(Error::Argument(format!(
                        "{v} = {}: a recurrent step cannot read an attention's memory; attention runs after the stack (`model::Model`)",
                        g.data(v).op.mnemonic()
                    )));
                }
            }
        }
        let mut cells = Vec::new();
        for (layer, cell) in self.layers.iter().enumerate() {
            for dir in 0..self.spec.directions() {
                let suffix = ModelSpec::param_suffix(layer, dir);
                let params: Vec<Vec<T>> = cell
                    .forward
                    .graph
                    .params
                    .iter()
                    .map(|info| {
                        let t = &weights.tensors[&format!("{}{suffix}", info.name)];
                        t.data.iter().map(|&x| T::from_f32(x)).collect()
                    })
                    .collect();
                cells.push(BoundCell {
                    inference: bind_values(&cell.forward, &cell.inference, &params),
                    training: bind_values(&cell.forward, &cell.training, &params),
                    backward: bind_values(&cell.backward, &cell.backward_plan, &params),
                    params,
                });
            }
        }
        Ok(Bound {
            program: self,
            cells,
        })
    }

    /// Binds `weights` and runs `req` once, in precision `T` (`f32` as PyTorch does, `f64` for
    /// gradient checks). See [`Bound::run`].
    pub fn run<T: Real>(&self, weights: &Weights, req: &Request, exec: &Exec) -> Result<Response> {
        self.bind::<T>(weights)?.run(req, exec)
    }
}

impl<'p, T: Real> Bound<'p, T> {
    /// The program bound.
    pub fn program(&self) -> &'p Program {
        self.program
    }

    /// Runs the model on `req`; every argument is checked first (see [`Request`]).
    pub fn run(&self, req: &Request, exec: &Exec) -> Result<Response> {
        Ok(self.run_raw(req, exec)?.response)
    }

    /// [`Bound::run`], also returning the output and final states unrounded (gradient checks
    /// take finite differences of them in `f64`).
    pub fn run_raw(&self, req: &Request, exec: &Exec) -> Result<RawResponse<T>> {
        driver::run(self.program, &Interp { bound: self, exec }, req)
    }

    /// The forward pass of `req` (its gradients are not read), keeping what
    /// [`Bound::backward`] needs.
    #[allow(clippy::type_complexity)]
    pub fn forward_train(
        &self,
        req: &Request,
        exec: &Exec,
    ) -> Result<(Response, driver::Tape<T, Tape<T>>)> {
        let (response, tape) = driver::forward_response(
            &self.program.layout(),
            &Interp { bound: self, exec },
            req,
            true,
        )?;
        let tape = tape.ok_or_else(|| Error::Argument("no tape was kept".into()))?;
        Ok((response, tape))
    }

    /// Back-propagation through time from a [`Bound::forward_train`] of this model: the
    /// gradients of `sum(output · grad_output)` plus `sum(h_n · grad_h_n)` for each given
    /// final-state gradient.
    pub fn backward(
        &self,
        tape: driver::Tape<T, Tape<T>>,
        grad_output: &Tensor,
        grad_final_states: &[Option<&Tensor>],
        exec: &Exec,
    ) -> Result<Gradients> {
        driver::backward(
            &self.program.layout(),
            &Interp { bound: self, exec },
            tape,
            grad_output,
            grad_final_states,
        )
    }

    fn cell(&self, layer: usize, dir: usize) -> (&'p CellProgram, &BoundCell<T>) {
        let dirs = self.program.spec.directions();
        (&self.program.layers[layer], &self.cells[layer * dirs + dir])
    }
}

/// The interpreter as the driver's per-sequence executor.
struct Interp<'b, 'p, T> {
    bound: &'b Bound<'p, T>,
    exec: &'b Exec,
}

/// What the interpreter's forward pass keeps for the backward pass: its workspace's buffers.
pub struct Tape<T>(Vec<Vec<T>>);

impl<T: Real> SequenceExecutor<T> for Interp<'_, '_, T> {
    type Tape = Tape<T>;

    fn forward(
        &self,
        layer: usize,
        dir: usize,
        seq: Seq<'_>,
        x: &[T],
        initial: Vec<Vec<T>>,
        training: bool,
    ) -> Result<Forward<T, Tape<T>>> {
        let (cell, bound) = self.bound.cell(layer, dir);
        let s = &cell.forward;
        let plan = cell.forward_plan(training);
        let values = if training {
            &bound.training
        } else {
            &bound.inference
        };
        let mut ws = Workspace::new(s, plan, seq.steps, seq.batch);
        for (slot, init) in ws.carried_mut().iter_mut().zip(initial) {
            *slot = init;
        }
        let feeds = Feeds {
            input: Some(View::dense(x, seq.steps * seq.batch, cell.input_size)),
            ..Feeds::params(&bound.params)
        };
        let walk = Walk {
            reverse: false,
            lengths: seq.lengths,
            zero_inactive_carried: false,
        };
        ws.run(s, plan, values, feeds, walk, self.exec);
        let mut out = ws.outputs(s, plan, values, feeds, seq.lengths);
        let output = out
            .per_step
            .pop()
            .filter(|(role, _)| *role == OutRole::Output)
            .map(|(_, y)| y)
            .ok_or_else(|| Error::Argument("the cell has no output".into()))?;
        let finals = ws.take_carried();
        Ok(Forward {
            output,
            finals,
            tape: training.then(|| Tape(ws.into_buffers())),
        })
    }

    fn backward(
        &self,
        layer: usize,
        dir: usize,
        seq: Seq<'_>,
        x: &[T],
        tape: Tape<T>,
        dy: &[T],
        final_grads: Vec<Vec<T>>,
    ) -> Result<Backward<T>> {
        let (cell, bound) = self.bound.cell(layer, dir);
        let (s, plan) = (&cell.backward, &cell.backward_plan);
        let rows = seq.steps * seq.batch;
        let fwd_feeds = Feeds {
            input: Some(View::dense(x, rows, cell.input_size)),
            ..Feeds::params(&bound.params)
        };
        let fwd_ws = Workspace::from_tape(seq.steps, seq.batch, tape.0);
        let forward = fwd_ws.frame(&cell.forward, &cell.training, &bound.training, fwd_feeds);
        let out_size = cell.forward.graph.shape(
            cell.forward
                .graph
                .output(OutRole::Output)
                .expect("a cell has an output"),
        );
        let feeds = Feeds {
            input: Some(View::dense(x, rows, cell.input_size)),
            cotangent: Some(View::dense(dy, rows, out_size.row_len())),
            saved: Some(&forward),
            ..Feeds::params(&bound.params)
        };
        let mut ws = Workspace::new(s, plan, seq.steps, seq.batch);
        for (slot, init) in ws.carried_mut().iter_mut().zip(final_grads) {
            *slot = init;
        }
        let walk = Walk {
            reverse: true,
            lengths: seq.lengths,
            zero_inactive_carried: true,
        };
        ws.run(s, plan, &bound.backward, feeds, walk, self.exec);
        let out = ws.outputs(s, plan, &bound.backward, feeds, seq.lengths);
        let mut param_grads: Vec<Vec<T>> = s
            .graph
            .params
            .iter()
            .map(|p| vec![T::ZERO; p.shape.row_len()])
            .collect();
        for (p, grad) in out.param_grads {
            param_grads[p as usize] = grad;
        }
        let input_grad = out
            .per_step
            .into_iter()
            .find(|(role, _)| *role == OutRole::InputGrad)
            .map_or_else(|| vec![T::ZERO; rows * cell.input_size], |(_, g)| g);
        Ok(Backward {
            input_grad,
            initial_grads: ws.take_carried(),
            param_grads,
        })
    }
}

/// The state of a streaming model between steps: every layer's carried values.
#[derive(Clone, Debug, PartialEq)]
pub struct State<T> {
    /// Per layer, per state (`h`, `c`), `B × size`.
    pub layers: Vec<Vec<Vec<T>>>,
}

/// A model run one step per call (streaming), with every buffer allocated when the stream is
/// made: [`Stream::step`] checks the input's length and values and allocates nothing.
pub struct Stream<'b, 'p, T> {
    bound: &'b Bound<'p, T>,
    batch: usize,
    exec: Exec,
    layers: Vec<Workspace<T>>,
    /// Each layer's output for the step, `B × output` (the next layer's input).
    outputs: Vec<Vec<T>>,
    /// Every row's length in a one-step run: 1.
    ones: Vec<usize>,
}

impl<'p, T: Real> Bound<'p, T> {
    /// A stream over `batch` rows. Only one-directional models stream (the reverse direction
    /// needs the whole sequence).
    pub fn stream(&self, batch: usize, exec: Exec) -> Result<Stream<'_, 'p, T>> {
        let program = self.program;
        if program.spec.bidirectional {
            return Err(Error::Argument(
                "a bidirectional model cannot run one step at a time: its reverse direction needs the whole sequence".into(),
            ));
        }
        if batch == 0 {
            return Err(Error::Argument("a stream needs at least one row".into()));
        }
        let out = program.output_size();
        Ok(Stream {
            bound: self,
            batch,
            exec,
            layers: program
                .layers
                .iter()
                .map(|cell| {
                    Workspace::new(&cell.forward, &cell.inference, 1, batch).allocation_free()
                })
                .collect(),
            outputs: vec![vec![T::ZERO; batch * out]; program.layers.len()],
            ones: vec![1; batch],
        })
    }
}

impl<T: Real> Stream<'_, '_, T> {
    /// The state before the first step: zeros.
    pub fn zero_state(&self) -> State<T> {
        let states = self.bound.program.states();
        State {
            layers: (0..self.layers.len())
                .map(|_| {
                    states
                        .iter()
                        .map(|(_, n)| vec![T::ZERO; self.batch * n])
                        .collect()
                })
                .collect(),
        }
    }

    /// One time step: reads `x_t` (`B × input`), advances `state` and returns `y_t`
    /// (`B × output`). The state must come from this stream's [`Stream::zero_state`] (or a
    /// previous step); its sizes are checked.
    pub fn step(&mut self, state: &mut State<T>, x: &[T]) -> Result<&[T]> {
        let program = self.bound.program;
        let batch = self.batch;
        crate::driver::check_step_input(x, batch, program.spec.input_size)?;
        let states = program.states();
        let fits = state.layers.len() == self.layers.len()
            && state.layers.iter().all(|l| {
                l.len() == states.len()
                    && l.iter().zip(states).all(|(s, (_, n))| s.len() == batch * n)
            });
        if !fits {
            return Err(Error::Argument(format!(
                "the state does not fit this stream ({} layers of {} states over {batch} rows)",
                self.layers.len(),
                states.len()
            )));
        }
        for (layer, ws) in self.layers.iter_mut().enumerate() {
            let (cell, bound) = self.bound.cell(layer, 0);
            let (before, rest) = self.outputs.split_at_mut(layer);
            let x_layer: &[T] = if layer == 0 { x } else { &before[layer - 1] };
            for (slot, s) in ws.carried_mut().iter_mut().zip(&mut state.layers[layer]) {
                std::mem::swap(slot, s);
            }
            let feeds = Feeds {
                input: Some(View::dense(x_layer, batch, cell.input_size)),
                ..Feeds::params(&bound.params)
            };
            let walk = Walk {
                reverse: false,
                lengths: &self.ones,
                zero_inactive_carried: false,
            };
            ws.run(
                &cell.forward,
                &cell.inference,
                &bound.inference,
                feeds,
                walk,
                &self.exec,
            );
            ws.step_output(
                &cell.forward,
                &cell.inference,
                &bound.inference,
                feeds,
                OutRole::Output,
                &mut rest[0],
            );
            for (slot, s) in ws.carried_mut().iter_mut().zip(&mut state.layers[layer]) {
                std::mem::swap(slot, s);
            }
        }
        Ok(&self.outputs[self.layers.len() - 1])
    }
}

/// Where a non-carried input of a step graph comes from ([`run_sequence`]).
#[derive(Clone, Copy, Debug)]
pub enum Feed<'a, T> {
    /// The same data at every step (a parameter, a saved unbatched value).
    Fixed(&'a [T]),
    /// `T·B` rows; step `t` reads rows `t·B .. (t+1)·B`.
    Rows(&'a [T]),
}

/// What [`run_sequence`] needs besides the graph.
pub struct SeqIo<'a, T> {
    /// Time steps `T`.
    pub steps: usize,
    /// Batch rows `B`.
    pub batch: usize,
    /// Run the loop from the last step to the first (the backward pass).
    pub reverse: bool,
    /// Per-row sequence lengths: row `b` takes part in steps `t < lengths[b]` only.
    pub lengths: Option<&'a [usize]>,
    /// Every non-carried input by role.
    pub feeds: HashMap<Role, Feed<'a, T>>,
    /// The initial carried values, indexed like the states (`B × size` each).
    pub carried: Vec<Vec<T>>,
    /// Zero the carried inputs on rows past their length (the backward pass).
    pub zero_inactive_carried: bool,
    /// Values to return over all steps (`T·B` rows, or once if unbatched).
    pub keep: &'a [Value],
}

/// What [`run_sequence`] returns.
pub struct SeqResult<T> {
    /// The final carried values.
    pub carried: Vec<Vec<T>>,
    /// Per-step outputs (`Output`, `InputGrad`) over `T·B` rows, zero past each length, and
    /// summed outputs (`ParamGrad`).
    pub outputs: BTreeMap<OutRole, Vec<T>>,
    /// The values asked for in `keep`.
    pub kept: HashMap<Value, Vec<T>>,
}

fn buf_len(shape: Shape, rows: usize) -> usize {
    if shape.is_batched() {
        rows * shape.row_len()
    } else {
        shape.row_len()
    }
}

/// Checks that `io` fits `s`: at least one step and one row, every input fed with the size
/// its shape gives, the carried values and lengths consistent.
fn check_sequence<T>(s: &Scheduled, io: &SeqIo<'_, T>) -> Result<()> {
    let g = &s.graph;
    let bad = |m: String| Err(Error::Argument(m));
    if io.steps == 0 || io.batch == 0 {
        return bad(format!(
            "a sequence needs at least one step and one row, found {} and {}",
            io.steps, io.batch
        ));
    }
    if io.carried.len() != g.states.len() {
        return bad(format!(
            "{} carried values given, the graph carries {}",
            io.carried.len(),
            g.states.len()
        ));
    }
    for (c, (name, n)) in io.carried.iter().zip(&g.states) {
        if c.len() != io.batch * n {
            return bad(format!(
                "carried `{name}` has {} elements, expected {}",
                c.len(),
                io.batch * n
            ));
        }
    }
    if let Some(l) = io.lengths
        && (l.len() != io.batch || l.iter().any(|&n| n == 0 || n > io.steps))
    {
        return bad(format!(
            "lengths {l:?} must give 1 ..= {} for each of {} rows",
            io.steps, io.batch
        ));
    }
    for v in g.iter() {
        let Op::Input(role) = g.data(v).op else {
            continue;
        };
        if carried_input(role).is_some() {
            continue;
        }
        let shape = g.shape(v);
        let (len, want) = match io.feeds.get(&role) {
            None => return bad(format!("no value given for input `{}`", g.role_name(role))),
            Some(Feed::Rows(x)) => (x.len(), buf_len(shape, io.steps * io.batch)),
            Some(Feed::Fixed(x)) => (x.len(), buf_len(shape, 1)),
        };
        if len != want {
            return bad(format!(
                "input `{}` has {len} elements, expected {want}",
                g.role_name(role)
            ));
        }
        if matches!(io.feeds.get(&role), Some(Feed::Fixed(_))) && shape.is_batched() {
            return bad(format!(
                "input `{}` is batched: feed it `Rows` over every step",
                g.role_name(role)
            ));
        }
    }
    Ok(())
}

/// Runs scheduled step graph `s` on its own over a sequence, with a storage plan made for it
/// (keeping `io.keep`): the executor without the driver, for tests of single graphs. Every
/// argument is checked first; see [`SeqIo`].
pub fn run_sequence<T: Real>(s: &Scheduled, io: SeqIo<'_, T>, exec: &Exec) -> Result<SeqResult<T>> {
    check_sequence(s, &io)?;
    let g = &s.graph;
    let plan = StoragePlan::new(s, io.keep);
    plan.verify(s)?;
    let (steps, batch) = (io.steps, io.batch);
    let params: Vec<Vec<T>> = (0..g.params.len())
        .map(|p| match io.feeds.get(&Role::Param(p as u32)) {
            Some(Feed::Fixed(x) | Feed::Rows(x)) => x.to_vec(),
            None => Vec::new(),
        })
        .collect();
    let mut by_role: Vec<(Role, View<'_, T>)> = io
        .feeds
        .iter()
        .map(|(&role, feed)| {
            let width = g.input(role).map_or(1, |v| g.shape(v).row_len());
            let view = match *feed {
                Feed::Rows(x) => View::dense(x, x.len() / width.max(1), width),
                Feed::Fixed(x) => View::dense(x, 1, x.len()),
            };
            (role, view)
        })
        .collect();
    by_role.sort_by_key(|(r, _)| *r);
    let feeds = Feeds {
        by_role: Some(&by_role),
        ..Feeds::params(&params)
    };
    let bound = bind_values(s, &plan, &params);
    let mut ws = Workspace::new(s, &plan, steps, batch);
    for (slot, init) in ws.carried_mut().iter_mut().zip(io.carried) {
        *slot = init;
    }
    let all = vec![steps; batch];
    let lengths = io.lengths.unwrap_or(&all);
    let walk = Walk {
        reverse: io.reverse,
        lengths,
        zero_inactive_carried: io.zero_inactive_carried,
    };
    ws.run(s, &plan, &bound, feeds, walk, exec);
    let out = ws.outputs(s, &plan, &bound, feeds, lengths);
    let mut outputs = BTreeMap::new();
    for (role, y) in out.per_step {
        outputs.insert(role, y);
    }
    for (p, x) in out.param_grads {
        outputs.insert(OutRole::ParamGrad(p), x);
    }
    let frame = ws.frame(s, &plan, &bound, feeds);
    let kept = io
        .keep
        .iter()
        .map(|&v| {
            let view = frame.view_all(v);
            let mut x = Vec::with_capacity(view.rows * view.width);
            for r in 0..view.rows {
                x.extend_from_slice(view.row(r));
            }
            (v, x)
        })
        .collect();
    let carried = ws.carried_mut().to_vec();
    Ok(SeqResult {
        carried,
        outputs,
        kept,
    })
}

/// Evaluates a whole graph once on `rows` rows; `inputs` gives every input by role. Returns
/// every value, densely (the interpreter of single steps, used by gradient checks and the
/// Linear workload). Each op runs through the same kernels as the executor.
pub fn eval_graph<T: Real>(
    g: &Graph,
    rows: usize,
    inputs: &HashMap<Role, Vec<T>>,
    exec: &Exec,
) -> Result<Vec<Vec<T>>> {
    eval_graph_with(g, rows, inputs, exec, None)
}

/// [`eval_graph`] for a graph that may read an attention's memory of extent `extent` (a
/// memory has `S · B` rows, pairs `rows · S`).
pub fn eval_graph_with<T: Real>(
    g: &Graph,
    rows: usize,
    inputs: &HashMap<Role, Vec<T>>,
    exec: &Exec,
    extent: Option<&Extent<'_>>,
) -> Result<Vec<Vec<T>>> {
    let mut vals = eval_graph_borrowed(
        g,
        rows,
        |role| inputs.get(&role).map(Vec::as_slice),
        exec,
        extent,
    )?;
    for v in g.iter() {
        if let Op::Input(role) = g.data(v).op {
            vals[v.index()] = inputs[&role].clone();
        }
    }
    Ok(vals)
}

/// Whether the kernel of `op` writes every element of its result (so its buffer need not be
/// zeroed first): the products and the element-wise ops ([`Op::is_elementwise`]).
fn writes_all(op: Op) -> bool {
    op.is_elementwise() || matches!(op, Op::MatMul | Op::MatMulT | Op::OuterSum)
}

/// [`eval_graph_with`] reading each input where `input(role)` has it, without copying it: the
/// values returned hold every computed value, and nothing in the slots of the inputs.
pub fn eval_graph_borrowed<'i, T: Real>(
    g: &Graph,
    rows: usize,
    input: impl Fn(Role) -> Option<&'i [T]>,
    exec: &Exec,
    extent: Option<&Extent<'_>>,
) -> Result<Vec<Vec<T>>> {
    eval_graph_partial(g, rows, input, |_| None, |_| false, exec, extent)
}

/// [`eval_graph_borrowed`] where `given(v)` supplies value `v` already computed (it is not
/// computed again: what a previous call computed of values that do not change, such as an
/// attention's projected memory while decoding) and `skip(v)` leaves `v` uncomputed (its slot
/// empty; nothing computed may read it). Given and skipped values' slots are empty.
pub fn eval_graph_partial<'i, T: Real>(
    g: &Graph,
    rows: usize,
    input: impl Fn(Role) -> Option<&'i [T]>,
    given: impl Fn(Value) -> Option<&'i [T]>,
    skip: impl Fn(Value) -> bool,
    exec: &Exec,
    extent: Option<&Extent<'_>>,
) -> Result<Vec<Vec<T>>> {
    let needs_extent = g
        .iter()
        .any(|v| matches!(g.shape(v), Shape::Memory(_) | Shape::Pairs(_)));
    let extent = match extent {
        Some(e) if e.positions == 0 || e.batch == 0 || !rows.is_multiple_of(e.batch) => {
            return Err(Error::Argument(format!(
                "a memory of {} positions for {} sequences cannot serve {rows} rows",
                e.positions, e.batch
            )));
        }
        Some(e) => *e,
        None if needs_extent => {
            return Err(Error::Argument(
                "the graph reads an attention's memory: give its extent".into(),
            ));
        }
        None => Extent {
            positions: 1,
            batch: 1,
            lengths: None,
        },
    };
    if let Some(l) = extent.lengths
        && (l.len() != extent.batch || l.iter().any(|&n| n == 0 || n > extent.positions))
    {
        return Err(Error::Argument(format!(
            "source lengths {l:?} must give 1 ..= {} for each of {} sequences",
            extent.positions, extent.batch
        )));
    }
    let mut vals: Vec<Vec<T>> = Vec::with_capacity(g.len());
    let mut fed: Vec<Option<&'i [T]>> = vec![None; g.len()];
    let rows_of = |s: Shape| match s {
        Shape::Memory(_) => extent.positions * extent.batch,
        Shape::Pairs(_) => rows * extent.positions,
        s if s.is_batched() => rows,
        _ => 1,
    };
    let buf_len = |s: Shape, _rows: usize| rows_of(s) * s.row_len();
    for v in g.iter() {
        let d = g.data(v);
        if let Some(x) = given(v) {
            if x.len() != buf_len(d.shape, rows) {
                return Err(Error::Argument(format!(
                    "the value given for {v} has {} elements, expected {}",
                    x.len(),
                    buf_len(d.shape, rows)
                )));
            }
            fed[v.index()] = Some(x);
            vals.push(Vec::new());
            continue;
        }
        if skip(v) {
            vals.push(Vec::new());
            continue;
        }
        if let Some(a) = d.args.iter().find(|a| {
            fed[a.index()].is_none()
                && vals[a.index()].is_empty()
                && !matches!(g.data(**a).op, Op::Input(_))
                && buf_len(g.shape(**a), rows) > 0
        }) {
            return Err(Error::Argument(format!("{v} reads {a}, which was skipped")));
        }
        let out = match d.op {
            Op::Input(role) => {
                let x = input(role).ok_or_else(|| {
                    Error::Argument(format!("no value given for input `{}`", g.role_name(role)))
                })?;
                if x.len() != buf_len(d.shape, rows) {
                    return Err(Error::Argument(format!(
                        "input `{}` has {} elements, expected {}",
                        g.role_name(role),
                        x.len(),
                        buf_len(d.shape, rows)
                    )));
                }
                fed[v.index()] = Some(x);
                Vec::new()
            }
            op => {
                let width = d.shape.row_len();
                // A product or an element-wise op writes every element of its result: its
                // buffer is not zeroed.
                let mut out = if writes_all(op) {
                    T::scratch(buf_len(d.shape, rows))
                } else {
                    T::zeros(buf_len(d.shape, rows))
                };
                let value = |a: Value| -> &[T] { fed[a.index()].unwrap_or(&vals[a.index()]) };
                let args: Vec<View<'_, T>> = d
                    .args
                    .iter()
                    .map(|&a| {
                        let s = g.shape(a);
                        View::dense(value(a), rows_of(s), s.row_len())
                    })
                    .collect();
                let shapes: Vec<Shape> = d.args.iter().map(|&a| g.shape(a)).collect();
                let mut dst = ViewMut {
                    data: &mut out,
                    offset: 0,
                    rows: rows_of(d.shape),
                    width,
                    stride: width,
                };
                if op.is_attention_op() {
                    let dense: Vec<&[T]> = d.args.iter().map(|&a| value(a)).collect();
                    let widths: Vec<usize> = shapes.iter().map(|s| s.row_len()).collect();
                    attend::eval(op, dst.data, &dense, &widths, rows, &extent);
                } else if op == Op::Concat {
                    let unit = d.shape.feature_len();
                    let mut col = 0;
                    for (a, s) in args.iter().zip(&shapes) {
                        let mut part = ViewMut {
                            data: &mut *dst.data,
                            offset: col,
                            rows: dst.rows,
                            width: s.row_len(),
                            stride: width,
                        };
                        part.copy_from(*a);
                        col += s.features() * unit;
                    }
                } else {
                    kernels::eval(op, &mut dst, &args, &shapes, exec, false);
                }
                out
            }
        };
        vals.push(out);
    }
    Ok(vals)
}

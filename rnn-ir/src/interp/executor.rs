//! The sequence executor: one scheduled step graph run over a sequence, following its
//! [`StoragePlan`] literally.
//!
//! A [`Workspace`] holds the plan's buffers, allocated once for `T` steps of `B` rows, and the
//! double-buffered carried slots. [`Workspace::run`] computes the values before the loop over all
//! `T·B` rows, then each step's values (forwards or backwards in time) into their places, then
//! the values after the loop; each op writes into its place through [`kernels`],
//! slices are views, concatenations are assembled where their arguments were computed. Rows past
//! a sequence's length keep their carried value (and, in the backward pass, see a zero gradient
//! flowing in while the incoming one passes through untouched); per-step outputs are zero there.
//!
//! Bound values (computed from parameters alone) are computed by [`bind_values`] once, when the
//! weights are bound, and read from there.

use super::Exec;
use super::kernels::{self, View, ViewMut};
use crate::driver;
use crate::graph::dataflow::is_per_step_output;
use crate::graph::{Op, OutRole, Role, Shape, Value};
use crate::passes::hoist::Phase;
use crate::plan::{Place, Root, Rows, Storage, StoragePlan};
use crate::schedule::Scheduled;
use crate::tensor::Real;

/// Where the values fed from outside come from.
#[derive(Clone, Copy)]
pub struct Feeds<'a, T> {
    /// The parameters, by index in the graph's parameter table.
    pub params: &'a [Vec<T>],
    /// The step input over all `T·B` rows.
    pub input: Option<View<'a, T>>,
    /// The gradient flowing into the per-step output, over all `T·B` rows (backward).
    pub cotangent: Option<View<'a, T>>,
    /// The forward run whose values `Saved` inputs read (backward).
    pub saved: Option<&'a Frame<'a, T>>,
    /// Any other fed role, looked up by role (a single graph run on its own, whose saved values
    /// are given as buffers rather than as a forward run).
    pub by_role: Option<&'a [(Role, View<'a, T>)]>,
}

impl<'a, T> Feeds<'a, T> {
    /// Parameters only.
    pub fn params(params: &'a [Vec<T>]) -> Self {
        Feeds {
            params,
            input: None,
            cotangent: None,
            saved: None,
            by_role: None,
        }
    }

    fn lookup(&self, role: Role) -> Option<View<'a, T>>
    where
        T: Copy,
    {
        self.by_role
            .and_then(|list| list.iter().find(|(r, _)| *r == role).map(|(_, v)| *v))
    }
}

/// A finished or running graph's values as the executor reads them: its plan, buffers,
/// bound values, carried slots and feeds.
pub struct Frame<'a, T> {
    s: &'a Scheduled,
    plan: &'a StoragePlan,
    steps: usize,
    batch: usize,
    bufs: &'a [Vec<T>],
    /// `None` while the bound values themselves are computed (they are then in `bufs`).
    bound: Option<&'a [Vec<T>]>,
    current: &'a [Vec<T>],
    next: &'a [Vec<T>],
    feeds: Feeds<'a, T>,
}

impl<'a, T: Real> Frame<'a, T> {
    /// The value `v` over all rows.
    pub fn view_all(&self, v: Value) -> View<'a, T> {
        self.view(v, None)
    }

    /// The value `v` over all rows (`step` `None`) or at one step.
    fn view(&self, v: Value, step: Option<usize>) -> View<'a, T> {
        let g = &self.s.graph;
        let (root, offset) = self.plan.root(g, v);
        let shape = g.shape(v);
        let (base, all_rows) = self.root_view(root, step);
        let mut view = base.columns(offset, shape.row_len());
        if !shape.is_batched() {
            view.rows = 1;
        } else if let (true, Some(t)) = (all_rows, step) {
            view = view.rows(t * self.batch, self.batch);
        }
        view
    }

    /// The whole of a root, and whether it holds `T·B` rows.
    fn root_view(&self, root: Root, step: Option<usize>) -> (View<'a, T>, bool) {
        let g = &self.s.graph;
        let (steps, batch) = (self.steps, self.batch);
        match root {
            Root::Buffer(b) => {
                let info = &self.plan.buffers[b.0 as usize];
                let data = match (info.storage, self.bound) {
                    (Storage::Bound, Some(bound)) => &bound[b.0 as usize],
                    _ => &self.bufs[b.0 as usize],
                };
                let rows = info.rows.count(steps, batch);
                (View::dense(data, rows, info.width), info.rows == Rows::All)
            }
            Root::Carried(k) => {
                let n = g.states[k as usize].1;
                match (step, self.plan.carried_tape[k as usize]) {
                    // Read after the loop or by the backward pass: the recorded values.
                    (None, Some(tape)) => (
                        View::dense(&self.bufs[tape.0 as usize], steps * batch, n),
                        true,
                    ),
                    _ => (View::dense(&self.current[k as usize], batch, n), false),
                }
            }
            Root::Next(k) => {
                let n = g.states[k as usize].1;
                (View::dense(&self.next[k as usize], batch, n), false)
            }
            Root::Feed(role) if self.feeds.by_role.is_some() => {
                let view = self.feeds.lookup(role).expect("every fed role was checked");
                (
                    view,
                    view.rows > 1 || g.shape(self.fed_value(role)).is_batched(),
                )
            }
            Root::Feed(role) => match role {
                Role::Param(p) => {
                    let data = &self.feeds.params[p as usize];
                    (View::dense(data, 1, data.len()), false)
                }
                Role::Input => (self.feeds.input.expect("the step input is fed"), true),
                Role::Cotangent(OutRole::Output) => {
                    (self.feeds.cotangent.expect("the cotangent is fed"), true)
                }
                Role::Saved(s) => {
                    let f = self.feeds.saved.expect("saved values are fed");
                    let view = f.view(s, None);
                    (view, view.rows > 1 || f.s.graph.shape(s).is_batched())
                }
                _ => unreachable!("carried roles are slots, not feeds"),
            },
        }
    }
}

impl<T> Frame<'_, T> {
    fn fed_value(&self, role: Role) -> Value {
        let g = &self.s.graph;
        g.input(role).expect("a fed role is an input of the graph")
    }
}

/// The buffers of one run of a plan over `T` steps of `B` rows, allocated once.
pub struct Workspace<T> {
    steps: usize,
    batch: usize,
    bufs: Vec<Vec<T>>,
    current: Vec<Vec<T>>,
    next: Vec<Vec<T>>,
    hold: Vec<Vec<T>>,
    /// Per graph output: the sum over the steps of a parameter gradient computed in the loop.
    sums: Vec<Vec<T>>,
    scratch: Vec<Vec<T>>,
    /// Run products of a few rows one row at a time, allocating nothing (streaming).
    by_row: bool,
}

/// What a run returns besides the workspace's buffers.
pub struct RunOutputs<T> {
    /// Per-step outputs (`Output`, `InputGrad`) over `T·B` rows, zero past each length.
    pub per_step: Vec<(OutRole, Vec<T>)>,
    /// Parameter gradients summed over time, by parameter index.
    pub param_grads: Vec<(u32, Vec<T>)>,
}

/// How a run goes through time.
#[derive(Clone, Copy, Debug)]
pub struct Walk<'a> {
    /// From the last step to the first (the backward pass).
    pub reverse: bool,
    /// Per-row lengths: row `b` takes part in steps `t < lengths[b]` only.
    pub lengths: &'a [usize],
    /// Rows past their length see a zero carried value (the backward pass: no gradient flows
    /// into steps a sequence does not have); the value passes through to the earlier step.
    pub zero_inactive_carried: bool,
}

impl<T: Real> Workspace<T> {
    /// Buffers for running `s` with `plan` over `steps` steps of `batch` rows; the carried
    /// slots start at zero.
    pub fn new(s: &Scheduled, plan: &StoragePlan, steps: usize, batch: usize) -> Self {
        let g = &s.graph;
        let bufs = plan
            .buffers
            .iter()
            .map(|b| match b.storage {
                Storage::Bound => Vec::new(),
                _ => vec![T::ZERO; b.rows.count(steps, batch) * b.width],
            })
            .collect();
        let slots = || -> Vec<Vec<T>> {
            g.states
                .iter()
                .map(|(_, n)| vec![T::ZERO; batch * n])
                .collect()
        };
        let sums = plan
            .step_sums
            .iter()
            .map(|&(_, v)| vec![T::ZERO; g.shape(v).row_len()])
            .collect();
        Workspace {
            steps,
            batch,
            bufs,
            current: slots(),
            next: slots(),
            hold: slots(),
            sums,
            scratch: vec![Vec::new(); 2],
            by_row: false,
        }
    }

    /// A workspace around the buffers a finished run left (a forward pass's tape), to read
    /// them through [`Workspace::frame`].
    pub fn from_tape(steps: usize, batch: usize, bufs: Vec<Vec<T>>) -> Self {
        Workspace {
            steps,
            batch,
            bufs,
            current: Vec::new(),
            next: Vec::new(),
            hold: Vec::new(),
            sums: Vec::new(),
            scratch: Vec::new(),
            by_row: false,
        }
    }

    /// Makes products of a few rows run one row at a time, so that a run allocates nothing
    /// (the streaming step's workspace).
    pub fn allocation_free(mut self) -> Self {
        self.by_row = true;
        self
    }

    /// The carried slots' current values (the initial values before a run, the final ones
    /// after it), `B × size` each.
    pub fn carried_mut(&mut self) -> &mut [Vec<T>] {
        &mut self.current
    }

    /// The carried slots' current values, moved out (the final values after a run).
    pub fn take_carried(&mut self) -> Vec<Vec<T>> {
        std::mem::take(&mut self.current)
    }

    /// The buffers, moved out (the forward pass's tape, read by the backward pass).
    pub fn into_buffers(self) -> Vec<Vec<T>> {
        self.bufs
    }

    /// A frame reading this workspace.
    pub fn frame<'a>(
        &'a self,
        s: &'a Scheduled,
        plan: &'a StoragePlan,
        bound: &'a [Vec<T>],
        feeds: Feeds<'a, T>,
    ) -> Frame<'a, T> {
        Frame {
            s,
            plan,
            steps: self.steps,
            batch: self.batch,
            bufs: &self.bufs,
            bound: Some(bound),
            current: &self.current,
            next: &self.next,
            feeds,
        }
    }

    /// Runs `s` with `plan` over the workspace's steps (see the module doc). `bound` holds the
    /// plan's bound values ([`bind_values`]).
    pub fn run(
        &mut self,
        s: &Scheduled,
        plan: &StoragePlan,
        bound: &[Vec<T>],
        feeds: Feeds<'_, T>,
        walk: Walk<'_>,
        exec: &Exec,
    ) {
        let g = &s.graph;
        let (steps, batch) = (self.steps, self.batch);
        let computed = |phase: Phase| {
            g.iter()
                .filter(move |&v| s.phases[v.index()] == phase && plan.is_computed(g, v))
                .filter(|&v| plan.storage[v.index()] != Storage::Bound)
        };
        for v in computed(Phase::Pre) {
            self.compute(s, plan, Some(bound), feeds, v, None, exec);
        }
        for sum in &mut self.sums {
            sum.fill(T::ZERO);
        }
        let lengths = &walk.lengths[..batch];
        let zero = walk.zero_inactive_carried.then_some(T::ZERO);
        for i in 0..steps {
            let t = if walk.reverse { steps - 1 - i } else { i };
            let partial = driver::any_finished(t, lengths);
            if partial {
                for (k, &(_, n)) in g.states.iter().enumerate() {
                    driver::hold_finished(
                        t,
                        lengths,
                        n,
                        &mut self.current[k],
                        &mut self.hold[k],
                        zero,
                    );
                }
            }
            for (k, tape) in plan.carried_tape.iter().enumerate() {
                if let Some(tape) = tape {
                    let n = g.states[k].1;
                    let rows = t * batch * n..(t + 1) * batch * n;
                    self.bufs[tape.0 as usize][rows].copy_from_slice(&self.current[k]);
                }
            }
            for v in computed(Phase::Loop) {
                self.compute(s, plan, Some(bound), feeds, v, Some(t), exec);
            }
            // The carried slots' next values that were not computed in place.
            for (k, next) in plan.carried_next.iter().enumerate() {
                let Some(v) = *next else { continue };
                if plan.place[v.index()] != Place::Next(k as u32) {
                    let mut next = std::mem::take(&mut self.next[k]);
                    let src = self.frame(s, plan, bound, feeds).view(v, Some(t));
                    let n = g.states[k].1;
                    let mut dst = ViewMut {
                        data: &mut next,
                        offset: 0,
                        rows: batch,
                        width: n,
                        stride: n,
                    };
                    dst.copy_from(src);
                    self.next[k] = next;
                }
            }
            // Parameter gradients computed per step, summed over time.
            for (i, &(_, v)) in plan.step_sums.iter().enumerate() {
                let mut sum = std::mem::take(&mut self.sums[i]);
                let x = self.frame(s, plan, bound, feeds).view(v, Some(t));
                for (s, &x) in sum.iter_mut().zip(x.row(0)) {
                    *s += x;
                }
                self.sums[i] = sum;
            }
            if partial {
                for (k, &(_, n)) in g.states.iter().enumerate() {
                    driver::restore_finished(t, lengths, n, &mut self.next[k], &self.hold[k]);
                }
            }
            std::mem::swap(&mut self.current, &mut self.next);
        }
        for v in computed(Phase::Post) {
            self.compute(s, plan, Some(bound), feeds, v, None, exec);
        }
    }

    /// The outputs of a finished run, copied out (per-step ones zeroed past each length).
    pub fn outputs(
        &self,
        s: &Scheduled,
        plan: &StoragePlan,
        bound: &[Vec<T>],
        feeds: Feeds<'_, T>,
        lengths: &[usize],
    ) -> RunOutputs<T> {
        let g = &s.graph;
        let frame = self.frame(s, plan, bound, feeds);
        let mut out = RunOutputs {
            per_step: Vec::new(),
            param_grads: Vec::new(),
        };
        for o in &g.outputs {
            if is_per_step_output(o.role) {
                let view = frame.view(o.value, None);
                let n = view.width;
                let mut y = Vec::with_capacity(self.steps * self.batch * n);
                for t in 0..self.steps {
                    for (b, &len) in lengths.iter().enumerate().take(self.batch) {
                        let r = t * self.batch + b;
                        if t < len {
                            y.extend_from_slice(view.row(r));
                        } else {
                            y.extend(std::iter::repeat_n(T::ZERO, n));
                        }
                    }
                }
                out.per_step.push((o.role, y));
            } else if let OutRole::ParamGrad(p) = o.role {
                let x = match plan.step_sums.iter().position(|&(q, _)| q == p) {
                    Some(i) => self.sums[i].clone(),
                    None => frame.view(o.value, None).row(0).to_vec(),
                };
                out.param_grads.push((p, x));
            }
        }
        out
    }

    /// Copies per-step output `role` of a one-step run (streaming) into `dst`.
    pub fn step_output(
        &self,
        s: &Scheduled,
        plan: &StoragePlan,
        bound: &[Vec<T>],
        feeds: Feeds<'_, T>,
        role: OutRole,
        dst: &mut [T],
    ) {
        let g = &s.graph;
        let v = g.output(role).expect("the graph has the output");
        let view = self.frame(s, plan, bound, feeds).view(v, Some(0));
        let n = view.width;
        for r in 0..view.rows {
            dst[r * n..(r + 1) * n].copy_from_slice(view.row(r));
        }
    }

    /// Computes value `v` into its place, over all rows or at `step`.
    #[allow(clippy::too_many_arguments)]
    fn compute(
        &mut self,
        s: &Scheduled,
        plan: &StoragePlan,
        bound: Option<&[Vec<T>]>,
        feeds: Feeds<'_, T>,
        v: Value,
        step: Option<usize>,
        exec: &Exec,
    ) {
        compute(
            Target {
                s,
                plan,
                steps: self.steps,
                batch: self.batch,
                bufs: &mut self.bufs,
                bound,
                current: &self.current,
                next: &mut self.next,
                by_row: self.by_row,
            },
            &mut self.scratch,
            feeds,
            v,
            step,
            exec,
        );
    }
}

/// Everything `compute` writes into or reads from.
struct Target<'w, T> {
    s: &'w Scheduled,
    plan: &'w StoragePlan,
    steps: usize,
    batch: usize,
    bufs: &'w mut Vec<Vec<T>>,
    bound: Option<&'w [Vec<T>]>,
    current: &'w [Vec<T>],
    next: &'w mut Vec<Vec<T>>,
    by_row: bool,
}

impl<T> Target<'_, T> {
    /// A frame reading everything the target holds (the destination excepted while it is
    /// taken out).
    fn frame<'a>(&'a self, feeds: Feeds<'a, T>) -> Frame<'a, T> {
        Frame {
            s: self.s,
            plan: self.plan,
            steps: self.steps,
            batch: self.batch,
            bufs: &self.bufs[..],
            bound: self.bound,
            current: self.current,
            next: &self.next[..],
            feeds,
        }
    }
}

/// Computes value `v` of `w`'s graph into its place, over all rows or at `step`; `scratch`
/// holds copies of arguments that live in the destination's own buffer.
fn compute<T: Real>(
    w: Target<'_, T>,
    scratch: &mut Vec<Vec<T>>,
    feeds: Feeds<'_, T>,
    v: Value,
    step: Option<usize>,
    exec: &Exec,
) {
    let (s, plan) = (w.s, w.plan);
    let g = &s.graph;
    let d = g.data(v);
    let (root, offset) = plan.root(g, v);
    // Argument `i` of a concatenation was computed straight into its columns (a value joined
    // twice is in place at one position only).
    let in_place = |i: usize| {
        let start: usize = d.args[..i].iter().map(|&a| g.shape(a).features()).sum();
        d.op == Op::Concat && plan.place[d.args[i].index()] == Place::View { of: v, start }
    };
    // Arguments that live in the destination's own buffer are copied aside first.
    let aliased = |i: usize| !in_place(i) && plan.root(g, d.args[i]).0 == root;
    {
        let frame = w.frame(feeds);
        if scratch.len() < d.args.len() {
            scratch.resize_with(d.args.len(), Vec::new);
        }
        for (i, &a) in d.args.iter().enumerate() {
            if aliased(i) {
                let view = frame.view(a, step);
                scratch[i].clear();
                for r in 0..view.rows {
                    scratch[i].extend_from_slice(view.row(r));
                }
            }
        }
    }
    // The destination's buffer is taken out while the op runs; no argument reads it then (the
    // ones sharing its root were copied aside above, or are parts computed in place).
    let mut dst_vec = match root {
        Root::Buffer(b) => std::mem::take(&mut w.bufs[b.0 as usize]),
        Root::Next(k) => std::mem::take(&mut w.next[k as usize]),
        _ => unreachable!("only buffers and next slots are written"),
    };
    {
        let frame = w.frame(feeds);
        let arg = |i: usize| -> View<'_, T> {
            let a = d.args[i];
            if aliased(i) {
                let width = g.shape(a).row_len();
                let rows = scratch[i].len() / width.max(1);
                View::dense(&scratch[i], rows, width)
            } else {
                frame.view(a, step)
            }
        };
        let (stride, all_rows, buffer_rows) = match root {
            Root::Buffer(b) => {
                let info = &plan.buffers[b.0 as usize];
                (
                    info.width,
                    info.rows == Rows::All,
                    info.rows.count(w.steps, w.batch),
                )
            }
            Root::Next(k) => (g.states[k as usize].1, false, w.batch),
            _ => unreachable!(),
        };
        let shape = d.shape;
        let (start_row, rows) = match (shape.is_batched(), all_rows, step) {
            (false, _, _) => (0, 1),
            (true, true, Some(t)) => (t * w.batch, w.batch),
            (true, _, _) => (0, buffer_rows),
        };
        let mut dst = ViewMut {
            data: &mut dst_vec,
            offset: offset + start_row * stride,
            rows,
            width: shape.row_len(),
            stride,
        };
        if d.op == Op::Concat {
            let unit = shape.feature_len();
            let mut col = 0;
            for (i, &a) in d.args.iter().enumerate() {
                let width = g.shape(a).row_len();
                if !in_place(i) {
                    let src = arg(i);
                    let mut part = ViewMut {
                        data: &mut *dst.data,
                        offset: dst.offset + col,
                        rows: dst.rows,
                        width,
                        stride: dst.stride,
                    };
                    part.copy_from(src);
                }
                col += g.shape(a).features() * unit;
            }
        } else {
            let n = d.args.len();
            let (a0, a1) = match n {
                0 => (None, None),
                1 => (Some(arg(0)), None),
                _ => (Some(arg(0)), Some(arg(1))),
            };
            let shape_of = |i: usize| d.args.get(i).map_or(Shape::Scalar, |&a| g.shape(a));
            let shapes = [shape_of(0), shape_of(1)];
            match (a0, a1) {
                (None, _) => kernels::eval(d.op, &mut dst, &[], &[], exec, w.by_row),
                (Some(a), None) => {
                    kernels::eval(d.op, &mut dst, &[a], &shapes[..1], exec, w.by_row)
                }
                (Some(a), Some(b)) => {
                    kernels::eval(d.op, &mut dst, &[a, b], &shapes, exec, w.by_row)
                }
            }
        }
    }
    match root {
        Root::Buffer(b) => w.bufs[b.0 as usize] = dst_vec,
        Root::Next(k) => w.next[k as usize] = dst_vec,
        _ => unreachable!(),
    }
}

/// Computes the bound values of `plan` (those derived from parameters alone) from `params`:
/// what [`Workspace::run`] reads as `bound`. Runs once, when weights are bound.
pub fn bind_values<T: Real>(s: &Scheduled, plan: &StoragePlan, params: &[Vec<T>]) -> Vec<Vec<T>> {
    let g = &s.graph;
    let mut bufs: Vec<Vec<T>> = plan
        .buffers
        .iter()
        .map(|b| match b.storage {
            Storage::Bound => vec![T::ZERO; b.width],
            _ => Vec::new(),
        })
        .collect();
    let feeds = Feeds::params(params);
    let (mut next, mut scratch) = (Vec::new(), Vec::new());
    for v in g.iter() {
        if plan.storage[v.index()] == Storage::Bound
            && plan.is_computed(g, v)
            && !matches!(g.data(v).op, Op::Input(_))
        {
            let target = Target {
                s,
                plan,
                steps: 1,
                batch: 1,
                bufs: &mut bufs,
                bound: None,
                current: &[],
                next: &mut next,
                by_row: false,
            };
            compute(target, &mut scratch, feeds, v, None, &Exec::default());
        }
    }
    bufs
}

//! Running the lowered plans: buffers allocated per run as the plan sizes them, the compiled
//! functions called before, at every step of and after the loop, and the step-level
//! orchestration the emitted Rust performs inline (rows past their length frozen, carried
//! values recorded on tapes, the slots swapped). Layers, directions, packed lengths and the
//! reverse-time backward pass are the shared driver's ([`rnn_ir::driver`]).

use crate::lower::{Access, Body, Lowered, RowSel, Slot, per_step};
use rnn_ir::driver::{self, Backward, Forward, Seq};
use rnn_ir::graph::OutRole;
use rnn_ir::plan::Storage;
use rnn_ir::pool::{recycle, scratch, zeros};

/// A compiled function: `(table, steps, batch, t)`.
pub type KernelFn = unsafe extern "C" fn(*const *mut f32, usize, usize, usize);

/// One plan's compiled functions and the slots they read.
pub struct Plan {
    pub(crate) lowered: Lowered,
    /// The values of the parameters alone, run once when weights are bound ([`bound_values`]).
    pub(crate) bound: KernelFn,
    pub(crate) pre: KernelFn,
    pub(crate) step: KernelFn,
    pub(crate) post: KernelFn,
}

/// What one run of a plan returns: per-step outputs by role, parameter gradients, the carried
/// values at the end, and the plan's buffers (the tape).
pub struct RunResult {
    /// The per-step outputs (the output, or the input's gradient), zero past each length.
    pub per_step: Vec<(OutRole, Vec<f32>)>,
    /// Parameter gradients by parameter index.
    pub grads: Vec<(usize, Vec<f32>)>,
    /// The carried values after the last step.
    pub finals: Vec<Vec<f32>>,
    /// The plan's buffers.
    pub buffers: Vec<Vec<f32>>,
}

/// The copies of one parameter a model makes when its weights are bound (each empty when no
/// product needs it).
#[derive(Default)]
pub struct Packed {
    /// `Wᵀ`, for `gemm` where the plan reads the weight as `(in, out)`.
    pub wt: Vec<f32>,
    /// `x · Wᵀ`'s 32-output panels (`rnn_ir::panels`), for a step's rows.
    pub panels: Vec<f32>,
    /// `d · W`'s panels (`W` read as `(in, out)`), for a backward step's rows.
    pub panels_t: Vec<f32>,
}

/// Feeds of one run.
pub struct Inputs<'a> {
    /// The cell's parameters, in order.
    pub params: &'a [Vec<f32>],
    /// The step input over all `T·B` rows.
    pub x: &'a [f32],
    /// The output's gradient over all `T·B` rows (backward).
    pub dy: Option<&'a [f32]>,
    /// The forward pass's buffers (backward).
    pub tape: Option<&'a [Vec<f32>]>,
    /// The carried values before the first step (zeros when empty).
    pub initial: Vec<Vec<f32>>,
    /// Per parameter, its packed copies.
    pub packed: &'a [Packed],
    /// The plan's bound buffers, computed when the weights were bound ([`bound_values`]; empty
    /// for the other buffers).
    pub bound: &'a [Vec<f32>],
    /// The forward (training) plan's bound buffers, for a backward run.
    pub fwd_bound: &'a [Vec<f32>],
    /// Whether the plan's buffers outlive the run (a training forward's tape). When they do
    /// not, a per-step output that fills a buffer of its own is moved out, not copied.
    pub keep: bool,
}

/// The address of `v`'s elements, null when it has none.
fn nonempty(v: &[f32]) -> *mut f32 {
    if v.is_empty() {
        std::ptr::null_mut()
    } else {
        v.as_ptr() as *mut f32
    }
}

/// Runs `plan` (lowered from `body`) over `seq`.
pub fn run(
    plan: &Plan,
    body: Body<'_>,
    seq: Seq<'_>,
    inputs: Inputs<'_>,
    reverse: bool,
) -> RunResult {
    let g = &body.s.graph;
    let p = body.plan;
    let (steps, batch, lengths) = (seq.steps, seq.batch, seq.lengths);
    let states = g.states();
    // A run whose rows are packed by decreasing length runs each step on the rows still
    // running only (`Lowered::step_shift`), forward and backward: a finished row's state (or
    // its gradient) is held as before, and it would contribute nothing to the step's
    // gradients. The buffers the steps then write in part start at zero, so that nothing
    // unwritten is read as a number (a backward pass reads the forward pass's, and sums over
    // all the rows after the loop).
    let shift = plan.lowered.step_shift.as_deref();
    let shrinks = shift.is_some() && lengths.iter().take(batch).any(|&len| len < steps);
    // The buffers a shrunk step writes at the step's rows: those start at zero, and after a
    // forward pass each finished row's positions past its length repeat its last step's
    // values, so that what runs over all the rows after the loop (here and in the backward
    // pass, which reads them as the tape) reads the numbers of a real step, never 0/0.
    let partial: Vec<u32> = match shift {
        Some(shift) if shrinks => plan
            .lowered
            .slots
            .iter()
            .zip(shift)
            .filter_map(|(slot, &s)| match *slot {
                Slot::Buf(b) if s > 0 && p.buffers[b as usize].storage != Storage::Bound => Some(b),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut bufs: Vec<Vec<f32>> = p
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let rows = match b.rows {
                rnn_ir::plan::Rows::Once => 1,
                rnn_ir::plan::Rows::Step => batch,
                rnn_ir::plan::Rows::All => steps * batch,
            };
            if b.storage == Storage::Bound {
                // The model's, computed once (`inputs.bound`).
                Vec::new()
            } else if p.written_whole(g, i) && !partial.contains(&(i as u32)) {
                scratch(rows * b.width)
            } else {
                zeros(rows * b.width)
            }
        })
        .collect();
    let mut initial = inputs.initial.into_iter();
    let mut cur: Vec<Vec<f32>> = states
        .iter()
        .map(|(_, n)| {
            let v = initial.next().unwrap_or_default();
            if v.len() == batch * n {
                v
            } else {
                zeros(batch * n)
            }
        })
        .collect();
    let mut nxt: Vec<Vec<f32>> = states.iter().map(|(_, n)| zeros(batch * n)).collect();
    let mut hold: Vec<Vec<f32>> = states.iter().map(|(_, n)| zeros(batch * n)).collect();
    let mut sums: Vec<Vec<f32>> = p
        .step_sums
        .iter()
        .map(|&(_, v)| zeros(g.shape(v).row_len()))
        .collect();
    let mut tmps: Vec<Vec<f32>> = plan
        .lowered
        .tmps
        .iter()
        .map(|t| zeros(t.rows.count(steps, batch) * t.width))
        .collect();
    let slots = &plan.lowered.slots;
    let mut table: Vec<*mut f32> = vec![std::ptr::null_mut(); slots.len()];
    // Every address but the carried slots' (which swap at each step).
    let bound = |b: u32| p.buffers[b as usize].storage == Storage::Bound;
    let fwd_bound = |b: u32| {
        body.forward
            .is_some_and(|(_, fplan)| fplan.buffers[b as usize].storage == Storage::Bound)
    };
    let fill = |table: &mut Vec<*mut f32>,
                bufs: &mut Vec<Vec<f32>>,
                cur: &mut Vec<Vec<f32>>,
                nxt: &mut Vec<Vec<f32>>,
                sums: &mut Vec<Vec<f32>>,
                tmps: &mut Vec<Vec<f32>>| {
        for (i, slot) in slots.iter().enumerate() {
            table[i] = match *slot {
                // Bound buffers are only read: the functions that run per sequence do not
                // write them.
                Slot::Buf(b) if bound(b) => inputs.bound[b as usize].as_ptr() as *mut f32,
                Slot::Buf(b) => bufs[b as usize].as_mut_ptr(),
                Slot::Fwd(b) => {
                    if fwd_bound(b) {
                        inputs.fwd_bound[b as usize].as_ptr() as *mut f32
                    } else {
                        inputs.tape.expect("a backward run has its tape")[b as usize].as_ptr()
                            as *mut f32
                    }
                }
                Slot::Param(q) => inputs.params[q as usize].as_ptr() as *mut f32,
                Slot::Input => inputs.x.as_ptr() as *mut f32,
                Slot::Dy => inputs
                    .dy
                    .expect("a backward run has the output's gradient")
                    .as_ptr() as *mut f32,
                Slot::Cur(k) => cur[k as usize].as_mut_ptr(),
                Slot::Nxt(k) => nxt[k as usize].as_mut_ptr(),
                Slot::Sum(s) => sums[s as usize].as_mut_ptr(),
                Slot::Tmp(j) => tmps[j as usize].as_mut_ptr(),
                Slot::Wt(q) => nonempty(&inputs.packed[q as usize].wt),
                Slot::Panels(q) => nonempty(&inputs.packed[q as usize].panels),
                Slot::PanelsT(q) => nonempty(&inputs.packed[q as usize].panels_t),
            };
        }
    };
    fill(
        &mut table, &mut bufs, &mut cur, &mut nxt, &mut sums, &mut tmps,
    );
    // SAFETY: every slot the functions name points at a buffer sized by the plan for these
    // `steps` and `batch`: this function is private to the crate, and its callers (the driver's
    // executor, which runs after the driver's checks, and `JitModel::step`, which checks the
    // sizes itself) pass inputs, states and tapes of those sizes.
    unsafe { (plan.pre)(table.as_ptr(), steps, batch, 0) };
    let mut shifted: Vec<*mut f32> = if shrinks { table.clone() } else { Vec::new() };
    for i in 0..steps {
        let t = if reverse { steps - 1 - i } else { i };
        let partial = driver::any_finished(t, lengths);
        if partial {
            for (k, &(_, n)) in states.iter().enumerate() {
                let zero = reverse.then_some(0.0);
                driver::hold_finished(t, lengths, n, &mut cur[k], &mut hold[k], zero);
            }
        }
        for (k, tape) in p.carried_tape.iter().enumerate() {
            if let Some(tape) = tape {
                let n = states[k].1;
                bufs[tape.0 as usize][t * batch * n..(t + 1) * batch * n].copy_from_slice(&cur[k]);
            }
        }
        for (j, slot) in slots.iter().enumerate() {
            match *slot {
                Slot::Cur(k) => table[j] = cur[k as usize].as_mut_ptr(),
                Slot::Nxt(k) => table[j] = nxt[k as usize].as_mut_ptr(),
                _ => {}
            }
        }
        let rows = match shift {
            Some(shift) if partial => {
                let running = running_prefix(t, lengths, batch);
                if running < batch {
                    for (j, (&p, &s)) in table.iter().zip(shift).enumerate() {
                        shifted[j] = p.wrapping_add(t * batch * s);
                    }
                }
                running
            }
            _ => batch,
        };
        if rows == batch {
            // SAFETY: as above.
            unsafe { (plan.step)(table.as_ptr(), steps, batch, t) };
        } else if rows > 0 {
            // SAFETY: as above, on the first `rows` rows: every address the step reads or
            // writes at the step's rows is moved to step `t`'s block (the rows' stride times
            // `t · batch`), and with `t = 0` and `batch = rows` it covers rows `0..rows` of
            // that block, which lie inside it.
            unsafe { (plan.step)(shifted.as_ptr(), steps, rows, 0) };
        }
        if partial {
            for (k, &(_, n)) in states.iter().enumerate() {
                driver::restore_finished(t, lengths, n, &mut nxt[k], &hold[k]);
            }
        }
        std::mem::swap(&mut cur, &mut nxt);
    }
    for (j, slot) in slots.iter().enumerate() {
        match *slot {
            Slot::Cur(k) => table[j] = cur[k as usize].as_mut_ptr(),
            Slot::Nxt(k) => table[j] = nxt[k as usize].as_mut_ptr(),
            _ => {}
        }
    }
    if body.forward.is_none() {
        for &b in &partial {
            let buf = &mut bufs[b as usize];
            let width = p.buffers[b as usize].width;
            if buf.len() != steps * batch * width {
                continue;
            }
            for (r, &len) in lengths.iter().enumerate().take(batch) {
                let last = ((len.max(1) - 1) * batch + r) * width;
                for t in len..steps {
                    buf.copy_within(last..last + width, (t * batch + r) * width);
                }
            }
        }
    }
    // SAFETY: as above.
    unsafe { (plan.post)(table.as_ptr(), steps, batch, 0) };

    // The results. A per-step output that is a whole buffer of all rows, every row of which was
    // computed, leaves with the caller unless the buffers are the tape.
    let full = lengths.iter().take(batch).all(|&len| len == steps);
    let mut moved: Vec<(OutRole, Vec<f32>)> = Vec::new();
    for o in g.outputs() {
        let a = body.access(o.value, false);
        if let (true, false, true, Slot::Buf(b)) = (per_step(o.role), inputs.keep, full, a.slot)
            && a.offset == 0
            && a.stride == a.width
            && a.rows == RowSel::All
            && bufs[b as usize].len() == steps * batch * a.width
            && !moved.iter().any(|(role, _)| *role == o.role)
        {
            moved.push((o.role, std::mem::take(&mut bufs[b as usize])));
        }
    }
    let root = |a: &Access| -> &[f32] {
        match a.slot {
            Slot::Buf(b) if bound(b) => &inputs.bound[b as usize],
            Slot::Buf(b) => &bufs[b as usize],
            Slot::Cur(k) => &cur[k as usize],
            Slot::Nxt(k) => &nxt[k as usize],
            Slot::Param(q) => &inputs.params[q as usize],
            Slot::Input => inputs.x,
            Slot::Dy => inputs.dy.unwrap_or(&[]),
            Slot::Sum(s) => &sums[s as usize],
            Slot::Tmp(j) => &tmps[j as usize],
            Slot::Wt(q) => &inputs.packed[q as usize].wt,
            Slot::Panels(q) => &inputs.packed[q as usize].panels,
            Slot::PanelsT(q) => &inputs.packed[q as usize].panels_t,
            Slot::Fwd(b) => {
                if fwd_bound(b) {
                    &inputs.fwd_bound[b as usize]
                } else {
                    &inputs.tape.unwrap_or(&[])[b as usize]
                }
            }
        }
    };
    let mut per_step_out = Vec::new();
    let mut grads = Vec::new();
    for o in g.outputs() {
        if let Some(i) = moved.iter().position(|(role, _)| *role == o.role) {
            per_step_out.push(moved.swap_remove(i));
        } else if per_step(o.role) {
            let a = body.access(o.value, false);
            let n = a.width;
            let data = root(&a);
            let mut y = zeros(steps * batch * n);
            for t in 0..steps {
                for (b, &len) in lengths.iter().enumerate().take(batch) {
                    if t < len {
                        let row = t * batch + b;
                        let start = a.start(row, 0, batch);
                        y[row * n..(row + 1) * n].copy_from_slice(&data[start..start + n]);
                    }
                }
            }
            per_step_out.push((o.role, y));
        } else if let OutRole::ParamGrad(q) = o.role {
            let value = match p.step_sums.iter().position(|&(s, _)| s == q) {
                Some(i) => sums[i].clone(),
                None => {
                    let a = body.access(o.value, false);
                    root(&a)[a.offset..a.offset + a.width].to_vec()
                }
            };
            grads.push((q as usize, value));
        }
    }
    recycle(hold.into_iter().chain(nxt).chain(tmps).chain(sums));
    RunResult {
        per_step: per_step_out,
        grads,
        finals: cur,
        buffers: bufs,
    }
}

/// The number of leading rows still running at step `t` when every row after them has ended
/// (a batch packed by decreasing length); `batch` when a running row follows an ended one.
fn running_prefix(t: usize, lengths: &[usize], batch: usize) -> usize {
    if lengths.len() < batch {
        return batch;
    }
    let lengths = &lengths[..batch];
    let running = lengths.iter().take_while(|&&len| len > t).count();
    if lengths[running..].iter().all(|&len| len <= t) {
        running
    } else {
        batch
    }
}

/// The bound values of `plan` (lowered from `body`): its buffers of [`Storage::Bound`] (empty
/// for the others), computed from the parameters (and, for a backward plan, the forward
/// training plan's bound buffers `fwd_bound`) by the plan's bound function. A model runs this
/// once, when its weights are bound; every run then reads them.
pub fn bound_values(
    plan: &Plan,
    body: Body<'_>,
    params: &[Vec<f32>],
    packed: &[Packed],
    fwd_bound: &[Vec<f32>],
) -> Vec<Vec<f32>> {
    let p = body.plan;
    let mut bufs: Vec<Vec<f32>> = p
        .buffers
        .iter()
        .map(|b| {
            if b.storage == Storage::Bound {
                vec![0.0; b.width]
            } else {
                Vec::new()
            }
        })
        .collect();
    // Bound values are unbatched: a scratch copy of an argument has one row.
    let mut tmps: Vec<Vec<f32>> = plan
        .lowered
        .tmps
        .iter()
        .map(|t| vec![0.0; t.rows.count(1, 1) * t.width])
        .collect();
    let table: Vec<*mut f32> = plan
        .lowered
        .slots
        .iter()
        .map(|slot| match *slot {
            Slot::Buf(b) if bufs[b as usize].is_empty() => std::ptr::null_mut(),
            Slot::Buf(b) => bufs[b as usize].as_mut_ptr(),
            Slot::Fwd(b) => fwd_bound
                .get(b as usize)
                .map_or(std::ptr::null_mut(), |v| nonempty(v)),
            Slot::Param(q) => params[q as usize].as_ptr() as *mut f32,
            Slot::Tmp(j) => tmps[j as usize].as_mut_ptr(),
            Slot::Wt(q) => nonempty(&packed[q as usize].wt),
            Slot::Panels(q) => nonempty(&packed[q as usize].panels),
            Slot::PanelsT(q) => nonempty(&packed[q as usize].panels_t),
            // Per-sequence slots: a bound value reads none of them.
            Slot::Input | Slot::Dy | Slot::Cur(_) | Slot::Nxt(_) | Slot::Sum(_) => {
                std::ptr::null_mut()
            }
        })
        .collect();
    // SAFETY: the bound function reads parameters (sized by the weights' check at bind), the
    // packed copies and the forward plan's bound buffers, and writes this plan's bound buffers
    // and its scratch copies, all sized by the plan; `steps` and `batch` of 1 size nothing it
    // touches (bound values are unbatched).
    unsafe { (plan.bound)(table.as_ptr(), 1, 1, 0) };
    drop(tmps);
    bufs
}

/// A forward run's result as the driver takes it.
pub fn forward_result(r: RunResult, training: bool) -> Forward<f32, Vec<Vec<f32>>> {
    let output = r
        .per_step
        .into_iter()
        .find(|(role, _)| *role == OutRole::Output)
        .map(|(_, y)| y)
        .unwrap_or_default();
    let tape = if training {
        Some(r.buffers)
    } else {
        recycle(r.buffers);
        None
    };
    Forward {
        output,
        finals: r.finals,
        tape,
    }
}

/// A backward run's result as the driver takes it (zeros for what the graph does not reach).
pub fn backward_result(r: RunResult, param_sizes: &[usize], input_len: usize) -> Backward<f32> {
    recycle(r.buffers);
    let mut param_grads: Vec<Vec<f32>> = param_sizes.iter().map(|&n| zeros(n)).collect();
    for (q, g) in r.grads {
        param_grads[q] = g;
    }
    let input_grad = r
        .per_step
        .into_iter()
        .find(|(role, _)| *role == OutRole::InputGrad)
        .map(|(_, y)| y)
        .unwrap_or_else(|| zeros(input_len));
    Backward {
        input_grad,
        initial_grads: r.finals,
        param_grads,
    }
}

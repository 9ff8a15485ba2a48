//! The interpreter: runs a [`Program`] forward and backward over a batch of sequences. It is the
//! reference every other backend is tested against, so it is written to be obviously right:
//! each op is a plain loop (products go to the `gemm` crate), and the time loop follows the
//! schedule literally.
//!
//! Three levels:
//! - [`eval_op`]: one op on buffers.
//! - [`run_sequence`]: one scheduled step graph over `T` steps: the Pre values once over all `T·B`
//!   rows, the Loop values step by step (forwards or backwards in time) with the carried values
//!   fed from one step to the next, the Post values once over the rows the loop recorded. Rows
//!   past a sequence's length keep their carried value and output zero. Forward and backward
//!   graphs both run through it.
//! - [`Program::run`]: layers, directions, lengths, initial states, batch-first layout, and the
//!   backward pass in reverse order of all that.

use crate::error::{Error, Result};
use crate::graph::{Graph, Op, OutRole, Role, Shape, Value};
use crate::passes::hoist::Phase;
use crate::program::{Program, Scheduled};
use crate::spec::ModelSpec;
use crate::tensor::{MatRef, Real, Tensor, matmul};
use crate::weights::Weights;
use std::borrow::Cow;
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

fn buf_len(shape: Shape, rows: usize) -> usize {
    if shape.is_batched() {
        rows * shape.row_len()
    } else {
        shape.row_len()
    }
}

fn binary<T: Real>(
    f: impl Fn(T, T) -> T,
    (sa, a): (Shape, &[T]),
    (sb, b): (Shape, &[T]),
    out: Shape,
) -> Vec<T> {
    match (sa == out, sb == out) {
        (true, true) => a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect(),
        (true, false) if sb == Shape::Scalar => a.iter().map(|&x| f(x, b[0])).collect(),
        (false, true) if sa == Shape::Scalar => b.iter().map(|&y| f(a[0], y)).collect(),
        (true, false) => a
            .chunks(b.len())
            .flat_map(|row| row.iter().zip(b).map(|(&x, &y)| f(x, y)))
            .collect(),
        (false, true) => b
            .chunks(a.len())
            .flat_map(|row| a.iter().zip(row).map(|(&x, &y)| f(x, y)))
            .collect(),
        (false, false) => unreachable!("verified shapes always broadcast to the result"),
    }
}

/// Evaluates value `v` of `g` on argument buffers `args`, with `rows` rows for batched values.
/// The buffers must have the sizes the shapes give (callers in this module make them so).
pub(crate) fn eval_op<T: Real>(
    g: &Graph,
    v: Value,
    args: &[&[T]],
    rows: usize,
    exec: &Exec,
) -> Vec<T> {
    let d = g.data(v);
    let shape = d.shape;
    let arg_shape = |i: usize| g.shape(d.args[i]);
    match d.op {
        Op::Input(_) => unreachable!("inputs are fed, not evaluated"),
        Op::Const(bits) => vec![T::from_f32(f32::from_bits(bits)); buf_len(shape, rows)],
        Op::MatMul => {
            let Shape::Matrix(o, i) = arg_shape(0) else {
                unreachable!()
            };
            let mut out = vec![T::ZERO; rows * o];
            let x = MatRef::row_major(args[1], rows, i);
            let w = MatRef::row_major(args[0], o, i).t();
            matmul(&mut out, x, w, false, exec.threads);
            out
        }
        Op::MatMulT => {
            let Shape::Matrix(o, i) = arg_shape(0) else {
                unreachable!()
            };
            let mut out = vec![T::ZERO; rows * i];
            let dy = MatRef::row_major(args[1], rows, o);
            let w = MatRef::row_major(args[0], o, i);
            matmul(&mut out, dy, w, false, exec.threads);
            out
        }
        Op::OuterSum => {
            let (o, i) = (arg_shape(0).row_len(), arg_shape(1).row_len());
            let mut out = vec![T::ZERO; o * i];
            let dy = MatRef::row_major(args[0], rows, o).t();
            let x = MatRef::row_major(args[1], rows, i);
            matmul(&mut out, dy, x, false, exec.threads);
            out
        }
        Op::SumRows => {
            let n = shape.row_len();
            let mut out = vec![T::ZERO; n];
            for row in args[0].chunks(n) {
                for (o, &x) in out.iter_mut().zip(row) {
                    *o += x;
                }
            }
            out
        }
        Op::Broadcast => {
            let mut out = Vec::with_capacity(rows * args[0].len());
            for _ in 0..rows {
                out.extend_from_slice(args[0]);
            }
            out
        }
        Op::Add => binary(
            |x, y| x + y,
            (arg_shape(0), args[0]),
            (arg_shape(1), args[1]),
            shape,
        ),
        Op::Sub => binary(
            |x, y| x - y,
            (arg_shape(0), args[0]),
            (arg_shape(1), args[1]),
            shape,
        ),
        Op::Mul => binary(
            |x, y| x * y,
            (arg_shape(0), args[0]),
            (arg_shape(1), args[1]),
            shape,
        ),
        Op::Neg => args[0].iter().map(|&x| -x).collect(),
        Op::Sigmoid => args[0].iter().map(|&x| x.sigmoid()).collect(),
        Op::Tanh => args[0].iter().map(|&x| x.tanh()).collect(),
        Op::Relu => args[0]
            .iter()
            .map(|&x| if x > T::ZERO { x } else { T::ZERO })
            .collect(),
        Op::Step => args[0]
            .iter()
            .map(|&x| if x > T::ZERO { T::ONE } else { T::ZERO })
            .collect(),
        Op::Slice { start, len } => {
            let (start, len) = (start as usize, len as usize);
            match arg_shape(0) {
                Shape::Batch(n) => args[0]
                    .chunks(n)
                    .flat_map(|row| row[start..start + len].iter().copied())
                    .collect(),
                Shape::Vector(_) => args[0][start..start + len].to_vec(),
                Shape::Matrix(_, c) => args[0][start * c..(start + len) * c].to_vec(),
                Shape::Scalar => unreachable!("verified: scalars are not sliced"),
            }
        }
        Op::Concat => {
            if shape.is_batched() {
                let widths: Vec<usize> = d.args.iter().map(|&a| g.shape(a).row_len()).collect();
                let mut out = Vec::with_capacity(rows * shape.row_len());
                for r in 0..rows {
                    for (a, &w) in args.iter().zip(&widths) {
                        out.extend_from_slice(&a[r * w..(r + 1) * w]);
                    }
                }
                out
            } else {
                args.concat()
            }
        }
    }
}

/// Evaluates a whole graph once on `rows` rows; `inputs` gives every input by role. Returns
/// every value's buffer, inputs borrowed (the interpreter of single steps, used by tests,
/// gradient checks and the Linear workload).
pub fn eval_graph<'a, T: Real>(
    g: &Graph,
    rows: usize,
    inputs: &'a HashMap<Role, Vec<T>>,
    exec: &Exec,
) -> Result<Vec<Cow<'a, [T]>>> {
    let mut vals: Vec<Cow<'a, [T]>> = Vec::with_capacity(g.len());
    for v in g.iter() {
        let d = g.data(v);
        let out = match d.op {
            Op::Input(role) => {
                let x = inputs.get(&role).ok_or_else(|| {
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
                Cow::Borrowed(x.as_slice())
            }
            _ => {
                let args: Vec<&[T]> = d.args.iter().map(|a| &*vals[a.index()]).collect();
                Cow::Owned(eval_op(g, v, &args, rows, exec))
            }
        };
        vals.push(out);
    }
    Ok(vals)
}

/// Where a non-carried input of a step graph comes from.
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
    /// Zero the carried inputs on rows past their length (the backward pass: nothing flows
    /// into steps a sequence does not have).
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

fn carried_in(role: Role) -> Option<usize> {
    match role {
        Role::State(k) | Role::Cotangent(OutRole::State(k)) => Some(k as usize),
        _ => None,
    }
}

fn carried_out(role: OutRole) -> Option<usize> {
    match role {
        OutRole::State(k) | OutRole::StateGrad(k) => Some(k as usize),
        _ => None,
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
        if carried_in(role).is_some() {
            continue;
        }
        let shape = g.shape(v);
        let (len, want) = match io.feeds.get(&role) {
            None => return bad(format!("no value given for input `{}`", g.role_name(role))),
            Some(Feed::Rows(x)) => (x.len(), buf_len(shape, io.steps * io.batch)),
            Some(Feed::Fixed(x)) => (x.len(), buf_len(shape, io.batch)),
        };
        if len != want {
            return bad(format!(
                "input `{}` has {len} elements, expected {want}",
                g.role_name(role)
            ));
        }
    }
    Ok(())
}

/// Runs scheduled step graph `s` over a sequence (see the module doc). Every argument is
/// checked first; see [`SeqIo`].
pub fn run_sequence<T: Real>(s: &Scheduled, io: SeqIo<'_, T>, exec: &Exec) -> Result<SeqResult<T>> {
    check_sequence(s, &io)?;
    let g = &s.graph;
    let (steps, batch) = (io.steps, io.batch);
    let all_rows = steps * batch;
    let phase = |v: Value| s.phases[v.index()];
    let active = |t: usize, b: usize| io.lengths.is_none_or(|l| t < l[b]);
    let feed = |role: Role| {
        io.feeds.get(&role).copied().ok_or_else(|| {
            Error::Argument(format!("no value given for input `{}`", g.role_name(role)))
        })
    };

    // Loop values recorded for later: read after the loop, kept, or per-step outputs.
    let mut record = vec![false; g.len()];
    for v in g.iter() {
        if phase(v) == Phase::Post {
            for &a in &g.data(v).args {
                record[a.index()] |= phase(a) == Phase::Loop;
            }
        }
    }
    for &v in io.keep {
        record[v.index()] |= phase(v) == Phase::Loop;
    }
    for o in &g.outputs {
        if matches!(o.role, OutRole::Output | OutRole::InputGrad) && phase(o.value) == Phase::Loop {
            record[o.value.index()] = true;
        }
    }

    // Values over all rows (Pre, Post); inputs borrow what was fed instead of copying it.
    let mut full: Vec<Option<Cow<'_, [T]>>> = vec![None; g.len()];
    for v in s.values(Phase::Pre) {
        let d = g.data(v);
        let out = match d.op {
            Op::Input(role) => match feed(role)? {
                Feed::Fixed(x) | Feed::Rows(x) => Cow::Borrowed(x),
            },
            _ => {
                let args: Vec<&[T]> = d
                    .args
                    .iter()
                    .map(|a| full[a.index()].as_deref().unwrap())
                    .collect();
                Cow::Owned(eval_op(g, v, &args, all_rows, exec))
            }
        };
        full[v.index()] = Some(out);
    }

    let rows_at = |buf: &[T], shape: Shape, t: usize| -> std::ops::Range<usize> {
        if shape.is_batched() {
            let n = shape.row_len() * batch;
            t * n..(t + 1) * n
        } else {
            0..buf.len()
        }
    };
    let mut tape: Vec<Option<Vec<T>>> = vec![None; g.len()];
    for v in g.iter().filter(|&v| record[v.index()]) {
        tape[v.index()] = Some(vec![T::ZERO; buf_len(g.shape(v), all_rows)]);
    }
    let mut sums: BTreeMap<OutRole, Vec<T>> = BTreeMap::new();
    let mut carried = io.carried;
    let loop_values = s.values(Phase::Loop);
    let mut local: Vec<Option<Cow<'_, [T]>>> = vec![None; g.len()];
    let order: Box<dyn Iterator<Item = usize>> = if io.reverse {
        Box::new((0..steps).rev())
    } else {
        Box::new(0..steps)
    };
    for t in order {
        for &v in &loop_values {
            let d = g.data(v);
            let out = match d.op {
                Op::Input(role) => match carried_in(role) {
                    Some(k) => {
                        let mut c = carried[k].clone();
                        if io.zero_inactive_carried {
                            let n = d.shape.row_len();
                            for b in (0..batch).filter(|&b| !active(t, b)) {
                                c[b * n..(b + 1) * n].fill(T::ZERO);
                            }
                        }
                        Cow::Owned(c)
                    }
                    None => match feed(role)? {
                        Feed::Fixed(x) => Cow::Borrowed(x),
                        Feed::Rows(x) => Cow::Borrowed(&x[rows_at(x, d.shape, t)]),
                    },
                },
                _ => {
                    let args: Vec<&[T]> = d
                        .args
                        .iter()
                        .map(|&a| match phase(a) {
                            Phase::Pre => {
                                let buf = full[a.index()].as_deref().unwrap();
                                &buf[rows_at(buf, g.shape(a), t)]
                            }
                            _ => local[a.index()].as_deref().unwrap(),
                        })
                        .collect();
                    Cow::Owned(eval_op(g, v, &args, batch, exec))
                }
            };
            local[v.index()] = Some(out);
        }
        let at_step = |v: Value| -> &[T] {
            match phase(v) {
                Phase::Loop => local[v.index()].as_deref().unwrap(),
                _ => {
                    let buf = full[v.index()].as_deref().unwrap();
                    &buf[rows_at(buf, g.shape(v), t)]
                }
            }
        };
        let mut next = Vec::new();
        for o in &g.outputs {
            if let Some(k) = carried_out(o.role) {
                let mut new = at_step(o.value).to_vec();
                let n = g.shape(o.value).row_len();
                for b in (0..batch).filter(|&b| !active(t, b)) {
                    new[b * n..(b + 1) * n].copy_from_slice(&carried[k][b * n..(b + 1) * n]);
                }
                next.push((k, new));
            } else if let OutRole::ParamGrad(_) = o.role
                && phase(o.value) == Phase::Loop
            {
                let x = at_step(o.value);
                let sum = sums.entry(o.role).or_insert_with(|| vec![T::ZERO; x.len()]);
                for (s, &x) in sum.iter_mut().zip(x) {
                    *s += x;
                }
            }
        }
        for (k, new) in next {
            carried[k] = new;
        }
        for &v in &loop_values {
            if let Some(buf) = tape[v.index()].as_mut() {
                let range = rows_at(buf, g.shape(v), t);
                buf[range].copy_from_slice(local[v.index()].as_deref().unwrap());
            }
        }
    }

    for v in s.values(Phase::Post) {
        let d = g.data(v);
        let args: Vec<&[T]> = d
            .args
            .iter()
            .map(|&a| match phase(a) {
                Phase::Loop => tape[a.index()].as_deref().unwrap(),
                _ => full[a.index()].as_deref().unwrap(),
            })
            .collect();
        let out = eval_op(g, v, &args, all_rows, exec);
        full[v.index()] = Some(Cow::Owned(out));
    }

    let whole = |v: Value| -> Vec<T> {
        match phase(v) {
            Phase::Loop => tape[v.index()]
                .clone()
                .expect("loop values read after the loop are recorded"),
            _ => full[v.index()].as_deref().unwrap().to_vec(),
        }
    };
    let mut outputs = BTreeMap::new();
    for o in &g.outputs {
        match o.role {
            OutRole::Output | OutRole::InputGrad => {
                let mut y = whole(o.value);
                let n = g.shape(o.value).row_len();
                for t in 0..steps {
                    for b in (0..batch).filter(|&b| !active(t, b)) {
                        let r = t * batch + b;
                        y[r * n..(r + 1) * n].fill(T::ZERO);
                    }
                }
                outputs.insert(o.role, y);
            }
            OutRole::ParamGrad(_) => {
                let x = match sums.remove(&o.role) {
                    Some(x) => x,
                    None => whole(o.value),
                };
                outputs.insert(o.role, x);
            }
            OutRole::State(_) | OutRole::StateGrad(_) => {}
        }
    }
    let kept = io.keep.iter().map(|&v| (v, whole(v))).collect();
    Ok(SeqResult {
        carried,
        outputs,
        kept,
    })
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

/// Checks a request against the model and returns `(T, B, lengths)`.
fn check_request(p: &Program, req: &Request) -> Result<(usize, usize, Vec<usize>)> {
    let spec = &p.spec;
    let x = req
        .input
        .ok_or_else(|| Error::Argument("no input given".into()))?;
    let layout = if spec.batch_first {
        "(batch, time, features)"
    } else {
        "(time, batch, features)"
    };
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
    let ld = spec.num_layers * spec.directions();
    let states = p.states();
    for list in [&req.initial_states, &req.grad_final_states] {
        if list.iter().skip(states.len()).any(Option::is_some) {
            let names: Vec<&str> = states.iter().map(|s| s.0.as_str()).collect();
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
            let name = format!("{}0", states[k].0);
            let want = vec![ld, b, states[k].1];
            if s.shape != want {
                return Err(Error::TensorShape {
                    name,
                    expected: want,
                    found: s.shape.clone(),
                });
            }
            if let Some((index, found)) = s.first_non_finite() {
                return Err(Error::NonFinite { name, index, found });
            }
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
        let want = if spec.batch_first {
            vec![b, t, spec.directions() * spec.output_size()]
        } else {
            vec![t, b, spec.directions() * spec.output_size()]
        };
        if gy.shape != want {
            return Err(Error::TensorShape {
                name: "grad_output".into(),
                expected: want,
                found: gy.shape.clone(),
            });
        }
        if let Some((index, found)) = gy.first_non_finite() {
            return Err(Error::NonFinite {
                name: "grad_output".into(),
                index,
                found,
            });
        }
    }
    for (k, s) in req.grad_final_states.iter().enumerate() {
        if let Some(s) = s {
            let name = format!("grad_{}_n", states[k].0);
            let want = vec![ld, b, states[k].1];
            if s.shape != want {
                return Err(Error::TensorShape {
                    name,
                    expected: want,
                    found: s.shape.clone(),
                });
            }
            if let Some((index, found)) = s.first_non_finite() {
                return Err(Error::NonFinite { name, index, found });
            }
        }
    }
    Ok((t, b, lengths))
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

/// A program with its weights checked and converted to precision `T`: compile once, bind once,
/// run many times (one call per time step when streaming).
#[derive(Clone, Debug)]
pub struct Bound<'p, T> {
    program: &'p Program,
    params: BTreeMap<String, Vec<T>>,
}

impl Program {
    /// Checks `weights` against the program (every parameter present, right shape, finite,
    /// nothing else) and binds them.
    pub fn bind<T: Real>(&self, weights: &Weights) -> Result<Bound<'_, T>> {
        weights.check(self)?;
        let params = weights
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), to_real(&v.data)))
            .collect();
        Ok(Bound {
            program: self,
            params,
        })
    }

    /// Binds `weights` and runs `req` once, in precision `T` (`f32` as PyTorch does, `f64` for
    /// gradient checks). See [`Bound::run`].
    pub fn run<T: Real>(&self, weights: &Weights, req: &Request, exec: &Exec) -> Result<Response> {
        self.bind::<T>(weights)?.run(req, exec)
    }
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

impl<T: Real> Bound<'_, T> {
    /// Runs the model on `req`; every argument is checked first (see [`Request`]).
    pub fn run(&self, req: &Request, exec: &Exec) -> Result<Response> {
        Ok(self.run_raw(req, exec)?.response)
    }

    /// [`Bound::run`], also returning the output and final states unrounded (gradient checks
    /// take finite differences of them in `f64`).
    pub fn run_raw(&self, req: &Request, exec: &Exec) -> Result<RawResponse<T>> {
        let program = self.program;
        let param_data = &self.params;
        let (steps, batch, lengths) = check_request(program, req)?;
        let spec = &program.spec;
        let dirs = spec.directions();
        let out_size = spec.output_size();
        let states = program.states().to_vec();
        let x = req.input.expect("checked");
        let mut layer_in: Vec<T> = to_real(&x.data);
        if spec.batch_first {
            layer_in = swap_tb(&layer_in, batch, steps, spec.input_size);
        }
        let packed = req.lengths.is_some();
        let zero_past = |buf: &mut [T], n: usize| {
            if packed {
                for t in 0..steps {
                    for b in (0..batch).filter(|&b| t >= lengths[b]) {
                        let r = t * batch + b;
                        buf[r * n..(r + 1) * n].fill(T::ZERO);
                    }
                }
            }
        };
        zero_past(&mut layer_in, spec.input_size);
        let want_grads = req.grad_output.is_some();

        // Forward, layer by layer; both directions of a layer read the same input.
        let mut finals: Vec<Vec<Vec<T>>> = vec![Vec::new(); states.len()];
        let mut tapes: Vec<HashMap<Value, Vec<T>>> = Vec::new();
        for (layer, cell) in program.layers.iter().enumerate() {
            let in_size = cell.input_size;
            let mut outs = Vec::new();
            for dir in 0..dirs {
                let xs: Cow<'_, [T]> = if dir == 0 {
                    Cow::Borrowed(&layer_in)
                } else {
                    Cow::Owned(reverse_within(&layer_in, batch, in_size, &lengths))
                };
                let g = &cell.forward.graph;
                let mut feeds = HashMap::new();
                feeds.insert(Role::Input, Feed::Rows(&xs));
                let suffix = ModelSpec::param_suffix(layer, dir);
                for (p, info) in g.params.iter().enumerate() {
                    feeds.insert(
                        Role::Param(p as u32),
                        Feed::Fixed(param_data[&format!("{}{suffix}", info.name)].as_slice()),
                    );
                }
                let carried = initial(
                    &states,
                    req.initial_states.as_slice(),
                    layer * dirs + dir,
                    batch,
                );
                let keep: &[Value] = if want_grads { &cell.saved } else { &[] };
                let io = SeqIo {
                    steps,
                    batch,
                    reverse: false,
                    lengths: Some(&lengths),
                    feeds,
                    carried,
                    zero_inactive_carried: false,
                    keep,
                };
                let r = run_sequence(&cell.forward, io, exec)?;
                let mut y = r.outputs.get(&OutRole::Output).cloned().unwrap_or_default();
                if dir == 1 {
                    y = reverse_within(&y, batch, out_size, &lengths);
                }
                outs.push(y);
                for (k, c) in r.carried.into_iter().enumerate() {
                    finals[k].push(c);
                }
                tapes.push(r.kept);
            }
            layer_in = if dirs == 1 {
                outs.pop().unwrap()
            } else {
                let mut joined = Vec::with_capacity(outs[0].len() * 2);
                for r in 0..steps * batch {
                    joined.extend_from_slice(&outs[0][r * out_size..(r + 1) * out_size]);
                    joined.extend_from_slice(&outs[1][r * out_size..(r + 1) * out_size]);
                }
                joined
            };
        }
        let width = dirs * out_size;
        let mut output = layer_in;
        if spec.batch_first {
            output = swap_tb(&output, steps, batch, width);
        }
        let out_shape = if spec.batch_first {
            vec![batch, steps, width]
        } else {
            vec![steps, batch, width]
        };
        let final_states: Vec<Tensor> = finals
            .iter()
            .zip(&states)
            .map(|(f, (_, n))| Tensor {
                shape: vec![f.len(), batch, *n],
                data: f.iter().flat_map(|v| to_f32(v)).collect(),
            })
            .collect();
        let raw_output = output;
        let raw_finals: Vec<Vec<T>> = finals.iter().map(|f| f.concat()).collect();
        let output = Tensor {
            shape: out_shape,
            data: to_f32(&raw_output),
        };
        let raw = |response| RawResponse {
            response,
            output: raw_output,
            final_states: raw_finals,
        };
        let Some(gy) = req.grad_output else {
            return Ok(raw(Response {
                output,
                final_states,
                grads: None,
            }));
        };

        // Backward, last layer first; each direction's input gradient adds into the layer's.
        let mut d_out: Vec<T> = to_real(&gy.data);
        if spec.batch_first {
            d_out = swap_tb(&d_out, batch, steps, width);
        }
        zero_past(&mut d_out, width);
        let mut params = BTreeMap::new();
        let mut d_initial: Vec<Vec<Vec<T>>> =
            vec![vec![Vec::new(); spec.num_layers * dirs]; states.len()];
        for (layer, cell) in program.layers.iter().enumerate().rev() {
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
                let g = &cell.backward.graph;
                let tape = &tapes[index];
                let suffix = ModelSpec::param_suffix(layer, dir);
                let mut feeds = HashMap::new();
                for v in g.iter() {
                    if let Op::Input(role) = g.data(v).op {
                        let f = match role {
                            Role::Param(p) => Feed::Fixed(
                                param_data[&format!("{}{suffix}", g.params[p as usize].name)]
                                    .as_slice(),
                            ),
                            Role::Saved(s) => {
                                let buf = tape[&s].as_slice();
                                if cell.forward.graph.shape(s).is_batched() {
                                    Feed::Rows(buf)
                                } else {
                                    Feed::Fixed(buf)
                                }
                            }
                            Role::Cotangent(OutRole::Output) => Feed::Rows(dy.as_slice()),
                            _ => continue,
                        };
                        feeds.insert(role, f);
                    }
                }
                let carried = initial(&states, req.grad_final_states.as_slice(), index, batch);
                let io = SeqIo {
                    steps,
                    batch,
                    reverse: true,
                    lengths: Some(&lengths),
                    feeds,
                    carried,
                    zero_inactive_carried: true,
                    keep: &[],
                };
                let mut r = run_sequence(&cell.backward, io, exec)?;
                for (p, info) in g.params.iter().enumerate() {
                    let grad = r
                        .outputs
                        .remove(&OutRole::ParamGrad(p as u32))
                        .unwrap_or_default();
                    let name = format!("{}{suffix}", info.name);
                    let shape = crate::program::shape_dims(info.shape);
                    params.insert(
                        name,
                        Tensor {
                            shape,
                            data: to_f32(&grad),
                        },
                    );
                }
                let mut dx = r
                    .outputs
                    .remove(&OutRole::InputGrad)
                    .unwrap_or_else(|| vec![T::ZERO; d_in.len()]);
                if dir == 1 {
                    dx = reverse_within(&dx, batch, in_size, &lengths);
                }
                for (a, b) in d_in.iter_mut().zip(&dx) {
                    *a += *b;
                }
                for (k, c) in r.carried.into_iter().enumerate() {
                    d_initial[k][index] = c;
                }
            }
            d_out = d_in;
        }
        if spec.batch_first {
            d_out = swap_tb(&d_out, steps, batch, spec.input_size);
        }
        let initial_states = d_initial
            .iter()
            .zip(&states)
            .map(|(d, (_, n))| Tensor {
                shape: vec![d.len(), batch, *n],
                data: d.iter().flat_map(|v| to_f32(v)).collect(),
            })
            .collect();
        let grads = Gradients {
            input: Tensor {
                shape: x.shape.clone(),
                data: to_f32(&d_out),
            },
            initial_states,
            params,
        };
        Ok(raw(Response {
            output,
            final_states,
            grads: Some(grads),
        }))
    }
}

/// The carried values for `(layer, direction)` number `index`: slices of the given
/// `(L·D, B, n)` tensors, zeros where none is given.
fn initial<T: Real>(
    states: &[(String, usize)],
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

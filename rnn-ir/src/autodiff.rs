//! Reverse-mode automatic differentiation: a forward step graph in, its backward step graph out.
//!
//! The backward graph takes
//! - `Cotangent(role)` for every output of the forward graph (the gradient flowing into the new
//!   state from the next step, or into `y_t` from the loss),
//! - `Saved(v)` for every forward value `v` a local derivative needs (the program keeps these
//!   from the forward pass; parameters and constants are referred to directly),
//!
//! and returns `ParamGrad(p)` for every parameter (this step's contribution; the program sums
//! them over time), `InputGrad` and `StateGrad(k)` (the gradient carried to the previous step).
//! BPTT is this graph run backwards in time with the `StateGrad` outputs fed to the next call's
//! `Cotangent(State)` inputs.
//!
//! The walk is micrograd's: visit the forward values in reverse topological order (the reverse of
//! the arena), and for each value with a gradient add each argument's local contribution into that
//! argument's gradient. Values that do not depend on any input (constants) get no gradient, nor
//! do token ids (`Shape::Tokens`): a graph whose step input is ids has no `InputGrad`.

use crate::graph::IrError;
use crate::graph::{Graph, Op, OutRole, Role, Shape, Value};
use std::collections::HashMap;

struct Builder<'f> {
    f: &'f Graph,
    b: Graph,
    saved: HashMap<Value, Value>,
    adj: Vec<Option<Value>>,
    /// Gradients of slices of a value, `(start, len, gradient)`, assembled when it is visited.
    slices: Vec<Vec<(usize, usize, Value)>>,
}

impl Builder<'_> {
    /// The backward graph's handle on forward value `v`.
    fn saved(&mut self, v: Value) -> Value {
        if let Some(&s) = self.saved.get(&v) {
            return s;
        }
        let d = self.f.data(v);
        let s = match d.op {
            Op::Input(Role::Param(p)) => {
                self.b.input_value(Role::Param(p), d.shape, d.name.clone())
            }
            Op::Const(bits) => self.b.constant(f32::from_bits(bits), d.shape),
            _ => self.b.input_value(Role::Saved(v), d.shape, d.name.clone()),
        };
        self.saved.insert(v, s);
        s
    }

    fn push(&mut self, op: Op, args: &[Value]) -> Result<Value, IrError> {
        self.b.push(op, args)
    }

    fn one(&mut self) -> Value {
        self.b.constant(1.0, Shape::Scalar)
    }

    /// Adds gradient `g` into the gradient of forward value `v`, summing first over what `v` was
    /// broadcast across: the features where it has one feature and the gradient more (a scalar
    /// parameter, a per-row mean), then the rows where it is unbatched (a bias used on every
    /// row).
    fn accumulate(&mut self, v: Value, g: Value) -> Result<(), IrError> {
        let target = self.f.shape(v);
        let mismatch = |s: Shape| {
            IrError::new(
                Some(v),
                self.f.data(v).op,
                format!(
                    "autodiff: gradient of shape {s} cannot flow into a value of shape {target}"
                ),
            )
        };
        let mut g = g;
        let s = self.b.shape(g);
        if s != target {
            if matches!(s, Shape::Matrix(..) | Shape::Scalar)
                || matches!(target, Shape::Matrix(..) | Shape::Scalar)
            {
                return Err(mismatch(s));
            }
            if target.features() == 1 && s.features() > 1 {
                g = self.push(Op::SumFeatures, &[g])?;
            }
            if !target.is_batched() && self.b.shape(g).is_batched() {
                g = self.push(Op::SumRows, &[g])?;
            }
            if self.b.shape(g) != target {
                return Err(mismatch(s));
            }
        }
        self.adj[v.index()] = Some(match self.adj[v.index()] {
            None => g,
            Some(prev) => self.push(Op::Add, &[prev, g])?,
        });
        Ok(())
    }

    fn zeros(&mut self, shape: Shape) -> Value {
        self.b.constant(0.0, shape)
    }

    /// Turns the gradients of the slices of `v` into gradients of `v`: slices that do not
    /// overlap are joined, gaps filled with zeros, into one concat (the four gates of an LSTM
    /// give `concat(di, df, dg, do)`); overlapping ones make further concats that are added.
    fn assemble_slices(&mut self, v: Value) -> Result<(), IrError> {
        let mut pieces = std::mem::take(&mut self.slices[v.index()]);
        pieces.sort_by_key(|&(start, _, _)| start);
        let shape = self.f.shape(v);
        while !pieces.is_empty() {
            let (mut parts, mut rest, mut end) = (Vec::new(), Vec::new(), 0);
            for (start, len, g) in pieces {
                if start < end {
                    rest.push((start, len, g));
                    continue;
                }
                if start > end {
                    parts.push(self.zeros(shape.with_features(start - end)));
                }
                parts.push(g);
                end = start + len;
            }
            if end < shape.features() {
                parts.push(self.zeros(shape.with_features(shape.features() - end)));
            }
            let g = if parts.len() == 1 {
                parts[0]
            } else {
                self.push(Op::Concat, &parts)?
            };
            self.accumulate(v, g)?;
            pieces = rest;
        }
        Ok(())
    }
}

/// The backward step graph of forward step graph `f` (see the module doc for its interface).
pub fn backward(f: &Graph) -> Result<Graph, IrError> {
    // needs[v]: whether v depends on an input, i.e. whether a gradient with respect to it means
    // anything.
    let mut needs = vec![false; f.len()];
    for v in f.iter() {
        let d = f.data(v);
        needs[v.index()] = match d.op {
            // Token ids are not differentiable: nothing flows into them or through them.
            _ if d.shape == Shape::Tokens => false,
            Op::Input(_) => true,
            Op::Const(_) => false,
            _ => d.args.iter().any(|a| needs[a.index()]),
        };
    }
    let b = Graph::with_signature_of(f);
    let mut cx = Builder {
        f,
        b,
        saved: HashMap::new(),
        adj: vec![None; f.len()],
        slices: vec![Vec::new(); f.len()],
    };

    let mut outputs = f.outputs.clone();
    outputs.sort_by_key(|o| o.role);
    for o in &outputs {
        if needs[o.value.index()] {
            let name = format!("d({})", f.out_role_name(o.role));
            let c =
                cx.b.input_value(Role::Cotangent(o.role), f.shape(o.value), Some(name));
            cx.accumulate(o.value, c)?;
        }
    }

    for v in f.iter().rev() {
        cx.assemble_slices(v)?;
        let Some(dv) = cx.adj[v.index()] else {
            continue;
        };
        let d = f.data(v);
        let args = d.args.clone();
        let need = |i: usize| needs[args[i].index()];
        match d.op {
            Op::Input(_) | Op::Const(_) => {}
            // y = x·wᵀ:  dw = dyᵀ·x,  dx = dy·w
            Op::MatMul => {
                if need(0) {
                    let x = cx.saved(args[1]);
                    let g = cx.push(Op::OuterSum, &[dv, x])?;
                    cx.accumulate(args[0], g)?;
                }
                if need(1) {
                    let w = cx.saved(args[0]);
                    let g = cx.push(Op::MatMulT, &[w, dv])?;
                    cx.accumulate(args[1], g)?;
                }
            }
            // y = d·w:  dd = dy·wᵀ,  dw = dᵀ·dy
            Op::MatMulT => {
                if need(0) {
                    let dd = cx.saved(args[1]);
                    let g = cx.push(Op::OuterSum, &[dd, dv])?;
                    cx.accumulate(args[0], g)?;
                }
                if need(1) {
                    let w = cx.saved(args[0]);
                    let g = cx.push(Op::MatMul, &[w, dv])?;
                    cx.accumulate(args[1], g)?;
                }
            }
            // W = dᵀ·x:  dd = x·dWᵀ,  dx = d·dW
            Op::OuterSum => {
                if need(0) {
                    let x = cx.saved(args[1]);
                    let g = cx.push(Op::MatMul, &[dv, x])?;
                    cx.accumulate(args[0], g)?;
                }
                if need(1) {
                    let dd = cx.saved(args[0]);
                    let g = cx.push(Op::MatMulT, &[dv, dd])?;
                    cx.accumulate(args[1], g)?;
                }
            }
            // y = Σ_rows d:  dd = dy on every row
            Op::SumRows => {
                let g = cx.push(Op::Broadcast, &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // y = v on every row:  dv = Σ_rows dy
            Op::Broadcast => {
                let g = cx.push(Op::SumRows, &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // y = a + b:  da = dy,  db = dy
            Op::Add => {
                for (i, &a) in args.iter().enumerate() {
                    if need(i) {
                        cx.accumulate(a, dv)?;
                    }
                }
            }
            // y = a - b:  da = dy,  db = -dy
            Op::Sub => {
                if need(0) {
                    cx.accumulate(args[0], dv)?;
                }
                if need(1) {
                    let g = cx.push(Op::Neg, &[dv])?;
                    cx.accumulate(args[1], g)?;
                }
            }
            // y = a * b:  da = dy * b,  db = dy * a
            Op::Mul => {
                for i in 0..2 {
                    if need(i) {
                        let other = cx.saved(args[1 - i]);
                        let g = cx.push(Op::Mul, &[dv, other])?;
                        cx.accumulate(args[i], g)?;
                    }
                }
            }
            // y = a / b:  da = dy / b,  db = -(dy / b) * y
            Op::Div => {
                let b = cx.saved(args[1]);
                let t = cx.push(Op::Div, &[dv, b])?;
                if need(0) {
                    cx.accumulate(args[0], t)?;
                }
                if need(1) {
                    let y = cx.saved(v);
                    let ty = cx.push(Op::Mul, &[t, y])?;
                    let g = cx.push(Op::Neg, &[ty])?;
                    cx.accumulate(args[1], g)?;
                }
            }
            // y = -a:  da = -dy
            Op::Neg => {
                let g = cx.push(Op::Neg, &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // y = e^a:  da = dy * y
            Op::Exp => {
                let y = cx.saved(v);
                let g = cx.push(Op::Mul, &[dv, y])?;
                cx.accumulate(args[0], g)?;
            }
            // y = ln a:  da = dy / a
            Op::Log => {
                let a = cx.saved(args[0]);
                let g = cx.push(Op::Div, &[dv, a])?;
                cx.accumulate(args[0], g)?;
            }
            // y = √a:  da = dy / (2y)
            Op::Sqrt => {
                let y = cx.saved(v);
                let two = cx.b.constant(2.0, Shape::Scalar);
                let y2 = cx.push(Op::Mul, &[y, two])?;
                let g = cx.push(Op::Div, &[dv, y2])?;
                cx.accumulate(args[0], g)?;
            }
            // y = ln(1 + e^a):  da = dy * σ(a)
            Op::Softplus => {
                let a = cx.saved(args[0]);
                let s = cx.push(Op::Sigmoid, &[a])?;
                let g = cx.push(Op::Mul, &[dv, s])?;
                cx.accumulate(args[0], g)?;
            }
            // y = |a|:  da = dy * sign(a) (zero at zero, as PyTorch)
            Op::Abs => {
                let a = cx.saved(args[0]);
                let s = cx.push(Op::Sign, &[a])?;
                let g = cx.push(Op::Mul, &[dv, s])?;
                cx.accumulate(args[0], g)?;
            }
            // y = sign(a) is piecewise constant.
            Op::Sign => {}
            // y = max(a, c):  da = dy * [a > c];  y = min(a, c):  da = dy * [a < c]
            // (at a tie the constant wins and no gradient passes: PyTorch 2.15's `clamp` gives
            // 0 there too, and `relu` at zero)
            Op::Max(bits) | Op::Min(bits) => {
                let a = cx.saved(args[0]);
                let c = cx.b.constant(f32::from_bits(bits), Shape::Scalar);
                let above = match d.op {
                    Op::Max(_) => cx.push(Op::Sub, &[a, c])?,
                    _ => cx.push(Op::Sub, &[c, a])?,
                };
                let step = cx.push(Op::Step, &[above])?;
                let g = cx.push(Op::Mul, &[dv, step])?;
                cx.accumulate(args[0], g)?;
            }
            // y = Σ_features a:  da = dy on every feature
            Op::SumFeatures => {
                let n = f.shape(args[0]).features();
                let g = cx.push(Op::Spread(n as u32), &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // y = a repeated over the features:  da = Σ_features dy
            Op::Spread(_) => {
                let g = cx.push(Op::SumFeatures, &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // y = σ(a):  da = dy * y * (1 - y)
            Op::Sigmoid => {
                let y = cx.saved(v);
                let one = cx.one();
                let one_minus = cx.push(Op::Sub, &[one, y])?;
                let local = cx.push(Op::Mul, &[y, one_minus])?;
                let g = cx.push(Op::Mul, &[dv, local])?;
                cx.accumulate(args[0], g)?;
            }
            // y = tanh(a):  da = dy * (1 - y²)
            Op::Tanh => {
                let y = cx.saved(v);
                let one = cx.one();
                let y2 = cx.push(Op::Mul, &[y, y])?;
                let local = cx.push(Op::Sub, &[one, y2])?;
                let g = cx.push(Op::Mul, &[dv, local])?;
                cx.accumulate(args[0], g)?;
            }
            // y = max(a, 0):  da = dy * [a > 0]
            Op::Relu => {
                let a = cx.saved(args[0]);
                let step = cx.push(Op::Step, &[a])?;
                let g = cx.push(Op::Mul, &[dv, step])?;
                cx.accumulate(args[0], g)?;
            }
            // y = [a > 0] is piecewise constant: its derivative is zero wherever it exists.
            Op::Step => {}
            // y = a[s..s+n]:  da = [0 .. 0, dy, 0 .. 0], assembled with the other slices of `a`
            Op::Slice { start, len } => {
                cx.slices[args[0].index()].push((start as usize, len as usize, dv));
            }
            // y = [a₁, a₂, ...]:  daᵢ = dy[offsetᵢ .. offsetᵢ + nᵢ]
            Op::Concat => {
                let mut offset = 0;
                for (i, &a) in args.iter().enumerate() {
                    let n = f.shape(a).features();
                    if need(i) {
                        let g = if n == f.shape(v).features() {
                            dv
                        } else {
                            cx.b.slice(dv, offset, n)?
                        };
                        cx.accumulate(a, g)?;
                    }
                    offset += n;
                }
            }
            // y = table[ids]:  dtable = the rows of dy added at their ids
            Op::Gather => {
                if need(0) {
                    let Shape::Matrix(rows, _) = f.shape(args[0]) else {
                        unreachable!("verified: gather's table is a matrix")
                    };
                    let ids = cx.saved(args[1]);
                    let g = cx.push(Op::ScatterRows(rows as u32), &[dv, ids])?;
                    cx.accumulate(args[0], g)?;
                }
            }
            // Y = Σ_r e_{ids[r]} d_r:  dd = dY[ids]
            Op::ScatterRows(_) => {
                let ids = cx.saved(args[1]);
                let g = cx.push(Op::Gather, &[dv, ids])?;
                cx.accumulate(args[0], g)?;
            }
            // y = a - ln Σ e^a:  da = dy - e^y · Σ_features dy
            Op::LogSoftmax => {
                let y = cx.saved(v);
                let n = f.shape(v).features();
                let p = cx.push(Op::Exp, &[y])?;
                let sum = cx.push(Op::SumFeatures, &[dv])?;
                let spread = cx.push(Op::Spread(n as u32), &[sum])?;
                let ps = cx.push(Op::Mul, &[p, spread])?;
                let g = cx.push(Op::Sub, &[dv, ps])?;
                cx.accumulate(args[0], g)?;
            }
            // y = a[ids] (0 where ignored):  da = dy placed at ids
            Op::Pick { ignore } => {
                let n = f.shape(args[0]).features();
                let ids = cx.saved(args[1]);
                let g = cx.push(
                    Op::Place {
                        n: n as u32,
                        ignore,
                    },
                    &[dv, ids],
                )?;
                cx.accumulate(args[0], g)?;
            }
            // y = d placed at ids:  dd = dy[ids]
            Op::Place { ignore, .. } => {
                let ids = cx.saved(args[1]);
                let g = cx.push(Op::Pick { ignore }, &[dv, ids])?;
                cx.accumulate(args[0], g)?;
            }
            // Ids are piecewise constant in `a`.
            Op::ArgMax => {}
            // P = M at every row of its sequence:  dM = Σ_rows dP
            Op::MemoryToPairs => {
                let g = cx.push(Op::PairsToMemory, &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // M = Σ_rows P:  dP = dM at every row
            Op::PairsToMemory => {
                let g = cx.push(Op::MemoryToPairs, &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // P = q at every position:  dq = Σ_positions dP
            Op::SpreadPositions => {
                let g = cx.push(Op::SumPositions, &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // q = Σ_positions P:  dP = dq at every position
            Op::SumPositions => {
                let g = cx.push(Op::SpreadPositions, &[dv])?;
                cx.accumulate(args[0], g)?;
            }
            // s[r, p] = M[p]·q[r]:  dq = Σ_p ds[r, p] M[p] (a context),  dM = Σ_r ds[r, p] q[r]
            Op::PairDot => {
                if need(1) {
                    let m = cx.saved(args[0]);
                    let g = cx.push(Op::Context, &[dv, m])?;
                    cx.accumulate(args[1], g)?;
                }
                if need(0) {
                    let q = cx.saved(args[1]);
                    let g = cx.push(Op::ContextT, &[dv, q])?;
                    cx.accumulate(args[0], g)?;
                }
            }
            // c[r] = Σ_p a[r, p] M[p]:  da = M[p]·dc[r],  dM = Σ_r a[r, p] dc[r]
            Op::Context => {
                if need(0) {
                    let m = cx.saved(args[1]);
                    let g = cx.push(Op::PairDot, &[m, dv])?;
                    cx.accumulate(args[0], g)?;
                }
                if need(1) {
                    let a = cx.saved(args[0]);
                    let g = cx.push(Op::ContextT, &[a, dv])?;
                    cx.accumulate(args[1], g)?;
                }
            }
            // Y[p] = Σ_r a[r, p] d[r]:  da = dY[p]·d[r],  dd = Σ_p a[r, p] dY[p]
            Op::ContextT => {
                if need(0) {
                    let d = cx.saved(args[1]);
                    let g = cx.push(Op::PairDot, &[dv, d])?;
                    cx.accumulate(args[0], g)?;
                }
                if need(1) {
                    let a = cx.saved(args[0]);
                    let g = cx.push(Op::Context, &[a, dv])?;
                    cx.accumulate(args[1], g)?;
                }
            }
            // y = softmax over positions:  ds = y ⊙ (dy - Σ_positions y ⊙ dy) (0 where masked)
            Op::SoftmaxPositions => {
                let y = cx.saved(v);
                let ydy = cx.push(Op::Mul, &[y, dv])?;
                let sum = cx.push(Op::SumPositions, &[ydy])?;
                let spread = cx.push(Op::SpreadPositions, &[sum])?;
                let centred = cx.push(Op::Sub, &[dv, spread])?;
                let g = cx.push(Op::Mul, &[y, centred])?;
                cx.accumulate(args[0], g)?;
            }
        }
    }

    // Every parameter, the input and every state gets a gradient output, zero where nothing flows.
    let find = |role: Role| f.input(role).and_then(|v| cx.adj[v.index()]);
    let mut results = Vec::new();
    for (p, info) in f.params.iter().enumerate() {
        results.push((
            OutRole::ParamGrad(p as u32),
            find(Role::Param(p as u32)),
            info.shape,
        ));
    }
    if !f.input_tokens {
        results.push((
            OutRole::InputGrad,
            find(Role::Input),
            Shape::Batch(f.input_size),
        ));
    }
    for (k, (_, n)) in f.states.iter().enumerate() {
        results.push((
            OutRole::StateGrad(k as u32),
            find(Role::State(k as u32)),
            Shape::Batch(*n),
        ));
    }
    if let Some(m) = f.input(Role::Memory) {
        results.push((OutRole::MemoryGrad, find(Role::Memory), f.shape(m)));
    }
    for (role, g, shape) in results {
        let g = match g {
            Some(g) => g,
            None => cx.zeros(shape),
        };
        cx.b.set_output(role, g);
    }
    Ok(cx.b)
}

//! One scheduled step graph and its [`StoragePlan`] lowered to four Cranelift functions: the
//! bound values (run once, when weights are bound), the values before the loop, one step of
//! the loop, and the values after it. The plan is read literally, as the Rust emitter reads it:
//! every offset, stride and width is a constant; only `T`, `B` and `t` are arguments.
//!
//! Each function is `fn(table: *const *mut f32, steps: usize, batch: usize, t: usize)`; `table`
//! holds the address of each [`Slot`] the function names, in the order of [`Lowered::slots`].
//! Element-wise values run over their rows in `f32x4` (a row's last one to three elements one
//! lane at a time), with [`crate::approx`] inline for the functions CLIF lacks. Products and
//! sums over rows call the registered symbols of [`crate::symbols`].

use crate::approx::{self, Vec4};
use crate::symbols::{self, Callees};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{AbiParam, FuncRef, InstBuilder, MemFlagsData, Value as CValue};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::JITModule;
use cranelift_module::{FuncId, Linkage, Module};
use rnn_ir::fuse::{self, Group, Item};
use rnn_ir::graph::dataflow::is_per_step_output;
use rnn_ir::graph::{Graph, Op, Shape, Value};
use rnn_ir::passes::hoist::Phase;
use rnn_ir::plan::{self, AccessRoot, Place, Storage, StoragePlan, WeightLayout};
use rnn_ir::schedule::Scheduled;
use std::collections::HashMap;

/// A root the generated code reads or writes, resolved to an address at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Buffer `i` of the plan.
    Buf(u32),
    /// Buffer `i` of the forward pass's plan (a backward graph's saved values).
    Fwd(u32),
    /// Parameter `p`.
    Param(u32),
    /// The step input over all `T·B` rows.
    Input,
    /// The output's cotangent over all `T·B` rows (backward).
    Dy,
    /// The current value of carried slot `k`.
    Cur(u32),
    /// The next value of carried slot `k`.
    Nxt(u32),
    /// The sum over steps of the `i`-th parameter gradient computed in the loop.
    Sum(u32),
    /// Scratch `j`: a copy of an argument that lives in its destination's own root.
    Tmp(u32),
    /// Parameter `p` as `Wᵀ` (`WeightLayout::InOut`), or null.
    Wt(u32),
    /// Parameter `p` in 32-output panels (`rnn_ir::panels`), or null.
    Panels(u32),
    /// Parameter `p` (`o × i`) in the panels of `d · W` (`W` read as `(in = o, out = i)`), or
    /// null.
    PanelsT(u32),
}

pub use rnn_ir::plan::RowSel;

/// A value's place resolved for one read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The root.
    pub slot: Slot,
    /// The first element, in elements.
    pub offset: usize,
    /// Distance between rows.
    pub stride: usize,
    /// Elements per row.
    pub width: usize,
    /// The rows covered.
    pub rows: RowSel,
}

impl Access {
    /// The first element of row `r` at step `t` (both in rows of `batch`).
    pub fn start(&self, r: usize, t: usize, batch: usize) -> usize {
        let row = match self.rows {
            RowSel::Once => 0,
            RowSel::Step | RowSel::All => r,
            RowSel::AtStep => t * batch + r,
        };
        self.offset + row * self.stride
    }
}

/// A scheduled graph and its plan, with the forward pass's for a backward graph.
#[derive(Clone, Copy)]
pub struct Body<'a> {
    /// The graph and its phases.
    pub s: &'a Scheduled,
    /// Its plan.
    pub plan: &'a StoragePlan,
    /// The forward pass's (backward graphs only).
    pub forward: Option<(&'a Scheduled, &'a StoragePlan)>,
}

impl Body<'_> {
    fn g(&self) -> &Graph {
        &self.s.graph
    }

    /// How `v` is read or written: over all rows, or at step `t`; the plan's one resolution
    /// (`plan::access`) with each root as a slot of the table.
    pub fn access(&self, v: Value, at_step: bool) -> Access {
        let forward = self.forward.map(|(fs, fplan)| (&fs.graph, fplan));
        let a = plan::access(self.g(), self.plan, forward, v, at_step);
        let slot = match a.root {
            AccessRoot::Buffer(b) => Slot::Buf(b),
            AccessRoot::Forward(b) => Slot::Fwd(b),
            AccessRoot::Param(p) => Slot::Param(p),
            AccessRoot::Input => Slot::Input,
            AccessRoot::Cotangent => Slot::Dy,
            AccessRoot::Carried(k) => Slot::Cur(k),
            AccessRoot::Next(k) => Slot::Nxt(k),
        };
        Access {
            slot,
            offset: a.offset,
            stride: a.stride,
            width: a.width,
            rows: a.rows,
        }
    }

    /// The values computed in `phase`, bound ones excepted, in graph order.
    pub fn computed(&self, phase: Phase) -> Vec<Value> {
        let g = self.g();
        g.iter()
            .filter(|&v| self.s.phases[v.index()] == phase && self.plan.is_computed(g, v))
            .filter(|&v| self.plan.storage[v.index()] != Storage::Bound)
            .collect()
    }

    /// The bound values, in graph order.
    pub fn bound(&self) -> Vec<Value> {
        let g = self.g();
        g.iter()
            .filter(|&v| {
                self.plan.storage[v.index()] == Storage::Bound
                    && self.plan.is_computed(g, v)
                    && !matches!(g.data(v).op, Op::Input(_))
            })
            .collect()
    }
}

/// A scratch buffer a function needs: `rows × width`.
#[derive(Clone, Copy, Debug)]
pub struct TmpInfo {
    /// Its rows.
    pub rows: RowSel,
    /// Elements per row.
    pub width: usize,
}

/// The compiled functions of one plan.
pub struct Lowered {
    /// The bound values (once, when weights are bound).
    pub bound: FuncId,
    /// Before the loop.
    pub pre: FuncId,
    /// One step.
    pub step: FuncId,
    /// After the loop.
    pub post: FuncId,
    /// The slots of the table every function reads, in order.
    pub slots: Vec<Slot>,
    /// The scratch buffers, by `Slot::Tmp` index.
    pub tmps: Vec<TmpInfo>,
    /// The functions' CLIF, before compilation.
    pub clif: Vec<(String, String)>,
    /// How the step function can run on the first `r` rows of a batch only (the rows still
    /// running in a batch packed by decreasing length): called with `batch = r` and `t = 0`,
    /// each slot's address moved on by `t · batch · shift[slot]` elements (its stride when the
    /// step reads or writes it at the step's rows, 0 when it reads it whole or per row).
    /// `None` when a slot is read both ways, or the step counts all the steps' rows: such a
    /// step runs every row.
    pub step_shift: Option<Vec<usize>>,
}

/// The code generator of one function.
struct Gen<'a, 'f> {
    b: FunctionBuilder<'f>,
    body: Body<'a>,
    slots: &'a mut Vec<Slot>,
    tmps: &'a mut Vec<TmpInfo>,
    table: CValue,
    steps: CValue,
    batch: CValue,
    t: CValue,
    callees: Callees,
    /// Every slot, row selection and stride the function addresses.
    uses: Vec<Use>,
    /// Whether it counts all the steps' rows.
    counts_all: bool,
}

/// Rows of at most this many vectors are unrolled.
const UNROLL: usize = 8;

/// Flags of the generated loads and stores: in bounds (the plan's sizes), not aligned.
fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

impl Gen<'_, '_> {
    /// The address of `slot`'s first element.
    fn base(&mut self, slot: Slot) -> CValue {
        let index = match self.slots.iter().position(|&s| s == slot) {
            Some(i) => i,
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.b
            .ins()
            .load(I64, mem(), self.table, (index * 8) as i32)
    }

    fn iconst(&mut self, n: usize) -> CValue {
        self.b.ins().iconst(I64, n as i64)
    }

    /// The row count of an access.
    fn count(&mut self, rows: RowSel) -> CValue {
        match rows {
            RowSel::Once => self.iconst(1),
            RowSel::Step | RowSel::AtStep => self.batch,
            RowSel::All => {
                self.counts_all = true;
                self.b.ins().imul(self.steps, self.batch)
            }
        }
    }

    /// The address of element `i` (a constant) of row `r` of `a`.
    fn addr(&mut self, a: &Access, base: CValue, r: CValue, i: usize) -> CValue {
        if !self.uses.contains(&(a.slot, a.rows, a.stride)) {
            self.uses.push((a.slot, a.rows, a.stride));
        }
        let row = match a.rows {
            RowSel::Once => None,
            RowSel::Step | RowSel::All => Some(r),
            RowSel::AtStep => {
                let tb = self.b.ins().imul(self.t, self.batch);
                Some(self.b.ins().iadd(tb, r))
            }
        };
        let off = (a.offset + i) * 4;
        let at = match row {
            None => base,
            Some(row) => {
                let bytes = self.b.ins().imul_imm_s(row, (a.stride * 4) as i64);
                self.b.ins().iadd(base, bytes)
            }
        };
        if off == 0 {
            at
        } else {
            self.b.ins().iadd_imm_s(at, off as i64)
        }
    }

    /// `for i in 0..n { body(i) }`.
    fn repeat(&mut self, n: CValue, body: &mut dyn FnMut(&mut Self, CValue)) {
        let head = self.b.create_block();
        let inner = self.b.create_block();
        let exit = self.b.create_block();
        let zero = self.iconst(0);
        self.b.ins().jump(head, &[zero.into()]);
        self.b.switch_to_block(head);
        let i = self.b.append_block_param(head, I64);
        let done = self.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, i, n);
        self.b.ins().brif(done, exit, &[], inner, &[]);
        self.b.switch_to_block(inner);
        body(self, i);
        let next = self.b.ins().iadd_imm_s(i, 1);
        self.b.ins().jump(head, &[next.into()]);
        self.b.switch_to_block(exit);
    }

    /// `dst[r][i] = f(args[r][i])` over the destination's rows, four lanes at a time. An
    /// argument of width 1 under a wider destination is one scalar per row, splat. A row of up
    /// to [`UNROLL`] vectors is unrolled; a longer one is a loop over its vectors (the code of a
    /// 256-wide LSTM would otherwise take Cranelift most of a second to compile). A row's last
    /// one to three elements go one lane at a time.
    fn elementwise(
        &mut self,
        dst: Access,
        args: &[Access],
        f: &dyn Fn(&mut Vec4, &[CValue]) -> CValue,
    ) {
        let rows = self.count(dst.rows);
        let width = dst.width;
        let vectors = width / 4;
        self.repeat(rows, &mut |g, r| {
            // Each operand's and the destination's row start, once per row.
            let dbase = g.base(dst.slot);
            let drow = g.addr(&dst, dbase, r, 0);
            let rows: Vec<CValue> = args
                .iter()
                .map(|a| {
                    let base = g.base(a.slot);
                    g.addr(a, base, r, 0)
                })
                .collect();
            // Element `i` (bytes `off`) of every operand, four lanes or one.
            let lanes = |g: &mut Self, off: CValue, vector: bool| {
                let mut xs = Vec::with_capacity(args.len());
                for (a, &row) in args.iter().zip(&rows) {
                    let scalar = a.width == 1 && width > 1;
                    let x = if scalar {
                        let s = g.b.ins().load(F32, mem(), row, 0);
                        g.b.ins().splat(F32X4, s)
                    } else {
                        let at = g.b.ins().iadd(row, off);
                        if vector {
                            g.b.ins().load(F32X4, mem(), at, 0)
                        } else {
                            let s = g.b.ins().load(F32, mem(), at, 0);
                            g.b.ins().splat(F32X4, s)
                        }
                    };
                    xs.push(x);
                }
                let y = f(&mut Vec4 { b: &mut g.b }, &xs);
                let at = g.b.ins().iadd(drow, off);
                if vector {
                    g.b.ins().store(mem(), y, at, 0);
                } else {
                    let s = g.b.ins().extractlane(y, 0);
                    g.b.ins().store(mem(), s, at, 0);
                }
            };
            if vectors > UNROLL {
                let n = g.iconst(vectors);
                g.repeat(n, &mut |g, c| {
                    let off = g.b.ins().imul_imm_s(c, 16);
                    lanes(g, off, true);
                });
            } else {
                for c in 0..vectors {
                    let off = g.iconst(c * 16);
                    lanes(g, off, true);
                }
            }
            for i in vectors * 4..width {
                let off = g.iconst(i * 4);
                lanes(g, off, false);
            }
        });
    }

    /// A fused group ([`rnn_ir::fuse`]): one loop over its rows and `group.width` columns,
    /// the members in registers, each evaluated at its demanded offsets in graph order, the
    /// stored ones written tile by tile (and into a carried slot's next value where they are
    /// one).
    fn fused(&mut self, group: &Group, at_step: bool) {
        let body = self.body;
        let g = body.g();
        let members = &group.members;
        let w = group.width;
        let vectors = w / 4;
        // Each member's operands: another member at an offset, or memory.
        let mut reads: Vec<Access> = Vec::new();
        let srcs: Vec<Vec<Src>> = members
            .iter()
            .map(|&m| {
                let mw = body.access(m, at_step).width;
                let shift = fuse::arg_offset(g, m);
                g.data(m)
                    .args
                    .iter()
                    .map(|&a| match fuse::resolve(g, body.plan, members, a) {
                        Some((j, off)) => Src::Member(j, off + shift),
                        None => {
                            let acc = body.access(a, at_step);
                            reads.push(acc);
                            let k = reads.len() - 1;
                            if acc.width == 1 && mw > 1 {
                                Src::Scalar(k)
                            } else {
                                Src::Mem(k, shift)
                            }
                        }
                    })
                    .collect()
            })
            .collect();
        let dsts: Vec<Access> = members.iter().map(|&m| body.access(m, at_step)).collect();
        let rows = self.count(dsts[0].rows);
        self.repeat(rows, &mut |cg, r| {
            // Row starts of every read and write, and the one-element reads, once per row.
            let starts: Vec<CValue> = reads
                .iter()
                .map(|a| {
                    let base = cg.base(a.slot);
                    cg.addr(a, base, r, 0)
                })
                .collect();
            let scalars: Vec<Option<CValue>> = srcs
                .iter()
                .flatten()
                .map(|s| match *s {
                    Src::Scalar(k) => {
                        let x = cg.b.ins().load(F32, mem(), starts[k], 0);
                        Some(cg.b.ins().splat(F32X4, x))
                    }
                    _ => None,
                })
                .collect();
            let mut outs: Vec<Vec<(CValue, usize)>> = Vec::with_capacity(members.len());
            for (i, d) in dsts.iter().enumerate() {
                let mut o = Vec::new();
                if group.stored[i] {
                    let base = cg.base(d.slot);
                    o.push((cg.addr(d, base, r, 0), d.width));
                }
                if let Some(k) = group.next[i] {
                    let n = d.width;
                    let nxt = Access {
                        slot: Slot::Nxt(k),
                        offset: 0,
                        stride: n,
                        width: n,
                        rows: RowSel::Step,
                    };
                    let base = cg.base(nxt.slot);
                    o.push((cg.addr(&nxt, base, r, 0), n));
                }
                outs.push(o);
            }
            let column = |cg: &mut Self, off: CValue, vector: bool| {
                let mut memo: HashMap<(usize, usize), CValue> = HashMap::new();
                let mut at: Vec<Option<CValue>> = vec![None; starts.len()];
                let mut flat = 0;
                for (i, &m) in members.iter().enumerate() {
                    let op = g.data(m).op;
                    for &e in &group.demands[i] {
                        let mut xs = Vec::with_capacity(srcs[i].len());
                        for (n, s) in srcs[i].iter().enumerate() {
                            let x = match *s {
                                Src::Member(j, o) => *memo
                                    .get(&(j, e + o))
                                    .expect("fuse: a member is evaluated where it is read"),
                                Src::Scalar(_) => {
                                    scalars[flat + n].expect("fuse: a one-element read")
                                }
                                Src::Mem(k, shift) => {
                                    let p = *at[k]
                                        .get_or_insert_with(|| cg.b.ins().iadd(starts[k], off));
                                    let bytes = ((e + shift) * 4) as i32;
                                    if vector {
                                        cg.b.ins().load(F32X4, mem(), p, bytes)
                                    } else {
                                        let x = cg.b.ins().load(F32, mem(), p, bytes);
                                        cg.b.ins().splat(F32X4, x)
                                    }
                                }
                            };
                            xs.push(x);
                        }
                        let y = apply(&mut Vec4 { b: &mut cg.b }, op, &xs);
                        memo.insert((i, e), y);
                    }
                    flat += srcs[i].len();
                    for &(start, width) in &outs[i] {
                        let p = cg.b.ins().iadd(start, off);
                        for e in (0..width).step_by(w) {
                            let y = memo[&(i, e)];
                            let bytes = (e * 4) as i32;
                            if vector {
                                cg.b.ins().store(mem(), y, p, bytes);
                            } else {
                                let x = cg.b.ins().extractlane(y, 0);
                                cg.b.ins().store(mem(), x, p, bytes);
                            }
                        }
                    }
                }
            };
            if vectors > UNROLL {
                let n = cg.iconst(vectors);
                cg.repeat(n, &mut |cg, c| {
                    let off = cg.b.ins().imul_imm_s(c, 16);
                    column(cg, off, true);
                });
            } else {
                for c in 0..vectors {
                    let off = cg.iconst(c * 16);
                    column(cg, off, true);
                }
            }
            for i in vectors * 4..w {
                let off = cg.iconst(i * 4);
                column(cg, off, false);
            }
        });
    }

    /// Copies `src`'s rows into `dst` (same width).
    fn copy(&mut self, dst: Access, src: Access) {
        self.elementwise(dst, &[src], &|_, x| x[0]);
    }

    /// A call of a registered symbol with integer and pointer arguments.
    fn call(&mut self, f: FuncRef, args: &[CValue]) -> Option<CValue> {
        let inst = self.b.ins().call(f, args);
        self.b.inst_results(inst).first().copied()
    }

    /// The address of the first element of row 0 of `a` (at step `t` for a step's rows).
    fn start0(&mut self, a: &Access) -> CValue {
        let base = self.base(a.slot);
        let zero = self.iconst(0);
        self.addr(a, base, zero, 0)
    }

    /// The statements computing `values` in order, element-wise runs fused
    /// ([`fuse::schedule`]). Returns the carried slots whose next value a group wrote.
    fn compute_all(&mut self, values: &[Value], at_step: bool) -> Vec<u32> {
        let body = self.body;
        let forward = body.forward.map(|(fs, fplan)| (&fs.graph, fplan));
        let ctx = fuse::Ctx {
            g: body.g(),
            plan: body.plan,
            forward,
            at_step,
        };
        let mut written = Vec::new();
        for item in fuse::schedule(ctx, values) {
            match item {
                Item::Single(v) => self.compute(v, at_step),
                Item::Fused(group) => {
                    written.extend(group.next.iter().flatten());
                    self.fused(&group, at_step);
                }
            }
        }
        written
    }

    /// The statements computing `v`.
    fn compute(&mut self, v: Value, at_step: bool) {
        let body = self.body;
        let g = body.g();
        let plan = body.plan;
        let d = g.data(v).clone();
        let dst = body.access(v, at_step);
        let in_place = |i: usize| {
            let start: usize = d.args[..i].iter().map(|&a| g.shape(a).features()).sum();
            d.op == Op::Concat && plan.place[d.args[i].index()] == Place::View { of: v, start }
        };
        let mut args: Vec<Access> = Vec::new();
        for (i, &a) in d.args.iter().enumerate() {
            let mut acc = body.access(a, at_step);
            let same = acc == dst && !matches!(d.op, Op::MatMul | Op::MatMulT | Op::OuterSum);
            if !in_place(i) && acc.slot == dst.slot && !same {
                // An argument in the destination's own root is read from a copy.
                let j = self.tmps.len() as u32;
                let rows = if acc.rows == RowSel::AtStep {
                    RowSel::Step
                } else {
                    acc.rows
                };
                self.tmps.push(TmpInfo {
                    rows,
                    width: acc.width,
                });
                let tmp = Access {
                    slot: Slot::Tmp(j),
                    offset: 0,
                    stride: acc.width,
                    width: acc.width,
                    rows,
                };
                self.copy(tmp, acc);
                acc = tmp;
            }
            args.push(acc);
        }
        let shapes: Vec<Shape> = d.args.iter().map(|&a| g.shape(a)).collect();
        match d.op {
            Op::Input(_) => unreachable!("inputs are fed"),
            Op::Concat => {
                let unit = d.shape.feature_len();
                let mut col = 0;
                for (i, a) in args.iter().enumerate() {
                    let width = shapes[i].row_len();
                    if !in_place(i) {
                        let part = Access {
                            offset: dst.offset + col,
                            width,
                            ..dst
                        };
                        self.copy(part, *a);
                    }
                    col += shapes[i].features() * unit;
                }
            }
            Op::Const(bits) => {
                let c = f32::from_bits(bits);
                self.elementwise(dst, &[], &move |v, _| v.splat(c));
            }
            Op::MatMul | Op::MatMulT => {
                let Shape::Matrix(o, i) = shapes[0] else {
                    unreachable!("verified: a product's weight is a matrix")
                };
                let (w, x) = (args[0], args[1]);
                let rows = self.count(dst.rows);
                let (oc, ic) = (self.iconst(o), self.iconst(i));
                let wp = self.start0(&w);
                let xp = self.start0(&x);
                let yp = self.start0(&dst);
                let (xs, ys) = (self.iconst(x.stride), self.iconst(dst.stride));
                // A parameter the plan reads as (in, out) is read from the copies the model
                // made when its weights were bound.
                // Only the whole parameter: a slice of it (rows of a stacked weight) has no copy
                // of its own.
                let packed = match w.slot {
                    Slot::Param(p)
                        if d.op == Op::MatMul
                            && w.offset == 0
                            && g.params()[p as usize].shape == Shape::Matrix(o, i) =>
                    {
                        plan.products
                            .iter()
                            .any(|q| q.value == v && q.layout == WeightLayout::InOut)
                            .then_some(p)
                    }
                    _ => None,
                };
                if let Some(p) = packed {
                    let wt = self.base(Slot::Wt(p));
                    let panels = self.base(Slot::Panels(p));
                    let f = self.callees.matmul_packed;
                    self.call(f, &[oc, ic, rows, wp, wt, panels, xp, xs, yp, ys]);
                } else if let Some(p) = match w.slot {
                    Slot::Param(p)
                        if d.op == Op::MatMulT
                            && w.offset == 0
                            && g.params()[p as usize].shape == Shape::Matrix(o, i) =>
                    {
                        Some(p)
                    }
                    _ => None,
                } {
                    // A whole parameter: the model may hold it in panels (a step's rows).
                    let panels = self.base(Slot::PanelsT(p));
                    let f = self.callees.matmul_t_packed;
                    self.call(f, &[oc, ic, rows, wp, panels, xp, xs, yp, ys]);
                } else {
                    let f = if d.op == Op::MatMul {
                        self.callees.matmul
                    } else {
                        self.callees.matmul_t
                    };
                    self.call(f, &[oc, ic, rows, wp, xp, xs, yp, ys]);
                }
            }
            Op::OuterSum => {
                let (o, i) = (shapes[0].row_len(), shapes[1].row_len());
                let (a, x) = (args[0], args[1]);
                let rows = self.count(a.rows);
                let (oc, ic) = (self.iconst(o), self.iconst(i));
                let ap = self.start0(&a);
                let xp = self.start0(&x);
                let yp = self.start0(&dst);
                let (as_, xs) = (self.iconst(a.stride), self.iconst(x.stride));
                self.call(self.callees.outer_sum, &[oc, ic, rows, ap, as_, xp, xs, yp]);
            }
            Op::SumRows => {
                let a = args[0];
                let rows = self.count(a.rows);
                let n = self.iconst(dst.width);
                let ap = self.start0(&a);
                let yp = self.start0(&dst);
                let stride = self.iconst(a.stride);
                self.call(self.callees.sum_rows, &[n, rows, ap, stride, yp]);
            }
            Op::SumFeatures => {
                let a = args[0];
                let rows = self.count(dst.rows);
                let n = self.iconst(a.width);
                let f = self.callees.sum_features;
                self.repeat(rows, &mut |g, r| {
                    let abase = g.base(a.slot);
                    let ap = g.addr(&a, abase, r, 0);
                    let s = g.call(f, &[n, ap]).expect("sum_features returns a value");
                    let dbase = g.base(dst.slot);
                    let yp = g.addr(&dst, dbase, r, 0);
                    g.b.ins().store(mem(), s, yp, 0);
                });
            }
            Op::Spread(_) => {
                // One scalar per row, spread over the destination's features.
                self.elementwise(dst, &args, &|_, x| x[0]);
            }
            Op::Broadcast | Op::Slice { .. } => {
                let mut src = args[0];
                if let Op::Slice { start, len } = d.op {
                    let unit = shapes[0].feature_len();
                    src.offset += start as usize * unit;
                    src.width = len as usize * unit;
                }
                self.copy(dst, src);
            }
            Op::Add | Op::Sub | Op::Mul | Op::Div => {
                let op = d.op;
                self.elementwise(dst, &args, &move |v, x| match op {
                    Op::Add => v.b.ins().fadd(x[0], x[1]),
                    Op::Sub => v.b.ins().fsub(x[0], x[1]),
                    Op::Mul => v.b.ins().fmul(x[0], x[1]),
                    _ => v.b.ins().fdiv(x[0], x[1]),
                });
            }
            op => {
                self.elementwise(dst, &args, &move |v, x| unary(v, op, x[0]));
            }
        }
    }
}

/// An operand of a fused member.
enum Src {
    /// Member `j` at this offset from the reader's element.
    Member(usize, usize),
    /// Read `k`, at the reader's element plus this offset.
    Mem(usize, usize),
    /// Read `k`'s one element, spread.
    Scalar(usize),
}

/// A fusible op ([`fuse::fusible`]) on four lanes.
fn apply(v: &mut Vec4, op: Op, x: &[CValue]) -> CValue {
    match op {
        Op::Add => v.b.ins().fadd(x[0], x[1]),
        Op::Sub => v.b.ins().fsub(x[0], x[1]),
        Op::Mul => v.b.ins().fmul(x[0], x[1]),
        Op::Div => v.b.ins().fdiv(x[0], x[1]),
        Op::Slice { .. } => x[0],
        op => unary(v, op, x[0]),
    }
}

/// A one-argument element-wise op on four lanes, as the interpreter defines it.
fn unary(v: &mut Vec4, op: Op, x: CValue) -> CValue {
    match op {
        Op::Neg => v.b.ins().fneg(x),
        Op::Exp => approx::exp(v, x),
        Op::Log => approx::ln(v, x),
        Op::Sqrt => v.b.ins().sqrt(x),
        Op::Softplus => approx::softplus(v, x),
        Op::Sigmoid => approx::sigmoid(v, x),
        Op::Tanh => approx::tanh(v, x),
        Op::Abs => v.abs(x),
        Op::Sign => {
            let zero = v.splat(0.0);
            let one = v.splat(1.0);
            let minus = v.splat(-1.0);
            let pos = v.cmp(FloatCC::GreaterThan, x, zero);
            let neg = v.cmp(FloatCC::LessThan, x, zero);
            let n = v.select(neg, minus, zero);
            v.select(pos, one, n)
        }
        Op::Relu => {
            let zero = v.splat(0.0);
            let pos = v.cmp(FloatCC::GreaterThan, x, zero);
            v.select(pos, x, zero)
        }
        Op::Step => {
            let zero = v.splat(0.0);
            let one = v.splat(1.0);
            let pos = v.cmp(FloatCC::GreaterThan, x, zero);
            v.select(pos, one, zero)
        }
        Op::Max(bits) => {
            let c = v.splat(f32::from_bits(bits));
            let below = v.cmp(FloatCC::LessThan, x, c);
            v.select(below, c, x)
        }
        Op::Min(bits) => {
            let c = v.splat(f32::from_bits(bits));
            let above = v.cmp(FloatCC::GreaterThan, x, c);
            v.select(above, c, x)
        }
        other => unreachable!("{other:?} is not a one-argument element-wise op"),
    }
}

/// Which part of a plan a function runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Bound,
    Pre,
    Step,
    Post,
}

/// Lowers `body` into `module` as four functions named `{name}_bound`, `_pre`, `_step` and
/// `_post`.
pub fn lower(module: &mut JITModule, body: Body<'_>, name: &str) -> Result<Lowered, String> {
    if let Some(why) = body.s.graph.codegen_unsupported("JIT") {
        return Err(why);
    }
    let mut slots = Vec::new();
    let mut tmps = Vec::new();
    let mut clif = Vec::new();
    let mut ids = Vec::new();
    let mut step_uses = None;
    for part in [Part::Bound, Part::Pre, Part::Step, Part::Post] {
        let fname = format!(
            "{name}_{}",
            match part {
                Part::Bound => "bound",
                Part::Pre => "pre",
                Part::Step => "step",
                Part::Post => "post",
            }
        );
        let (id, text, uses) = lower_part(module, body, part, &fname, &mut slots, &mut tmps)?;
        if part == Part::Step {
            step_uses = uses;
        }
        clif.push((fname, text));
        ids.push(id);
    }
    let step_shift = step_uses.and_then(|uses| shifts(&slots, &uses));
    Ok(Lowered {
        bound: ids[0],
        pre: ids[1],
        step: ids[2],
        post: ids[3],
        slots,
        tmps,
        clif,
        step_shift,
    })
}

/// A slot a function addresses, with the rows it selects and their stride.
type Use = (Slot, RowSel, usize);

/// [`Lowered::step_shift`] from the step function's uses: `None` when a slot is addressed
/// at the step's rows and also otherwise (or with two strides).
fn shifts(slots: &[Slot], uses: &[Use]) -> Option<Vec<usize>> {
    let mut shift = vec![0; slots.len()];
    for (i, slot) in slots.iter().enumerate() {
        let mine: Vec<(RowSel, usize)> = uses
            .iter()
            .filter(|u| u.0 == *slot)
            .map(|u| (u.1, u.2))
            .collect();
        let at_step: Vec<usize> = mine
            .iter()
            .filter(|u| u.0 == RowSel::AtStep)
            .map(|u| u.1)
            .collect();
        if at_step.is_empty() {
            continue;
        }
        if at_step.len() != mine.len() || at_step.iter().any(|&s| s != at_step[0]) {
            return None;
        }
        shift[i] = at_step[0];
    }
    Some(shift)
}

fn lower_part(
    module: &mut JITModule,
    body: Body<'_>,
    part: Part,
    name: &str,
    slots: &mut Vec<Slot>,
    tmps: &mut Vec<TmpInfo>,
) -> Result<(FuncId, String, Option<Vec<Use>>), String> {
    let mut ctx = module.make_context();
    let config = module.target_config();
    for _ in 0..4 {
        ctx.func.signature.params.push(AbiParam::new(I64));
    }
    let callees = symbols::declare(module, &mut ctx.func)?;
    let mut fbc = FunctionBuilderContext::new();
    let uses;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let mut g = Gen {
            b,
            body,
            slots,
            tmps,
            table: p[0],
            steps: p[1],
            batch: p[2],
            t: p[3],
            callees,
            uses: Vec::new(),
            counts_all: false,
        };
        match part {
            Part::Bound => {
                // The plan's own bound values; a backward plan reads its forward plan's from
                // that plan's bound buffers (`Slot::Fwd`), computed when the weights were.
                for v in body.bound() {
                    g.compute(v, false);
                }
            }
            Part::Pre => {
                g.compute_all(&body.computed(Phase::Pre), false);
            }
            Part::Step => {
                let written = g.compute_all(&body.computed(Phase::Loop), true);
                let gr = body.g();
                for (k, next) in body.plan.carried_next.iter().enumerate() {
                    let Some(v) = *next else { continue };
                    if body.plan.place[v.index()] != Place::Next(k as u32)
                        && !written.contains(&(k as u32))
                    {
                        let n = gr.states()[k].1;
                        let src = body.access(v, true);
                        let dst = Access {
                            slot: Slot::Nxt(k as u32),
                            offset: 0,
                            stride: n,
                            width: n,
                            rows: RowSel::Step,
                        };
                        g.copy(dst, src);
                    }
                }
                for (i, &(_, v)) in body.plan.step_sums.iter().enumerate() {
                    let a = body.access(v, true);
                    let sum = Access {
                        slot: Slot::Sum(i as u32),
                        offset: 0,
                        stride: a.width,
                        width: a.width,
                        rows: RowSel::Once,
                    };
                    let a = Access {
                        rows: RowSel::Once,
                        ..a
                    };
                    g.elementwise(sum, &[sum, a], &|v, x| v.b.ins().fadd(x[0], x[1]));
                }
            }
            Part::Post => {
                g.compute_all(&body.computed(Phase::Post), false);
            }
        }
        g.b.ins().return_(&[]);
        g.b.seal_all_blocks();
        uses = (!g.counts_all).then(|| std::mem::take(&mut g.uses));
        g.b.finalize(config);
    }
    let text = ctx.func.display().to_string();
    let id = module
        .declare_function(name, Linkage::Local, &ctx.func.signature)
        .map_err(|e| e.to_string())?;
    module
        .define_function(id, &mut ctx)
        .map_err(|e| format!("{name}: {e:?}"))?;
    module.clear_context(&mut ctx);
    Ok((id, text, uses))
}

/// Whether `role`'s output is produced per step (the output, the input's gradient).
pub fn per_step(role: rnn_ir::graph::OutRole) -> bool {
    is_per_step_output(role)
}

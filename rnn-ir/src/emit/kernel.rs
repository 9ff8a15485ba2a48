//! One scheduled step graph and its [`StoragePlan`] as the body of a Rust function: the plan
//! read literally, with every size, offset and stride a constant.
//!
//! The body does what the interpreter's `Workspace::run` does, with every decision taken here
//! instead of at run time: the bound values, the values before the loop over all `T·B` rows,
//! each step's values (forwards or backwards in time) with rows past their length frozen, the
//! values after the loop. Each value is computed into its planned place (a buffer of the plan,
//! a column range of one, a carried slot); slices are views and concatenations are assembled
//! where their arguments were computed, exactly as planned.
//!
//! Names inside the body: `b{i}` the plan's buffers, `fb{i}` the forward pass's (a backward
//! body reads its saved values there), `p{i}` the parameters, `x` the step input over all rows,
//! `dy` the output's cotangent, `cur{k}` / `nxt{k}` / `hold{k}` the carried slots, `wt{v}` the
//! copy of weight `v` the plan reads as `(in, out)` (`rnn::rt::pack`), `steps`, `batch`, `t`,
//! `lengths` and `isa` (the SIMD path every product takes).
//!
//! Two modes share every statement. [`Mode::Sequence`] allocates its buffers (`T·B`, `B` or one
//! row) and returns them as the tape; [`Mode::Step`] runs one step of one row with every
//! buffer a fixed-size array on the stack, so the streaming step needs nothing but `core`.

use crate::graph::dataflow::is_per_step_output;
use crate::graph::{Graph, Op, OutRole, Role, Shape, Value};
use crate::passes::hoist::Phase;
use crate::plan::{self, AccessRoot, Place, RowSel, Rows, Storage, StoragePlan, WeightLayout};
use crate::schedule::Scheduled;
use proc_macro2::{Ident, Literal, TokenStream};
use quote::{format_ident, quote};

/// How the body holds its buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Any `T` and `B`: buffers are `Vec`s, returned as the tape.
    Sequence,
    /// One step of one row: buffers are arrays; `steps`, `batch` and `t` are constants.
    Step,
}

/// A graph to emit, with the forward pass it reads saved values from (backward graphs).
pub struct Body<'a> {
    /// The scheduled step graph.
    pub s: &'a Scheduled,
    /// Its plan.
    pub plan: &'a StoragePlan,
    /// The forward graph and the plan its tape was made with, for a backward graph.
    pub forward: Option<(&'a Scheduled, &'a StoragePlan)>,
    /// Backwards in time, with rows past their length seeing a zero carried value.
    pub reverse: bool,
    /// The buffers' mode.
    pub mode: Mode,
}

fn lit(n: usize) -> Literal {
    Literal::usize_unsuffixed(n)
}

fn f32_lit(x: f32) -> TokenStream {
    if x.is_finite() {
        let l = Literal::f32_suffixed(x);
        quote!(#l)
    } else {
        let bits = Literal::u32_suffixed(x.to_bits());
        quote!(f32::from_bits(#bits))
    }
}

/// A value's place resolved for one read or write.
#[derive(Clone)]
struct Access {
    /// The variable holding the root's elements.
    root: Ident,
    /// Its first element, in elements.
    offset: usize,
    /// Distance between rows.
    stride: usize,
    /// Elements per row.
    width: usize,
    rows: RowSel,
}

impl Access {
    /// The expression of row `r`'s first element (`r` an expression).
    fn start(&self, r: &TokenStream) -> TokenStream {
        let (off, stride) = (lit(self.offset), lit(self.stride));
        let row = match self.rows {
            RowSel::Once => return quote!(#off),
            RowSel::Step | RowSel::All => quote!(#r * #stride),
            RowSel::AtStep => quote!((t * batch + #r) * #stride),
        };
        if self.offset == 0 {
            row
        } else {
            quote!(#off + #row)
        }
    }

    /// The expression of row 0's first element.
    fn start0(&self) -> TokenStream {
        let (off, stride) = (lit(self.offset), lit(self.stride));
        match self.rows {
            RowSel::Once | RowSel::Step | RowSel::All => quote!(#off),
            RowSel::AtStep if self.offset == 0 => quote!(t * batch * #stride),
            RowSel::AtStep => quote!(#off + t * batch * #stride),
        }
    }

    /// The row count expression.
    fn count(&self) -> TokenStream {
        match self.rows {
            RowSel::Once => quote!(1usize),
            RowSel::Step | RowSel::AtStep => quote!(batch),
            RowSel::All => quote!(steps * batch),
        }
    }
}

impl Body<'_> {
    fn g(&self) -> &Graph {
        &self.s.graph
    }

    /// How `v` is read or written: over all rows (`at_step` false) or at step `t`; the plan's
    /// one resolution (`plan::access`) with each root named as the body names it.
    fn access(&self, v: Value, at_step: bool) -> Access {
        let forward = self.forward.map(|(fs, fplan)| (&fs.graph, fplan));
        let a = plan::access(self.g(), self.plan, forward, v, at_step);
        let root = match a.root {
            AccessRoot::Buffer(b) => format_ident!("b{}", b),
            AccessRoot::Forward(b) => format_ident!("fb{}", b),
            AccessRoot::Param(p) => feed_ident(Role::Param(p)),
            AccessRoot::Input => feed_ident(Role::Input),
            AccessRoot::Cotangent => feed_ident(Role::Cotangent(OutRole::Output)),
            AccessRoot::Carried(k) => format_ident!("cur{}", k),
            AccessRoot::Next(k) => format_ident!("nxt{}", k),
        };
        Access {
            root,
            offset: a.offset,
            stride: a.stride,
            width: a.width,
            rows: a.rows,
        }
    }

    /// The function body (see the module doc). In sequence mode it ends with the expression
    /// `(per_step_outputs, param_grads, carried, tape)`; in step mode with the carried slots
    /// updated in place and the output written to `y`.
    pub fn emit(&self) -> TokenStream {
        let g = self.g();
        let plan = self.plan;
        let mut out = TokenStream::new();
        let step_mode = self.mode == Mode::Step;
        if step_mode {
            out.extend(quote! {
                let (steps, batch) = (1usize, 1usize);
                let _ = (steps, batch);
            });
        }

        // Buffers: the forward pass's bound values first (a backward body reads saved values
        // there), then this plan's.
        if let Some((fs, fplan)) = self.forward {
            let fwd = Body {
                s: fs,
                plan: fplan,
                forward: None,
                reverse: false,
                mode: self.mode,
            };
            out.extend(fwd.bound_values("fb"));
            for (i, b) in fplan.buffers.iter().enumerate() {
                if b.storage != Storage::Bound {
                    let name = format_ident!("fb{}", i);
                    let i = lit(i);
                    out.extend(quote!(let #name: &[f32] = &tape[#i];));
                }
            }
        }
        for (i, b) in plan.buffers.iter().enumerate() {
            if b.storage == Storage::Bound {
                continue;
            }
            let name = format_ident!("b{}", i);
            let width = lit(b.width);
            // A buffer holding only products' results, each filling it, is written whole
            // before it is read: it need not be zeroed.
            let written = plan.written_whole(g, i);
            let alloc = if written {
                quote!(::rnn::rt::scratch)
            } else {
                quote!(::rnn::rt::zeros)
            };
            out.extend(match (self.mode, b.rows) {
                (Mode::Step, _) => quote!(let mut #name = [0.0f32; #width];),
                (Mode::Sequence, Rows::Once) => quote!(let mut #name = #alloc(#width);),
                (Mode::Sequence, Rows::Step) => {
                    quote!(let mut #name = #alloc(batch * #width);)
                }
                (Mode::Sequence, Rows::All) => {
                    quote!(let mut #name = #alloc(steps * batch * #width);)
                }
            });
        }
        out.extend(self.bound_values("b"));

        // Carried slots.
        for (k, (_, n)) in g.states.iter().enumerate() {
            let (nxt, hold) = (format_ident!("nxt{}", k), format_ident!("hold{}", k));
            let n = lit(*n);
            if step_mode {
                out.extend(quote!(let mut #nxt = [0.0f32; #n];));
            } else {
                out.extend(quote! {
                    let mut #nxt = ::rnn::rt::zeros(batch * #n);
                    let mut #hold = ::rnn::rt::zeros(batch * #n);
                });
            }
        }
        let sums: Vec<Ident> = (0..plan.step_sums.len())
            .map(|i| format_ident!("sum{}", i))
            .collect();
        for (i, &(_, v)) in plan.step_sums.iter().enumerate() {
            let name = &sums[i];
            let n = lit(g.shape(v).row_len());
            out.extend(if step_mode {
                quote!(let mut #name = [0.0f32; #n];)
            } else {
                quote!(let mut #name = ::rnn::rt::zeros(#n);)
            });
        }

        // The weights the plan reads as (in, out), copied once.
        let packed = self.packed_weights();
        for &(w, o, i, all) in &packed {
            let acc = self.access(w, false);
            let (root, start, end) = (&acc.root, lit(acc.offset), lit(acc.offset + o * i));
            let name = format_ident!("wt{}", w.index());
            let rows = if all {
                quote!(steps * batch)
            } else {
                quote!(batch)
            };
            let (o, i) = (lit(o), lit(i));
            out.extend(
                quote!(let #name = ::rnn::rt::pack::<#o, #i>(isa, #rows, &#root[#start..#end]);),
            );
        }
        for v in self.computed(Phase::Pre) {
            out.extend(self.compute(v, false));
        }

        // The loop.
        let mut body = TokenStream::new();
        if !step_mode {
            // Packed sequences: the driver's one rule (`hold_finished` before the step,
            // `restore_finished` after it).
            let mut save = TokenStream::new();
            let mut restore = TokenStream::new();
            let zero = if self.reverse {
                quote!(::core::option::Option::Some(0.0))
            } else {
                quote!(::core::option::Option::None)
            };
            for (k, (_, n)) in g.states.iter().enumerate() {
                let (cur, nxt, hold) = (
                    format_ident!("cur{}", k),
                    format_ident!("nxt{}", k),
                    format_ident!("hold{}", k),
                );
                let n = lit(*n);
                save.extend(quote!(
                    ::rnn::rt::hold_finished(t, lengths, #n, &mut #cur, &mut #hold, #zero);
                ));
                restore.extend(quote!(
                    ::rnn::rt::restore_finished(t, lengths, #n, &mut #nxt, &#hold);
                ));
            }
            body.extend(quote! {
                let partial = ::rnn::rt::any_finished(t, lengths);
                if partial {
                    #save
                }
            });
            out.extend(quote!(let _ = &lengths;));
            // Restoring finished rows happens after the step's values.
            let restore = quote! {
                if partial {
                    #restore
                }
            };
            body.extend(self.loop_values(&sums));
            body.extend(restore);
        } else {
            body.extend(self.loop_values(&sums));
        }
        let mut swaps = TokenStream::new();
        for k in 0..g.states.len() {
            let (cur, nxt) = (format_ident!("cur{}", k), format_ident!("nxt{}", k));
            swaps.extend(if step_mode {
                quote!(::core::mem::swap(#cur, &mut #nxt);)
            } else {
                quote!(::core::mem::swap(&mut #cur, &mut #nxt);)
            });
        }
        if step_mode {
            // One step: the values after the loop (an output projection hoisted out of it
            // reads the recorded states) and the output come before the slots swap.
            let mut post = TokenStream::new();
            for v in self.computed(Phase::Post) {
                post.extend(self.compute(v, false));
            }
            let outputs = self.outputs(&sums);
            out.extend(quote! {
                let t = 0usize;
                #body
                #post
                #outputs
                #swaps
            });
            return out;
        } else {
            body.extend(swaps);
            let t = if self.reverse {
                quote!(steps - 1 - i)
            } else {
                quote!(i)
            };
            out.extend(quote! {
                for i in 0..steps {
                    let t = #t;
                    #body
                }
            });
        }
        for v in self.computed(Phase::Post) {
            out.extend(self.compute(v, false));
        }
        if !packed.is_empty() {
            let names = packed
                .iter()
                .map(|&(w, ..)| format_ident!("wt{}", w.index()));
            out.extend(quote!(::rnn::rt::recycle([#(#names.buffer),*]);));
        }
        out.extend(self.outputs(&sums));
        out
    }

    /// The weights the plan reads as `(in, out)` ([`WeightLayout::InOut`]), each once, with
    /// their `O × I` and whether a product over all `T·B` rows reads them (sequence mode; a
    /// step reads every weight as stored).
    fn packed_weights(&self) -> Vec<(Value, usize, usize, bool)> {
        if self.mode != Mode::Sequence {
            return Vec::new();
        }
        let g = self.g();
        let mut out: Vec<(Value, usize, usize, bool)> = Vec::new();
        for p in &self.plan.products {
            let Some(w) = p.weight else { continue };
            let Shape::Matrix(o, i) = g.shape(w) else {
                continue;
            };
            if p.layout != WeightLayout::InOut || self.plan.storage[w.index()] != Storage::Bound {
                continue;
            }
            let all = p.rows == Rows::All;
            match out.iter_mut().find(|e| e.0 == w) {
                Some(e) => e.3 |= all,
                None => out.push((w, o, i, all)),
            }
        }
        out
    }

    /// Each step's values, the carried values recorded on tapes, the next values not computed
    /// in place, and the per-step parameter gradients summed.
    fn loop_values(&self, sums: &[Ident]) -> TokenStream {
        let g = self.g();
        let plan = self.plan;
        let mut out = TokenStream::new();
        for (k, tape) in plan.carried_tape.iter().enumerate() {
            if let Some(tape) = tape {
                let n = lit(g.states[k].1);
                let (buf, cur) = (format_ident!("b{}", tape.0), format_ident!("cur{}", k));
                out.extend(quote! {
                    #buf[t * batch * #n..(t + 1) * batch * #n].copy_from_slice(&#cur[..]);
                });
            }
        }
        // Runs of element-wise values share one loop over the step's rows: each row's values
        // are computed while its operands are in the L1 cache (W1's gate math: 32 rows of
        // 1024 gate pre-activations and six 256-wide values, 512 KiB a step, no longer passes
        // through the L2 cache once per value).
        let mut run: Vec<TokenStream> = Vec::new();
        let flush = |run: &mut Vec<TokenStream>, out: &mut TokenStream| {
            if !run.is_empty() {
                out.extend(quote! {
                    for r in 0..batch {
                        #(#run)*
                    }
                });
                run.clear();
            }
        };
        for v in self.computed(Phase::Loop) {
            match self.row_body(v) {
                Some(body) => run.push(body),
                None => {
                    flush(&mut run, &mut out);
                    out.extend(self.compute(v, true));
                }
            }
        }
        flush(&mut run, &mut out);
        for (k, next) in plan.carried_next.iter().enumerate() {
            let Some(v) = *next else { continue };
            if plan.place[v.index()] != Place::Next(k as u32) {
                let src = self.access(v, true);
                let dst = Access {
                    root: format_ident!("nxt{}", k),
                    offset: 0,
                    stride: g.states[k].1,
                    width: g.states[k].1,
                    rows: RowSel::Step,
                };
                out.extend(copy_rows(&dst, &src));
            }
        }
        for (i, &(_, v)) in plan.step_sums.iter().enumerate() {
            let a = self.access(v, true);
            let (root, start, n) = (&a.root, a.start0(), lit(a.width));
            let sum = &sums[i];
            out.extend(quote! {
                for (s, x) in #sum.iter_mut().zip(&#root[#start..][..#n]) {
                    *s += *x;
                }
            });
        }
        out
    }

    /// The values computed in `phase` (bound ones excepted), in graph order.
    fn computed(&self, phase: Phase) -> Vec<Value> {
        let g = self.g();
        g.iter()
            .filter(|&v| self.s.phases[v.index()] == phase && self.plan.is_computed(g, v))
            .filter(|&v| self.plan.storage[v.index()] != Storage::Bound)
            .collect()
    }

    /// The bound values' buffers, named `{prefix}{i}`, computed from the parameters.
    fn bound_values(&self, prefix: &str) -> TokenStream {
        let g = self.g();
        let plan = self.plan;
        let mut out = TokenStream::new();
        for (i, b) in plan.buffers.iter().enumerate() {
            if b.storage == Storage::Bound {
                let name = format_ident!("{}{}", prefix, i);
                let width = lit(b.width);
                out.extend(match self.mode {
                    Mode::Step => quote!(let mut #name = [0.0f32; #width];),
                    Mode::Sequence => quote!(let mut #name = ::rnn::rt::zeros(#width);),
                });
            }
        }
        let renamed = Body {
            s: self.s,
            plan: self.plan,
            forward: None,
            reverse: false,
            mode: self.mode,
        };
        for v in g.iter() {
            if plan.storage[v.index()] == Storage::Bound
                && plan.is_computed(g, v)
                && !matches!(g.data(v).op, Op::Input(_))
            {
                let code = renamed.compute(v, false);
                out.extend(if prefix == "b" {
                    code
                } else {
                    rename_buffers(code, prefix)
                });
            }
        }
        out
    }

    /// An element-wise step value as the statements for row `r` of the step (sequence mode):
    /// `None` unless `v` is computed row by row over the step's rows from rows `r` (or the one
    /// row of an unbatched operand) of other buffers, so that consecutive ones can share a loop.
    fn row_body(&self, v: Value) -> Option<TokenStream> {
        if self.mode != Mode::Sequence {
            return None;
        }
        let g = self.g();
        let d = g.data(v);
        let elementwise = d.op.is_elementwise();
        let dst = self.access(v, true);
        if !elementwise || !matches!(dst.rows, RowSel::Step | RowSel::AtStep) {
            return None;
        }
        let args: Vec<Access> = d.args.iter().map(|&a| self.access(a, true)).collect();
        if args.iter().any(|a| a.root == dst.root) {
            return None;
        }
        let operands: Vec<Operand> = d
            .args
            .iter()
            .enumerate()
            .map(|(k, &a)| Operand::new(&args[k], g.shape(a), dst.width, k))
            .collect();
        let e: Vec<TokenStream> = operands.iter().map(|o| o.elem.clone()).collect();
        let value = match d.op {
            Op::Add => {
                let (a, b) = (&e[0], &e[1]);
                quote!(#a + #b)
            }
            Op::Sub => {
                let (a, b) = (&e[0], &e[1]);
                quote!(#a - #b)
            }
            Op::Mul => {
                let (a, b) = (&e[0], &e[1]);
                quote!(#a * #b)
            }
            Op::Div => {
                let (a, b) = (&e[0], &e[1]);
                quote!(#a / #b)
            }
            op => unary(op)(e[0].clone()),
        };
        let binds = operands.iter().map(|o| &o.bind);
        let (yr, n) = (&dst.root, lit(dst.width));
        let ys = dst.start(&quote!(r));
        Some(quote! {
            {
                #(#binds)*
                let y = &mut #yr[#ys..][..#n];
                for i in 0..#n {
                    y[i] = #value;
                }
            }
        })
    }

    /// The statements computing `v` into its place, over all rows or at step `t`.
    fn compute(&self, v: Value, at_step: bool) -> TokenStream {
        let g = self.g();
        let plan = self.plan;
        let d = g.data(v);
        let dst = self.access(v, at_step);
        let in_place = |i: usize| {
            let start: usize = d.args[..i].iter().map(|&a| g.shape(a).features()).sum();
            d.op == Op::Concat && plan.place[d.args[i].index()] == Place::View { of: v, start }
        };
        let mut prelude = TokenStream::new();
        let mut args: Vec<Access> = Vec::new();
        for (i, &a) in d.args.iter().enumerate() {
            let mut acc = self.access(a, at_step);
            if !in_place(i) && acc.root == dst.root {
                // An argument in the destination's own root is read from a copy of the rows it
                // covers (the step's rows of a tape, not the whole tape).
                let copy = format_ident!("arg{}", i);
                let root = &acc.root;
                let (start, count) = (acc.start0(), acc.count());
                let (stride, width) = (lit(acc.stride), lit(acc.width));
                prelude.extend(match self.mode {
                    Mode::Step => quote!(let #copy = #root;),
                    Mode::Sequence => quote! {
                        let #copy = #root[#start..#start + (#count - 1) * #stride + #width].to_vec();
                    },
                });
                if self.mode == Mode::Sequence {
                    acc.offset = 0;
                    if acc.rows == RowSel::AtStep {
                        acc.rows = RowSel::Step;
                    }
                }
                acc.root = copy;
            }
            args.push(acc);
        }
        let shapes: Vec<Shape> = d.args.iter().map(|&a| g.shape(a)).collect();
        let body = match d.op {
            Op::Input(_) => unreachable!("inputs are fed"),
            Op::Concat => {
                let unit = d.shape.feature_len();
                let mut col = 0;
                let mut out = TokenStream::new();
                for (i, a) in args.iter().enumerate() {
                    let width = shapes[i].row_len();
                    if !in_place(i) {
                        let part = Access {
                            offset: dst.offset + col,
                            width,
                            ..dst.clone()
                        };
                        out.extend(copy_rows(&part, a));
                    }
                    col += shapes[i].features() * unit;
                }
                out
            }
            Op::Const(bits) => {
                let c = f32_lit(f32::from_bits(bits));
                rows_loop(&dst, &[], |_| quote!(#c))
            }
            Op::MatMul | Op::MatMulT => {
                let Shape::Matrix(o, i) = shapes[0] else {
                    unreachable!("verified: a product's weight is a matrix")
                };
                let (w, x) = (&args[0], &args[1]);
                let (wr, wo, we) = (&w.root, lit(w.offset), lit(w.offset + o * i));
                let (xr, xo, xs) = (&x.root, x.start0(), lit(x.stride));
                let (yr, yo, ys) = (&dst.root, dst.start0(), lit(dst.stride));
                let rows = dst.count();
                let (ol, il) = (lit(o), lit(i));
                let f = if d.op == Op::MatMul {
                    quote!(matmul)
                } else {
                    quote!(matmul_t)
                };
                let packed = self
                    .plan
                    .products
                    .iter()
                    .any(|p| p.value == v && p.layout == WeightLayout::InOut)
                    && self.packed_weights().iter().any(|p| p.0 == d.args[0]);
                if packed {
                    let wt = format_ident!("wt{}", d.args[0].index());
                    quote! {
                        ::rnn::rt::matmul_packed::<#ol, #il>(
                            isa, #rows, &#wr[#wo..#we], &#wt,
                            &#xr[#xo..], #xs, &mut #yr[#yo..], #ys,
                        );
                    }
                } else {
                    quote! {
                        ::rnn::rt::#f::<#ol, #il>(
                            isa, #rows, &#wr[#wo..#we],
                            &#xr[#xo..], #xs, &mut #yr[#yo..], #ys,
                        );
                    }
                }
            }
            Op::OuterSum => {
                let (o, i) = (shapes[0].row_len(), shapes[1].row_len());
                let (a, b) = (&args[0], &args[1]);
                let (ar, ao, as_) = (&a.root, a.start0(), lit(a.stride));
                let (br, bo, bs) = (&b.root, b.start0(), lit(b.stride));
                let (yr, yo, ye) = (&dst.root, lit(dst.offset), lit(dst.offset + o * i));
                let rows = a.count();
                let (ol, il) = (lit(o), lit(i));
                quote! {
                    ::rnn::rt::outer_sum::<#ol, #il>(
                        isa, #rows, &#ar[#ao..], #as_, &#br[#bo..], #bs,
                        &mut #yr[#yo..#ye],
                    );
                }
            }
            Op::SumRows => {
                let a = &args[0];
                let (ar, ao, as_) = (&a.root, a.start0(), lit(a.stride));
                let (yr, yo, ye) = (&dst.root, lit(dst.offset), lit(dst.offset + dst.width));
                let (n, rows) = (lit(dst.width), a.count());
                quote! {
                    ::rnn::rt::sum_rows::<#n>(#rows, &#ar[#ao..], #as_, &mut #yr[#yo..#ye]);
                }
            }
            Op::SumFeatures => {
                let a = &args[0];
                let (ar, n) = (&a.root, lit(a.width));
                let (yr, rows) = (&dst.root, dst.count());
                let (ys, as_) = (dst.start(&quote!(r)), a.start(&quote!(r)));
                quote! {
                    for r in 0..#rows {
                        #yr[#ys] = ::rnn::rt::sum_features::<#n>(&#ar[#as_..][..#n]);
                    }
                }
            }
            Op::Spread(_) => {
                let a = &args[0];
                let (ar, as_) = (&a.root, a.start(&quote!(r)));
                row_map(&dst, quote!(let s = #ar[#as_];), quote!(s))
            }
            Op::Broadcast | Op::Slice { .. } => {
                let mut src = args[0].clone();
                if let Op::Slice { start, len } = d.op {
                    let unit = shapes[0].feature_len();
                    src.offset += start as usize * unit;
                    src.width = len as usize * unit;
                }
                copy_rows(&dst, &src)
            }
            Op::Add | Op::Sub | Op::Mul | Op::Div => {
                let f = match d.op {
                    Op::Add => |a, b| quote!(#a + #b),
                    Op::Sub => |a, b| quote!(#a - #b),
                    Op::Mul => |a, b| quote!(#a * #b),
                    _ => |a, b| quote!(#a / #b),
                };
                let operands = [
                    Operand::new(&args[0], shapes[0], dst.width, 0),
                    Operand::new(&args[1], shapes[1], dst.width, 1),
                ];
                elementwise(&dst, &operands, |e| f(e[0].clone(), e[1].clone()))
            }
            op => {
                let operands = [Operand::new(&args[0], shapes[0], dst.width, 0)];
                let f = unary(op);
                elementwise(&dst, &operands, |e| f(e[0].clone()))
            }
        };
        quote! {
            { #prelude #body }
        }
    }

    /// The end of the body: per-step outputs zeroed past each length, the parameter gradients
    /// and the carried values (sequence mode), or the output written to `y` (step mode).
    fn outputs(&self, sums: &[Ident]) -> TokenStream {
        let g = self.g();
        let plan = self.plan;
        if self.mode == Mode::Step {
            let o = g
                .output(OutRole::Output)
                .expect("a forward graph has an output");
            let src = self.access(o, true);
            let dst = Access {
                root: format_ident!("y"),
                offset: 0,
                stride: src.width,
                width: src.width,
                rows: RowSel::Step,
            };
            return copy_rows(&dst, &src);
        }
        let mut per_step = Vec::new();
        let mut grads = Vec::new();
        for o in &g.outputs {
            if is_per_step_output(o.role) {
                let a = self.access(o.value, false);
                let (r, n) = (&a.root, lit(a.width));
                let start = a.start(&quote!(row));
                per_step.push(quote! {{
                    let mut y = ::rnn::rt::scratch(steps * batch * #n);
                    for t in 0..steps {
                        for b in 0..batch {
                            let row = t * batch + b;
                            let y = &mut y[row * #n..(row + 1) * #n];
                            if t < lengths[b] {
                                y.copy_from_slice(&#r[#start..][..#n]);
                            } else {
                                y.fill(0.0);
                            }
                        }
                    }
                    y
                }});
            } else if let OutRole::ParamGrad(p) = o.role {
                let value = match plan.step_sums.iter().position(|&(q, _)| q == p) {
                    Some(i) => {
                        let s = &sums[i];
                        quote!(#s)
                    }
                    None => {
                        let a = self.access(o.value, false);
                        let (r, off, end) = (&a.root, lit(a.offset), lit(a.offset + a.width));
                        quote!(#r[#off..#end].to_vec())
                    }
                };
                let p = lit(p as usize);
                grads.push(quote!((#p, #value)));
            }
        }
        let carried: Vec<TokenStream> = (0..g.states.len())
            .map(|k| {
                let c = format_ident!("cur{}", k);
                quote!(#c)
            })
            .collect();
        let tape: Vec<TokenStream> = plan
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let name = format_ident!("b{}", i);
                if b.storage == Storage::Bound {
                    quote!(::rnn::rt::Vec::new())
                } else {
                    quote!(#name)
                }
            })
            .collect();
        quote! {
            (
                ::rnn::rt::vec![#(#per_step),*],
                ::rnn::rt::vec![#(#grads),*],
                ::rnn::rt::vec![#(#carried),*],
                ::rnn::rt::vec![#(#tape),*],
            )
        }
    }
}

/// The variable a fed role is read from.
fn feed_ident(role: Role) -> Ident {
    match role {
        Role::Param(p) => format_ident!("p{}", p),
        Role::Input => format_ident!("x"),
        Role::Cotangent(OutRole::Output) => format_ident!("dy"),
        other => unreachable!("{other:?} is not fed"),
    }
}

/// `code` with every `b{i}` identifier renamed `{prefix}{i}`.
fn rename_buffers(code: TokenStream, prefix: &str) -> TokenStream {
    use proc_macro2::{Group, TokenTree};
    code.into_iter()
        .map(|t| match t {
            TokenTree::Ident(id) => {
                let s = id.to_string();
                match s.strip_prefix('b') {
                    Some(n) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => {
                        TokenTree::Ident(Ident::new(&format!("{prefix}{n}"), id.span()))
                    }
                    _ => TokenTree::Ident(id),
                }
            }
            TokenTree::Group(g) => {
                let mut ng = Group::new(g.delimiter(), rename_buffers(g.stream(), prefix));
                ng.set_span(g.span());
                TokenTree::Group(ng)
            }
            other => other,
        })
        .collect()
}

/// An argument of an element-wise op as the loop over a row reads it.
struct Operand {
    /// Statements at the start of each row (binding the row's slice or scalar).
    bind: TokenStream,
    /// The element expression inside the loop over `i`.
    elem: TokenStream,
}

impl Operand {
    fn new(a: &Access, shape: Shape, width: usize, index: usize) -> Operand {
        let name = format_ident!("a{}", index);
        let root = &a.root;
        let r = if a.rows == RowSel::Once {
            quote!(0)
        } else {
            quote!(r)
        };
        let start = a.start(&r);
        let scalar = shape == Shape::Scalar || (a.width == 1 && width > 1);
        if scalar {
            Operand {
                bind: quote!(let #name = #root[#start];),
                elem: quote!(#name),
            }
        } else {
            let n = lit(a.width);
            Operand {
                bind: quote!(let #name = &#root[#start..][..#n];),
                elem: quote!(#name[i]),
            }
        }
    }
}

/// A loop over the destination's rows and features: `y[i] = f(operands)`.
fn elementwise(
    dst: &Access,
    operands: &[Operand],
    f: impl Fn(&[TokenStream]) -> TokenStream,
) -> TokenStream {
    let binds: Vec<&TokenStream> = operands.iter().map(|o| &o.bind).collect();
    let elems: Vec<TokenStream> = operands.iter().map(|o| o.elem.clone()).collect();
    let value = f(&elems);
    row_map(dst, quote!(#(#binds)*), value)
}

/// A loop over the destination's rows (`r`) and features (`i`) with `bind` at each row start.
fn row_map(dst: &Access, bind: TokenStream, value: TokenStream) -> TokenStream {
    let (yr, n, rows) = (&dst.root, lit(dst.width), dst.count());
    let ys = dst.start(&quote!(r));
    quote! {
        for r in 0..#rows {
            #bind
            let y = &mut #yr[#ys..][..#n];
            for i in 0..#n {
                y[i] = #value;
            }
        }
    }
}

/// A loop over the destination's rows filling each with `value` (no operands).
fn rows_loop(dst: &Access, _: &[Operand], value: impl Fn(()) -> TokenStream) -> TokenStream {
    let (yr, n, rows) = (&dst.root, lit(dst.width), dst.count());
    let ys = dst.start(&quote!(r));
    let v = value(());
    quote! {
        for r in 0..#rows {
            #yr[#ys..][..#n].fill(#v);
        }
    }
}

/// Copies `src` into `dst` row by row (a row-0 source fills every row).
fn copy_rows(dst: &Access, src: &Access) -> TokenStream {
    let (yr, n, rows) = (&dst.root, lit(dst.width), dst.count());
    let ys = dst.start(&quote!(r));
    let sr = &src.root;
    let r = if src.rows == RowSel::Once {
        quote!(0)
    } else {
        quote!(r)
    };
    let ss = src.start(&r);
    quote! {
        for r in 0..#rows {
            #yr[#ys..][..#n].copy_from_slice(&#sr[#ss..][..#n]);
        }
    }
}

/// The element expression of a one-argument op on `a`.
fn unary(op: Op) -> impl Fn(TokenStream) -> TokenStream {
    move |a| match op {
        Op::Neg => quote!(-#a),
        Op::Exp => quote!(::rnn::rt::math::exp(#a)),
        Op::Log => quote!(::rnn::rt::math::ln(#a)),
        Op::Sqrt => quote!(::rnn::rt::math::sqrt(#a)),
        Op::Softplus => quote!(::rnn::rt::math::softplus(#a)),
        Op::Sigmoid => quote!(::rnn::rt::math::sigmoid(#a)),
        Op::Tanh => quote!(::rnn::rt::math::tanh(#a)),
        Op::Abs => quote!(::rnn::rt::abs(#a)),
        Op::Sign => quote!(::rnn::rt::sign(#a)),
        Op::Relu => quote!(::rnn::rt::relu(#a)),
        Op::Step => quote!(::rnn::rt::step(#a)),
        Op::Max(bits) => {
            let c = f32_lit(f32::from_bits(bits));
            quote!(::rnn::rt::max(#a, #c))
        }
        Op::Min(bits) => {
            let c = f32_lit(f32::from_bits(bits));
            quote!(::rnn::rt::min(#a, #c))
        }
        other => unreachable!("{other:?} is not a one-argument element-wise op"),
    }
}

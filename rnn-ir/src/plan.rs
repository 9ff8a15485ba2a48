//! The storage plan: where every value of a scheduled step graph lives while a sequence runs.
//!
//! A backend reads the plan instead of deciding again. For each value it gives
//! - its [`Storage`] class: computed once when the weights are bound, once per sequence before
//!   the loop, per step inside the loop (forgotten after the step, or kept on a tape for every
//!   step), carried between steps, or once after the loop;
//! - its [`Place`]: a buffer of its own, a view into another value's buffer (slices never copy;
//!   the arguments of a concatenation are computed straight into their columns of it where they
//!   can be), the carried slot it reads or writes, or an input fed from outside;
//!
//! and for the whole graph the buffers (reused between values whose lifetimes do not overlap),
//! the double-buffered carried slots, and the weight layout of every matrix product.
//!
//! # Design
//! Buffers have one of three row counts: *once* (unbatched), *step* (`B` rows: one step of the
//! batch) and *all* (`T·B` rows, time-major: step `t` owns rows `t·B .. (t+1)·B`). A value's
//! columns in its buffer are `start .. start + width`; rows are `buffer width` apart, so a view
//! of a batched buffer is strided and a view of an unbatched one is contiguous (a slice of a
//! matrix takes whole rows).
//!
//! Reuse is decided on one execution order: the values before the loop, then one step of the
//! loop, then the values after it. A buffer is free after the last read of every value in it;
//! a value read inside the loop but computed before it stays live to the end of the loop; outputs
//! and values the backward pass reads (`keep`) are never freed. Only buffers of the same row count
//! and width are shared, between values of one step, or between values before and after the loop;
//! bound and tape buffers are never shared. The plan stays obviously right, and [`verify`] checks
//! it independently.
//!
//! # What is refused
//! A value of one step that is unbatched (a sum over the rows computed inside the loop) and that
//! the backward pass reads would have to be kept once per step; the plan has no such row count
//! (`T` rows of one), so [`verify_pair`](crate::program::verify_pair) refuses the model rather
//! than feed every step the last step's value. Cross-row sums inside a cell are rare (they mix
//! the sequences of a batch); sums over features are row-wise and unaffected.
//!
//! A parameter broadcast to every row is batched, so it is computed per sequence rather than
//! bound (its rows are one vector repeated; a backend may read it as the vector).
//!
//! Carried slots are double-buffered: a step reads slot `k`'s current buffer and its state
//! output is computed straight into the next buffer where it can be; after the step, rows past
//! their sequence's length copy the current value into the next one (the forward pass freezes
//! finished sequences), and the two buffers swap.

use crate::graph::dataflow::{self, carried_input, carried_output, is_per_step_output};
use crate::graph::{Graph, IrError, Op, OutRole, Role, Shape, Value};
use crate::passes::hoist::Phase;
use crate::schedule::Scheduled;
use std::fmt::{self, Write};

/// When a value is computed and how long it is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Storage {
    /// A parameter, a constant, or computed from them alone: once, when the weights are bound.
    Bound,
    /// Before the loop, once for the whole sequence (`T·B` rows, or once if unbatched).
    Sequence,
    /// Inside the loop, one step's `B` rows, dead after the step.
    Step,
    /// Inside the loop, kept for every step on a tape of `T·B` rows (read after the loop, by
    /// the backward pass, or a per-step output).
    Tape,
    /// A carried input: the current value of a double-buffered slot.
    Carried,
    /// After the loop, once for the whole sequence.
    After,
}

impl Storage {
    /// The printed name.
    pub fn name(self) -> &'static str {
        match self {
            Storage::Bound => "bound",
            Storage::Sequence => "seq",
            Storage::Step => "step",
            Storage::Tape => "tape",
            Storage::Carried => "carried",
            Storage::After => "after",
        }
    }
}

/// How many rows a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rows {
    /// One (an unbatched value).
    Once,
    /// `B`: one step of the batch.
    Step,
    /// `T·B`: every step of the batch, time-major.
    All,
}

impl Rows {
    /// The row count for `steps` steps of `batch` rows.
    pub fn count(self, steps: usize, batch: usize) -> usize {
        match self {
            Rows::Once => 1,
            Rows::Step => batch,
            Rows::All => steps * batch,
        }
    }
}

/// A buffer's index in [`StoragePlan::buffers`], printed `b{index}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u32);

impl fmt::Display for BufferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

/// A buffer: `rows × width` elements, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// The class of the values it holds.
    pub storage: Storage,
    /// Its row count.
    pub rows: Rows,
    /// Elements per row (per buffer when unbatched).
    pub width: usize,
    /// The values computed into it, in execution order (several when reused).
    pub values: Vec<Value>,
}

/// Where a value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Columns `0 .. width` of a buffer of its own.
    Buffer(BufferId),
    /// Features `start ..` of another value's place (a slice, or an argument computed straight
    /// into its concatenation).
    View {
        /// The value whose place this is part of.
        of: Value,
        /// The first feature (row of a matrix).
        start: usize,
    },
    /// Fed from outside: a parameter, the step input, a saved forward value, the output's
    /// cotangent. Batched feeds hold `T·B` rows.
    Feed(Role),
    /// The current value of carried slot `k`.
    Carried(u32),
    /// Written straight into the next value of carried slot `k`.
    Next(u32),
}

/// The layout in which a product reads its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// PyTorch's `(out, in)` row-major matrix, read as stored (`x · Wᵀ` reads it transposed
    /// through strides; no copy).
    OutIn,
    /// `Wᵀ`, outputs contiguous: `x · Wᵀ` over several rows (the input projection of all
    /// steps, the recurrent product of each step) then streams each input's weights in the order
    /// a GEMM micro-kernel consumes them, and the GEMM packs nothing at each call. A backend
    /// that compiles kernels copies a weight known before the sequence (a bound value) once per
    /// sequence into this layout (`(in, out)` row-major, or blocked into panels of outputs for
    /// its own kernel); the interpreter reads the stored matrix through strides. A step of a
    /// single row reads the `(out, in)` matrix as stored (one dot product per output).
    ///
    /// Measured on W1's recurrent product (32 × 256 by 256 × 1024, one thread, the `gemm`
    /// crate): 80 µs with `Wᵀ` against 137 µs reading `(out, in)`, which it packs again at
    /// every call; the input projection of all 16,384 rows: 35 ms against 43 ms.
    InOut,
}

/// A matrix product of the graph and how it runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Product {
    /// The value it defines.
    pub value: Value,
    /// The weight (`Matrix`) operand, `None` for an outer product of two batches.
    pub weight: Option<Value>,
    /// How the weight is read.
    pub layout: WeightLayout,
    /// The rows it runs over at once.
    pub rows: Rows,
}

/// The plan of one scheduled step graph (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct StoragePlan {
    /// Each value's class (indexed by value).
    pub storage: Vec<Storage>,
    /// Each value's place (indexed by value).
    pub place: Vec<Place>,
    /// The buffers.
    pub buffers: Vec<Buffer>,
    /// Per carried slot: the tape its current value is recorded on at every step, when a value
    /// after the loop or the backward pass reads it.
    pub carried_tape: Vec<Option<BufferId>>,
    /// Per carried slot: the value that becomes its next value at the end of each step (when
    /// its place is not [`Place::Next`], it is copied there after the step's values).
    pub carried_next: Vec<Option<Value>>,
    /// Parameter gradients computed inside the loop, each summed over the steps:
    /// `(parameter, value)`.
    pub step_sums: Vec<(u32, Value)>,
    /// Every matrix product.
    pub products: Vec<Product>,
    /// The values kept after the run for the backward pass.
    pub keep: Vec<Value>,
}

/// A value's place resolved to a root: the buffer or outside source and the column offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    /// A buffer of the plan.
    Buffer(BufferId),
    /// A feed.
    Feed(Role),
    /// The current value of a carried slot.
    Carried(u32),
    /// The next value of a carried slot.
    Next(u32),
}

impl StoragePlan {
    /// Plans `s`. `keep` lists the values the backward pass will read (the saved values), which
    /// must outlive the run; pass `&[]` for inference.
    pub fn new(s: &Scheduled, keep: &[Value]) -> StoragePlan {
        Planner::new(s, keep).run()
    }

    /// The root of `v`'s place and the offset of its first column there, in elements of one row
    /// (rows of a matrix count `columns` elements each).
    pub fn root(&self, g: &Graph, v: Value) -> (Root, usize) {
        match self.place[v.index()] {
            Place::Buffer(b) => (Root::Buffer(b), 0),
            Place::Feed(r) => (Root::Feed(r), 0),
            Place::Carried(k) => (Root::Carried(k), 0),
            Place::Next(k) => (Root::Next(k), 0),
            Place::View { of, start } => {
                let (root, offset) = self.root(g, of);
                let unit = g.shape(of).feature_len();
                (root, offset + start * unit)
            }
        }
    }

    /// The buffer storage of `v`'s root, if it is a buffer of the plan.
    pub fn buffer_of(&self, g: &Graph, v: Value) -> Option<BufferId> {
        match self.root(g, v).0 {
            Root::Buffer(b) => Some(b),
            _ => None,
        }
    }

    /// Whether `v` is computed into its place by an op (as opposed to fed, carried in, or a
    /// slice viewing another value).
    pub fn is_computed(&self, g: &Graph, v: Value) -> bool {
        match g.data(v).op {
            Op::Input(_) => false,
            // A slice is a view of its argument, unless it is a kept copy of a carried value
            // (which may itself be computed into a concatenation).
            Op::Slice { .. } => {
                let arg = g.data(v).args[0];
                !matches!(self.place[v.index()], Place::View { of, .. } if of == arg)
            }
            _ => true,
        }
    }

    /// Whether buffer `b` holds only products' results, each filling it: it is written whole
    /// before it is read, so a backend need not zero it.
    pub fn written_whole(&self, g: &Graph, b: usize) -> bool {
        let buffer = &self.buffers[b];
        buffer.values.iter().all(|&v| {
            matches!(g.data(v).op, Op::MatMul | Op::MatMulT)
                && self.place[v.index()] == Place::Buffer(BufferId(b as u32))
                && g.shape(v).row_len() == buffer.width
        })
    }

    /// Checks the plan against its schedule; see [`verify`].
    pub fn verify(&self, s: &Scheduled) -> Result<(), IrError> {
        verify(s, self)
    }

    /// The plan as text: the graph annotated with phase, class and place, then the buffers,
    /// carried slots and products.
    pub fn to_text(&self, s: &Scheduled) -> String {
        let g = &s.graph;
        let mut out = g.to_text_with(|v| {
            let place = match self.place[v.index()] {
                Place::Buffer(b) => b.to_string(),
                Place::View { of, start } => {
                    format!("{of}[{start}..{}]", start + g.shape(v).features())
                }
                Place::Feed(_) => "feed".into(),
                Place::Carried(k) => format!("carried {k}"),
                Place::Next(k) => format!("next {k}"),
            };
            format!(
                "{:<4} {:<7} {:<12}",
                s.phases[v.index()].name(),
                self.storage[v.index()].name(),
                place
            )
        });
        out.push_str(&self.buffers_text(s));
        out
    }

    /// The buffers, carried slots, products and kept values as text (the part of
    /// [`StoragePlan::to_text`] after the annotated graph).
    pub fn buffers_text(&self, s: &Scheduled) -> String {
        let g = &s.graph;
        let mut out = String::new();
        let _ = writeln!(out, "  buffers:");
        for (i, b) in self.buffers.iter().enumerate() {
            let rows = match b.rows {
                Rows::Once => "1",
                Rows::Step => "B",
                Rows::All => "T·B",
            };
            let values: Vec<String> = b.values.iter().map(|v| v.to_string()).collect();
            let _ = writeln!(
                out,
                "    b{i}: {:<7} {rows} × {}  ({})",
                b.storage.name(),
                b.width,
                values.join(", ")
            );
        }
        for (k, (name, n)) in g.states.iter().enumerate() {
            let input = g.iter().find(
                |&v| matches!(g.data(v).op, Op::Input(r) if carried_input(r) == Some(k as u32)),
            );
            let output = g
                .outputs
                .iter()
                .find(|o| carried_output(o.role) == Some(k as u32));
            let _ = write!(
                out,
                "  carried {k} `{name}` B × {n}: double-buffered, reads {}, next = {}",
                input.map_or("nothing".into(), |v| v.to_string()),
                output.map_or("(none)".into(), |o| {
                    if self.place[o.value.index()] == Place::Next(k as u32) {
                        format!("{} (in place)", o.value)
                    } else {
                        format!("copy of {}", o.value)
                    }
                })
            );
            match self.carried_tape[k] {
                Some(b) => {
                    let _ = writeln!(out, ", recorded on {b}");
                }
                None => out.push('\n'),
            }
        }
        for p in &self.products {
            let d = g.data(p.value);
            let rows = match p.rows {
                Rows::Once => "once",
                Rows::Step => "B rows per step",
                Rows::All => "T·B rows at once",
            };
            let weight = match (p.weight, p.layout) {
                (Some(w), WeightLayout::OutIn) => {
                    format!(", weight {w} {} (out, in) row-major", g.shape(w))
                }
                (Some(w), WeightLayout::InOut) => format!(
                    ", weight {w} {} read as (in, out) row-major, copied once per sequence",
                    g.shape(w)
                ),
                (None, _) => String::new(),
            };
            let _ = writeln!(
                out,
                "  product {} = {} -> {}{weight}, {rows}",
                p.value,
                d.op.mnemonic(),
                d.shape
            );
        }
        if !self.keep.is_empty() {
            let kept: Vec<String> = self.keep.iter().map(|v| v.to_string()).collect();
            let _ = writeln!(out, "  kept for backward: {}", kept.join(", "));
        }
        out
    }
}

struct Planner<'a> {
    s: &'a Scheduled,
    g: &'a Graph,
    keep: &'a [Value],
    storage: Vec<Storage>,
    place: Vec<Option<Place>>,
    /// Slices that are views of their argument (all but kept slices of a carried input).
    viewed: Vec<bool>,
}

impl<'a> Planner<'a> {
    fn new(s: &'a Scheduled, keep: &'a [Value]) -> Self {
        let g = &s.graph;
        Planner {
            s,
            g,
            keep,
            storage: Vec::new(),
            place: vec![None; g.len()],
            viewed: vec![false; g.len()],
        }
    }

    fn phase(&self, v: Value) -> Phase {
        self.s.phases[v.index()]
    }

    /// Each value's class.
    fn classify(&mut self) {
        let g = self.g;
        let bound = dataflow::parameter_derived(g);
        // Loop values that must be kept for every step.
        let mut taped = vec![false; g.len()];
        for v in g.iter() {
            if self.phase(v) == Phase::Post {
                for &a in &g.data(v).args {
                    taped[a.index()] = true;
                }
            }
        }
        for &v in self.keep {
            taped[v.index()] = true;
        }
        for o in &g.outputs {
            if is_per_step_output(o.role) {
                taped[o.value.index()] = true;
            }
        }
        self.storage = g
            .iter()
            .map(|v| {
                let d = g.data(v);
                match d.op {
                    Op::Input(role) if carried_input(role).is_some() => Storage::Carried,
                    Op::Input(Role::Saved(_)) if !d.shape.is_batched() => Storage::Bound,
                    _ if bound[v.index()] && !d.shape.is_batched() => Storage::Bound,
                    _ => match self.phase(v) {
                        Phase::Pre => Storage::Sequence,
                        Phase::Loop if taped[v.index()] => Storage::Tape,
                        Phase::Loop => Storage::Step,
                        Phase::Post => Storage::After,
                    },
                }
            })
            .collect();
        // A slice is a view of its argument and shares its class; a slice kept on the tape
        // keeps its argument there (walking backwards reaches chains of slices). A slice of a
        // carried input that must be kept is the one slice copied: the carried slot is
        // overwritten every step.
        for v in g.iter().rev() {
            if let Op::Slice { .. } = g.data(v).op {
                let a = g.data(v).args[0];
                if self.storage[v.index()] == Storage::Tape
                    && self.storage[a.index()] == Storage::Step
                {
                    self.storage[a.index()] = Storage::Tape;
                }
            }
        }
        for v in g.iter() {
            if let Op::Slice { .. } = g.data(v).op {
                let a = g.data(v).args[0];
                let kept_carried = self.storage[a.index()] == Storage::Carried && taped[v.index()];
                if !kept_carried {
                    self.storage[v.index()] = self.storage[a.index()];
                    self.viewed[v.index()] = true;
                }
            }
        }
    }

    /// Fixed places: feeds, carried slots, slices, state outputs written in place, concat
    /// arguments computed into their concatenation.
    fn place_fixed(&mut self) {
        let g = self.g;
        for v in g.iter() {
            let d = g.data(v);
            match d.op {
                Op::Input(role) => {
                    self.place[v.index()] = Some(match carried_input(role) {
                        Some(k) => Place::Carried(k),
                        None => Place::Feed(role),
                    });
                }
                Op::Slice { start, .. } if self.viewed[v.index()] => {
                    self.place[v.index()] = Some(Place::View {
                        of: d.args[0],
                        start: start as usize,
                    });
                }
                _ => {}
            }
        }
        for o in &g.outputs {
            let v = o.value;
            if let Some(k) = carried_output(o.role)
                && self.place[v.index()].is_none()
                && self.storage[v.index()] == Storage::Step
                && !matches!(g.data(v).op, Op::Const(_))
            {
                self.place[v.index()] = Some(Place::Next(k));
            }
        }
        // Concatenations assemble in place: an argument computed by an op, of the same class
        // and not placed otherwise, is computed straight into its columns. Later concats come
        // first so that nested ones chain (a concat placed in another keeps its arguments).
        for c in g.iter().rev() {
            let d = g.data(c);
            if d.op != Op::Concat || self.storage[c.index()] == Storage::Bound {
                continue;
            }
            let mut start = 0;
            let mut seen: Vec<Value> = Vec::new();
            for &a in &d.args {
                let (sa, sc) = (self.storage[a.index()], self.storage[c.index()]);
                // A step value joined into a concatenation kept on the tape is computed
                // straight onto the tape.
                let class_fits = sa == sc || (sa == Storage::Step && sc == Storage::Tape);
                let eligible = self.place[a.index()].is_none()
                    && !seen.contains(&a)
                    && class_fits
                    && !matches!(g.data(a).op, Op::Const(_) | Op::Input(_));
                if eligible {
                    self.place[a.index()] = Some(Place::View { of: c, start });
                    self.storage[a.index()] = sc;
                }
                seen.push(a);
                start += g.shape(a).features();
            }
        }
    }

    /// The execution order used for liveness: Pre values, then one step, then Post values.
    fn order(&self) -> Vec<Value> {
        let mut order = Vec::with_capacity(self.g.len());
        for phase in [Phase::Pre, Phase::Loop, Phase::Post] {
            order.extend(self.s.values(phase));
        }
        order
    }

    fn run(mut self) -> StoragePlan {
        let g = self.g;
        self.classify();
        self.place_fixed();
        let order = self.order();
        let pos_of = {
            let mut p = vec![0; g.len()];
            for (i, &v) in order.iter().enumerate() {
                p[v.index()] = i;
            }
            p
        };
        let loop_end = order
            .iter()
            .rposition(|&v| self.phase(v) != Phase::Post)
            .map_or(0, |p| p + 1);
        let end = usize::MAX;
        // The root value whose buffer `v` lives in (following views).
        let root_value = |place: &[Option<Place>], mut v: Value| loop {
            match place[v.index()] {
                Some(Place::View { of, .. }) => v = of,
                _ => return v,
            }
        };
        // First definition and last use of each root value's buffer.
        let mut first = vec![usize::MAX; g.len()];
        for &v in &order {
            let r = root_value(&self.place, v);
            first[r.index()] = first[r.index()].min(pos_of[v.index()]);
        }
        let mut last = vec![0usize; g.len()];
        for &v in &order {
            let reader_pos = pos_of[v.index()];
            for &a in &g.data(v).args {
                let r = root_value(&self.place, a);
                let mut p = reader_pos;
                if self.phase(v) == Phase::Loop && self.phase(r) != Phase::Loop {
                    p = p.max(loop_end);
                }
                if self.storage[r.index()] == Storage::Tape {
                    p = p.max(loop_end);
                }
                last[r.index()] = last[r.index()].max(p);
            }
            let r = root_value(&self.place, v);
            last[r.index()] = last[r.index()].max(pos_of[v.index()]);
        }
        for o in &g.outputs {
            let r = root_value(&self.place, o.value);
            last[r.index()] = end;
        }
        for &k in self.keep {
            let r = root_value(&self.place, k);
            last[r.index()] = end;
        }

        // Assign buffers to the roots that need one, in execution order (bound values first).
        let mut buffers: Vec<Buffer> = Vec::new();
        let mut free_at: Vec<usize> = Vec::new(); // per buffer: position after which it is free
        let mut roots: Vec<Value> = g
            .iter()
            .filter(|&v| self.place[v.index()].is_none())
            .collect();
        roots.sort_by_key(|&v| (self.storage[v.index()] != Storage::Bound, pos_of[v.index()]));
        for v in roots {
            let storage = self.storage[v.index()];
            let shape = g.shape(v);
            let rows = match (storage, shape.is_batched()) {
                (_, false) => Rows::Once,
                (Storage::Step, true) => Rows::Step,
                (_, true) => Rows::All,
            };
            let width = shape.row_len();
            let start = if storage == Storage::Tape {
                0
            } else {
                first[v.index()]
            };
            let reusable = |b: &Buffer, free: usize| {
                let same_class = matches!(
                    (b.storage, storage),
                    (Storage::Step, Storage::Step)
                        | (
                            Storage::Sequence | Storage::After,
                            Storage::Sequence | Storage::After
                        )
                );
                same_class && b.rows == rows && b.width == width && free < start
            };
            let id = match (0..buffers.len()).find(|&i| reusable(&buffers[i], free_at[i])) {
                Some(i) => i,
                None => {
                    buffers.push(Buffer {
                        storage,
                        rows,
                        width,
                        values: Vec::new(),
                    });
                    free_at.push(0);
                    buffers.len() - 1
                }
            };
            buffers[id].values.push(v);
            free_at[id] = if storage == Storage::Bound {
                end
            } else {
                last[v.index()]
            };
            self.place[v.index()] = Some(Place::Buffer(BufferId(id as u32)));
        }

        // Carried inputs read after the loop, by the backward pass, or returned as a per-step
        // output are recorded every step.
        let mut carried_tape = vec![None; g.states.len()];
        for v in g.iter() {
            if let Op::Input(role) = g.data(v).op
                && let Some(k) = carried_input(role)
            {
                let read_after = g
                    .iter()
                    .any(|u| self.phase(u) == Phase::Post && g.data(u).args.contains(&v))
                    || self.keep.contains(&v)
                    || g.outputs()
                        .iter()
                        .any(|o| o.value == v && is_per_step_output(o.role));
                if read_after {
                    buffers.push(Buffer {
                        storage: Storage::Tape,
                        rows: Rows::All,
                        width: g.shape(v).row_len(),
                        values: vec![v],
                    });
                    carried_tape[k as usize] = Some(BufferId(buffers.len() as u32 - 1));
                }
            }
        }

        let products = g
            .iter()
            .filter(|&v| matches!(g.data(v).op, Op::MatMul | Op::MatMulT | Op::OuterSum))
            .map(|v| {
                let d = g.data(v);
                let weight = (d.op != Op::OuterSum).then_some(d.args[0]);
                let rows = match (self.phase(v), d.shape.is_batched()) {
                    (_, false) if d.op != Op::OuterSum => Rows::Once,
                    (Phase::Loop, _) => Rows::Step,
                    _ => Rows::All,
                };
                // `x · Wᵀ` over batched rows reads `Wᵀ`; `d · W` (`matmul_t`) already reads `W`
                // with its outputs contiguous.
                let layout = if d.op == Op::MatMul && rows != Rows::Once {
                    WeightLayout::InOut
                } else {
                    WeightLayout::OutIn
                };
                Product {
                    value: v,
                    weight,
                    layout,
                    rows,
                }
            })
            .collect();

        // A view lives where its root lives: it takes the root's class (a step value computed
        // into a concatenation on the tape is on the tape, and so are its slices).
        for v in g.iter() {
            let r = root_value(&self.place, v);
            if r != v {
                self.storage[v.index()] = self.storage[r.index()];
            }
        }
        let carried_next = (0..g.states().len() as u32)
            .map(|k| {
                g.outputs()
                    .iter()
                    .find(|o| carried_output(o.role) == Some(k))
                    .map(|o| o.value)
            })
            .collect();
        let step_sums = g
            .outputs()
            .iter()
            .filter_map(|o| match o.role {
                OutRole::ParamGrad(p) if self.phase(o.value) == Phase::Loop => Some((p, o.value)),
                _ => None,
            })
            .collect();
        StoragePlan {
            carried_next,
            step_sums,
            storage: self.storage,
            place: self
                .place
                .into_iter()
                .map(|p| p.expect("every value is placed"))
                .collect(),
            buffers,
            carried_tape,
            products,
            keep: self.keep.to_vec(),
        }
    }
}

/// Checks a storage plan against its schedule, independently of how it was made:
/// 1. **Classes fit phases**: `Bound` values are unbatched and derived from parameters alone (or
///    unbatched saved values); `Sequence` values run before the loop, `Step` and `Tape` values in
///    it, `After` values after it; `Carried` values are carried inputs.
/// 2. **Places fit ops**: inputs are fed or carried slots; a slice is a view of its argument at
///    its own offset (or, kept from a carried slot, a copy); a view lies within the value it is
///    part of and has its class; a value written into a next slot is that slot's state output.
/// 3. **Buffers fit their values**: each buffer's row count and width hold each of its values,
///    its class is theirs, and values sharing a buffer never overlap in time: no reader of an
///    earlier value (or of a view of it) runs at or after the later value's definition, the
///    earlier one is neither kept nor an output, and bound and tape buffers are never shared.
/// 4. **Per-step outputs and kept values** are on `T·B` rows.
pub fn verify(s: &Scheduled, plan: &StoragePlan) -> Result<(), IrError> {
    let g = &s.graph;
    let bound = dataflow::parameter_derived(g);
    let err = |v: Value, m: String| Err(IrError::new(Some(v), g.data(v).op, m));
    if plan.storage.len() != g.len() || plan.place.len() != g.len() {
        return Err(IrError::new(
            None,
            Op::Concat,
            "the plan does not cover every value of the graph",
        ));
    }
    // 1. Classes fit phases.
    for v in g.iter() {
        let (phase, storage, d) = (s.phases[v.index()], plan.storage[v.index()], g.data(v));
        let carried = matches!(d.op, Op::Input(r) if carried_input(r).is_some());
        let fits = match storage {
            Storage::Bound => {
                !d.shape.is_batched()
                    && (bound[v.index()] || matches!(d.op, Op::Input(Role::Saved(_))))
            }
            Storage::Sequence => phase == Phase::Pre,
            Storage::Step | Storage::Tape => phase == Phase::Loop || phase == Phase::Post,
            // Views of a carried slot; after the loop they read its tape.
            Storage::Carried => carried || matches!(d.op, Op::Slice { .. }),
            Storage::After => phase == Phase::Post,
        };
        if !fits || carried != (storage == Storage::Carried && matches!(d.op, Op::Input(_))) {
            return err(
                v,
                format!(
                    "class `{}` does not fit a value in phase `{}`",
                    storage.name(),
                    phase.name()
                ),
            );
        }
    }
    // 2. Places fit ops; views lie within what they view.
    for v in g.iter() {
        let d = g.data(v);
        let place = plan.place[v.index()];
        match (d.op, place) {
            (Op::Input(role), Place::Carried(k)) if carried_input(role) == Some(k) => {}
            (Op::Input(role), Place::Feed(r)) if r == role && carried_input(role).is_none() => {}
            (Op::Input(_), _) => return err(v, "an input must be fed or a carried slot".into()),
            (Op::Slice { start, .. }, Place::View { of, start: s0 })
                if of == d.args[0] && s0 != start as usize =>
            {
                return err(v, format!("a slice from {start} viewed at {s0}"));
            }
            (_, Place::View { of, start }) => {
                if of.index() >= g.len()
                    || start + g.shape(v).features() > g.shape(of).features()
                    || g.shape(of).with_features(0) != g.shape(v).with_features(0)
                {
                    return err(v, format!("the view of {of} at {start} does not fit in it"));
                }
                if !matches!(d.op, Op::Slice { .. }) && g.data(of).op != Op::Concat {
                    return err(v, format!("only slices and concatenation parts view {of}"));
                }
                let mut root = of;
                while let Place::View { of, .. } = plan.place[root.index()] {
                    root = of;
                }
                if plan.storage[v.index()] != plan.storage[root.index()] {
                    return err(
                        v,
                        format!(
                            "a view of class `{}` into a `{}` value",
                            plan.storage[v.index()].name(),
                            plan.storage[root.index()].name()
                        ),
                    );
                }
            }
            (_, Place::Next(k)) => {
                let is_output = g
                    .outputs()
                    .iter()
                    .any(|o| o.value == v && carried_output(o.role) == Some(k));
                if !is_output {
                    return err(v, format!("written into next slot {k} but not its state"));
                }
            }
            (_, Place::Buffer(b)) if b.0 as usize >= plan.buffers.len() => {
                return err(v, format!("{b} does not exist"));
            }
            (Op::Slice { .. }, Place::Buffer(_)) | (_, Place::Buffer(_)) => {}
            (_, Place::Feed(_) | Place::Carried(_)) => {
                return err(v, "only inputs are fed or carried".into());
            }
        }
    }
    // 3. Buffers fit their values, and values sharing one never overlap in time.
    let order: Vec<Value> = [Phase::Pre, Phase::Loop, Phase::Post]
        .into_iter()
        .flat_map(|p| s.values(p))
        .collect();
    let mut pos = vec![0; g.len()];
    for (i, &v) in order.iter().enumerate() {
        pos[v.index()] = i;
    }
    let loop_end = order
        .iter()
        .rposition(|&v| s.phases[v.index()] != Phase::Post)
        .map_or(0, |p| p + 1);
    let pinned: Vec<bool> = g
        .iter()
        .map(|v| plan.keep.contains(&v) || g.outputs().iter().any(|o| o.value == v))
        .collect();
    // last_read[x]: the last position at which x, or any value viewing it, is read (a loop
    // value reading one computed outside the loop reads it until the loop ends); its own
    // position if nothing reads it. Once for all values, so the check stays linear in the
    // graph's size times the views' depth.
    let mut last_read = pos.clone();
    for r in g.iter() {
        for &arg in &g.data(r).args {
            let mut a = arg;
            loop {
                let mut p = pos[r.index()];
                if s.phases[r.index()] == Phase::Loop && s.phases[a.index()] != Phase::Loop {
                    p = p.max(loop_end);
                }
                last_read[a.index()] = last_read[a.index()].max(p);
                match plan.place[a.index()] {
                    Place::View { of, .. } => a = of,
                    _ => break,
                }
            }
        }
    }
    for (i, b) in plan.buffers.iter().enumerate() {
        for &v in &b.values {
            let shape = g.shape(v);
            let rows_fit = match (b.rows, shape.is_batched()) {
                (Rows::Once, false) => true,
                (Rows::Step, true) => b.storage == Storage::Step,
                (Rows::All, true) => b.storage != Storage::Step,
                _ => false,
            };
            if !rows_fit || shape.row_len() > b.width {
                return err(v, format!("does not fit buffer b{i} ({} wide)", b.width));
            }
            let class = plan.storage[v.index()];
            // Values before and after the loop share buffers of all rows.
            let all_rows = |c: Storage| matches!(c, Storage::Sequence | Storage::After);
            let same = class == b.storage || all_rows(class) && all_rows(b.storage);
            if !same && !matches!(g.data(v).op, Op::Input(_)) {
                return err(
                    v,
                    format!(
                        "class `{}` in a `{}` buffer",
                        class.name(),
                        b.storage.name()
                    ),
                );
            }
        }
        for (j, &u) in b.values.iter().enumerate() {
            for &w in &b.values[j + 1..] {
                let overlap = pinned[u.index()]
                    || b.storage == Storage::Bound
                    || b.storage == Storage::Tape
                    || last_read[u.index()] >= pos[w.index()];
                if overlap {
                    return err(w, format!("shares b{i} with {u}, which is still live"));
                }
            }
        }
    }
    // 4. Per-step outputs and kept values are on T·B rows.
    let rows_of = |v: Value| -> Option<Rows> {
        let mut x = v;
        loop {
            match plan.place[x.index()] {
                Place::View { of, .. } => x = of,
                Place::Buffer(b) => return Some(plan.buffers[b.0 as usize].rows),
                Place::Carried(k) => {
                    return plan.carried_tape[k as usize].map(|t| plan.buffers[t.0 as usize].rows);
                }
                Place::Feed(_) => return Some(Rows::All),
                Place::Next(_) => return Some(Rows::Step),
            }
        }
    };
    let per_step = g
        .outputs()
        .iter()
        .filter(|o| dataflow::is_per_step_output(o.role))
        .map(|o| o.value);
    for v in per_step.chain(plan.keep.iter().copied()) {
        if g.shape(v).is_batched() && rows_of(v) != Some(Rows::All) {
            return err(
                v,
                "a per-step output or kept value is not kept for every step".into(),
            );
        }
    }
    Ok(())
}

/// Which rows of its root a read or write of a value covers (what a backend's loops index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowSel {
    /// Row 0 only, for every row of the result (an unbatched value).
    Once,
    /// `B` rows from row 0 (a step buffer, a carried slot).
    Step,
    /// The `B` rows of step `t` in a `T·B` root.
    AtStep,
    /// All `T·B` rows.
    All,
}

impl RowSel {
    /// The rows a value of `shape` covers in a root that holds `T·B` rows (`all_rows`) or one
    /// step's, read over all rows or at step `t` (`at_step`).
    pub fn of(shape: Shape, all_rows: bool, at_step: bool) -> RowSel {
        match (shape.is_batched(), all_rows, at_step) {
            (false, _, _) => RowSel::Once,
            (true, true, true) => RowSel::AtStep,
            (true, true, false) => RowSel::All,
            (true, false, _) => RowSel::Step,
        }
    }

    /// The rows covered for `steps` steps of `batch` rows.
    pub fn count(self, steps: usize, batch: usize) -> usize {
        match self {
            RowSel::Once => 1,
            RowSel::Step | RowSel::AtStep => batch,
            RowSel::All => steps * batch,
        }
    }
}

/// The storage an [`Access`] reads or writes, as a backend allocates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessRoot {
    /// Buffer `i` of the plan.
    Buffer(u32),
    /// Buffer `i` of the forward pass's plan (a backward graph's saved values).
    Forward(u32),
    /// Parameter `p`.
    Param(u32),
    /// The step input over all `T·B` rows.
    Input,
    /// The output's cotangent over all `T·B` rows (backward).
    Cotangent,
    /// The current value of carried slot `k`.
    Carried(u32),
    /// The next value of carried slot `k`.
    Next(u32),
}

/// A value's place resolved for one read or write: `rows` rows of `width` elements, row `r`
/// starting at `offset + r · stride` of `root` (row `t·B + r` for [`RowSel::AtStep`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The storage.
    pub root: AccessRoot,
    /// The first element of row 0, in elements.
    pub offset: usize,
    /// Distance between rows.
    pub stride: usize,
    /// Elements per row.
    pub width: usize,
    /// The rows covered.
    pub rows: RowSel,
}

/// Elements per row of the value fed with `role` (a parameter is one row of all its elements;
/// a view of a fed value strides by the fed value's width, not its own).
fn fed_width(g: &Graph, role: Role) -> usize {
    match role {
        Role::Param(p) => g.params[p as usize].shape.row_len(),
        _ => g
            .shape(g.input(role).expect("a fed role is an input"))
            .row_len(),
    }
}

/// How value `v` of `g` (planned by `plan`) is read or written: over all rows (`at_step` false)
/// or at step `t`. A backward graph passes its forward pass (`forward`), whose saved values it
/// reads from the forward plan's buffers over all rows. The one resolution every backend that
/// compiles the plan uses (the Rust emitter, the JIT).
pub fn access(
    g: &Graph,
    plan: &StoragePlan,
    forward: Option<(&Graph, &StoragePlan)>,
    v: Value,
    at_step: bool,
) -> Access {
    let shape = g.shape(v);
    let (root, offset) = plan.root(g, v);
    let (root, stride, all_rows) = match root {
        Root::Buffer(b) => {
            let info = &plan.buffers[b.0 as usize];
            (AccessRoot::Buffer(b.0), info.width, info.rows == Rows::All)
        }
        Root::Carried(k) => {
            let n = g.states[k as usize].1;
            match (at_step, plan.carried_tape[k as usize]) {
                (false, Some(tape)) => (AccessRoot::Buffer(tape.0), n, true),
                _ => (AccessRoot::Carried(k), n, false),
            }
        }
        Root::Next(k) => (AccessRoot::Next(k), g.states[k as usize].1, false),
        Root::Feed(Role::Saved(s)) => {
            let (fg, fplan) = forward.expect("a backward graph has its forward pass");
            let mut a = saved(fg, fplan, s);
            a.offset += offset;
            a.width = shape.row_len();
            if !shape.is_batched() {
                a.rows = RowSel::Once;
            } else if at_step && a.rows == RowSel::All {
                a.rows = RowSel::AtStep;
            }
            return a;
        }
        Root::Feed(role) => {
            let root = match role {
                Role::Param(p) => AccessRoot::Param(p),
                Role::Input => AccessRoot::Input,
                Role::Cotangent(OutRole::Output) => AccessRoot::Cotangent,
                other => unreachable!("{other:?} is not fed"),
            };
            (root, fed_width(g, role), !matches!(role, Role::Param(_)))
        }
    };
    Access {
        root,
        offset,
        stride,
        width: shape.row_len(),
        rows: RowSel::of(shape, all_rows, at_step),
    }
}

/// Forward value `s` over all rows, as a backward graph reads it from the forward pass's tape.
fn saved(fg: &Graph, fplan: &StoragePlan, s: Value) -> Access {
    let shape = fg.shape(s);
    let (root, offset) = fplan.root(fg, s);
    let (root, stride, all_rows) = match root {
        Root::Buffer(b) => {
            let info = &fplan.buffers[b.0 as usize];
            (AccessRoot::Forward(b.0), info.width, info.rows == Rows::All)
        }
        Root::Carried(k) => {
            let tape = fplan.carried_tape[k as usize]
                .expect("a saved carried value is recorded on a tape");
            (AccessRoot::Forward(tape.0), fg.states[k as usize].1, true)
        }
        Root::Feed(role @ Role::Param(p)) => (AccessRoot::Param(p), fed_width(fg, role), false),
        Root::Feed(Role::Input) => (AccessRoot::Input, fed_width(fg, Role::Input), true),
        other => unreachable!("a forward value is not fed from {other:?}"),
    };
    Access {
        root,
        offset,
        stride,
        width: shape.row_len(),
        rows: RowSel::of(shape, all_rows, false),
    }
}

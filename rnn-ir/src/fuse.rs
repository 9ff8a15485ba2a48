//! Register fusion of element-wise values: which consecutive values of a plan a backend may
//! compute in one loop over their rows and columns, keeping the values between them in
//! registers, and which of them must still be written to their places.
//!
//! A [`Group`] is a run of consecutive element-wise values over the same rows. Its loop runs
//! over `width` columns (the greatest common divisor of its members' widths); at column `j` it
//! evaluates member `m` at each of its [`Group::demands`]: element `e + j` of `m` for each
//! offset `e`. A member read through a slice by another member is evaluated at the slice's
//! offset, so an LSTM's four gates are four offsets of the pre-activation, never stored. A
//! member is stored (each of its `width`-wide tiles) only when something outside the group
//! reads it, it outlives the step, or it lives in a place other than a buffer of its own.
//!
//! Within one column the members run in graph order, each reading its operands before it
//! writes. A group is cut before any member whose reads or writes could meet another member's
//! at a *different* column (a buffer the plan reuses, read at one offset and written at
//! another); what remains keeps the serial order of the plan.

use crate::graph::{Graph, Op, Shape, Value};
use crate::plan::{self, Access, Place, RowSel, Storage, StoragePlan};

/// A run of element-wise values computed in one loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The values, in graph order.
    pub members: Vec<Value>,
    /// Columns of the loop: every member's width is a multiple of it.
    pub width: usize,
    /// Per member: the offsets at which the loop evaluates it, ascending.
    pub demands: Vec<Vec<usize>>,
    /// Per member: whether the loop writes it to its place (every tile `0, width, 2·width, …`).
    pub stored: Vec<bool>,
    /// Per member of a step's group: the carried slot whose next value it also is (written there
    /// too, so no copy follows the step). Always `None` outside the loop.
    pub next: Vec<Option<u32>>,
}

/// One unit of a backend's code for a list of values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A value computed on its own.
    Single(Value),
    /// Values computed together.
    Fused(Group),
}

/// A value and the plans it is read through.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    /// The graph.
    pub g: &'a Graph,
    /// Its plan.
    pub plan: &'a StoragePlan,
    /// The forward pass's graph and plan (backward graphs).
    pub forward: Option<(&'a Graph, &'a StoragePlan)>,
    /// Whether the values are read at step `t` (inside the loop).
    pub at_step: bool,
}

impl Ctx<'_> {
    fn access(&self, v: Value) -> Access {
        plan::access(self.g, self.plan, self.forward, v, self.at_step)
    }
}

/// Whether `v` is computed element by element from its arguments' same elements (a computed
/// slice reads them at its offset).
pub fn fusible(g: &Graph, v: Value) -> bool {
    match g.data(v).op {
        Op::Slice { .. } => !matches!(g.shape(g.data(v).args[0]), Shape::Matrix(..)),
        op => op.is_elementwise(),
    }
}

/// Elements of one feature of `v` (a matrix's row).
fn unit(g: &Graph, v: Value) -> usize {
    g.shape(v).feature_len()
}

/// The offset at which `m` reads its arguments, relative to its own element (a slice's start).
pub fn arg_offset(g: &Graph, m: Value) -> usize {
    match g.data(m).op {
        Op::Slice { start, .. } => start as usize * unit(g, g.data(m).args[0]),
        _ => 0,
    }
}

/// `a` read as a member of `members` at an offset: itself, or a slice (a view, not computed)
/// of one.
pub fn resolve(
    g: &Graph,
    plan: &StoragePlan,
    members: &[Value],
    a: Value,
) -> Option<(usize, usize)> {
    let (mut cur, mut off) = (a, 0);
    loop {
        if let Some(i) = members.iter().position(|&m| m == cur) {
            return Some((i, off));
        }
        match plan.place[cur.index()] {
            Place::View { of, start } if !plan.is_computed(g, cur) => {
                off += start * unit(g, of);
                cur = of;
            }
            _ => return None,
        }
    }
}

/// The rows a value's loop runs over: 1, `B` or `T·B`.
fn row_class(rows: RowSel) -> u8 {
    match rows {
        RowSel::Once => 0,
        RowSel::Step | RowSel::AtStep => 1,
        RowSel::All => 2,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Splits `values` (computed in this order) into single values and fused groups.
pub fn schedule(ctx: Ctx<'_>, values: &[Value]) -> Vec<Item> {
    let g = ctx.g;
    let users = g.users();
    let mut items = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut members = grow(ctx, &values[i..]);
        let group = loop {
            let group = plan_group(ctx, &users, &members);
            match first_hazard(ctx, &group) {
                Some(cut) if cut >= 2 => members.truncate(cut),
                Some(_) => {
                    members.truncate(1);
                    break None;
                }
                None => break (members.len() >= 2).then_some(group),
            }
        };
        i += members.len();
        match group {
            Some(group) => items.push(Item::Fused(group)),
            None => items.push(Item::Single(members[0])),
        }
    }
    items
}

/// The longest run from `values[0]` that may share a loop (before hazards are considered).
fn grow(ctx: Ctx<'_>, values: &[Value]) -> Vec<Value> {
    let g = ctx.g;
    let first = values[0];
    if !fusible(g, first) {
        return vec![first];
    }
    let a0 = ctx.access(first);
    let mut members = vec![first];
    let mut width = a0.width;
    for &v in &values[1..] {
        if !fusible(g, v) {
            break;
        }
        let a = ctx.access(v);
        if row_class(a.rows) != row_class(a0.rows) {
            break;
        }
        let w = gcd(width, a.width);
        if w < 4 && !(w == width && w == a.width) {
            break;
        }
        // A member is read at its own elements: a one-element argument spread over a wider
        // value must come from memory.
        let spread = g.data(v).args.iter().any(|&x| {
            resolve(g, ctx.plan, &members, x).is_some() && g.shape(x).row_len() == 1 && a.width > 1
        });
        if spread {
            break;
        }
        members.push(v);
        width = w;
    }
    members
}

/// Whether `v`'s value is read by something other than `members` (through views), outlives
/// the step, or is an output.
fn escapes(ctx: Ctx<'_>, users: &[Vec<Value>], members: &[Value], v: Value) -> bool {
    let (g, plan) = (ctx.g, ctx.plan);
    if plan.storage[v.index()] != Storage::Step
        || !matches!(plan.place[v.index()], Place::Buffer(_))
        || plan.carried_next.contains(&Some(v))
        || plan.step_sums.iter().any(|&(_, s)| s == v)
        || plan.keep.contains(&v)
        || g.outputs().iter().any(|o| o.value == v)
    {
        return true;
    }
    let mut stack = vec![v];
    while let Some(x) = stack.pop() {
        for &u in &users[x.index()] {
            if members.contains(&u) {
                continue;
            }
            let view = !plan.is_computed(g, u)
                && matches!(plan.place[u.index()], Place::View { of, .. } if of == x);
            if view && !g.outputs().iter().any(|o| o.value == u) {
                stack.push(u);
            } else {
                return true;
            }
        }
    }
    false
}

/// The stores and demands of `members` as one group.
fn plan_group(ctx: Ctx<'_>, users: &[Vec<Value>], members: &[Value]) -> Group {
    let (g, plan) = (ctx.g, ctx.plan);
    let width = members.iter().map(|&m| ctx.access(m).width).fold(0, gcd);
    let stored: Vec<bool> = members
        .iter()
        .map(|&m| escapes(ctx, users, members, m))
        .collect();
    // Only a step's group writes a carried slot's next value: a state that depends on no
    // carried input is hoisted before the loop, over `T·B` rows, and copied at each step.
    let step = row_class(ctx.access(members[0]).rows) == 1 && ctx.at_step;
    let next: Vec<Option<u32>> = members
        .iter()
        .map(|&m| {
            plan.carried_next
                .iter()
                .position(|&n| n == Some(m))
                .filter(|&k| step && plan.place[m.index()] != Place::Next(k as u32))
                .map(|k| k as u32)
        })
        .collect();
    let mut demands: Vec<Vec<usize>> = vec![Vec::new(); members.len()];
    for (i, &m) in members.iter().enumerate().rev() {
        if stored[i] {
            let w = ctx.access(m).width;
            demands[i].extend((0..w).step_by(width));
        }
        demands[i].sort_unstable();
        demands[i].dedup();
        let shift = arg_offset(g, m);
        for &a in &g.data(m).args {
            if let Some((j, off)) = resolve(g, plan, members, a) {
                let more: Vec<usize> = demands[i].iter().map(|&e| e + off + shift).collect();
                demands[j].extend(more);
            }
        }
    }
    Group {
        members: members.to_vec(),
        width,
        demands,
        stored,
        next,
    }
}

/// A read or write of memory by member `member`: `access` at each offset of `at`.
struct Touch {
    member: usize,
    access: Access,
    at: Vec<usize>,
    /// Reads the row's one element (spread over the member's elements).
    scalar: bool,
}

/// The first member (index) that must leave the group for its memory order to stay serial.
fn first_hazard(ctx: Ctx<'_>, group: &Group) -> Option<usize> {
    let (g, plan) = (ctx.g, ctx.plan);
    let w = group.width;
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for (i, &m) in group.members.iter().enumerate() {
        let tiles: Vec<usize> = (0..ctx.access(m).width).step_by(w).collect();
        if group.stored[i] {
            writes.push(Touch {
                member: i,
                access: ctx.access(m),
                at: tiles.clone(),
                scalar: false,
            });
        }
        if let Some(k) = group.next[i] {
            let n = ctx.access(m).width;
            writes.push(Touch {
                member: i,
                access: Access {
                    root: plan::AccessRoot::Next(k),
                    offset: 0,
                    stride: n,
                    width: n,
                    rows: RowSel::Step,
                },
                at: tiles,
                scalar: false,
            });
        }
        let mw = ctx.access(m).width;
        let shift = arg_offset(g, m);
        for &a in &g.data(m).args {
            if resolve(g, plan, &group.members, a).is_some() {
                continue;
            }
            let access = ctx.access(a);
            let scalar = access.width == 1 && mw > 1;
            let at = if scalar {
                vec![0]
            } else {
                group.demands[i].iter().map(|&e| e + shift).collect()
            };
            reads.push(Touch {
                member: i,
                access,
                at,
                scalar,
            });
        }
    }
    let mut cut: Option<usize> = None;
    let mut meet = |x: &Touch, y: &Touch| {
        if conflict(x, y, w) {
            let later = x.member.max(y.member).max(1);
            cut = Some(cut.map_or(later, |c| c.min(later)));
        }
    };
    for (i, x) in writes.iter().enumerate() {
        for y in &writes[i + 1..] {
            meet(x, y);
        }
        for y in &reads {
            meet(x, y);
        }
    }
    cut
}

/// Whether two touches of one column loop may meet at different columns.
fn conflict(x: &Touch, y: &Touch, w: usize) -> bool {
    if x.access.root != y.access.root {
        return false;
    }
    let span = |t: &Touch, e: usize| {
        let start = t.access.offset + e;
        (start, start + if t.scalar { 1 } else { w })
    };
    if x.access.rows != y.access.rows || x.access.stride != y.access.stride {
        // One touch's rows may be another's: any shared column is a conflict.
        let end = |t: &Touch| t.access.offset + t.access.width.max(w);
        return x.access.offset < end(y) && y.access.offset < end(x);
    }
    for &ex in &x.at {
        for &ey in &y.at {
            let (xs, xe) = span(x, ex);
            let (ys, ye) = span(y, ey);
            // The same columns of the same rows meet at the same column, in member order.
            if xs < ye && ys < xe && !(xs == ys && !x.scalar && !y.scalar) {
                return true;
            }
        }
    }
    false
}

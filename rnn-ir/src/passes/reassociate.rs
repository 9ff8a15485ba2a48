//! Reassociation: sums are regrouped so that their loop-invariant terms are added together
//! first, where time hoisting can move that partial sum before the loop.
//!
//! An LSTM's gates are `(W_ih·x + b_ih) + (W_hh·h + b_hh)`: as written, `b_hh` is added inside
//! the loop because `W_hh·h` depends on the state. Flattening the sum to its terms
//! `[W_ih·x, b_ih, W_hh·h, b_hh]` and rebuilding it as `((W_ih·x + b_ih) + b_hh) + W_hh·h` leaves
//! one add per step instead of two. The same holds for any cell, custom ones included: a term
//! is invariant when it does not depend on a carried input (the dependency analysis of
//! [`hoist`](super::hoist)).
//!
//! Only sums are regrouped, and an inner add is flattened only if the sum is its one user, so no
//! work is duplicated. Floating-point addition is not associative: the result may differ from the
//! unregrouped sum in the last bits, well within the tolerance every backend is held to. Terms
//! keep their order within each group, so the pass is deterministic.

use super::rebuild;
use crate::graph::IrError;
use crate::graph::dataflow::{depends_on_carried, parameter_derived};
use crate::graph::{Graph, Op, Value};

/// `g` with every sum's loop-invariant terms grouped first.
pub fn reassociate(g: &Graph) -> Result<Graph, IrError> {
    let depends = depends_on_carried(g);
    let bound = parameter_derived(g);
    let users = g.users();
    let outputs: Vec<Value> = g.outputs.iter().map(|o| o.value).collect();
    // An add is "inner" when its one use is another add, which will absorb its terms.
    let inner = |v: Value| {
        g.data(v).op == Op::Add
            && users[v.index()].len() == 1
            && g.data(users[v.index()][0]).op == Op::Add
            && !outputs.contains(&v)
    };
    let mut terms_of: Vec<Vec<Value>> = vec![Vec::new(); g.len()];
    for v in g.iter() {
        if g.data(v).op == Op::Add {
            let mut terms = Vec::new();
            for &a in &g.data(v).args {
                if inner(a) {
                    terms.extend(terms_of[a.index()].iter().copied());
                } else {
                    terms.push(a);
                }
            }
            terms_of[v.index()] = terms;
        }
    }
    let mut map: Vec<Value> = Vec::with_capacity(g.len());
    rebuild(g, |out, v, d| {
        let regroup = d.op == Op::Add && !inner(v) && {
            let terms = &terms_of[v.index()];
            let invariant = terms.iter().filter(|t| !depends[t.index()]).count();
            terms.len() > 2 && invariant >= 2 && invariant < terms.len()
        };
        let nv = if regroup {
            let terms = &terms_of[v.index()];
            let (fixed, varying): (Vec<Value>, Vec<Value>) =
                terms.iter().partition(|t| !depends[t.index()]);
            // Sum the invariant terms first, and among them the ones derived from parameters
            // alone first: their partial sum (the two biases) is computed once, when the
            // weights are bound.
            let mut fixed = fixed;
            fixed.sort_by_key(|&t| !bound[t.index()] as u8);
            let mut acc = map[fixed[0].index()];
            for &t in fixed[1..].iter().chain(&varying) {
                acc = out.push(Op::Add, &[acc, map[t.index()]])?;
            }
            if out.shape(acc) != d.shape {
                return Err(IrError::new(
                    Some(v),
                    d.op,
                    format!("reassociation changed the shape to {}", out.shape(acc)),
                ));
            }
            if let Some(n) = d.name {
                out.set_name(acc, &n);
            }
            acc
        } else {
            out.push_raw(d.op, d.args, d.shape, d.name)
        };
        map.push(nv);
        Ok(nv)
    })
}

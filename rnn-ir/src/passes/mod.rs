//! Graph-to-graph optimisation passes, each a free function in its own module, and the pipeline
//! that runs them and re-verifies after each.
//!
//! - [`dce`]: dead-code elimination.
//! - [`cse`]: common-subexpression elimination.
//! - [`fuse`]: gate fusion (matmuls sharing a right operand become one stacked matmul).
//! - [`reassociate`]: sums regrouped so that their loop-invariant terms add up before the loop.
//! - [`hoist`]: time hoisting (which values run before, inside or after the time loop).

pub mod cse;
pub mod dce;
pub mod fuse;
pub mod hoist;
pub mod reassociate;

use crate::graph::IrError;
use crate::graph::{Graph, Value, ValueData, verify};

/// Rounds of the pass pipeline before [`optimize`] gives up looking for a fixed point.
pub const MAX_ROUNDS: usize = 8;

/// Runs DCE, CSE, gate fusion and reassociation until the graph no longer changes (at most
/// [`MAX_ROUNDS`] rounds), verifying the graph after every pass. (Time hoisting schedules the
/// result; it does not change it.)
///
/// A round can grow the graph (fusion turns four matmuls into a concat, one matmul and four
/// slices) and still open work for the next (common slices to merge), so the test is equality,
/// not size.
pub fn optimize(g: &Graph) -> Result<Graph, IrError> {
    let mut g = dce::dce(g);
    verify(&g)?;
    for _ in 0..MAX_ROUNDS {
        let before = g.clone();
        g = cse::cse(&g);
        verify(&g)?;
        g = fuse::fuse(&g)?;
        verify(&g)?;
        g = reassociate::reassociate(&g)?;
        verify(&g)?;
        g = dce::dce(&g);
        verify(&g)?;
        if g == before {
            break;
        }
    }
    Ok(g)
}

/// Copies `g` value by value in arena order. `f` receives the new graph and the old definition
/// with its arguments already renamed, and returns the new value standing for the old one.
pub(crate) fn rebuild(
    g: &Graph,
    mut f: impl FnMut(&mut Graph, Value, ValueData) -> Result<Value, IrError>,
) -> Result<Graph, IrError> {
    let mut out = Graph::with_signature_of(g);
    let mut map: Vec<Value> = Vec::with_capacity(g.len());
    for v in g.iter() {
        let mut d = g.data(v).clone();
        for a in &mut d.args {
            *a = map[a.index()];
        }
        let nv = f(&mut out, v, d)?;
        map.push(nv);
    }
    for o in &g.outputs {
        out.set_output(o.role, map[o.value.index()]);
    }
    Ok(out)
}

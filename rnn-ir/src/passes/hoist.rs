//! Time hoisting: decides, by dependency analysis alone, which values of a step graph run before
//! the time loop, inside it, or after it.
//!
//! A step graph has *carried* inputs (the recurrent state, or in a backward graph the state's
//! gradient) and *carried* outputs (the next state, or the gradient for the previous step).
//! - **Pre**: the value does not depend on a carried input. It depends on the step's input,
//!   saved values and parameters alone, so it is computed for all time steps at once, as one
//!   operation over `T·B` rows (`W_ih · x_t` for every t becomes one GEMM). Element-wise sums,
//!   differences, negations and products that only the loop reads are the exception: they run
//!   in the loop (`sink`), where they cost no pass over a buffer of all steps.
//! - **Loop**: it depends on a carried input and a carried output depends on it: it must run
//!   step by step.
//! - **Post**: it depends on a carried input but no carried output needs it, so it is computed
//!   after the loop over the `T·B` rows the loop recorded (the weight gradients `dW = Σ_t dg_tᵀ x_t`
//!   become one GEMM, `dx_t = dg_t · W` another).
//!
//! Running a value over all `T·B` rows at once is only right if it treats rows independently, or
//! if it is a reduction whose result is only summed over time (a parameter gradient). The pass
//! checks this: a Pre or Post value may not combine a reduction's result with rows, and nothing
//! may use an unbatched Loop value outside the loop. A graph breaking these rules is refused.

use crate::graph::IrError;
use crate::graph::dataflow::{depends_on_carried, is_carried_input, is_carried_output, needed_by};
use crate::graph::{Graph, Op, Value};

/// Where a value runs relative to the time loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Before the loop, once over all time steps.
    Pre,
    /// Inside the loop, once per time step.
    Loop,
    /// After the loop, once over all time steps.
    Post,
}

impl Phase {
    /// The printer's tag.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pre => "pre",
            Phase::Loop => "loop",
            Phase::Post => "post",
        }
    }
}

/// Every value in the loop: the schedule without hoisting, the reference hoisting is tested
/// against.
pub fn no_hoist(g: &Graph) -> Vec<Phase> {
    vec![Phase::Loop; g.len()]
}

/// The phase of every value of `g` (see the module doc).
pub fn hoist(g: &Graph) -> Result<Vec<Phase>, IrError> {
    let depends = depends_on_carried(g);
    let needed = needed_by(g, is_carried_output);
    // A carried input is the state at one step: it lives in the loop even when only values
    // after the loop read it (they read what the loop recorded).
    let phases: Vec<Phase> = g
        .iter()
        .map(
            |v| match (depends[v.index()], needed[v.index()], g.data(v).op) {
                (_, _, Op::Input(role)) if is_carried_input(role) => Phase::Loop,
                (false, _, _) => Phase::Pre,
                (true, true, _) => Phase::Loop,
                (true, false, _) => Phase::Post,
            },
        )
        .collect();
    let phases = sink(g, phases);
    check(g, &phases)?;
    Ok(phases)
}

/// Moves into the loop the row-wise element-wise sums, differences, negations and products
/// before it that only the loop reads. The work is the same either way, but before the loop it
/// fills a buffer of all `T·B` rows that the loop then reads back: for W1 the gates' bias added
/// to the input projection, 64 MiB written and read again, 6% of the run (measured). Matrix
/// products stay before the loop (one GEMM is the point of hoisting them), and so do functions
/// (see `sink`'s body), the graph's results, reductions, views and copies.
fn sink(g: &Graph, mut phases: Vec<Phase>) -> Vec<Phase> {
    let users = g.users();
    let mut is_output = vec![false; g.len()];
    for o in g.outputs() {
        is_output[o.value.index()] = true;
    }
    for v in g.iter().rev() {
        let d = g.data(v);
        // Additions, subtractions and products only: a pass over memory either way, and
        // nearly free inside the loop. Functions (sigmoid, tanh, exp, ...) stay before it, where
        // the work of all steps is independent (minGRU's gates: its point is that nothing but
        // the state's update is sequential). Views and copies live with their operands' buffers.
        let movable = matches!(d.op, Op::Add | Op::Sub | Op::Neg | Op::Mul) && d.shape.is_batched();
        let u = &users[v.index()];
        if phases[v.index()] == Phase::Pre
            && movable
            && !is_output[v.index()]
            && !u.is_empty()
            && u.iter().all(|w| phases[w.index()] == Phase::Loop)
        {
            phases[v.index()] = Phase::Loop;
        }
    }
    phases
}

/// Checks that running Pre and Post values over all time steps at once is exact.
///
/// A value derived from a sum over rows stands, outside the loop, for the sum over all time
/// steps of its per-step values. That is only the same as summing it step by step when it is
/// *linear* in the sums it reads: sums, differences, negation, slices and concatenations of
/// them (with zero padding), sums over and spreads across the feature axis, and products with
/// (or division by) a value that is the same at every step (a parameter or constant). Anything else (`sum · sum`, `tanh(sum)`, `sum + 1`) is refused.
pub fn check(g: &Graph, phases: &[Phase]) -> Result<(), IrError> {
    // reduced[v]: v is unbatched and derived from a reduction over rows.
    let mut reduced = vec![false; g.len()];
    for v in g.iter() {
        let d = g.data(v);
        let phase = phases[v.index()];
        let from_reduction = d.op.is_reduction() || d.args.iter().any(|a| reduced[a.index()]);
        reduced[v.index()] = from_reduction && !d.shape.is_batched();
        let err = |m: &str| Err(IrError::new(Some(v), d.op, m));
        if phase != Phase::Loop
            && reduced[v.index()]
            && !d.op.is_reduction()
            && !linear_in_reductions(g, v, &reduced)
        {
            return err(
                "outside the loop, a value may only be linear in a sum over the rows (sums, differences, slices, concatenations, products with a parameter)",
            );
        }
        for &a in &d.args {
            let pa = phases[a.index()];
            if phase != Phase::Loop && d.shape.is_batched() && reduced[a.index()] {
                return err("a row-wise value outside the loop uses a sum over the rows");
            }
            if phase == Phase::Loop && pa != Phase::Loop && reduced[a.index()] {
                return err("a loop value uses a sum over the rows of all time steps");
            }
            if phase == Phase::Post && pa == Phase::Loop && !g.shape(a).is_batched() {
                return err("a value after the loop uses an unbatched value of one step");
            }
            if phase == Phase::Pre && pa != Phase::Pre || phase == Phase::Loop && pa == Phase::Post
            {
                return err("a value uses one computed later in the schedule");
            }
        }
    }
    Ok(())
}

/// Whether `v`, which reads at least one reduced value, is linear in the reduced values it reads.
fn linear_in_reductions(g: &Graph, v: Value, reduced: &[bool]) -> bool {
    let d = g.data(v);
    let is_reduced = |a: &Value| reduced[a.index()];
    let is_zero = |a: &Value| g.data(*a).op == Op::Const(0.0f32.to_bits());
    match d.op {
        Op::Neg | Op::Slice { .. } | Op::SumFeatures | Op::Spread(_) => true,
        Op::Add | Op::Sub | Op::Concat => d.args.iter().all(|a| is_reduced(a) || is_zero(a)),
        Op::Mul => {
            let [a, b] = [d.args[0], d.args[1]];
            // Unbatched and not from a reduction: parameters and constants, the same at every step.
            let invariant = |x: Value| !reduced[x.index()] && !g.shape(x).is_batched();
            (reduced[a.index()] && invariant(b)) || (reduced[b.index()] && invariant(a))
        }
        Op::Div => {
            let [a, b] = [d.args[0], d.args[1]];
            reduced[a.index()] && !reduced[b.index()] && !g.shape(b).is_batched()
        }
        _ => false,
    }
}

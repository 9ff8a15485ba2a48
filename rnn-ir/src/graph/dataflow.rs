//! Dataflow facts about a graph, each computed in one place: which roles are carried from one
//! step to the next, which values depend on a carried input, which are derived from parameters
//! alone, and which values the outputs need. Passes, the scheduler and the storage plan all read
//! them here.

use super::{Graph, Op, OutRole, Role};

/// The carried slot an input role reads: state `k` (forward) or the gradient of state `k`
/// flowing back from the next step (backward).
pub fn carried_input(role: Role) -> Option<u32> {
    match role {
        Role::State(k) | Role::Cotangent(OutRole::State(k)) => Some(k),
        _ => None,
    }
}

/// The carried slot an output role writes: the next state `k` (forward) or the gradient of
/// state `k` carried to the previous step (backward).
pub fn carried_output(role: OutRole) -> Option<u32> {
    match role {
        OutRole::State(k) | OutRole::StateGrad(k) => Some(k),
        _ => None,
    }
}

/// Whether an input role is carried from one step to the next.
pub fn is_carried_input(role: Role) -> bool {
    carried_input(role).is_some()
}

/// Whether an output role is carried to the next step.
pub fn is_carried_output(role: OutRole) -> bool {
    carried_output(role).is_some()
}

/// Whether an output has one value per step and row (`y_t`, `dx_t`), as opposed to a carried
/// value or a parameter gradient summed over time.
pub fn is_per_step_output(role: OutRole) -> bool {
    matches!(role, OutRole::Output | OutRole::InputGrad)
}

/// For each value, whether it depends (transitively) on a carried input.
pub fn depends_on_carried(g: &Graph) -> Vec<bool> {
    let mut depends = vec![false; g.len()];
    for v in g.iter() {
        let d = g.data(v);
        depends[v.index()] = match d.op {
            Op::Input(role) => is_carried_input(role),
            _ => d.args.iter().any(|a| depends[a.index()]),
        };
    }
    depends
}

/// For each value, whether it is unbatched and computed from parameters and unbatched constants
/// alone, through unbatched values only (never from the step input, a state, a saved value, a
/// cotangent, or anything batched, whose sums over rows depend on the batch size): what can be
/// computed once when weights are bound.
pub fn parameter_derived(g: &Graph) -> Vec<bool> {
    let mut fixed = vec![false; g.len()];
    for v in g.iter() {
        let d = g.data(v);
        fixed[v.index()] = !d.shape.is_batched()
            && match d.op {
                Op::Input(Role::Param(_)) | Op::Const(_) => true,
                Op::Input(_) => false,
                _ => d.args.iter().all(|a| fixed[a.index()]),
            };
    }
    fixed
}

/// For each value, whether an output selected by `wanted` depends on it (the value itself
/// included).
pub fn needed_by(g: &Graph, wanted: impl Fn(OutRole) -> bool) -> Vec<bool> {
    let mut needed = vec![false; g.len()];
    for o in &g.outputs {
        if wanted(o.role) {
            needed[o.value.index()] = true;
        }
    }
    for v in g.iter().rev() {
        if needed[v.index()] {
            for a in &g.data(v).args {
                needed[a.index()] = true;
            }
        }
    }
    needed
}

/// For each value, whether any output depends on it: the live values of dead-code elimination.
pub fn live(g: &Graph) -> Vec<bool> {
    needed_by(g, |_| true)
}

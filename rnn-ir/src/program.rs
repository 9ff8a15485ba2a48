//! The Program: the sequence-level plan for a whole model, the contract every backend reads.
//!
//! For each layer it holds the forward step graph and the backward step graph (from
//! [`autodiff`]), each optimised and scheduled by time hoisting into values run
//! before the loop, per step, and after the loop, and for each a [`StoragePlan`]: where every
//! value lives, which buffers are reused, how carried state is double-buffered, what the forward
//! pass keeps for the backward pass. Both directions of a layer share its graphs and plans
//! (their parameters differ, not their code). [`verify_pair`] checks that a backward graph and
//! its forward graph agree.
//!
//! Layers, directions, per-sequence lengths, initial states, batch-first layout and the
//! reverse-time backward pass are orchestrated once, by the shared driver (`driver`, with the
//! `runtime` feature), over a per-sequence executor that each backend supplies.
//! `Display for Program` prints the whole plan; its snapshots are the contract.

use crate::autodiff;
use crate::error::{Error, Result};
use crate::graph::dataflow::carried_input;
use crate::graph::{Graph, IrError, Op, OutRole, ParamInfo, Role, Shape, Value, verify};
use crate::lower::lower;
use crate::passes;
use crate::plan::{Storage, StoragePlan};
pub use crate::schedule::Scheduled;
use crate::spec::ModelSpec;
use std::fmt;

/// The compiled cell of one layer.
#[derive(Clone, Debug)]
pub struct CellProgram {
    /// Features of the layer's input.
    pub input_size: usize,
    /// The forward step.
    pub forward: Scheduled,
    /// The backward step.
    pub backward: Scheduled,
    /// The forward values the backward step reads (`Role::Saved`), in order.
    pub saved: Vec<Value>,
    /// The forward step's storage plan when no gradient is wanted (nothing kept).
    pub inference: StoragePlan,
    /// The forward step's storage plan when the backward pass follows (`saved` kept).
    pub training: StoragePlan,
    /// The backward step's storage plan.
    pub backward_plan: StoragePlan,
}

impl CellProgram {
    /// Features of the step's output `y_t`.
    pub fn output_size(&self) -> usize {
        let g = &self.forward.graph;
        g.output(OutRole::Output)
            .map_or(0, |v| g.shape(v).features())
    }

    /// The forward plan for a run that does (`training`) or does not want gradients.
    pub fn forward_plan(&self, training: bool) -> &StoragePlan {
        if training {
            &self.training
        } else {
            &self.inference
        }
    }
}

/// How to compile.
#[derive(Clone, Copy, Debug)]
pub struct CompileOptions {
    /// Run DCE, CSE, gate fusion and time hoisting. Off, the graphs are used as lowered and as
    /// autodiff made them, every value in the loop: the reference the passes are tested against.
    pub optimize: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions { optimize: true }
    }
}

/// A whole model, compiled.
#[derive(Clone, Debug)]
pub struct Program {
    /// The declaration.
    pub spec: ModelSpec,
    /// One compiled cell per layer.
    pub layers: Vec<CellProgram>,
}

impl Program {
    /// Compiles `spec` with every pass.
    pub fn compile(spec: &ModelSpec) -> Result<Program> {
        Self::compile_with(spec, CompileOptions::default())
    }

    /// Compiles `spec`: lower → verify → passes → autodiff → passes → hoisting, per layer.
    pub fn compile_with(spec: &ModelSpec, options: CompileOptions) -> Result<Program> {
        spec.validate().map_err(Error::Spec)?;
        if spec.has_model_layers() {
            return Err(Error::Spec(
                "this declaration has an embedding (`vocab`) or a head (`head`) around its recurrent stack: compile it as a `Model` (`Model::compile`), which runs them; a `Program` is the stack alone (`ModelSpec::stack`)".into(),
            ));
        }
        let mut layers = Vec::with_capacity(spec.num_layers);
        for layer in 0..spec.num_layers {
            let input_size = spec.layer_input_size(layer);
            if let Some(prev) = layers
                .iter()
                .find(|c: &&CellProgram| c.input_size == input_size)
            {
                layers.push(prev.clone());
                continue;
            }
            let cell = compile_cell(spec, input_size, options)?;
            if let Some(first) = layers.first() {
                same_sizes(first, &cell, layer)?;
            }
            layers.push(cell);
        }
        Ok(Program {
            spec: spec.clone(),
            layers,
        })
    }

    /// Every parameter in PyTorch's `state_dict` order (per layer, per direction, in the cell's
    /// declaration order) with its full name and shape.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        self.parameter_infos()
            .into_iter()
            .map(|(name, p)| (name, p.dims()))
            .collect()
    }

    /// Every parameter, in the order of [`Program::parameters`], with its full name and what the
    /// cell declares of it (shape, whether it is a scalar, its initial value if given).
    pub fn parameter_infos(&self) -> Vec<(String, &ParamInfo)> {
        let mut out = Vec::new();
        for (layer, cell) in self.layers.iter().enumerate() {
            for direction in 0..self.spec.directions() {
                let suffix = ModelSpec::param_suffix(layer, direction);
                for p in &cell.forward.graph.params {
                    out.push((format!("{}{suffix}", p.name), p));
                }
            }
        }
        out
    }

    /// The number of scalar parameters, exact.
    ///
    /// It is a `u128` because a model that validates can hold more than `u64::MAX` parameters
    /// (a deep stack at the largest sizes, [`ModelSpec::MAX_SIZE`] = 2²⁴, has about 2⁵² per
    /// layer), even though no such model fits in memory to run. Every size is at most 2²⁴, so
    /// each tensor holds at most 2⁴⁸ scalars and the sum cannot reach `u128::MAX` short of 2⁸⁰
    /// tensors; the arithmetic is checked all the same and saturates at `u128::MAX` rather than
    /// wrap around.
    pub fn parameter_count(&self) -> u128 {
        self.parameters()
            .iter()
            .map(|(_, s)| {
                s.iter()
                    .try_fold(1u128, |n, &d| n.checked_mul(d as u128))
                    .unwrap_or(u128::MAX)
            })
            .fold(0u128, u128::saturating_add)
    }

    /// Features of each direction's output `y_t`, as the compiled cell computes it (every layer
    /// has the same: [`Program::compile`] refuses a stack where they differ). The same number as
    /// [`ModelSpec::output_size`], without lowering a custom cell again.
    pub fn output_size(&self) -> usize {
        self.layers[0].output_size()
    }

    /// The recurrent states' names and sizes (`h`, and `c` for an LSTM).
    pub fn states(&self) -> &[(String, usize)] {
        &self.layers[0].forward.graph.states
    }
}

/// Refuses a layer whose output or states differ in size from layer 0's: the driver, the
/// streaming state and `h_n` hold one size per state for the whole stack, as PyTorch's do. A
/// custom cell whose output or state size depends on `input` can only be one layer deep.
fn same_sizes(first: &CellProgram, cell: &CellProgram, layer: usize) -> Result<()> {
    let out = |c: &CellProgram| {
        let g = &c.forward.graph;
        g.output(OutRole::Output)
            .map_or(0, |v| g.shape(v).features())
    };
    if out(cell) != out(first) {
        return Err(Error::Spec(format!(
            "the output has {} features in layer {layer} but {} in layer 0: it depends on `input`, which differs between layers; a stack needs every layer's output to have one size",
            out(cell),
            out(first)
        )));
    }
    for ((name, a), (_, b)) in cell
        .forward
        .graph
        .states
        .iter()
        .zip(&first.forward.graph.states)
    {
        if a != b {
            return Err(Error::Spec(format!(
                "state `{name}` has {a} features in layer {layer} but {b} in layer 0: its size depends on `input`, which differs between layers; a stack needs every layer's states to have one size"
            )));
        }
    }
    Ok(())
}

/// The dimensions of an unbatched shape as a tensor shape.
pub fn shape_dims(s: Shape) -> Vec<usize> {
    match s {
        Shape::Scalar | Shape::Tokens => vec![],
        Shape::Vector(n) | Shape::Batch(n) | Shape::Memory(n) | Shape::Pairs(n) => vec![n],
        Shape::Matrix(r, c) => vec![r, c],
    }
}

fn compile_cell(
    spec: &ModelSpec,
    input_size: usize,
    options: CompileOptions,
) -> Result<CellProgram> {
    let mut forward = lower(spec, input_size)?;
    verify(&forward)?;
    if options.optimize {
        forward = passes::optimize(&forward)?;
    }
    let mut backward = autodiff::backward(&forward)?;
    verify(&backward)?;
    if options.optimize {
        backward = passes::optimize(&backward)?;
    }
    let saved: Vec<Value> = backward
        .iter()
        .filter_map(|v| match backward.data(v).op {
            Op::Input(Role::Saved(s)) => Some(s),
            _ => None,
        })
        .collect();
    let forward = Scheduled::new(forward, options.optimize)?;
    let backward = Scheduled::new(backward, options.optimize)?;
    let inference = StoragePlan::new(&forward, &[]);
    let training = StoragePlan::new(&forward, &saved);
    let backward_plan = StoragePlan::new(&backward, &[]);
    inference.verify(&forward)?;
    training.verify(&forward)?;
    if let Err(e) = backward_plan.verify(&backward) {
        eprintln!("{}", backward_plan.to_text(&backward));
        return Err(e.into());
    }
    verify_pair(&forward, &training, &backward.graph)?;
    Ok(CellProgram {
        input_size,
        forward,
        backward,
        saved,
        inference,
        training,
        backward_plan,
    })
}

/// Checks a backward step graph against its forward step graph and the forward plan that
/// keeps the saved values:
/// 1. every `Saved(v)` names a forward value of the same shape, stored per step where it varies
///    per step (a batched value on `T·B` rows) and step-invariant where it is read once (an
///    unbatched value must be bound: computed from parameters alone);
/// 2. every `Cotangent(role)` has a forward output with that role and the same shape;
/// 3. both graphs have the same parameters, states and input size, and the backward graph
///    returns the gradient of every parameter, of the input and of every state.
pub fn verify_pair(
    forward: &Scheduled,
    plan: &StoragePlan,
    backward: &Graph,
) -> Result<(), IrError> {
    let f = &forward.graph;
    for v in backward.iter() {
        let d = backward.data(v);
        let err = |m: String| Err(IrError::new(Some(v), d.op, m));
        match d.op {
            Op::Input(Role::Saved(s)) => {
                if s.index() >= f.len() {
                    return err(format!("saved {s} is not a value of the forward graph"));
                }
                if f.shape(s) != d.shape {
                    return err(format!(
                        "saved {s} is {} in the forward graph but read as {}",
                        f.shape(s),
                        d.shape
                    ));
                }
                let kept_per_step = match plan.storage[s.index()] {
                    Storage::Sequence | Storage::Tape | Storage::After => true,
                    Storage::Carried => true,
                    Storage::Bound | Storage::Step => false,
                };
                if d.shape.is_batched() && !kept_per_step {
                    return err(format!(
                        "saved {s} varies per step but the forward plan does not keep it per step"
                    ));
                }
                if !d.shape.is_batched() && plan.storage[s.index()] != Storage::Bound {
                    return err(format!(
                        "saved {s} is unbatched but not computed from parameters alone: the backward pass would read one step's value for every step"
                    ));
                }
                if let Op::Input(role) = f.data(s).op
                    && let Some(k) = carried_input(role)
                    && plan.carried_tape[k as usize].is_none()
                {
                    return err(format!("saved carried input {s} is not recorded on a tape"));
                }
            }
            Op::Input(Role::Cotangent(role)) => match f.output(role) {
                Some(o) if f.shape(o) == d.shape => {}
                Some(o) => {
                    return err(format!(
                        "the cotangent of `{}` is {} but the forward output is {}",
                        f.out_role_name(role),
                        d.shape,
                        f.shape(o)
                    ));
                }
                None => {
                    return err(format!(
                        "a cotangent of `{}`, which the forward graph does not output",
                        f.out_role_name(role)
                    ));
                }
            },
            _ => {}
        }
    }
    let sig = |m: &str| Err(IrError::new(None, Op::Input(Role::Input), m));
    if f.params != backward.params || f.states != backward.states {
        return sig("the backward graph's parameters or states differ from the forward graph's");
    }
    if f.input_size != backward.input_size {
        return sig("the backward graph's input size differs from the forward graph's");
    }
    let mut wanted: Vec<OutRole> = (0..f.params.len() as u32).map(OutRole::ParamGrad).collect();
    wanted.push(OutRole::InputGrad);
    wanted.extend((0..f.states.len() as u32).map(OutRole::StateGrad));
    for role in wanted {
        if backward.output(role).is_none() {
            return Err(IrError::new(
                None,
                Op::Input(Role::Input),
                format!(
                    "the backward graph does not return `{}`",
                    f.out_role_name(role)
                ),
            ));
        }
    }
    Ok(())
}

impl fmt::Display for Program {
    /// The whole plan: the model, its parameters, then for each distinct layer its forward
    /// step (with the training plan, and the buffers of the inference plan) and its backward
    /// step with their storage plans.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spec = &self.spec;
        let dirs = if spec.bidirectional {
            "forward and reverse (sharing the code, each with its own parameters)"
        } else {
            "forward"
        };
        writeln!(
            f,
            "program {}: input {}, hidden {}, {} layer(s), directions: {dirs}, {}",
            spec.cell.name(),
            spec.input_size,
            spec.hidden_size,
            spec.num_layers,
            if spec.batch_first {
                "batch-first"
            } else {
                "time-major"
            }
        )?;
        writeln!(f, "parameters ({}):", self.parameter_count())?;
        for (name, shape) in self.parameters() {
            writeln!(f, "  {name}: {shape:?}")?;
        }
        let mut shown: Vec<usize> = Vec::new();
        for (layer, cell) in self.layers.iter().enumerate() {
            if let Some(first) = shown.iter().position(|&i| i == cell.input_size) {
                writeln!(f, "\nlayer {layer}: the code of layer {first}")?;
                continue;
            }
            shown.push(cell.input_size);
            writeln!(
                f,
                "\nlayer {layer} (input {}): forward step, training plan",
                cell.input_size
            )?;
            f.write_str(&cell.training.to_text(&cell.forward))?;
            writeln!(f, "layer {layer}: forward step, inference plan buffers")?;
            f.write_str(&cell.inference.buffers_text(&cell.forward))?;
            writeln!(f, "layer {layer}: backward step")?;
            f.write_str(&cell.backward_plan.to_text(&cell.backward))?;
        }
        Ok(())
    }
}

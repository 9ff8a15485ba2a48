//! The Program: the sequence-level plan for a whole model.
//!
//! For each layer it holds the forward step graph and the backward step graph (from
//! [`autodiff`](crate::autodiff)), each optimised and scheduled by time hoisting into values run
//! before the loop, per step, and after the loop. Both directions of a layer share its graphs
//! (their parameters differ, not their code). Layers, directions, per-sequence lengths, initial
//! states and batch-first layout are handled by whoever executes the Program; the
//! [interpreter](crate::interp) is the reference.

use crate::autodiff;
use crate::error::{Error, Result};
use crate::graph::{Graph, Op, Role, Shape, Value, verify};
use crate::lower::lower;
use crate::passes::{self, hoist, hoist::Phase};
use crate::spec::ModelSpec;

/// A step graph with its time-loop schedule.
#[derive(Clone, Debug)]
pub struct Scheduled {
    /// The graph.
    pub graph: Graph,
    /// The phase of each value (indexed by value).
    pub phases: Vec<Phase>,
}

impl Scheduled {
    /// Schedules `graph` with time hoisting, or everything in the loop when `hoisting` is off.
    pub fn new(graph: Graph, hoisting: bool) -> Result<Self> {
        let phases = if hoisting {
            hoist::hoist(&graph)?
        } else {
            hoist::no_hoist(&graph)
        };
        Ok(Scheduled { graph, phases })
    }

    /// The values of `phase`, in order.
    pub fn values(&self, phase: Phase) -> Vec<Value> {
        self.graph
            .iter()
            .filter(|v| self.phases[v.index()] == phase)
            .collect()
    }

    /// The graph as text with each value's phase.
    pub fn to_text(&self) -> String {
        self.graph.to_text(Some(&self.phases))
    }
}

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
            layers.push(compile_cell(spec, input_size, options)?);
        }
        Ok(Program {
            spec: spec.clone(),
            layers,
        })
    }

    /// Every parameter in PyTorch's `state_dict` order (per layer, per direction, in the cell's
    /// declaration order) with its full name and shape.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for (layer, cell) in self.layers.iter().enumerate() {
            for direction in 0..self.spec.directions() {
                let suffix = ModelSpec::param_suffix(layer, direction);
                for p in &cell.forward.graph.params {
                    out.push((format!("{}{suffix}", p.name), shape_dims(p.shape)));
                }
            }
        }
        out
    }

    /// The number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.parameters()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The recurrent states' names and sizes (`h`, and `c` for an LSTM).
    pub fn states(&self) -> &[(String, usize)] {
        &self.layers[0].forward.graph.states
    }
}

/// The dimensions of an unbatched shape as a tensor shape.
pub fn shape_dims(s: Shape) -> Vec<usize> {
    match s {
        Shape::Scalar => vec![],
        Shape::Vector(n) | Shape::Batch(n) => vec![n],
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
    let saved = backward
        .iter()
        .filter_map(|v| match backward.data(v).op {
            Op::Input(Role::Saved(s)) => Some(s),
            _ => None,
        })
        .collect();
    Ok(CellProgram {
        input_size,
        forward: Scheduled::new(forward, options.optimize)?,
        backward: Scheduled::new(backward, options.optimize)?,
        saved,
    })
}

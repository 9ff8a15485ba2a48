//! A model around a recurrent stack: an optional embedding of token ids in front of it, the
//! stack itself (a [`Program`]), an optional linear head behind it, and the cross-entropy loss.
//!
//! The embedding, the head and the loss are graphs of the same IR as a cell's step
//! ([`Op::Gather`], [`Op::MatMul`], [`Op::LogSoftmax`], [`Op::Pick`]), differentiated by the same
//! [`autodiff`]. None of them carries state from step to step, so each runs once over all `T·B`
//! rows of a sequence, not inside the time loop: the embedding before the stack, the head and
//! the loss after it, and their backward graphs in the reverse order. The head is then one
//! matrix product over the whole sequence, and its weight gradient one product after the loop.
//! They run on the interpreter's kernels whatever backend runs the stack: the stack is reached
//! through the [`Recurrent`] trait, which the interpreter ([`Interpreted`]), the JIT and the
//! emitted Rust implement.
//!
//! Parameter names follow a PyTorch module holding `embedding`, `rnn` and `fc`: a model with an
//! embedding or a head has `embedding.weight`, `rnn.<the stack's names>`, `fc.weight` and
//! `fc.bias`; a stack alone keeps `nn.LSTM`'s own names.
//!
//! ```
//! use rnn_ir::model::{Ids, Input, Model, Run, IGNORE_INDEX};
//! use rnn_ir::{Exec, parse::parse_str};
//!
//! let spec = parse_str("lstm { vocab: 10, input: 4, hidden: 8, head: 10 }").unwrap();
//! let model = Model::compile(&spec).unwrap();
//! assert_eq!(model.parameters()[0], ("embedding.weight".to_string(), vec![10, 4]));
//! let weights = model.init(0).unwrap();
//! let bound = model.bind_interp(&weights, Exec::default()).unwrap();
//! // (time, batch) ids in, (time, batch, classes) logits out.
//! let ids = Ids::new(vec![3, 2], vec![1, 2, 3, 4, 5, 6]).unwrap();
//! let logits = bound.forward(&Run::new(Input::Ids(&ids))).unwrap();
//! assert_eq!(logits.output.shape, vec![3, 2, 10]);
//! // Cross-entropy against next tokens, with every gradient.
//! let targets = Ids::new(vec![3, 2], vec![2, 3, 4, 5, 6, IGNORE_INDEX]).unwrap();
//! let loss = bound.loss(&Run::new(Input::Ids(&ids)), &targets, IGNORE_INDEX).unwrap();
//! assert_eq!(loss.counted, 5);
//! assert!(loss.grads.params.contains_key("rnn.weight_hh_l0"));
//! ```

use crate::autodiff;
use crate::error::{Error, Result};
use crate::graph::{Graph, Op, OutRole, Role, Shape, Value, verify};
use crate::program::Program;
use crate::spec::{Attention, ModelSpec, Placement, Score};

#[cfg(feature = "runtime")]
mod run;
#[cfg(feature = "runtime")]
pub use run::*;

/// A layer around the stack: its graph, run once over all rows (an attention in the step:
/// once per step, over its rows), and its backward graph.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The forward graph.
    pub forward: Graph,
    /// Its backward graph ([`autodiff::backward`]).
    pub backward: Graph,
    /// For each forward value, whether it depends on the memory and the parameters alone, not
    /// on the step's input: computed once per sequence while decoding ([`Prepared`]), as time
    /// hoisting computes a step graph's fixed values before the loop.
    pub per_sequence: Vec<bool>,
}

impl Layer {
    fn new(forward: Graph) -> Result<Layer> {
        verify(&forward)?;
        let backward = autodiff::backward(&forward)?;
        verify(&backward)?;
        let mut per_sequence = vec![false; forward.len()];
        for v in forward.iter() {
            let d = forward.data(v);
            per_sequence[v.index()] = match d.op {
                Op::Input(role) => matches!(role, Role::Memory | Role::Param(_)),
                Op::Const(_) => true,
                _ => d.args.iter().all(|a| per_sequence[a.index()]),
            };
        }
        Ok(Layer {
            forward,
            backward,
            per_sequence,
        })
    }

    /// The forward graph's output.
    pub fn output(&self) -> Value {
        self.forward
            .output(OutRole::Output)
            .expect("a layer's graph has an output")
    }
}

/// The embedding's graph: ids in, rows of a `vocab × features` table out.
fn embedding_graph(vocab: usize, features: usize) -> Result<Layer> {
    let mut g = Graph::new();
    let ids = g.tokens();
    let table = g.param("weight", Shape::Matrix(vocab, features));
    let y = g.push(Op::Gather, &[table, ids])?;
    g.set_output(OutRole::Output, y);
    Layer::new(g)
}

/// The head's graph: `x · Wᵀ + b`, PyTorch's `Linear(features, classes)` (which has a bias
/// whatever the stack's `bias` setting says).
fn head_graph(features: usize, classes: usize) -> Result<Layer> {
    let mut g = Graph::new();
    let x = g.x(features);
    let w = g.param("weight", Shape::Matrix(classes, features));
    let b = g.param("bias", Shape::Vector(classes));
    let wx = g.matmul(w, x)?;
    let y = g.add(wx, b)?;
    g.set_output(OutRole::Output, y);
    Layer::new(g)
}

/// The attention's graph (see [`Attention`]): the stack's output `h` (`features`) and the
/// memory in, `tanh(W_c [c; h])` out. Its parameters, in order: the score's (`score.weight`
/// for `general`; `key.weight`, `query.weight`, `v.weight` for `additive`), then
/// `combine.weight`; none has a bias. In the step ([`Placement::Input`]) the query `h` is the
/// previous step's output and the graph's output is the context `c`, with no `combine`.
fn attention_graph(features: usize, a: Attention) -> Result<Layer> {
    let mut g = Graph::new();
    let h = g.x(features);
    let m = g.input_value(Role::Memory, Shape::Memory(a.memory), Some("memory".into()));
    let scores = match a.score {
        Score::Dot => g.push(Op::PairDot, &[m, h])?,
        Score::General => {
            let w = g.param("score.weight", Shape::Matrix(features, a.memory));
            let k = g.matmul(w, m)?;
            g.push(Op::PairDot, &[k, h])?
        }
        Score::Additive(units) => {
            let wk = g.param("key.weight", Shape::Matrix(units, a.memory));
            let wq = g.param("query.weight", Shape::Matrix(units, features));
            let v = g.param("v.weight", Shape::Matrix(1, units));
            // The memory's projection does not depend on the step: computed once per sequence.
            let k = g.matmul(wk, m)?;
            let q = g.matmul(wq, h)?;
            let kp = g.push(Op::MemoryToPairs, &[k])?;
            let qp = g.push(Op::SpreadPositions, &[q])?;
            let sum = g.add(kp, qp)?;
            let t = g.tanh(sum)?;
            g.matmul(v, t)?
        }
    };
    let weights = g.push(Op::SoftmaxPositions, &[scores])?;
    let context = g.push(Op::Context, &[weights, m])?;
    if a.placement == Placement::Input {
        // In the step: the context itself joins the next input.
        g.set_output(OutRole::Output, context);
        return Layer::new(g);
    }
    let joined = g.push(Op::Concat, &[context, h])?;
    let wc = g.param(
        "combine.weight",
        Shape::Matrix(features, a.memory + features),
    );
    let z = g.matmul(wc, joined)?;
    let y = g.tanh(z)?;
    g.set_output(OutRole::Output, y);
    Layer::new(g)
}

/// A compiled model: the stack and the layers around it.
#[derive(Clone, Debug)]
pub struct Model {
    /// The declaration, with its embedding and head.
    pub spec: ModelSpec,
    /// The recurrent stack ([`ModelSpec::stack`] compiled).
    pub stack: Program,
    /// The embedding, when the declaration has `vocab`.
    pub embedding: Option<Layer>,
    /// The attention, when the declaration has one.
    pub attention: Option<Layer>,
    /// The head, when the declaration has `head`.
    pub head: Option<Layer>,
}

impl Model {
    /// Compiles `spec`: the stack as [`Program::compile`] does, and the layers around it.
    pub fn compile(spec: &ModelSpec) -> Result<Model> {
        spec.validate().map_err(Error::Spec)?;
        if spec.bidirectional
            && spec
                .attention
                .is_some_and(|a| a.placement == Placement::Input)
        {
            return Err(Error::Spec(
                "an attention in the step runs the stack one step after another, forward: the stack cannot be bidirectional".into(),
            ));
        }
        if let (Some(a), crate::spec::CellKind::Custom(c)) = (spec.attention, &spec.cell)
            && a.placement == Placement::Input
            && !c.states.iter().any(|(n, _, _)| *n == c.output.0)
        {
            return Err(Error::Spec(format!(
                "an attention in the step queries with the cell's previous output, and this cell's output `{}` is not one of its states: make the output a state",
                c.output.0
            )));
        }
        if spec.attention.is_some_and(|a| a.memory == 0) {
            return Err(Error::Spec(
                "the attention's memory has no size: an attention reads an encoder's outputs, so declare it in the decoder of an encoder-decoder (`seq2seq!`, `Seq2Seq::new`), whose encoder sizes it".into(),
            ));
        }
        let stack = Program::compile(&spec.stack())?;
        let embedding = spec
            .vocab
            .map(|v| embedding_graph(v, spec.input_size))
            .transpose()?;
        let features = stack.output_size() * spec.directions();
        let attention = spec
            .attention
            .map(|a| attention_graph(features, a))
            .transpose()?;
        let head = spec.head.map(|n| head_graph(features, n)).transpose()?;
        Ok(Model {
            spec: spec.clone(),
            stack,
            embedding,
            attention,
            head,
        })
    }

    /// Whether the model has layers around its stack (and so prefixes the stack's names).
    pub fn has_layers(&self) -> bool {
        self.embedding.is_some() || self.head.is_some() || self.attention.is_some()
    }

    /// The prefix of the stack's parameter names: `rnn.` when there are layers around it.
    pub fn stack_prefix(&self) -> &'static str {
        if self.has_layers() { "rnn." } else { "" }
    }

    /// Features of each step's result: the head's classes, else every direction's output.
    pub fn features(&self) -> usize {
        self.spec
            .head
            .unwrap_or(self.stack.output_size() * self.spec.directions())
    }

    /// Every parameter with its full name and shape, in the order of a PyTorch module that
    /// registers `embedding`, `rnn` and `fc` in turn.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let layer = |out: &mut Vec<(String, Vec<usize>)>, prefix: &str, l: &Layer| {
            for p in l.forward.params() {
                out.push((format!("{prefix}{}", p.name), p.dims()));
            }
        };
        if let Some(e) = &self.embedding {
            layer(&mut out, "embedding.", e);
        }
        let prefix = self.stack_prefix();
        for (name, dims) in self.stack.parameters() {
            out.push((format!("{prefix}{name}"), dims));
        }
        if let Some(a) = &self.attention {
            layer(&mut out, "attention.", a);
        }
        if let Some(h) = &self.head {
            layer(&mut out, "fc.", h);
        }
        out
    }

    /// The number of scalar parameters.
    pub fn parameter_count(&self) -> u128 {
        self.parameters()
            .iter()
            .map(|(_, d)| d.iter().map(|&n| n as u128).product::<u128>())
            .sum()
    }
}

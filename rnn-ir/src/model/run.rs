//! Running a [`Model`]: binding weights, the forward and backward passes around any backend's
//! stack, the loss, and decoding's prepared memory (the runtime half of [`super`]).

use super::*;

mod stepped;

use crate::driver::{Gradients, Request, Response};
use crate::interp::{
    Bound, Exec, Extent, Tape as InterpTape, eval_graph_borrowed, eval_graph_partial,
};
use crate::tensor::Tensor;
use crate::weights::{Weights, seeded_normals};
use std::collections::{BTreeMap, HashMap};

/// PyTorch's default `ignore_index` of `cross_entropy`: a target equal to it counts nowhere.
pub const IGNORE_INDEX: i64 = -100;

/// The largest magnitude of an id: every integer up to 2²⁴ is exact in an `f32` lane.
const MAX_ID: i64 = 1 << 24;

/// Token ids: `(T, B)`, or `(B, T)` for a batch-first model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids {
    /// The two dimensions.
    pub shape: Vec<usize>,
    /// The ids, row-major.
    pub data: Vec<i64>,
}

impl Ids {
    /// Ids of `shape` (two dimensions) holding `data`; a typed error when they disagree.
    pub fn new(shape: Vec<usize>, data: Vec<i64>) -> Result<Ids> {
        if shape.len() != 2 {
            return Err(Error::Argument(format!(
                "token ids are (time, batch) or (batch, time): two dimensions, found shape {shape:?}"
            )));
        }
        let n = shape[0].checked_mul(shape[1]);
        if n != Some(data.len()) {
            return Err(Error::Argument(format!(
                "token ids of shape {shape:?} need {} ids, found {}",
                shape[0].saturating_mul(shape[1]),
                data.len()
            )));
        }
        Ok(Ids { shape, data })
    }

    /// Checks that the ids are two-dimensional and hold as many ids as their shape says (the
    /// fields are public: [`Ids::new`] is not the only way to make them).
    pub fn check(&self, name: &str) -> Result<()> {
        let n = match self.shape[..] {
            [a, b] => a.checked_mul(b),
            _ => None,
        };
        if n != Some(self.data.len()) {
            return Err(Error::Argument(format!(
                "`{name}` has shape {:?} but holds {} ids: token ids are (time, batch) or (batch, time)",
                self.shape,
                self.data.len()
            )));
        }
        Ok(())
    }

    /// The ids as `f32` lanes, each checked to be in `0 .. vocab` or to equal `ignore`.
    fn lanes(&self, name: &str, vocab: usize, ignore: Option<i64>) -> Result<Vec<f32>> {
        self.data
            .iter()
            .enumerate()
            .map(|(index, &id)| {
                if (0..vocab as i64).contains(&id) || Some(id) == ignore {
                    Ok(id as f32)
                } else {
                    Err(Error::Token {
                        name: name.into(),
                        index,
                        found: id,
                        vocab,
                    })
                }
            })
            .collect()
    }
}

impl Layer {
    /// Runs the forward graph on `rows` rows of `inputs` (those not parameters) and `params`
    /// (borrowed, not copied).
    fn run(
        &self,
        rows: usize,
        inputs: HashMap<Role, Vec<f32>>,
        params: &[Vec<f32>],
    ) -> Result<LayerRun> {
        self.run_with(rows, inputs, params, None)
    }

    /// [`Layer::run`] against a memory of `extent` (positions, sequences, source lengths).
    fn run_with(
        &self,
        rows: usize,
        inputs: HashMap<Role, Vec<f32>>,
        params: &[Vec<f32>],
        extent: Option<Span>,
    ) -> Result<LayerRun> {
        let values = {
            let e = extent.as_ref().map(Span::extent);
            let lookup = |role: Role| fed(&inputs, params, role);
            let mut values = eval_graph_borrowed::<f32>(
                &self.forward,
                rows,
                lookup,
                &Exec::default(),
                e.as_ref(),
            )?;
            fill_outputs(&self.forward, &mut values, lookup);
            values
        };
        Ok(LayerRun {
            rows,
            inputs,
            values,
            extent,
        })
    }

    /// [`Layer::run_with`] given the values `given` holds (by value; empty where the run
    /// computes them), which it does not compute again: an attention's per-sequence values at
    /// each step of a decoder.
    fn run_given(
        &self,
        rows: usize,
        inputs: HashMap<Role, Vec<f32>>,
        params: &[Vec<f32>],
        extent: Span,
        given: &[Vec<f32>],
    ) -> Result<LayerRun> {
        let values = {
            let e = extent.extent();
            let lookup = |role: Role| fed(&inputs, params, role);
            let mut values = eval_graph_partial::<f32>(
                &self.forward,
                rows,
                lookup,
                |v| {
                    given
                        .get(v.index())
                        .filter(|x| !x.is_empty())
                        .map(Vec::as_slice)
                },
                |_| false,
                &Exec::default(),
                Some(&e),
            )?;
            fill_outputs(&self.forward, &mut values, lookup);
            values
        };
        Ok(LayerRun {
            rows,
            inputs,
            values,
            extent: Some(extent),
        })
    }

    /// Runs the backward graph of forward run `run` (with the same `params`) with `cotangent`
    /// flowing into the output; every value of the backward graph.
    fn back(
        &self,
        run: &LayerRun,
        cotangent: &[f32],
        params: &[Vec<f32>],
    ) -> Result<Vec<Vec<f32>>> {
        self.back_given(run, cotangent, params, &[])
    }

    /// Puts `grads` (one per parameter, in the graph's order) into `params`, each named
    /// `prefix` and the parameter's name, shaped as the parameter.
    fn insert_grads(
        &self,
        params: &mut BTreeMap<String, Tensor>,
        prefix: &str,
        grads: Vec<Vec<f32>>,
    ) {
        for (info, data) in self.forward.params().iter().zip(grads) {
            let shape = info.dims();
            params.insert(format!("{prefix}{}", info.name), Tensor { shape, data });
        }
    }

    /// [`Layer::back`] of a run that was given some values (`given`, by value; empty where
    /// the run computed them: [`Layer::run_given`]).
    fn back_given(
        &self,
        run: &LayerRun,
        cotangent: &[f32],
        params: &[Vec<f32>],
        given: &[Vec<f32>],
    ) -> Result<Vec<Vec<f32>>> {
        let (f, b) = (&self.forward, &self.backward);
        let lookup = |role: Role| -> Option<&[f32]> {
            match role {
                Role::Cotangent(OutRole::Output) => Some(cotangent),
                // A saved forward value: an input as it was fed, or what the run computed or
                // was given.
                Role::Saved(s) => match f.data(s).op {
                    Op::Input(r) => fed(&run.inputs, params, r),
                    _ => match given.get(s.index()) {
                        Some(g) if !g.is_empty() => Some(g.as_slice()),
                        _ => run.values.get(s.index()).map(Vec::as_slice),
                    },
                },
                other => fed(&run.inputs, params, other),
            }
        };
        let e = run.extent.as_ref().map(Span::extent);
        let mut values =
            eval_graph_borrowed::<f32>(b, run.rows, lookup, &Exec::default(), e.as_ref())?;
        fill_outputs(b, &mut values, lookup);
        Ok(values)
    }
}

/// The value fed to input `role`: a parameter from `params`, anything else from `inputs`.
fn fed<'a>(
    inputs: &'a HashMap<Role, Vec<f32>>,
    params: &'a [Vec<f32>],
    role: Role,
) -> Option<&'a [f32]> {
    match role {
        Role::Param(p) => params.get(p as usize).map(Vec::as_slice),
        other => inputs.get(&other).map(Vec::as_slice),
    }
}

/// Copies into `values` the inputs that are also outputs of `g` (their slots are empty after
/// [`eval_graph_borrowed`]).
fn fill_outputs<'a>(
    g: &Graph,
    values: &mut [Vec<f32>],
    lookup: impl Fn(Role) -> Option<&'a [f32]>,
) {
    for o in g.outputs() {
        if let Op::Input(role) = g.data(o.value).op
            && let Some(x) = lookup(role)
        {
            values[o.value.index()] = x.to_vec();
        }
    }
}

/// A forward run of a [`Layer`]: its inputs and every value, what its backward graph reads.
struct LayerRun {
    rows: usize,
    inputs: HashMap<Role, Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// The memory's positions, sequences and source lengths (an attention's run).
    extent: Option<Span>,
}

impl Drop for LayerRun {
    /// The run's buffers (a head's logits are a vocabulary wide) go back to this thread's pool.
    fn drop(&mut self) {
        crate::pool::recycle(
            std::mem::take(&mut self.values)
                .into_iter()
                .chain(self.inputs.drain().map(|(_, v)| v)),
        );
    }
}

/// Values `wanted` of a backward run, moved out (a value wanted twice is copied); the rest go
/// back to this thread's pool.
fn take_values(mut values: Vec<Vec<f32>>, wanted: &[Value]) -> Vec<Vec<f32>> {
    let out = wanted
        .iter()
        .enumerate()
        .map(|(k, v)| {
            if wanted[k + 1..].contains(v) {
                values[v.index()].clone()
            } else {
                std::mem::take(&mut values[v.index()])
            }
        })
        .collect();
    crate::pool::recycle(values);
    out
}

/// The backward graph's gradient of each of `layer`'s parameters, then of `extra` outputs.
fn grad_values(layer: &Layer, extra: &[OutRole]) -> Result<Vec<Value>> {
    (0..layer.forward.params().len())
        .map(|p| OutRole::ParamGrad(p as u32))
        .chain(extra.iter().copied())
        .map(|role| grad_of(&layer.backward, role))
        .collect()
}

/// An owned [`Extent`]: a memory's positions, its sequences and their source lengths.
#[derive(Clone, Debug)]
struct Span {
    positions: usize,
    batch: usize,
    lengths: Option<Vec<usize>>,
}

impl Span {
    fn extent(&self) -> Extent<'_> {
        Extent {
            positions: self.positions,
            batch: self.batch,
            lengths: self.lengths.as_deref(),
        }
    }
}

impl LayerRun {
    fn output(&self, layer: &Layer) -> &[f32] {
        &self.values[layer.output().index()]
    }
}

/// `(d0, d1, n)` as `(d1, d0, n)`.
fn swap_outer(data: &[f32], d0: usize, d1: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len());
    for j in 0..d1 {
        for i in 0..d0 {
            let at = (i * d1 + j) * n;
            out.extend_from_slice(&data[at..at + n]);
        }
    }
    out
}

/// The loss's graph: logits and targets in, each row's negative log-likelihood out (0 on a row
/// whose target is `ignore`).
#[cfg(test)]
fn loss_graph(classes: usize, ignore: i32) -> Result<Layer> {
    let mut g = Graph::new();
    let logits = g.x(classes);
    let target = g.target();
    let logp = g.push(Op::LogSoftmax, &[logits])?;
    let picked = g.push(Op::Pick { ignore }, &[logp, target])?;
    let nll = g.push(Op::Neg, &[picked])?;
    g.set_output(OutRole::Output, nll);
    Layer::new(g)
}

/// The summed negative log-likelihood of `targets` under each row of `logits` (`classes`
/// wide), PyTorch's `cross_entropy` with `ignore_index` before the mean; `logits` become the
/// gradient of `scale` times that sum: `scale · (softmax(row) - onehot(target))`, zero on an
/// ignored row. One pass per row computes the loss graph's values ([`Op::LogSoftmax`], then
/// [`Op::Pick`]) and its backward graph's gradient; the sums are in `f64`. Targets are
/// `0 .. classes` or `ignore` (checked by the callers).
pub fn cross_entropy_fused(
    logits: &mut [f32],
    classes: usize,
    targets: &[i64],
    ignore: i64,
    scale: f32,
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (detected above).
            return unsafe { cross_entropy_avx512(logits, classes, targets, ignore, scale) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (detected above).
            return unsafe { cross_entropy_avx2(logits, classes, targets, ignore, scale) };
        }
    }
    cross_entropy_rows(logits, classes, targets, ignore, scale)
}

/// [`cross_entropy_rows`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn cross_entropy_avx512(
    logits: &mut [f32],
    classes: usize,
    targets: &[i64],
    ignore: i64,
    scale: f32,
) -> f64 {
    cross_entropy_rows(logits, classes, targets, ignore, scale)
}

/// [`cross_entropy_rows`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn cross_entropy_avx2(
    logits: &mut [f32],
    classes: usize,
    targets: &[i64],
    ignore: i64,
    scale: f32,
) -> f64 {
    cross_entropy_rows(logits, classes, targets, ignore, scale)
}

/// Lanes of the cross-entropy's reductions: independent accumulators the compiler keeps in
/// vector registers (a sequential `fold` would wait on each addition).
const LANES: usize = 16;

/// The body of [`cross_entropy_fused`], the same arithmetic on every instruction set (no
/// contraction into fused multiply-adds, the sums in a fixed order), so every path gives the
/// same bits. The maximum ignores NaNs: a NaN logit makes its exponential, the row's sum and so
/// every gradient of the row and the loss NaN, as a NaN maximum would.
#[inline(always)]
fn cross_entropy_rows(
    logits: &mut [f32],
    classes: usize,
    targets: &[i64],
    ignore: i64,
    scale: f32,
) -> f64 {
    let mut total = 0.0;
    for (row, &t) in logits.chunks_mut(classes).zip(targets) {
        if t == ignore {
            row.fill(0.0);
            continue;
        }
        let (m, _) = crate::interp::lane_max(row);
        let picked = row[t as usize];
        // The exponentials in place, summed in f64 lanes.
        let mut sums = [0.0f64; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (s, x) in sums.iter_mut().zip(c.iter_mut()) {
                *x = exp_nonpositive(*x - m);
                *s += f64::from(*x);
            }
        }
        let mut sum = 0.0f64;
        for x in chunks.into_remainder() {
            *x = exp_nonpositive(*x - m);
            sum += f64::from(*x);
        }
        sum += sums.iter().sum::<f64>();
        total += f64::from(m) + sum.ln() - f64::from(picked);
        let k = (1.0 / sum) as f32 * scale;
        for x in row.iter_mut() {
            *x *= k;
        }
        row[t as usize] -= scale;
    }
    total
}

/// `e^x` for `x ≤ 0` (and NaN), within a few ulp of the correctly rounded `f32` result over
/// `[-87.3, 0]` and tiny below (where it underflows): Cody–Waite reduction by `ln 2` and a
/// degree-6 Taylor polynomial, branch-free so that a loop over a row vectorises
/// (`cross_entropy_fused`).
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let c = x.max(-87.3);
    // Round to nearest by the 1.5 · 2^23 trick (no call, so the loop vectorises).
    const MAGIC: f32 = 12_582_912.0;
    let t = c * LOG2E + MAGIC;
    let k = t - MAGIC;
    let r = (c - k * LN2_HI) - k * LN2_LO;
    // e^r on [-ln2/2, ln2/2].
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^k by the exponent bits: k is in -126 ..= 0 here, and `t`'s low bits hold it (`t` is
    // 1.5 · 2^23 + k), so no float-to-integer conversion (scalar code) is needed.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits() - 127) << 23);
    let y = p * scale;
    if x.is_nan() { x } else { y }
}

/// The most rows an inference runs the head's product for on packed panels rather than
/// through `gemm`.
const PANEL_ROWS: usize = 32;

impl Model {
    /// Initial weights from `seed`, as PyTorch initialises each module (not PyTorch's random
    /// stream): the stack as [`Weights::init`]; the embedding from a standard normal
    /// (`nn.Embedding`); the head's weight and bias uniform in `±1/√features` (`nn.Linear`).
    pub fn init(&self, seed: u64) -> Result<Weights> {
        let mut tensors = BTreeMap::new();
        let prefix = self.stack_prefix();
        for (name, t) in Weights::init(&self.stack, seed)?.tensors {
            tensors.insert(format!("{prefix}{name}"), t);
        }
        if let Some(e) = &self.embedding {
            let dims = e.forward.params()[0].dims();
            let n: usize = dims.iter().product();
            let data = seeded_normals(seed ^ 0x656d_6265_6464_696e, n);
            tensors.insert("embedding.weight".into(), Tensor { shape: dims, data });
        }
        if let Some(a) = &self.attention {
            // Each of nn.Linear's weights uniform in ±1/√(its input features).
            for (i, p) in a.forward.params().iter().enumerate() {
                let dims = p.dims();
                let name = format!("attention.{}", p.name);
                let w = Weights::init_params(
                    [(name.as_str(), dims.clone(), None)],
                    dims[1],
                    seed ^ (0x6174_7465_6e64 + i as u64),
                )?;
                tensors.extend(w.tensors);
            }
        }
        if let Some(h) = &self.head {
            let features = self.stack.output_size() * self.spec.directions();
            let params: Vec<(String, Vec<usize>)> = h
                .forward
                .params()
                .iter()
                .map(|p| (format!("fc.{}", p.name), p.dims()))
                .collect();
            let w = Weights::init_params(
                params.iter().map(|(n, d)| (n.as_str(), d.clone(), None)),
                features,
                seed ^ 0x6865_6164,
            )?;
            tensors.extend(w.tensors);
        }
        Ok(Weights { tensors })
    }

    /// Checks `weights` against [`Model::parameters`] (every one present, its shape, finite,
    /// nothing else) and splits them: the stack's, under their own names, and each layer's
    /// parameters in its graph's order.
    pub fn split(&self, weights: &Weights) -> Result<Split> {
        let params = self.parameters();
        weights.check_params(params.iter().map(|(n, s)| (n.as_str(), s.as_slice())))?;
        let [embedding, attention, head] =
            self.layer_copies(|name| weights.tensors[name].data.as_slice());
        let prefix = self.stack_prefix();
        let stack = Weights {
            tensors: self
                .stack
                .parameters()
                .into_iter()
                .map(|(n, _)| {
                    let t = weights.tensors[&format!("{prefix}{n}")].clone();
                    (n, t)
                })
                .collect(),
        };
        Ok(Split {
            stack,
            embedding,
            attention,
            head,
        })
    }

    /// Binds `weights`: the stack through `bind_stack` (any backend's), the layers around it
    /// to the interpreter's kernels.
    pub fn bind<'m, R: Recurrent>(
        &'m self,
        weights: &Weights,
        bind_stack: impl FnOnce(&'m Program, &Weights) -> Result<R>,
    ) -> Result<BoundModel<'m, R>> {
        let split = self.split(weights)?;
        let stack = bind_stack(&self.stack, &split.stack)?;
        Ok(BoundModel {
            model: self,
            stack,
            embedding: split.embedding,
            attention: split.attention,
            head: split.head,
            head_panels: std::sync::OnceLock::new(),
        })
    }

    /// The parameters of the layers around the stack (the embedding's, the attention's, the
    /// head's), full names and shapes, in [`Model::parameters`]' order.
    pub fn layer_parameters(&self) -> Vec<(String, Vec<usize>)> {
        if !self.has_layers() {
            return Vec::new();
        }
        let stack = self.stack_prefix();
        self.parameters()
            .into_iter()
            .filter(|(n, _)| !n.starts_with(stack))
            .collect()
    }

    /// Binds a stack bound already (an emitted model's, which holds its own weights) with the
    /// layers around it: `layers` holds each of [`Model::layer_parameters`] by full name, as
    /// its elements (row-major, the shape's count, finite), and nothing else. Nothing of the
    /// stack is copied or checked again.
    pub fn bind_layers<'m, R: Recurrent>(
        &'m self,
        layers: &[(&str, &[f32])],
        stack: R,
    ) -> Result<BoundModel<'m, R>> {
        check_slices(layers, &self.layer_parameters(), "")?;
        Ok(self.bound_with(stack, |name| slice_of(layers, name)))
    }

    /// The model bound to `stack`, each layer's parameters copied (into this thread's pool)
    /// from `get(full name)`, present and checked.
    pub(crate) fn bound_with<'m, 'w, R>(
        &'m self,
        stack: R,
        get: impl Fn(&str) -> &'w [f32],
    ) -> BoundModel<'m, R> {
        let [embedding, attention, head] = self.layer_copies(get);
        BoundModel {
            model: self,
            stack,
            embedding,
            attention,
            head,
            head_panels: std::sync::OnceLock::new(),
        }
    }

    /// The embedding's, the attention's and the head's parameters, each in its graph's order,
    /// copied from `get(full name)` into buffers of this thread's pool (a training loop binds
    /// at every step).
    fn layer_copies<'w>(&self, get: impl Fn(&str) -> &'w [f32]) -> [Vec<Vec<f32>>; 3] {
        [
            ("embedding.", &self.embedding),
            ("attention.", &self.attention),
            ("fc.", &self.head),
        ]
        .map(|(prefix, l)| {
            l.iter()
                .flat_map(|l| l.forward.params())
                .map(|p| {
                    let data = get(&format!("{prefix}{}", p.name));
                    let mut copy = crate::pool::scratch(data.len());
                    copy.copy_from_slice(data);
                    copy
                })
                .collect()
        })
    }

    /// [`Model::bind`] with the interpreter running the stack.
    pub fn bind_interp(
        &self,
        weights: &Weights,
        exec: Exec,
    ) -> Result<BoundModel<'_, Interpreted<'_>>> {
        self.bind(weights, |program, w| {
            Interpreted::bind_with(program, w, exec)
        })
    }
}

/// The elements `layers` holds for `name` (checked present by [`check_slices`]).
pub(crate) fn slice_of<'w>(layers: &[(&str, &'w [f32])], name: &str) -> &'w [f32] {
    layers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .expect("checked present")
}

/// Checks that `layers` holds exactly `params` (names under `prefix`), each once, with its
/// shape's count of elements, all finite.
pub(crate) fn check_slices(
    layers: &[(&str, &[f32])],
    params: &[(String, Vec<usize>)],
    prefix: &str,
) -> Result<()> {
    for (name, dims) in params {
        let full = format!("{prefix}{name}");
        let mut found = layers.iter().filter(|(n, _)| *n == full);
        let Some((_, data)) = found.next() else {
            return Err(Error::MissingTensor {
                name: full,
                expected: dims.clone(),
            });
        };
        if found.next().is_some() {
            return Err(Error::WeightsMismatch(format!("`{full}` is given twice")));
        }
        let n: usize = dims.iter().product();
        if data.len() != n {
            return Err(Error::WeightsMismatch(format!(
                "`{full}` has shape {dims:?} but holds {} elements",
                data.len()
            )));
        }
        if let Some(index) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                name: full,
                index,
                found: data[index],
            });
        }
    }
    if let Some((extra, _)) = layers
        .iter()
        .find(|(n, _)| !params.iter().any(|(p, _)| format!("{prefix}{p}") == *n))
    {
        return Err(Error::UnexpectedTensor {
            name: extra.to_string(),
        });
    }
    Ok(())
}

/// A model's weights split by part ([`Model::split`]).
#[derive(Clone, Debug)]
pub struct Split {
    /// The stack's, under the stack's own names.
    pub stack: Weights,
    /// The embedding's parameters in its graph's order (empty without one).
    pub embedding: Vec<Vec<f32>>,
    /// The attention's parameters in its graph's order (empty without one).
    pub attention: Vec<Vec<f32>>,
    /// The head's parameters in its graph's order (empty without one).
    pub head: Vec<Vec<f32>>,
}

/// A recurrent stack bound to its weights on some backend: what [`BoundModel`] runs between
/// its embedding and its head.
pub trait Recurrent {
    /// What a training forward pass keeps for the backward pass.
    type Tape;
    /// The forward pass.
    fn forward(&self, req: &Request) -> Result<Response>;
    /// The forward pass, keeping what [`Recurrent::backward`] needs.
    fn forward_train(&self, req: &Request) -> Result<(Response, Self::Tape)>;
    /// Back-propagation through time from a [`Recurrent::forward_train`].
    fn backward(
        &self,
        tape: Self::Tape,
        grad_output: &Tensor,
        grad_final_states: &[Option<&Tensor>],
    ) -> Result<Gradients>;
}

/// The interpreter running a bound stack.
pub struct Interpreted<'p> {
    /// The stack and its weights.
    pub bound: Bound<'p, f32>,
    /// Threads and tuning.
    pub exec: Exec,
}

impl<'p> Interpreted<'p> {
    /// Binds `weights` to `program` on the interpreter, one thread: the stack binder
    /// [`Model::bind`] and [`crate::seq2seq::Seq2Seq::bind`] take for the interpreter.
    pub fn bind(program: &'p Program, weights: &Weights) -> Result<Interpreted<'p>> {
        Self::bind_with(program, weights, Exec::default())
    }

    /// [`Interpreted::bind`] with the threads and tuning of `exec`.
    pub fn bind_with(
        program: &'p Program,
        weights: &Weights,
        exec: Exec,
    ) -> Result<Interpreted<'p>> {
        Ok(Interpreted {
            bound: program.bind::<f32>(weights)?,
            exec,
        })
    }
}

impl Recurrent for Interpreted<'_> {
    type Tape = crate::driver::Tape<f32, InterpTape<f32>>;
    fn forward(&self, req: &Request) -> Result<Response> {
        self.bound.run(
            &Request {
                grad_output: None,
                grad_final_states: Vec::new(),
                ..req.clone()
            },
            &self.exec,
        )
    }
    fn forward_train(&self, req: &Request) -> Result<(Response, Self::Tape)> {
        self.bound.forward_train(req, &self.exec)
    }
    fn backward(
        &self,
        tape: Self::Tape,
        grad_output: &Tensor,
        grad_final_states: &[Option<&Tensor>],
    ) -> Result<Gradients> {
        self.bound
            .backward(tape, grad_output, grad_final_states, &self.exec)
    }
}

/// What goes into a model: token ids when it has an embedding, else features.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// `(T, B)` ids (or `(B, T)` batch-first).
    Ids(&'a Ids),
    /// `(T, B, input)` features (or `(B, T, input)` batch-first).
    Features(&'a Tensor),
}

/// One run of a model: its input, and optionally the stack's initial states and per-sequence
/// lengths, as in [`Request`].
#[derive(Clone, Debug)]
pub struct Run<'a> {
    /// The input.
    pub input: Input<'a>,
    /// Per recurrent state, its initial value `(layers·directions, B, size)`; zeros when absent.
    pub initial_states: Vec<Option<&'a Tensor>>,
    /// Per-sequence lengths (packed-sequence semantics).
    pub lengths: Option<&'a [i64]>,
    /// The memory an attention reads (required by a model with one, refused by others).
    pub memory: Option<MemoryRef<'a>>,
}

impl<'a> Run<'a> {
    /// A run of `input` from zero states, every sequence its whole length.
    pub fn new(input: Input<'a>) -> Self {
        Run {
            input,
            initial_states: Vec::new(),
            lengths: None,
            memory: None,
        }
    }
}

/// An attention's memory: an encoder's outputs `(S, B, features)`, or `(B, S, features)` for a
/// batch-first model, and each sequence's source length.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRef<'a> {
    /// The outputs.
    pub values: &'a Tensor,
    /// Each sequence's source length (`1 ..= S`); all `S` when absent.
    pub lengths: Option<&'a [i64]>,
    /// What [`BoundModel::prepare`] computed of this memory once (decoding reads it at every
    /// step); used by inference, ignored by training.
    pub prepared: Option<&'a Prepared>,
}

/// An attention's memory made ready once for many decoding steps ([`BoundModel::prepare`]):
/// the memory in time-major rows and every attention value that depends on the memory and the
/// parameters alone (the projected memory of the general and additive scores).
#[derive(Clone, Debug)]
pub struct Prepared {
    memory: Vec<f32>,
    shape: Vec<usize>,
    span: Span,
    /// By value of the attention's graph: the per-sequence values, empty elsewhere.
    values: Vec<Vec<f32>>,
}

/// The gradients of a backward pass through a whole model ([`BoundModel::backward`]).
#[derive(Clone, Debug)]
pub struct ModelGrads {
    /// Of every parameter, by full name.
    pub params: BTreeMap<String, Tensor>,
    /// Of the input features (`None` when the input is ids: they have no gradient).
    pub input: Option<Tensor>,
    /// Of each initial state, `(layers·directions, B, size)`.
    pub initial_states: Vec<Tensor>,
    /// Of the attention's memory, shaped like it (with an attention).
    pub memory: Option<Tensor>,
}

/// The cross-entropy of a run and every gradient of it ([`BoundModel::loss`]).
#[derive(Clone, Debug)]
pub struct Loss {
    /// The mean negative log-likelihood over the counted targets, in nats.
    pub loss: f64,
    /// The targets counted (those not equal to the ignore index).
    pub counted: usize,
    /// The stack's final states, `(layers·directions, B, size)` each.
    pub final_states: Vec<Tensor>,
    /// The gradients of `loss`.
    pub grads: ModelGrads,
}

impl<R> Drop for BoundModel<'_, R> {
    /// The layers' weights go back to this thread's pool, for the next `bind` of a training
    /// loop.
    fn drop(&mut self) {
        crate::pool::recycle(
            std::mem::take(&mut self.embedding)
                .into_iter()
                .chain(std::mem::take(&mut self.attention))
                .chain(std::mem::take(&mut self.head)),
        );
    }
}

/// A model bound to its weights, the stack on backend `R`.
pub struct BoundModel<'m, R> {
    model: &'m Model,
    stack: R,
    embedding: Vec<Vec<f32>>,
    attention: Vec<Vec<f32>>,
    head: Vec<Vec<f32>>,
    /// The head's weight packed in panels (on a CPU with AVX-512), for inference over a few
    /// rows: decoding reads the whole weight at every step. Packed at the first such inference
    /// ([`BoundModel::head_panels`]), not at `bind`: a training step binds and never reads it.
    head_panels: std::sync::OnceLock<Option<Vec<f32>>>,
}

/// What the forward pass of the layers before the head computed.
struct Front {
    rows: usize,
    dims: [usize; 2],
    /// The embedding's run (when there is one).
    embedding: Option<LayerRun>,
    /// The stack's input.
    x: Tensor,
}

/// The stack's part of a [`ModelTape`]: one tape of the whole run, or one per step (an
/// attention in the step).
enum StackTape<T> {
    Whole(T),
    Steps(stepped::Steps<T>),
}

/// What [`BoundModel::forward_train`] keeps for [`BoundModel::backward`].
pub struct ModelTape<T> {
    embedding: Option<LayerRun>,
    stack: StackTape<T>,
    /// The stack's output's shape.
    stack_shape: Vec<usize>,
    /// The attention's run, and the memory's shape.
    attention: Option<(LayerRun, Vec<usize>)>,
    head: Option<LayerRun>,
    /// The model's output's shape.
    out_shape: Vec<usize>,
}

impl<'m, R: Recurrent> BoundModel<'m, R> {
    /// The model.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The bound stack.
    pub fn stack(&self) -> &R {
        &self.stack
    }

    /// The head's weight packed in panels, packed at the first call (`None` without a head or
    /// without AVX-512).
    fn head_panels(&self) -> Option<&[f32]> {
        self.head_panels
            .get_or_init(|| match (&self.model.head, self.head.first()) {
                (Some(h), Some(w)) if crate::panels::available() => {
                    let dims = h.forward.params()[0].dims();
                    let mut panels = vec![0.0; crate::panels::panels_len(dims[0], dims[1])];
                    crate::panels::pack_panels(dims[0], dims[1], w, &mut panels);
                    Some(panels)
                }
                _ => None,
            })
            .as_deref()
    }

    /// Embeds the input (ids checked against the vocabulary), or takes the features.
    fn front(&self, input: Input<'_>) -> Result<Front> {
        match (input, &self.model.embedding) {
            (Input::Ids(ids), Some(e)) => {
                ids.check("input")?;
                let vocab = self.model.spec.vocab.unwrap_or(0);
                let lanes = ids.lanes("input", vocab, None)?;
                let rows = lanes.len();
                if rows == 0 {
                    return Err(Error::Argument(format!(
                        "the input ids of shape {:?} hold no token: a sequence needs at least one step and one row",
                        ids.shape
                    )));
                }
                let mut inputs = HashMap::new();
                inputs.insert(Role::Input, lanes);
                let run = e.run(rows, inputs, &self.embedding)?;
                let x = Tensor {
                    shape: vec![ids.shape[0], ids.shape[1], self.model.spec.input_size],
                    data: run.output(e).to_vec(),
                };
                Ok(Front {
                    rows,
                    dims: [ids.shape[0], ids.shape[1]],
                    embedding: Some(run),
                    x,
                })
            }
            (Input::Features(x), None) => {
                let [d0, d1] = match x.shape[..] {
                    [a, b, _] => [a, b],
                    _ => [0, 0],
                };
                Ok(Front {
                    rows: d0 * d1,
                    dims: [d0, d1],
                    embedding: None,
                    x: x.clone(),
                })
            }
            (Input::Ids(_), None) => Err(Error::Argument(
                "the model has no embedding (`vocab`): give it features, not token ids".into(),
            )),
            (Input::Features(_), Some(_)) => Err(Error::Argument(
                "the model embeds token ids (`vocab`): give it ids, not features".into(),
            )),
        }
    }

    fn request<'a>(&self, run: &Run<'a>, x: &'a Tensor) -> Request<'a> {
        Request {
            input: Some(x),
            initial_states: run.initial_states.clone(),
            lengths: run.lengths,
            grad_output: None,
            grad_final_states: Vec::new(),
        }
    }

    /// Runs the attention on the stack's output `y` (`(d0, d1, features)` in the model's
    /// layout) against `memory`: its run (time-major rows) and its output in the model's layout.
    /// The memory checked against the model (`batch` sequences, its features, finite, its
    /// lengths): its positions, its lengths and its rows time-major.
    fn memory_rows(
        &self,
        memory: MemoryRef<'_>,
        batch: usize,
    ) -> Result<(usize, Option<Vec<usize>>, Vec<f32>)> {
        let bf = self.model.spec.batch_first;
        let size = self.model.spec.attention.map_or(0, |a| a.memory);
        let m = memory.values;
        if Some(m.data.len()) != m.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) {
            return Err(Error::Argument(format!(
                "the memory has shape {:?} but holds {} values",
                m.shape,
                m.data.len()
            )));
        }
        let fits = |a: usize, b: usize| if bf { (b, a) } else { (a, b) };
        let (positions, m_batch) = match m.shape[..] {
            [a, b, f] if f == size && fits(a, b).1 == batch && fits(a, b).0 > 0 => fits(a, b),
            _ => {
                return Err(Error::TensorShape {
                    name: "memory".into(),
                    expected: if bf {
                        vec![batch, m.shape.get(1).copied().unwrap_or(1).max(1), size]
                    } else {
                        vec![m.shape.first().copied().unwrap_or(1).max(1), batch, size]
                    },
                    found: m.shape.clone(),
                });
            }
        };
        if let Some((index, found)) = m.first_non_finite() {
            return Err(Error::NonFinite {
                name: "memory".into(),
                index,
                found,
            });
        }
        let lengths = match memory.lengths {
            None => None,
            Some(l) => {
                if l.len() != m_batch {
                    return Err(Error::Argument(format!(
                        "{} source lengths given for a memory of {m_batch} sequences",
                        l.len()
                    )));
                }
                let mut out = Vec::with_capacity(l.len());
                for (index, &n) in l.iter().enumerate() {
                    if n < 1 || n as usize > positions {
                        return Err(Error::Length {
                            index,
                            found: n,
                            max: positions,
                        });
                    }
                    out.push(n as usize);
                }
                Some(out)
            }
        };
        let rows = if bf {
            swap_outer(&m.data, batch, positions, size)
        } else {
            m.data.clone()
        };
        Ok((positions, lengths, rows))
    }

    /// Refuses a prepared memory that is not `memory`'s for `batch` sequences.
    fn check_prepared(&self, p: &Prepared, memory: MemoryRef<'_>, batch: usize) -> Result<()> {
        if p.span.batch != batch || p.shape != memory.values.shape {
            return Err(Error::Argument(format!(
                "the prepared memory is of shape {:?} for {} sequences; this run gives {:?} for {batch}",
                p.shape, p.span.batch, memory.values.shape
            )));
        }
        Ok(())
    }

    /// Makes `memory` ready for many inference runs (decoding): checked, time-major, and the
    /// attention's per-sequence values (the projected memory) computed once.
    pub fn prepare(&self, memory: MemoryRef<'_>) -> Result<Prepared> {
        let Some(layer) = &self.model.attention else {
            return Err(Error::Argument(
                "the model has no attention: it reads no memory".into(),
            ));
        };
        let bf = self.model.spec.batch_first;
        let batch = match memory.values.shape[..] {
            [a, b, _] => {
                if bf {
                    a
                } else {
                    b
                }
            }
            _ => 0,
        };
        let (positions, lengths, rows) = self.memory_rows(memory, batch)?;
        let span = Span {
            positions,
            batch,
            lengths,
        };
        let lookup = |role: Role| match role {
            Role::Memory => Some(rows.as_slice()),
            Role::Param(p) => self.attention.get(p as usize).map(Vec::as_slice),
            _ => None,
        };
        let per = &layer.per_sequence;
        let mut values = eval_graph_partial::<f32>(
            &layer.forward,
            batch,
            lookup,
            |_| None,
            |v| !per[v.index()],
            &Exec::default(),
            Some(&span.extent()),
        )?;
        // Inputs stay where they are fed; only computed values are kept.
        for v in layer.forward.iter() {
            if matches!(layer.forward.data(v).op, Op::Input(_)) {
                values[v.index()] = Vec::new();
            }
        }
        Ok(Prepared {
            memory: rows,
            shape: memory.values.shape.clone(),
            span,
            values,
        })
    }

    /// Runs the attention on the stack's output `y` (`(d0, d1, features)` in the model's
    /// layout) against `memory`: its run (time-major rows; none for an inference on a prepared
    /// memory) and its output in the model's layout.
    fn attend(
        &self,
        layer: &Layer,
        dims: [usize; 2],
        y: Vec<f32>,
        memory: Option<MemoryRef<'_>>,
        keep: bool,
    ) -> Result<(Option<LayerRun>, Vec<f32>)> {
        let Some(memory) = memory else {
            return Err(Error::Argument(
                "the model attends over a memory (an encoder's outputs): give it with the run"
                    .into(),
            ));
        };
        let bf = self.model.spec.batch_first;
        let features = self.model.stack.output_size() * self.model.spec.directions();
        let (steps, batch) = if bf {
            (dims[1], dims[0])
        } else {
            (dims[0], dims[1])
        };
        let tm = |data: Vec<f32>, d0: usize, d1: usize, n: usize| {
            if bf {
                swap_outer(&data, d0, d1, n)
            } else {
                data
            }
        };
        if let (false, Some(p)) = (keep, memory.prepared) {
            self.check_prepared(p, memory, batch)?;
            let x = tm(y, batch, steps, features);
            let extent = p.span.extent();
            let lookup = |role: Role| match role {
                Role::Input => Some(x.as_slice()),
                Role::Memory => Some(p.memory.as_slice()),
                Role::Param(i) => self.attention.get(i as usize).map(Vec::as_slice),
                _ => None,
            };
            let given = |v: Value| {
                p.values
                    .get(v.index())
                    .filter(|x| !x.is_empty())
                    .map(Vec::as_slice)
            };
            let mut values = eval_graph_partial::<f32>(
                &layer.forward,
                steps * batch,
                lookup,
                given,
                |_| false,
                &Exec::default(),
                Some(&extent),
            )?;
            let out = std::mem::take(&mut values[layer.output().index()]);
            return Ok((None, tm(out, steps, batch, features)));
        }
        let (positions, lengths, rows) = self.memory_rows(memory, batch)?;
        let mut inputs = HashMap::new();
        inputs.insert(Role::Input, tm(y, batch, steps, features));
        inputs.insert(Role::Memory, rows);
        let run = layer.run_with(
            steps * batch,
            inputs,
            &self.attention,
            Some(Span {
                positions,
                batch,
                lengths,
            }),
        )?;
        let out = tm(run.output(layer).to_vec(), steps, batch, features);
        Ok((Some(run), out))
    }

    /// Runs the attention and the head (those the model has) on the stack's output in
    /// `response`, which becomes theirs; returns their runs.
    #[allow(clippy::type_complexity)]
    fn after_stack(
        &self,
        rows: usize,
        dims: [usize; 2],
        response: &mut Response,
        memory: Option<MemoryRef<'_>>,
        keep: bool,
    ) -> Result<(Option<(LayerRun, Vec<usize>)>, Option<LayerRun>)> {
        let attention = match (&self.model.attention, memory) {
            // In the step: it ran with the stack.
            (Some(_), _) if self.in_step() => None,
            (Some(a), memory) => {
                let y = std::mem::take(&mut response.output.data);
                let (run, out) = self.attend(a, dims, y, memory, keep)?;
                response.output.data = out;
                let shape = memory.map(|m| m.values.shape.clone()).unwrap_or_default();
                run.map(|r| (r, shape))
            }
            (None, Some(_)) => {
                return Err(Error::Argument(
                    "the model has no attention: it reads no memory".into(),
                ));
            }
            (None, None) => None,
        };
        let Some(h) = &self.model.head else {
            return Ok((attention, None));
        };
        let classes = self.model.features();
        // Checked in order: the panels are packed only for an inference over a few rows.
        if !keep
            && rows <= PANEL_ROWS
            && let Some(panels) = self.head_panels()
        {
            // Inference over a few rows (decoding): the head's product on its packed weight,
            // then its bias; the head graph's values, summed in another order.
            let features = response.output.data.len() / rows.max(1);
            let mut logits = vec![0.0; rows * classes];
            if rows == 1 {
                let x = &response.output.data;
                crate::panels::matvec_panels(classes, features, panels, x, &mut logits);
            } else {
                crate::panels::matmul_panels(
                    classes,
                    features,
                    rows,
                    panels,
                    &response.output.data,
                    features,
                    &mut logits,
                    classes,
                );
            }
            for row in logits.chunks_mut(classes) {
                for (y, &b) in row.iter_mut().zip(&self.head[1]) {
                    *y += b;
                }
            }
            response.output = Tensor {
                shape: vec![dims[0], dims[1], classes],
                data: logits,
            };
            return Ok((attention, None));
        }
        let mut inputs = HashMap::new();
        inputs.insert(Role::Input, std::mem::take(&mut response.output.data));
        let mut run = h.run(rows, inputs, &self.head)?;
        let out = h.output();
        // The logits leave the run uncopied unless the head's backward reads them.
        let data = if h.backward.input(Role::Saved(out)).is_none() {
            std::mem::take(&mut run.values[out.index()])
        } else {
            run.values[out.index()].clone()
        };
        response.output = Tensor {
            shape: vec![dims[0], dims[1], classes],
            data,
        };
        Ok((attention, Some(run)))
    }

    /// The forward pass: the output is the head's logits `(T, B, classes)` (or batch-first),
    /// or the stack's output without a head; the final states are the stack's.
    pub fn forward(&self, run: &Run<'_>) -> Result<Response> {
        if self.in_step() {
            let (mut response, front, _) = self.forward_steps(run, false)?;
            self.after_stack(front.rows, front.dims, &mut response, run.memory, false)?;
            return Ok(response);
        }
        let front = self.front(run.input)?;
        let mut response = self.stack.forward(&self.request(run, &front.x))?;
        self.after_stack(front.rows, front.dims, &mut response, run.memory, false)?;
        Ok(response)
    }

    /// [`BoundModel::forward`], keeping what [`BoundModel::backward`] needs.
    pub fn forward_train(&self, run: &Run<'_>) -> Result<(Response, ModelTape<R::Tape>)> {
        let (mut response, front, stack) = if self.in_step() {
            let (response, front, steps) = self.forward_steps(run, true)?;
            let steps = steps.expect("kept");
            (response, front, StackTape::Steps(steps))
        } else {
            let front = self.front(run.input)?;
            let (response, stack) = self.stack.forward_train(&self.request(run, &front.x))?;
            (response, front, StackTape::Whole(stack))
        };
        let stack_shape = response.output.shape.clone();
        let (attention, head) =
            self.after_stack(front.rows, front.dims, &mut response, run.memory, true)?;
        let tape = ModelTape {
            embedding: front.embedding,
            stack,
            stack_shape,
            attention,
            head,
            out_shape: response.output.shape.clone(),
        };
        Ok((response, tape))
    }

    /// The backward pass of a [`BoundModel::forward_train`]: the gradients of
    /// `sum(output · grad_output) + Σ sum(state_n · grad_state_n)` (the output being the
    /// logits when there is a head).
    pub fn backward(
        &self,
        tape: ModelTape<R::Tape>,
        grad_output: &Tensor,
        grad_final_states: &[Option<&Tensor>],
    ) -> Result<ModelGrads> {
        if grad_output.shape != tape.out_shape {
            return Err(Error::TensorShape {
                name: "grad_output".into(),
                expected: tape.out_shape,
                found: grad_output.shape.clone(),
            });
        }
        if grad_output.data.len() != grad_output.shape.iter().product::<usize>() {
            return Err(Error::Argument(format!(
                "`grad_output` has shape {:?} but holds {} values",
                grad_output.shape,
                grad_output.data.len()
            )));
        }
        let mut params = BTreeMap::new();
        let d_output = match (&self.model.head, &tape.head) {
            (Some(h), Some(run)) => {
                let wanted = grad_values(h, &[OutRole::InputGrad])?;
                let mut back = take_values(h.back(run, &grad_output.data, &self.head)?, &wanted);
                let dx = back.pop().expect("the input's gradient was wanted");
                h.insert_grads(&mut params, "fc.", back);
                Tensor {
                    shape: tape.stack_shape.clone(),
                    data: dx,
                }
            }
            _ => grad_output.clone(),
        };
        let (d_output, memory) = match (&self.model.attention, &tape.attention) {
            (Some(a), Some((run, memory_shape))) => {
                let bf = self.model.spec.batch_first;
                let [d0, d1, n] = [d_output.shape[0], d_output.shape[1], d_output.shape[2]];
                let (steps, batch) = if bf { (d1, d0) } else { (d0, d1) };
                let tm = |data: Vec<f32>, x0: usize, x1: usize, n: usize| {
                    if bf {
                        swap_outer(&data, x0, x1, n)
                    } else {
                        data
                    }
                };
                let wanted = grad_values(a, &[OutRole::InputGrad, OutRole::MemoryGrad])?;
                let back = a.back(run, &tm(d_output.data, batch, steps, n), &self.attention)?;
                let mut back = take_values(back, &wanted);
                let dm = back.pop().expect("the memory's gradient was wanted");
                let dy = back.pop().expect("the input's gradient was wanted");
                a.insert_grads(&mut params, "attention.", back);
                let (positions, size) = if bf {
                    (memory_shape[1], memory_shape[2])
                } else {
                    (memory_shape[0], memory_shape[2])
                };
                (
                    Tensor {
                        shape: vec![d0, d1, n],
                        data: tm(dy, steps, batch, n),
                    },
                    Some(Tensor {
                        shape: memory_shape.clone(),
                        data: tm(dm, positions, batch, size),
                    }),
                )
            }
            _ => (d_output, None),
        };
        let (stack, memory) = match tape.stack {
            StackTape::Whole(t) => (
                self.stack.backward(t, &d_output, grad_final_states)?,
                memory,
            ),
            StackTape::Steps(steps) => {
                let (g, m) = self.back_steps(steps, &d_output, grad_final_states, &mut params)?;
                (g, Some(m))
            }
        };
        let prefix = self.model.stack_prefix();
        for (name, g) in stack.params {
            params.insert(format!("{prefix}{name}"), g);
        }
        let input = match (&self.model.embedding, &tape.embedding) {
            (Some(e), Some(run)) => {
                let wanted = grad_values(e, &[])?;
                let back = e.back(run, &stack.input.data, &self.embedding)?;
                e.insert_grads(&mut params, "embedding.", take_values(back, &wanted));
                None
            }
            _ => Some(stack.input),
        };
        Ok(ModelGrads {
            params,
            input,
            initial_states: stack.initial_states,
            memory,
        })
    }

    /// The mean cross-entropy of the model's output against `targets` (shaped like the input,
    /// each a class id or `ignore`), PyTorch's `cross_entropy(logits, targets, ignore_index)`,
    /// and its gradients. Positions past a sequence's length must hold `ignore`; a run whose
    /// targets are all `ignore` has no mean and is refused.
    pub fn loss(&self, run: &Run<'_>, targets: &Ids, ignore: i64) -> Result<Loss> {
        if !(-MAX_ID..=MAX_ID).contains(&ignore) {
            return Err(Error::Argument(format!(
                "the ignore index {ignore} is beyond ±2^24, the ids a model can hold exactly"
            )));
        }
        targets.check("targets")?;
        let dims = match run.input {
            Input::Ids(ids) => ids.shape.clone(),
            Input::Features(x) => x.shape.iter().take(2).copied().collect(),
        };
        if targets.shape != dims {
            return Err(Error::TensorShape {
                name: "targets".into(),
                expected: dims,
                found: targets.shape.clone(),
            });
        }
        let classes = self.model.features();
        // Checks every target is a class or `ignore`.
        targets.lanes("targets", classes, Some(ignore))?;
        if let Some(lengths) = run.lengths {
            self.check_padding(targets, lengths, ignore)?;
        }
        let counted = targets.data.iter().filter(|&&t| t != ignore).count();
        if counted == 0 {
            return Err(Error::Argument(format!(
                "every target is the ignore index {ignore}: the mean loss over no target is undefined"
            )));
        }
        let (mut response, tape) = self.forward_train(run)?;
        // The loss graph's log_softmax, pick and their backward, fused into one pass over the
        // logits, which become their gradient in place (`cross_entropy_fused`).
        let total = cross_entropy_fused(
            &mut response.output.data,
            classes,
            &targets.data,
            ignore,
            1.0 / counted as f32,
        );
        let d_logits = response.output;
        let grads = self.backward(tape, &d_logits, &[])?;
        crate::pool::recycle([d_logits.data]);
        Ok(Loss {
            loss: total / counted as f64,
            counted,
            final_states: response.final_states,
            grads,
        })
    }

    /// Refuses a counted target past its sequence's length (the stack's output is zero there).
    fn check_padding(&self, targets: &Ids, lengths: &[i64], ignore: i64) -> Result<()> {
        let batch_first = self.model.spec.batch_first;
        let d1 = targets.shape[1];
        for (i, &t) in targets.data.iter().enumerate() {
            let (step, row) = if batch_first {
                (i % d1, i / d1)
            } else {
                (i / d1, i % d1)
            };
            if let Some(&len) = lengths.get(row)
                && step as i64 >= len
                && t != ignore
            {
                return Err(Error::Argument(format!(
                    "`targets` holds {t} at step {step} of sequence {row}, past its length {len}: give the ignore index {ignore} there"
                )));
            }
        }
        Ok(())
    }
}

fn grad_of(g: &Graph, role: OutRole) -> Result<Value> {
    g.output(role)
        .ok_or_else(|| Error::Argument(format!("the backward graph has no {role:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_exponential_is_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let n = 2_000_000;
        for i in 0..=n {
            let x = -87.0 * i as f32 / n as f32;
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert!(exp_nonpositive(-1000.0) < 1e-37);
    }

    #[test]
    fn the_fused_cross_entropy_is_the_loss_graph_and_its_backward() {
        let (rows, classes, ignore) = (7, 13, -100i64);
        let mut u = crate::weights::SeededUniform::new(3);
        let logits: Vec<f32> = (0..rows * classes)
            .map(|_| (u.next().unwrap_or(0.0) * 8.0) as f32)
            .collect();
        let targets: Vec<i64> = vec![0, 12, ignore, 5, 5, ignore, 7];
        let scale = 0.2f32;
        // The graph: log_softmax, pick, neg, then its backward graph.
        let g = loss_graph(classes, ignore as i32).unwrap();
        let mut inputs = HashMap::new();
        inputs.insert(Role::Input, logits.clone());
        inputs.insert(Role::Target, targets.iter().map(|&t| t as f32).collect());
        let run = g.run(rows, inputs, &[]).unwrap();
        let graph_total: f64 = run.output(&g).iter().map(|&x| f64::from(x)).sum();
        let back = g.back(&run, &vec![scale; rows], &[]).unwrap();
        let graph_grad = &back[grad_of(&g.backward, OutRole::InputGrad).unwrap().index()];
        // Fused.
        let mut fused = logits.clone();
        let total = cross_entropy_fused(&mut fused, classes, &targets, ignore, scale);
        assert!(
            (total - graph_total).abs() <= 1e-5 * graph_total.abs(),
            "{total} vs {graph_total}"
        );
        for (i, (a, b)) in fused.iter().zip(graph_grad).enumerate() {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "[{i}]: {a} vs {b}");
        }
        // Ignored rows: no gradient.
        assert!(fused[2 * classes..3 * classes].iter().all(|&x| x == 0.0));
    }
}

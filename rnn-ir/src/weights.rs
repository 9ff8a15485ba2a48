//! Weights: PyTorch `state_dict` names in and out through safetensors, strict checking against a
//! program, inference of a model from a state dict, and PyTorch's initialisation from a seed.

use crate::error::{Error, Result};
use crate::program::Program;
use crate::spec::{CellKind, ModelSpec};
use crate::tensor::{Tensor, f32s_from_le_bytes, f32s_to_le_bytes};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::BTreeMap;

/// A model's parameters by PyTorch name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Weights {
    /// The tensors, sorted by name.
    pub tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// Checks that the weights are exactly the program's parameters: every one present, with its
    /// shape, finite, and nothing else.
    pub fn check(&self, p: &Program) -> Result<()> {
        let params = p.parameters();
        self.check_params(params.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
    }

    /// [`Weights::check`] against a list of parameter names and shapes.
    pub fn check_params<'a>(
        &self,
        params: impl IntoIterator<Item = (&'a str, &'a [usize])> + Clone,
    ) -> Result<()> {
        for (name, shape) in params.clone() {
            let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                expected: shape.to_vec(),
            })?;
            if t.shape != *shape {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: t.shape.clone(),
                });
            }
            if t.data.len() != shape.iter().product::<usize>() {
                return Err(Error::WeightsMismatch(format!(
                    "`{name}` has shape {shape:?} but holds {} elements",
                    t.data.len()
                )));
            }
            if let Some((index, found)) = t.first_non_finite() {
                return Err(Error::NonFinite {
                    name: name.to_string(),
                    index,
                    found,
                });
            }
        }
        if let Some(extra) = self
            .tensors
            .keys()
            .find(|k| !params.clone().into_iter().any(|(n, _)| n == k.as_str()))
        {
            return Err(Error::UnexpectedTensor {
                name: extra.clone(),
            });
        }
        Ok(())
    }

    /// PyTorch's initialisation: every parameter uniform in `±1/√hidden`, from `seed`
    /// (ChaCha8, so the same seed gives the same weights on every platform), except those whose
    /// declaration gives a value (`param gamma: [hidden] = 1`), which start at it. The uniform
    /// stream skips the declared ones, so declaring one parameter's value changes no other's.
    /// Fails, rather than aborting, when the parameters do not fit in memory.
    pub fn init(p: &Program, seed: u64) -> Result<Weights> {
        let infos = p.parameter_infos();
        Weights::init_params(
            infos
                .iter()
                .map(|(name, info)| (name.as_str(), info.dims(), info.init)),
            p.spec.hidden_size,
            seed,
        )
    }

    /// [`Weights::init`] for parameters given as `(name, dims, declared value)` in the
    /// program's parameter order, for a model of `hidden` features.
    pub fn init_params<'a>(
        params: impl IntoIterator<Item = (&'a str, Vec<usize>, Option<f32>)>,
        hidden: usize,
        seed: u64,
    ) -> Result<Weights> {
        let mut tensors = BTreeMap::new();
        let mut list = Vec::new();
        for (name, shape, init) in params {
            let n: usize = shape.iter().product();
            let mut data = Vec::new();
            data.try_reserve_exact(n).map_err(|_| {
                Error::Argument(format!("cannot allocate {n} floats for `{name}` {shape:?}"))
            })?;
            data.resize(n, 0.0);
            list.push((name.to_string(), shape, init, data));
        }
        init_into(
            list.iter_mut()
                .map(|(_, _, init, data)| (*init, data.as_mut_slice())),
            hidden,
            seed,
        );
        for (name, shape, _, data) in list {
            tensors.insert(name, Tensor { shape, data });
        }
        Ok(Weights { tensors })
    }

    /// The part of a `state_dict` saved from a whole PyTorch model that belongs to the
    /// recurrent submodule at `prefix`: every tensor whose name starts with the prefix, with it
    /// stripped (`rnn.weight_ih_l0` becomes `weight_ih_l0` for the prefix `rnn.`); every other
    /// tensor (`fc.weight`, `embedding.weight`) is dropped.
    ///
    /// A prefix is a module path as PyTorch writes it, ending with `.`; one written without the
    /// final `.` (`rnn`, `encoder.rnn`) gets it, so `rnn` never matches `rnn2.weight_ih_l0`. The
    /// empty prefix keeps everything. Fails with [`Error::WeightsMismatch`] when no tensor is
    /// under the prefix, naming the module paths the names do hold.
    ///
    /// ```
    /// # use rnn_ir::{Tensor, Weights};
    /// let mut w = Weights::default();
    /// w.tensors.insert("rnn.weight_ih_l0".into(), Tensor::zeros(vec![4, 3]));
    /// w.tensors.insert("fc.weight".into(), Tensor::zeros(vec![2, 4]));
    /// let w = w.strip_prefix("rnn.").unwrap();
    /// assert_eq!(w.tensors.keys().collect::<Vec<_>>(), ["weight_ih_l0"]);
    /// ```
    pub fn strip_prefix(self, prefix: &str) -> Result<Weights> {
        if prefix.is_empty() {
            return Ok(self);
        }
        let prefix = module_prefix(prefix);
        let modules = module_paths(self.tensors.keys().map(String::as_str));
        let tensors: BTreeMap<String, Tensor> = self
            .tensors
            .into_iter()
            .filter_map(|(name, t)| {
                let rest = name.strip_prefix(&prefix)?;
                (!rest.is_empty()).then(|| (rest.to_string(), t))
            })
            .collect();
        if tensors.is_empty() {
            let held = if modules.is_empty() {
                "no name holds a module path (the tensors are at the top level)".to_string()
            } else {
                let shown: Vec<String> = modules.iter().take(8).map(|m| format!("`{m}`")).collect();
                let more = if modules.len() > 8 { ", …" } else { "" };
                format!("the names are under {}{more}", shown.join(", "))
            };
            return Err(Error::WeightsMismatch(format!(
                "no tensor name starts with the prefix `{prefix}`: {held}"
            )));
        }
        Ok(Weights { tensors })
    }

    /// Reads and checks weights for `p` from safetensors bytes.
    pub fn from_safetensors(bytes: &[u8], p: &Program) -> Result<Weights> {
        let w = Weights {
            tensors: read_safetensors(bytes)?,
        };
        w.check(p)?;
        Ok(w)
    }
}

/// Fills parameters, in the program's parameter order, as [`Weights::init`] does: each
/// `(declared value, elements)` gets its declared value, or the next numbers of the uniform
/// stream of `seed` scaled to `±1/√hidden`.
pub fn init_into<'a>(
    params: impl IntoIterator<Item = (Option<f32>, &'a mut [f32])>,
    hidden: usize,
    seed: u64,
) {
    let k = 1.0 / (hidden as f64).sqrt();
    let mut uniform = SeededUniform::new(seed);
    for (init, data) in params {
        match init {
            Some(value) => data.fill(value),
            None => {
                for (x, u) in data.iter_mut().zip(uniform.by_ref()) {
                    *x = (u * k) as f32;
                }
            }
        }
    }
}

/// The module prefixes under which `names` hold one of the `wanted` parameter names: for a
/// `state_dict` saved from a whole model, the submodules that hold the recurrent layer.
///
/// A prefix is everything before a wanted name that follows a `.` (`rnn.` in
/// `rnn.weight_ih_l0`, `encoder.rnn.` in `encoder.rnn.weight_hh_l0`); the result is sorted and
/// without repeats, empty when no name holds a wanted one under a prefix. This is how a caller
/// whose names do not match says which prefix to strip with [`Weights::strip_prefix`].
///
/// ```
/// # use rnn_ir::weights::prefixes_holding;
/// let names = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc.weight"];
/// assert_eq!(prefixes_holding(names, &["weight_ih_l0", "weight_hh_l0"]), ["rnn."]);
/// assert!(prefixes_holding(names, &["bias_ih_l0"]).is_empty());
/// ```
pub fn prefixes_holding<'a>(
    names: impl IntoIterator<Item = &'a str>,
    wanted: &[&str],
) -> Vec<String> {
    let mut out: Vec<String> = names
        .into_iter()
        .filter_map(|name| {
            wanted.iter().find_map(|w| {
                let prefix = name.strip_suffix(w)?;
                (prefix.len() > 1 && prefix.ends_with('.')).then(|| prefix.to_string())
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `prefix` as the module path [`Weights::strip_prefix`] strips: ending with `.` (`rnn` is
/// `rnn.`), or empty.
pub fn module_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('.') {
        prefix.to_string()
    } else {
        format!("{prefix}.")
    }
}

/// The distinct module paths (`rnn.`, `fc.`) of `names`: each dotted name up to its last `.`.
fn module_paths<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = names
        .into_iter()
        .filter_map(|n| n.rfind('.').filter(|&i| i > 0).map(|i| n[..=i].to_string()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Uniform random numbers in `[-1, 1)` from a seed: ChaCha8, so the same seed gives the same
/// numbers on every platform, each with 24 random bits (exact in `f32` and `f64`).
#[derive(Clone, Debug)]
pub struct SeededUniform(ChaCha8Rng);

impl SeededUniform {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        SeededUniform(ChaCha8Rng::seed_from_u64(seed))
    }
}

/// `n` standard normal numbers from `seed` (Box–Muller on [`SeededUniform`]'s numbers, two
/// per pair): what `torch.randn` and `nn.Embedding`'s initialisation draw, from this
/// project's generator.
pub fn seeded_normals(seed: u64, n: usize) -> Vec<f32> {
    let mut u = SeededUniform::new(seed);
    let mut data = Vec::with_capacity(n);
    while data.len() < n {
        // Box–Muller on two uniforms in (0, 1].
        let a = (u.next().unwrap_or(0.0) + 1.0) / 2.0;
        let b = (u.next().unwrap_or(0.0) + 1.0) / 2.0;
        let r = (-2.0 * (1.0 - a).max(f64::MIN_POSITIVE).ln()).sqrt();
        let t = std::f64::consts::TAU * b;
        data.push((r * t.cos()) as f32);
        if data.len() < n {
            data.push((r * t.sin()) as f32);
        }
    }
    data
}

impl Iterator for SeededUniform {
    type Item = f64;
    fn next(&mut self) -> Option<f64> {
        let u = (self.0.next_u32() >> 8) as f64 / (1u64 << 24) as f64;
        Some(2.0 * u - 1.0)
    }
}

/// Every tensor of a safetensors file, which must all be `F32`.
pub fn read_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::WeightFile(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        out.insert(name.to_string(), tensor_from_view(name, &view)?);
    }
    Ok(out)
}

fn tensor_from_view(name: &str, view: &TensorView) -> Result<Tensor> {
    if view.dtype() != Dtype::F32 {
        return Err(Error::TensorDtype {
            name: name.into(),
            expected: "F32".into(),
            found: format!("{:?}", view.dtype()),
        });
    }
    let data = f32s_from_le_bytes(view.data());
    Tensor::new(view.shape().to_vec(), data).ok_or_else(|| {
        Error::WeightFile(format!(
            "tensor `{name}` holds a byte count that does not match its shape"
        ))
    })
}

/// The bytes of a safetensors file holding `tensors` (all `F32`).
pub fn write_safetensors(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    write_safetensors_with(tensors, &BTreeMap::new())
}

/// Every tensor of a safetensors file (all `F32`) and its `__metadata__` strings.
pub fn read_safetensors_with(
    bytes: &[u8],
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let tensors = read_safetensors(bytes)?;
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::WeightFile(e.to_string()))?;
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok((tensors, metadata))
}

/// The bytes of a safetensors file holding `tensors` (all `F32`) and the `__metadata__`
/// strings `metadata` (none when empty).
pub fn write_safetensors_with(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .values()
        .map(|t| f32s_to_le_bytes(&t.data))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::WeightFile(format!("cannot write `{name}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let info = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    let mut bytes =
        safetensors::serialize(views, info).map_err(|e| Error::WeightFile(e.to_string()))?;
    sort_metadata(&mut bytes, metadata);
    Ok(bytes)
}

/// Rewrites the metadata object of serialized safetensors `bytes` with its entries in key
/// order, so that the same tensors and metadata always give the same bytes (the `safetensors`
/// crate writes them in a hash map's order). Only plain entries are rewritten (no character
/// JSON escapes); the object keeps its length, so nothing else moves.
fn sort_metadata(bytes: &mut [u8], metadata: &BTreeMap<String, String>) {
    let plain = |s: &str| !s.chars().any(|c| c == '"' || c == '\\' || c.is_control());
    if metadata.is_empty() || !metadata.iter().all(|(k, v)| plain(k) && plain(v)) {
        return;
    }
    let sorted: Vec<String> = metadata
        .iter()
        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
        .collect();
    let sorted = format!("{{{}}}", sorted.join(","));
    let Some(header_len) = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| u64::from_le_bytes(b) as usize)
    else {
        return;
    };
    let key = b"\"__metadata__\":";
    let Some(header) = bytes.get_mut(8..8 + header_len) else {
        return;
    };
    let Some(at) = header.windows(key.len()).position(|w| w == key) else {
        return;
    };
    let start = at + key.len();
    let end = start + sorted.len();
    if end > header.len() || header[start] != b'{' || header[end - 1] != b'}' {
        return;
    }
    // The same entries in another order: the same bytes, counted.
    let mut a = header[start..end].to_vec();
    let mut b = sorted.as_bytes().to_vec();
    a.sort_unstable();
    b.sort_unstable();
    if a == b {
        header[start..end].copy_from_slice(sorted.as_bytes());
    }
}

/// Infers the model a PyTorch `nn.RNN` / `nn.LSTM` / `nn.GRU` state dict belongs to: layers and
/// directions from the names, sizes and gate count from the shapes. `cell` settles what shapes
/// cannot (tanh or relu) and is checked against the gate count. PyTorch always stores both
/// biases, so the result uses its two-bias convention; a missing `bias_hh` is then reported by
/// [`Weights::check`] as missing rather than read as another convention.
///
/// Only the layer-0 tensors are read here; [`Weights::check`] then checks every tensor against
/// the inferred model, naming the one at fault.
pub fn infer_spec(tensors: &BTreeMap<String, Tensor>, cell: Option<CellKind>) -> Result<ModelSpec> {
    let matrix = |name: &str| -> Result<(usize, usize)> {
        let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            expected: vec![],
        })?;
        match t.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(Error::WeightsMismatch(format!(
                "`{name}` must be a matrix, found shape {:?}",
                t.shape
            ))),
        }
    };
    let (rows, input_size) = matrix("weight_ih_l0")?;
    let (rows_hh, rec) = matrix("weight_hh_l0")?;
    let gates_of = |hidden: usize, source: &str| -> Result<usize> {
        if hidden == 0 || rows % hidden != 0 {
            return Err(Error::WeightsMismatch(format!(
                "`weight_ih_l0` has {rows} rows, not a whole number of gate blocks of the hidden size {hidden} ({source})"
            )));
        }
        Ok(rows / hidden)
    };
    let (hidden, proj, gates) = if tensors.contains_key("weight_hr_l0") {
        let (p, h) = matrix("weight_hr_l0")?;
        (h, p, gates_of(h, "the columns of `weight_hr_l0`")?)
    } else if let Some(c) = &cell {
        // The cell fixes the gate count, so the hidden size follows from `weight_ih_l0`, and
        // `weight_hh_l0` is checked against it like every other tensor.
        let gates = c.gates().unwrap_or(1);
        if rows % gates != 0 {
            return Err(Error::WeightsMismatch(format!(
                "`weight_ih_l0` has {rows} rows, not a whole number of the {gates} gate blocks of `--cell {}`",
                c.name()
            )));
        }
        let hidden = rows / gates;
        if rec != hidden && rec > 0 && rows % rec == 0 && rows_hh == rows {
            return Err(Error::WeightsMismatch(format!(
                "`--cell {}` has {gates} gate block(s), but `weight_ih_l0` [{rows}, {input_size}] and `weight_hh_l0` [{rows_hh}, {rec}] hold {} blocks of hidden size {rec}",
                c.name(),
                rows / rec
            )));
        }
        (hidden, 0, gates)
    } else {
        if rec == 0 || rows_hh % rec != 0 || rows_hh != rows {
            return Err(Error::WeightsMismatch(format!(
                "`weight_hh_l0` has shape [{rows_hh}, {rec}]: its columns (the hidden size) must divide {rows} rows (those of `weight_ih_l0`) into 1, 3 or 4 gate blocks"
            )));
        }
        (rec, 0, gates_of(rec, "the columns of `weight_hh_l0`")?)
    };
    let cell = match (gates, cell) {
        (g, Some(c)) if c.gates() == Some(g) => c,
        (g, Some(c)) => {
            return Err(Error::WeightsMismatch(format!(
                "`--cell {}` has {} gate block(s), but `weight_ih_l0` has {g} ({rows} rows of hidden size {hidden})",
                c.name(),
                c.gates().unwrap_or(0)
            )));
        }
        (1, None) => CellKind::RnnTanh,
        (4, None) => CellKind::Lstm,
        (3, None) => CellKind::Gru,
        (g, None) => {
            return Err(Error::WeightsMismatch(format!(
                "{g} gate blocks in `weight_ih_l0` match no RNN, LSTM or GRU"
            )));
        }
    };
    let mut layers = 0;
    while tensors.contains_key(&format!("weight_ih_l{layers}")) {
        layers += 1;
    }
    let mut spec = ModelSpec::new(cell, input_size, hidden);
    spec.num_layers = layers;
    spec.bidirectional = tensors.contains_key("weight_ih_l0_reverse");
    spec.bias = tensors.contains_key("bias_ih_l0");
    spec.proj_size = proj;
    spec.validate().map_err(Error::WeightsMismatch)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(names: &[&str]) -> Weights {
        Weights {
            tensors: names
                .iter()
                .map(|n| (n.to_string(), Tensor::zeros(vec![1])))
                .collect(),
        }
    }

    fn names(w: &Weights) -> Vec<&str> {
        w.tensors.keys().map(String::as_str).collect()
    }

    #[test]
    fn strip_prefix_keeps_the_submodule_and_drops_the_rest() {
        let w = weights(&[
            "rnn.weight_ih_l0",
            "rnn.bias_ih_l0",
            "rnn2.weight_ih_l0",
            "fc.weight",
            "weight_hh_l0",
        ]);
        let stripped = w.clone().strip_prefix("rnn.").unwrap();
        assert_eq!(names(&stripped), ["bias_ih_l0", "weight_ih_l0"]);
        // Without the final dot it is the same module path, and `rnn2.` is another module.
        assert_eq!(w.clone().strip_prefix("rnn").unwrap(), stripped);
        assert_eq!(w.clone().strip_prefix("").unwrap(), w);
        let nested = weights(&["encoder.rnn.weight_ih_l0", "decoder.rnn.weight_ih_l0"]);
        assert_eq!(
            names(&nested.strip_prefix("encoder.rnn.").unwrap()),
            ["weight_ih_l0"]
        );
    }

    #[test]
    fn strip_prefix_names_the_modules_when_nothing_matches() {
        let w = weights(&["rnn.weight_ih_l0", "fc.weight", "fc.bias"]);
        match w.strip_prefix("lstm.") {
            Err(Error::WeightsMismatch(m)) => assert_eq!(
                m,
                "no tensor name starts with the prefix `lstm.`: the names are under `fc.`, `rnn.`"
            ),
            other => panic!("{other:?}"),
        }
        match weights(&["weight_ih_l0"]).strip_prefix("rnn") {
            Err(Error::WeightsMismatch(m)) => assert!(m.contains("top level"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A name that is the prefix alone holds nothing under it.
        assert!(weights(&["rnn."]).strip_prefix("rnn.").is_err());
    }

    #[test]
    fn prefixes_holding_finds_every_submodule_with_the_wanted_names() {
        let wanted = ["weight_ih_l0", "weight_hh_l0"];
        let names = [
            "encoder.rnn.weight_ih_l0",
            "encoder.rnn.weight_hh_l0",
            "decoder.rnn.weight_ih_l0",
            "fc.weight",
            "weight_ih_l0",
            "xweight_ih_l0",
            ".weight_ih_l0",
        ];
        assert_eq!(
            prefixes_holding(names, &wanted),
            ["decoder.rnn.", "encoder.rnn."]
        );
        assert!(prefixes_holding(["fc.weight", "weight_ih_l0"], &wanted).is_empty());
    }
}

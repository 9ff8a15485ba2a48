//! Training checkpoints in one safetensors file: the weights, the optimiser (its rule,
//! hyperparameters and every parameter's state), the step, and the data position, so that a
//! run resumed from it continues bit for bit as if it had never stopped.
//!
//! Layout: tensors `weights.<name>` (PyTorch names) and `state.<name>.first` / `.second` /
//! `.max_second` (the momentum buffer or Adam's moments, when the optimiser has them); the
//! `__metadata__` holds `format` (`rnn-checkpoint-1`), `model` (every parameter's name and
//! shape), `optimizer` (`sgd`, `adam` or `adamw`) and its hyperparameters (written with Rust's
//! round-trip float formatting), `step`, `data_position` and `steps.<name>` (each parameter's
//! optimiser steps). A checkpoint of another model, or of a model with other shapes, is a
//! [`Error::Checkpoint`] naming the first difference. "Another model" means other parameter
//! names or shapes: the weights of a tanh RNN and of a ReLU RNN of the same sizes are
//! interchangeable, and so are their checkpoints.

use crate::error::{Error, Result};
use crate::optim::{Adam, Optimizer, ParamState, Rule, Sgd};
use crate::program::Program;
use crate::tensor::Tensor;
use crate::weights::{Weights, read_safetensors_with, write_safetensors_with};
use std::collections::BTreeMap;

const FORMAT: &str = "rnn-checkpoint-1";

/// The most optimiser steps a checkpoint may record (`2^53`, where an `f64` step count, as
/// PyTorch's bias corrections use it, stops counting exactly).
const MAX_STEPS: u64 = 1 << 53;

/// Everything a training run needs to continue.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The model's weights.
    pub weights: Weights,
    /// The optimiser and its state.
    pub optimizer: Optimizer,
    /// Optimisation steps taken.
    pub step: u64,
    /// Where the data stands (the next batch, a byte offset: the trainer's own count).
    pub data_position: u64,
    /// The trainer's own settings that the data and the steps depend on (a seed, a batch
    /// size, a task), as text by name: stored as `run.<name>` metadata and read back as they
    /// were, for the trainer to compare on resuming.
    pub run: BTreeMap<String, String>,
}

/// Parameters as one line: `name[shape] …`.
fn fingerprint(params: &[(String, Vec<usize>)]) -> String {
    params
        .iter()
        .map(|(name, shape)| {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("{name}[{}]", dims.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn bad(m: String) -> Error {
    Error::Checkpoint(m)
}

impl Checkpoint {
    /// The checkpoint as a safetensors file, its weights first checked against `program`.
    pub fn to_safetensors(&self, program: &Program) -> Result<Vec<u8>> {
        self.to_safetensors_for(&program.parameters())
    }

    /// [`Checkpoint::to_safetensors`] for a model given by its parameters (names and shapes:
    /// a [`crate::model::Model`]'s, an encoder-decoder's).
    pub fn to_safetensors_for(&self, params: &[(String, Vec<usize>)]) -> Result<Vec<u8>> {
        self.weights
            .check_params(params.iter().map(|(n, s)| (n.as_str(), s.as_slice())))?;
        let mut tensors: BTreeMap<String, Tensor> = self
            .weights
            .tensors
            .iter()
            .map(|(n, t)| (format!("weights.{n}"), t.clone()))
            .collect();
        let mut meta: BTreeMap<String, String> = BTreeMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("model".into(), fingerprint(params));
        meta.insert("step".into(), self.step.to_string());
        meta.insert("data_position".into(), self.data_position.to_string());
        for (k, v) in &self.run {
            meta.insert(format!("run.{k}"), v.clone());
        }
        let mut put = |k: &str, v: String| meta.insert(k.into(), v);
        match self.optimizer.rule {
            Rule::Sgd(h) => {
                put("optimizer", "sgd".into());
                put("lr", h.lr.to_string());
                put("momentum", h.momentum.to_string());
                put("dampening", h.dampening.to_string());
                put("weight_decay", h.weight_decay.to_string());
                put("nesterov", h.nesterov.to_string());
                put("maximize", h.maximize.to_string());
            }
            Rule::Adam(h) | Rule::AdamW(h) => {
                let name = if matches!(self.optimizer.rule, Rule::Adam(_)) {
                    "adam"
                } else {
                    "adamw"
                };
                put("optimizer", name.into());
                put("lr", h.lr.to_string());
                put("beta1", h.betas.0.to_string());
                put("beta2", h.betas.1.to_string());
                put("eps", h.eps.to_string());
                put("weight_decay", h.weight_decay.to_string());
                put("amsgrad", h.amsgrad.to_string());
                put("maximize", h.maximize.to_string());
            }
        }
        for (name, s) in &self.optimizer.state {
            let Some(w) = self.weights.tensors.get(name) else {
                return Err(bad(format!(
                    "the optimiser has state for `{name}`, which the weights do not have"
                )));
            };
            meta.insert(format!("steps.{name}"), s.step.to_string());
            for (slot, v) in [
                ("first", &s.first),
                ("second", &s.second),
                ("max_second", &s.max_second),
            ] {
                if !v.is_empty() {
                    let t = Tensor::new(w.shape.clone(), v.clone()).ok_or_else(|| {
                        bad(format!(
                            "the optimiser's `{slot}` of `{name}` has another size"
                        ))
                    })?;
                    tensors.insert(format!("state.{name}.{slot}"), t);
                }
            }
        }
        write_safetensors_with(&tensors, &meta)
    }

    /// Reads a checkpoint that [`Checkpoint::to_safetensors`] wrote for `program` (or a model
    /// with the same parameters), checking that it is one.
    pub fn from_safetensors(bytes: &[u8], program: &Program) -> Result<Checkpoint> {
        Self::from_safetensors_for(bytes, &program.parameters())
    }

    /// [`Checkpoint::from_safetensors`] for a model given by its parameters.
    pub fn from_safetensors_for(
        bytes: &[u8],
        params: &[(String, Vec<usize>)],
    ) -> Result<Checkpoint> {
        let (mut tensors, meta) = read_safetensors_with(bytes)?;
        let get = |k: &str| -> Result<&str> {
            meta.get(k).map(String::as_str).ok_or_else(|| {
                bad(format!(
                    "no `{k}` in its metadata: not a checkpoint of this format"
                ))
            })
        };
        if get("format")? != FORMAT {
            return Err(bad(format!(
                "format `{}`, expected `{FORMAT}`",
                get("format")?
            )));
        }
        let mine = fingerprint(params);
        let theirs = get("model")?;
        if theirs != mine {
            let first = theirs
                .split(' ')
                .zip(mine.split(' '))
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("`{a}` where this model has `{b}`"))
                .unwrap_or_else(|| "another number of parameters".into());
            return Err(bad(format!("of another model: {first}")));
        }
        let f = |k: &str| -> Result<f64> {
            get(k)?
                .parse::<f64>()
                .map_err(|_| bad(format!("`{k}` is not a number: {:?}", meta.get(k))))
        };
        let b = |k: &str| -> Result<bool> {
            get(k)?
                .parse::<bool>()
                .map_err(|_| bad(format!("`{k}` is not true or false")))
        };
        let u = |k: &str| -> Result<u64> {
            get(k)?
                .parse::<u64>()
                .map_err(|_| bad(format!("`{k}` is not a count")))
        };
        let adam = || -> Result<Adam> {
            Ok(Adam {
                lr: f("lr")?,
                betas: (f("beta1")?, f("beta2")?),
                eps: f("eps")?,
                weight_decay: f("weight_decay")?,
                amsgrad: b("amsgrad")?,
                maximize: b("maximize")?,
            })
        };
        let rule = match get("optimizer")? {
            "sgd" => Rule::Sgd(Sgd {
                lr: f("lr")?,
                momentum: f("momentum")?,
                dampening: f("dampening")?,
                weight_decay: f("weight_decay")?,
                nesterov: b("nesterov")?,
                maximize: b("maximize")?,
            }),
            "adam" => Rule::Adam(adam()?),
            "adamw" => Rule::AdamW(adam()?),
            other => return Err(bad(format!("unknown optimiser `{other}`"))),
        };
        let mut optimizer = Optimizer::new(rule)?;
        let mut weights = Weights {
            tensors: BTreeMap::new(),
        };
        let names: Vec<String> = tensors.keys().cloned().collect();
        for key in names {
            if let Some(name) = key.strip_prefix("weights.") {
                let t = tensors.remove(&key).expect("listed");
                weights.tensors.insert(name.to_string(), t);
            }
        }
        weights.check_params(params.iter().map(|(n, s)| (n.as_str(), s.as_slice())))?;
        for (key, value) in &meta {
            let Some(name) = key.strip_prefix("steps.") else {
                continue;
            };
            let Some(w) = weights.tensors.get(name) else {
                return Err(bad(format!(
                    "optimiser state for `{name}`, which this model does not have"
                )));
            };
            let step = value
                .parse::<u64>()
                .map_err(|_| bad(format!("`{key}` is not a count")))?;
            if step > MAX_STEPS {
                return Err(bad(format!(
                    "`{key}` is {step} steps: more than {MAX_STEPS}, the most a run can have taken"
                )));
            }
            let mut state = ParamState {
                step,
                ..ParamState::default()
            };
            for (slot, v) in [
                ("first", &mut state.first),
                ("second", &mut state.second),
                ("max_second", &mut state.max_second),
            ] {
                if let Some(t) = tensors.remove(&format!("state.{name}.{slot}")) {
                    if t.shape != w.shape {
                        return Err(Error::TensorShape {
                            name: format!("state.{name}.{slot}"),
                            expected: w.shape.clone(),
                            found: t.shape,
                        });
                    }
                    if let Some((index, found)) = t.first_non_finite() {
                        return Err(Error::NonFinite {
                            name: format!("state.{name}.{slot}"),
                            index,
                            found,
                        });
                    }
                    *v = t.data;
                }
            }
            // What the rule will read after a first step must be there.
            let needed: &[(&str, bool)] = match rule {
                Rule::Sgd(h) => &[("first", h.momentum != 0.0)],
                Rule::Adam(h) | Rule::AdamW(h) => {
                    &[("first", true), ("second", true), ("max_second", h.amsgrad)][..]
                }
            };
            for &(slot, wanted) in needed {
                let present = match slot {
                    "first" => !state.first.is_empty(),
                    "second" => !state.second.is_empty(),
                    _ => !state.max_second.is_empty(),
                };
                if wanted && step > 0 && !present {
                    return Err(bad(format!(
                        "`{name}` has taken {step} steps but its `{slot}` state is missing"
                    )));
                }
            }
            optimizer.state.insert(name.to_string(), state);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(bad(format!(
                "tensor `{extra}` belongs to no weight and no optimiser state"
            )));
        }
        let run = meta
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("run.")?.to_string(), v.clone())))
            .collect();
        Ok(Checkpoint {
            weights,
            optimizer,
            step: u("step")?,
            data_position: u("data_position")?,
            run,
        })
    }
}

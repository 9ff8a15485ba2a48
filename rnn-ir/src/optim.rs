//! Optimisers and gradient clipping with PyTorch's update rules and defaults: SGD (momentum,
//! dampening, Nesterov, weight decay), Adam and AdamW (`amsgrad` too), and `clip_grad_norm_`.
//!
//! They update [`Weights`] in place from a gradient map by PyTorch name (what
//! [`crate::Gradients::params`] holds), so they serve every backend alike. The arithmetic is
//! PyTorch's single-tensor CPU path, step by step in `f32`, with its `f64` scalars (Adam's bias
//! corrections) computed in `f64`; `tests/optim.rs` holds the results against values PyTorch
//! produced (`tests/fixtures/make_optim_cases.py`). PyTorch's vectorised kernels fuse some
//! multiply-adds, so the last bit may differ.
//!
//! Hyperparameters are `f64`, as PyTorch's Python floats are, and enter the `f32` arithmetic
//! as PyTorch's do (`1 - beta` computed in `f64`, then rounded).
//!
//! Bad input is refused before anything changes: a gradient of a tensor the weights do not
//! have, of another shape, or with a non-finite element; hyperparameters PyTorch refuses (a
//! negative learning rate, betas outside `[0, 1)`, Nesterov without momentum, …) and, unlike
//! PyTorch, non-finite ones. A
//! parameter without a gradient is left as it is (PyTorch skips a parameter whose `grad` is
//! `None`) and its optimiser state does not advance.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::Weights;
use std::collections::BTreeMap;

/// Gradients by PyTorch parameter name.
pub type Grads = BTreeMap<String, Tensor>;

/// `torch.optim.SGD`'s hyperparameters (its defaults by `Default`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate (PyTorch's default `1e-3`).
    pub lr: f64,
    /// Momentum factor (`0`: none).
    pub momentum: f64,
    /// Dampening of the momentum's new gradient.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening == 0`).
    pub nesterov: bool,
    /// Maximise the objective instead.
    pub maximize: bool,
}

impl Default for Sgd {
    fn default() -> Sgd {
        Sgd {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

/// `torch.optim.Adam`'s and `AdamW`'s hyperparameters (Adam's defaults by `Default`, AdamW's
/// by [`Adam::adamw`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    /// Learning rate (default `1e-3`).
    pub lr: f64,
    /// Decay rates of the first and second moment estimates (default `(0.9, 0.999)`).
    pub betas: (f64, f64),
    /// Added to the denominator (default `1e-8`).
    pub eps: f64,
    /// Weight decay: an L2 penalty added to the gradient (Adam, default `0`), or a decay of the
    /// weights themselves by `lr · weight_decay` (AdamW, default `1e-2`).
    pub weight_decay: f64,
    /// The AMSGrad variant (the maximum of past second moments).
    pub amsgrad: bool,
    /// Maximise the objective instead.
    pub maximize: bool,
}

/// `torch.optim.Adam`'s defaults.
impl Default for Adam {
    fn default() -> Adam {
        Adam {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
        }
    }
}

impl Adam {
    /// `torch.optim.AdamW`'s defaults (weight decay `1e-2`; the others as [`Adam::default`]).
    pub fn adamw() -> Adam {
        Adam {
            weight_decay: 1e-2,
            ..Adam::default()
        }
    }
}

/// Which update an [`Optimizer`] applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    /// Stochastic gradient descent.
    Sgd(Sgd),
    /// Adam: weight decay as an L2 penalty on the gradient.
    Adam(Adam),
    /// AdamW: decoupled weight decay.
    AdamW(Adam),
}

/// An optimiser: its rule and, per parameter, its state (momentum buffer; first and second
/// moments and step count).
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub(crate) rule: Rule,
    pub(crate) state: BTreeMap<String, ParamState>,
}

/// One parameter's optimiser state.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ParamState {
    /// Steps taken on this parameter.
    pub(crate) step: u64,
    /// SGD's momentum buffer, or Adam's first moment.
    pub(crate) first: Vec<f32>,
    /// Adam's second moment.
    pub(crate) second: Vec<f32>,
    /// AMSGrad's running maximum of the second moment.
    pub(crate) max_second: Vec<f32>,
}

fn bad(what: String) -> Error {
    Error::Argument(what)
}

fn check_finite(name: &str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(bad(format!("`{name}` is {value}: it must be finite")))
    }
}

impl Optimizer {
    /// An optimiser applying `rule`, its hyperparameters checked as PyTorch checks them.
    pub fn new(rule: Rule) -> Result<Optimizer> {
        match rule {
            Rule::Sgd(h) => {
                for (name, v) in [
                    ("lr", h.lr),
                    ("momentum", h.momentum),
                    ("dampening", h.dampening),
                    ("weight_decay", h.weight_decay),
                ] {
                    check_finite(name, v)?;
                }
                if h.lr < 0.0 {
                    return Err(bad(format!("invalid learning rate {}: below 0", h.lr)));
                }
                if h.momentum < 0.0 {
                    return Err(bad(format!("invalid momentum {}: below 0", h.momentum)));
                }
                if h.weight_decay < 0.0 {
                    return Err(bad(format!(
                        "invalid weight_decay {}: below 0",
                        h.weight_decay
                    )));
                }
                if h.nesterov && (h.momentum <= 0.0 || h.dampening != 0.0) {
                    return Err(bad(
                        "Nesterov momentum needs a momentum above 0 and zero dampening".into(),
                    ));
                }
            }
            Rule::Adam(h) | Rule::AdamW(h) => {
                for (name, v) in [
                    ("lr", h.lr),
                    ("betas.0", h.betas.0),
                    ("betas.1", h.betas.1),
                    ("eps", h.eps),
                    ("weight_decay", h.weight_decay),
                ] {
                    check_finite(name, v)?;
                }
                if h.lr < 0.0 {
                    return Err(bad(format!("invalid learning rate {}: below 0", h.lr)));
                }
                if h.eps < 0.0 {
                    return Err(bad(format!("invalid eps {}: below 0", h.eps)));
                }
                for (i, beta) in [h.betas.0, h.betas.1].into_iter().enumerate() {
                    if !(0.0..1.0).contains(&beta) {
                        return Err(bad(format!(
                            "invalid beta parameter at index {i}: {beta} is outside [0, 1)"
                        )));
                    }
                }
                if h.weight_decay < 0.0 {
                    return Err(bad(format!(
                        "invalid weight_decay {}: below 0",
                        h.weight_decay
                    )));
                }
            }
        }
        Ok(Optimizer {
            rule,
            state: BTreeMap::new(),
        })
    }

    /// The rule and its hyperparameters.
    pub fn rule(&self) -> Rule {
        self.rule
    }

    /// Steps taken on parameter `name` (0 before its first gradient).
    pub fn steps(&self, name: &str) -> u64 {
        self.state.get(name).map_or(0, |s| s.step)
    }

    /// One step: updates every parameter of `weights` that has a gradient in `grads`. Every
    /// gradient is checked (a parameter of that name, its shape, finite elements) before any
    /// parameter or state changes.
    pub fn step(&mut self, weights: &mut Weights, grads: &Grads) -> Result<()> {
        for (name, g) in grads {
            let Some(w) = weights.tensors.get(name) else {
                return Err(Error::UnexpectedTensor {
                    name: format!("gradient of `{name}`"),
                });
            };
            if g.shape != w.shape || g.data.len() != w.data.len() {
                return Err(Error::TensorShape {
                    name: format!("gradient of `{name}`"),
                    expected: w.shape.clone(),
                    found: g.shape.clone(),
                });
            }
            if let Some((index, found)) = g.first_non_finite() {
                return Err(Error::NonFinite {
                    name: format!("gradient of `{name}`"),
                    index,
                    found,
                });
            }
        }
        for (name, g) in grads {
            let w = weights
                .tensors
                .get_mut(name)
                .expect("checked: every gradient has its parameter");
            let state = self.state.entry(name.clone()).or_default();
            match self.rule {
                Rule::Sgd(h) => sgd(&h, &mut w.data, &g.data, state),
                Rule::Adam(h) => adam(&h, false, &mut w.data, &g.data, state),
                Rule::AdamW(h) => adam(&h, true, &mut w.data, &g.data, state),
            }
        }
        Ok(())
    }
}

/// PyTorch's `_single_tensor_sgd`: its Python-float scalars (`f64`) enter the `f32` tensor
/// operations as `f32`, each computed in `f64` first (`1 - dampening`).
fn sgd(h: &Sgd, p: &mut [f32], grad: &[f32], state: &mut ParamState) {
    let mut d: Vec<f32> = if h.maximize {
        grad.iter().map(|g| -g).collect()
    } else {
        grad.to_vec()
    };
    if h.weight_decay != 0.0 {
        let wd = h.weight_decay as f32;
        for (d, &p) in d.iter_mut().zip(p.iter()) {
            *d += wd * p;
        }
    }
    if h.momentum != 0.0 {
        let (momentum, keep) = (h.momentum as f32, (1.0 - h.dampening) as f32);
        let buf = &mut state.first;
        if state.step == 0 {
            // The first step's buffer is the gradient itself (no dampening).
            *buf = d.clone();
        } else {
            for (b, &d) in buf.iter_mut().zip(&d) {
                *b = *b * momentum + keep * d;
            }
        }
        if h.nesterov {
            for (d, &b) in d.iter_mut().zip(buf.iter()) {
                *d += momentum * b;
            }
        } else {
            d.copy_from_slice(buf);
        }
    }
    let alpha = (-h.lr) as f32;
    for (p, &d) in p.iter_mut().zip(&d) {
        *p += alpha * d;
    }
    state.step = state.step.saturating_add(1);
}

/// PyTorch's `_single_tensor_adam` (AdamW: `decoupled`). Its Python-float scalars are `f64`
/// here as there: `1 - beta`, the bias corrections, the step size and AdamW's decay factor are
/// computed in `f64` and enter the `f32` tensor operations as `f32`.
fn adam(h: &Adam, decoupled: bool, p: &mut [f32], grad: &[f32], state: &mut ParamState) {
    let n = p.len();
    if state.step == 0 {
        state.first = vec![0.0; n];
        state.second = vec![0.0; n];
        if h.amsgrad {
            state.max_second = vec![0.0; n];
        }
    }
    state.step = state.step.saturating_add(1);
    let mut g: Vec<f32> = if h.maximize {
        grad.iter().map(|g| -g).collect()
    } else {
        grad.to_vec()
    };
    if h.weight_decay != 0.0 {
        if decoupled {
            let keep = (1.0 - h.lr * h.weight_decay) as f32;
            for p in p.iter_mut() {
                *p *= keep;
            }
        } else {
            let wd = h.weight_decay as f32;
            for (g, &p) in g.iter_mut().zip(p.iter()) {
                *g += wd * p;
            }
        }
    }
    let (beta1, beta2) = h.betas;
    // `exp_avg.lerp_(grad, 1 - beta1)`: `m + w·(g - m)` for a weight below one half.
    let w = (1.0 - beta1) as f32;
    for (m, &g) in state.first.iter_mut().zip(&g) {
        *m = if w < 0.5 {
            *m + w * (g - *m)
        } else {
            g - (g - *m) * (1.0 - w)
        };
    }
    // `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)`.
    let (b2, one_minus_b2) = (beta2 as f32, (1.0 - beta2) as f32);
    for (v, &g) in state.second.iter_mut().zip(&g) {
        *v = *v * b2 + one_minus_b2 * g * g;
    }
    // Python's `beta ** step` on floats.
    let t = state.step as f64;
    let bias1 = 1.0 - beta1.powf(t);
    let bias2 = 1.0 - beta2.powf(t);
    let step_size = (h.lr / bias1) as f32;
    let bias2_sqrt = bias2.sqrt() as f32;
    let eps = h.eps as f32;
    let second: &[f32] = if h.amsgrad {
        for (mx, &v) in state.max_second.iter_mut().zip(&state.second) {
            *mx = mx.max(v);
        }
        &state.max_second
    } else {
        &state.second
    };
    for ((p, &m), &v) in p.iter_mut().zip(&state.first).zip(second) {
        let denom = v.sqrt() / bias2_sqrt + eps;
        *p += -step_size * (m / denom);
    }
}

/// The larger of `a` and `b`, NaN if either is (as `torch.max` propagates it).
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// How [`clip_grad_norm`] measures the gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Norm {
    /// The Euclidean norm of all gradients as one vector.
    L2,
    /// The largest magnitude.
    Inf,
}

/// `torch.nn.utils.clip_grad_norm_`: the norm of all gradients taken together (each tensor's
/// norm, then the norm of those), and, above `max_norm`, every gradient scaled by
/// `max_norm / (norm + 1e-6)` (PyTorch multiplies by the factor clamped to 1 always, so a norm
/// below `max_norm` leaves the gradients unchanged). Returns the norm before clipping.
///
/// Unlike PyTorch's default, a non-finite norm is an error (the gradients unchanged), as if
/// `error_if_nonfinite=True`; so is a negative or non-finite `max_norm`.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f32, norm: Norm) -> Result<f32> {
    if !max_norm.is_finite() || max_norm < 0.0 {
        return Err(bad(format!(
            "invalid max_norm {max_norm}: it must be finite and at least 0"
        )));
    }
    let norms: Vec<f32> = grads
        .values()
        .map(|g| match norm {
            Norm::L2 => g.data.iter().map(|&x| x * x).sum::<f32>().sqrt(),
            Norm::Inf => g.data.iter().fold(0.0f32, |m, &x| nan_max(m, x.abs())),
        })
        .collect();
    let total = match norm {
        Norm::L2 => norms.iter().map(|&x| x * x).sum::<f32>().sqrt(),
        Norm::Inf => norms.iter().fold(0.0f32, |m, &x| nan_max(m, x)),
    };
    if !total.is_finite() {
        return Err(Error::NonFinite {
            name: "the gradients' total norm".into(),
            index: 0,
            found: total,
        });
    }
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    for g in grads.values_mut() {
        for x in g.data.iter_mut() {
            *x *= coef;
        }
    }
    Ok(total)
}

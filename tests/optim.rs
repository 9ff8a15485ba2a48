//! The optimisers and gradient clipping against PyTorch: every case of
//! `tests/fixtures/optim` (made by `tests/fixtures/make_optim_cases.py`, whose `CASES` these
//! hyperparameters repeat) stepped six times from the same parameters and gradients, and the
//! typed errors of bad input.

use rnn::ir::optim::{Adam, Grads, Norm, Optimizer, Rule, Sgd, clip_grad_norm};
use rnn::ir::weights::read_safetensors;
use rnn::{Error, Tensor, Weights};
use std::collections::BTreeMap;

const STEPS: usize = 6;
const PARAMS: [&str; 3] = ["w", "b", "v"];

fn case(name: &str) -> BTreeMap<String, Tensor> {
    let path = format!(
        "{}/tests/fixtures/optim/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    read_safetensors(&std::fs::read(&path).unwrap()).unwrap()
}

/// Within PyTorch's own rounding: its vectorised kernels fuse some multiply-adds.
fn close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for (i, (&a, &b)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            (a - b).abs() <= 2e-6 * b.abs().max(1.0),
            "{what}[{i}]: {a} against PyTorch's {b}"
        );
    }
}

/// Relative to each element (clipped gradients may be tiny: the clipping factor is what is
/// compared).
fn close_relative(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for (i, (&a, &b)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            (a - b).abs() <= 2e-6 * b.abs(),
            "{what}[{i}]: {a} against PyTorch's {b}"
        );
    }
}

fn run(name: &str, rule: Rule) {
    let t = case(name);
    let mut weights = Weights {
        tensors: PARAMS
            .iter()
            .map(|p| (p.to_string(), t[&format!("initial.{p}")].clone()))
            .collect(),
    };
    let mut opt = Optimizer::new(rule).unwrap();
    for s in 0..STEPS {
        let grads: Grads = PARAMS
            .iter()
            .map(|p| (p.to_string(), t[&format!("grad.{s}.{p}")].clone()))
            .collect();
        opt.step(&mut weights, &grads).unwrap();
        for p in PARAMS {
            close(
                &format!("{name} step {s} {p}"),
                &weights.tensors[p],
                &t[&format!("after.{s}.{p}")],
            );
        }
    }
    assert_eq!(opt.steps("w"), STEPS as u64);
}

#[test]
fn sgd_matches_pytorch() {
    let sgd = |lr| Sgd {
        lr,
        ..Sgd::default()
    };
    run("sgd", Rule::Sgd(sgd(0.1)));
    run(
        "sgd_momentum",
        Rule::Sgd(Sgd {
            momentum: 0.9,
            ..sgd(0.05)
        }),
    );
    run(
        "sgd_nesterov",
        Rule::Sgd(Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
            ..sgd(0.05)
        }),
    );
    run(
        "sgd_maximize",
        Rule::Sgd(Sgd {
            momentum: 0.9,
            weight_decay: 0.01,
            maximize: true,
            ..sgd(0.05)
        }),
    );
    run(
        "sgd_dampening",
        Rule::Sgd(Sgd {
            momentum: 0.8,
            dampening: 0.3,
            weight_decay: 0.02,
            ..sgd(0.05)
        }),
    );
}

#[test]
fn adam_and_adamw_match_pytorch() {
    run("adam", Rule::Adam(Adam::default()));
    run(
        "adam_custom",
        Rule::Adam(Adam {
            lr: 0.01,
            betas: (0.8, 0.99),
            eps: 1e-6,
            weight_decay: 0.05,
            amsgrad: true,
            ..Adam::default()
        }),
    );
    run(
        "adam_maximize",
        Rule::Adam(Adam {
            lr: 0.01,
            betas: (0.95, 0.99999),
            weight_decay: 0.02,
            maximize: true,
            ..Adam::default()
        }),
    );
    run("adamw", Rule::AdamW(Adam::adamw()));
    run(
        "adamw_custom",
        Rule::AdamW(Adam {
            lr: 0.02,
            betas: (0.85, 0.995),
            weight_decay: 0.1,
            amsgrad: true,
            ..Adam::adamw()
        }),
    );
}

#[test]
fn clipping_matches_pytorch() {
    for (name, max_norm, norm) in [
        ("clip_l2", 1.0, Norm::L2),
        ("clip_l2_below", 100.0, Norm::L2),
        ("clip_inf", 0.5, Norm::Inf),
        ("clip_tiny", 1e-6, Norm::L2),
    ] {
        let t = case(name);
        let mut grads: Grads = PARAMS
            .iter()
            .map(|p| (p.to_string(), t[&format!("grad.{p}")].clone()))
            .collect();
        let total = clip_grad_norm(&mut grads, max_norm, norm).unwrap();
        let want = t["total_norm"].data[0];
        assert!(
            (total - want).abs() <= 2e-6 * want,
            "{name}: norm {total} against {want}"
        );
        for p in PARAMS {
            close_relative(
                &format!("{name} {p}"),
                &grads[p],
                &t[&format!("clipped.{p}")],
            );
        }
    }
}

fn weights() -> Weights {
    Weights {
        tensors: [
            (
                "w".to_string(),
                Tensor::new(vec![2, 2], vec![1.0; 4]).unwrap(),
            ),
            ("b".to_string(), Tensor::new(vec![2], vec![0.5; 2]).unwrap()),
        ]
        .into_iter()
        .collect(),
    }
}

/// Every bad gradient is refused before anything changes: the weights and the optimiser's
/// state stay as they were.
#[test]
fn bad_gradients_are_typed_errors_and_change_nothing() {
    let mut opt = Optimizer::new(Rule::Adam(Adam::default())).unwrap();
    let mut w = weights();
    let before = w.clone();
    let good = Tensor::new(vec![2], vec![0.1, 0.2]).unwrap();
    let cases: Vec<(Grads, &str)> = vec![
        (
            [("nope".to_string(), good.clone())].into_iter().collect(),
            "nope",
        ),
        (
            [
                ("b".to_string(), good.clone()),
                ("w".to_string(), Tensor::new(vec![4], vec![0.0; 4]).unwrap()),
            ]
            .into_iter()
            .collect(),
            "w",
        ),
        (
            [
                ("b".to_string(), good.clone()),
                (
                    "w".to_string(),
                    Tensor::new(vec![2, 2], vec![0.0, f32::NAN, 0.0, 0.0]).unwrap(),
                ),
            ]
            .into_iter()
            .collect(),
            "w",
        ),
    ];
    for (grads, name) in cases {
        let err = opt.step(&mut w, &grads).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(name), "{text}");
        assert!(
            matches!(
                err,
                Error::UnexpectedTensor { .. }
                    | Error::TensorShape { .. }
                    | Error::NonFinite { .. }
            ),
            "{err:?}"
        );
        assert_eq!(w, before, "weights changed by a refused step");
        assert_eq!(opt.steps("b"), 0, "state advanced by a refused step");
    }
    // A parameter without a gradient is left alone; its state does not advance.
    let grads: Grads = [("b".to_string(), good)].into_iter().collect();
    opt.step(&mut w, &grads).unwrap();
    assert_eq!(w.tensors["w"], before.tensors["w"]);
    assert_ne!(w.tensors["b"], before.tensors["b"]);
    assert_eq!((opt.steps("b"), opt.steps("w")), (1, 0));
}

#[test]
fn bad_hyperparameters_are_refused() {
    let sgd = |f: fn(&mut Sgd)| {
        let mut h = Sgd::default();
        f(&mut h);
        Optimizer::new(Rule::Sgd(h))
    };
    assert!(sgd(|h| h.lr = -0.1).is_err());
    assert!(sgd(|h| h.lr = f64::NAN).is_err());
    assert!(sgd(|h| h.momentum = -0.5).is_err());
    assert!(
        sgd(|h| h.nesterov = true).is_err(),
        "Nesterov without momentum"
    );
    assert!(
        sgd(|h| {
            h.nesterov = true;
            h.momentum = 0.9;
            h.dampening = 0.1;
        })
        .is_err(),
        "Nesterov with dampening"
    );
    assert!(sgd(|h| h.weight_decay = -1.0).is_err());
    let adam = |f: fn(&mut Adam)| {
        let mut h = Adam::default();
        f(&mut h);
        Optimizer::new(Rule::Adam(h))
    };
    assert!(adam(|h| h.betas = (1.0, 0.999)).is_err());
    assert!(adam(|h| h.betas = (0.9, -0.1)).is_err());
    assert!(adam(|h| h.eps = -1e-8).is_err());
    assert!(adam(|h| h.lr = f64::INFINITY).is_err());
    assert!(
        adam(|h| h.betas = (0.9, 0.99999999)).is_ok(),
        "a beta that rounds to 1 in f32 is still below 1"
    );
    assert!(adam(|_| {}).is_ok());
    let mut grads: Grads = [("b".to_string(), Tensor::new(vec![1], vec![3.0]).unwrap())]
        .into_iter()
        .collect();
    assert!(clip_grad_norm(&mut grads, -1.0, Norm::L2).is_err());
    grads.get_mut("b").unwrap().data[0] = f32::INFINITY;
    let before = grads.clone();
    assert!(matches!(
        clip_grad_norm(&mut grads, 1.0, Norm::L2),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(grads, before);
    // A NaN is a non-finite norm in both norms (a maximum must not skip it).
    let mut grads: Grads = [
        (
            "a".to_string(),
            Tensor::new(vec![2], vec![1.0, f32::NAN]).unwrap(),
        ),
        ("b".to_string(), Tensor::new(vec![1], vec![3.0]).unwrap()),
    ]
    .into_iter()
    .collect();
    for norm in [Norm::L2, Norm::Inf] {
        let err = clip_grad_norm(&mut grads, 1.0, norm).unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{norm:?}: {err:?}");
    }
    assert_eq!(grads["b"].data, vec![3.0]);
}

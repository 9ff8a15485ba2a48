//! Checkpoints: a run resumed from one continues bit for bit; another model's checkpoint, a
//! plain weight file and a damaged checkpoint are typed errors naming what is wrong.

mod common;

use rnn::ir::checkpoint::Checkpoint;
use rnn::ir::optim::{Adam, Norm, Optimizer, Rule, Sgd, clip_grad_norm};
use rnn::ir::weights::{read_safetensors_with, write_safetensors, write_safetensors_with};
use rnn::{CellKind, Error, Exec, ModelSpec, Program, Request, Tensor, Weights};

/// A deterministic pseudo-random tensor (the tests' shared generator).
fn tensor(shape: Vec<usize>, seed: u64) -> Tensor {
    common::Rng(seed).tensor(shape)
}

/// Steps `from .. to` of a small training run: the data of step `s` is a function of `s`
/// (the data position), gradients clipped to norm 1, then one optimiser step.
fn train(program: &Program, weights: &mut Weights, opt: &mut Optimizer, from: u64, to: u64) {
    let spec = &program.spec;
    for s in from..to {
        let x = tensor(vec![7, 2, spec.input_size], 10 + s);
        let gy = tensor(vec![7, 2, spec.output_size() * spec.directions()], 1000 + s);
        let req = Request {
            input: Some(&x),
            grad_output: Some(&gy),
            ..Default::default()
        };
        let out = program.run::<f32>(weights, &req, &Exec::default()).unwrap();
        let mut grads = out.grads.unwrap().params;
        clip_grad_norm(&mut grads, 1.0, Norm::L2).unwrap();
        opt.step(weights, &grads).unwrap();
    }
}

fn resumes_bit_identically(spec: &ModelSpec, rule: Rule) {
    let program = Program::compile(spec).unwrap();
    let mut weights = Weights::init(&program, 3).unwrap();
    let mut opt = Optimizer::new(rule).unwrap();
    train(&program, &mut weights, &mut opt, 0, 4);
    let saved = Checkpoint {
        weights: weights.clone(),
        optimizer: opt.clone(),
        step: 4,
        data_position: 4,
        run: Default::default(),
    }
    .to_safetensors(&program)
    .unwrap();
    train(&program, &mut weights, &mut opt, 4, 9);

    let back = Checkpoint::from_safetensors(&saved, &program).unwrap();
    assert_eq!((back.step, back.data_position), (4, 4));
    let (mut w2, mut opt2) = (back.weights, back.optimizer);
    train(&program, &mut w2, &mut opt2, back.data_position, 9);
    for (name, t) in &weights.tensors {
        let bits = |t: &Tensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(t), bits(&w2.tensors[name]), "{name} after resuming");
    }
    assert_eq!(opt, opt2, "the optimiser's state after resuming");
}

#[test]
fn a_resumed_run_continues_bit_for_bit() {
    let lstm = ModelSpec::new(CellKind::Lstm, 3, 5);
    resumes_bit_identically(
        &lstm,
        Rule::Sgd(Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            ..Sgd::default()
        }),
    );
    resumes_bit_identically(
        &lstm,
        Rule::AdamW(Adam {
            amsgrad: true,
            ..Adam::adamw()
        }),
    );
    let mut gru = ModelSpec::new(CellKind::Gru, 4, 3);
    gru.num_layers = 2;
    gru.bidirectional = true;
    resumes_bit_identically(&gru, Rule::Adam(Adam::default()));
}

fn checkpoint_of(spec: &ModelSpec) -> (Program, Vec<u8>) {
    let program = Program::compile(spec).unwrap();
    let mut weights = Weights::init(&program, 1).unwrap();
    let mut opt = Optimizer::new(Rule::Adam(Adam::default())).unwrap();
    train(&program, &mut weights, &mut opt, 0, 2);
    let bytes = Checkpoint {
        weights,
        optimizer: opt,
        step: 2,
        data_position: 2,
        run: Default::default(),
    }
    .to_safetensors(&program)
    .unwrap();
    (program, bytes)
}

#[test]
fn another_models_checkpoint_is_refused_naming_the_difference() {
    let (_, bytes) = checkpoint_of(&ModelSpec::new(CellKind::Lstm, 3, 5));
    let other = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 6)).unwrap();
    let err = Checkpoint::from_safetensors(&bytes, &other).unwrap_err();
    assert!(matches!(err, Error::Checkpoint(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("another model") && text.contains("weight_ih_l0[20,3]"),
        "{text}"
    );
}

#[test]
fn a_plain_weight_file_is_not_a_checkpoint() {
    let program = Program::compile(&ModelSpec::new(CellKind::Gru, 2, 3)).unwrap();
    let weights = Weights::init(&program, 1).unwrap();
    let bytes = write_safetensors(&weights.tensors).unwrap();
    let err = Checkpoint::from_safetensors(&bytes, &program).unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint(m) if m.contains("format")),
        "{err:?}"
    );
}

#[test]
fn a_damaged_checkpoint_is_refused() {
    let spec = ModelSpec::new(CellKind::RnnTanh, 2, 3);
    let (program, bytes) = checkpoint_of(&spec);
    let (tensors, meta) = read_safetensors_with(&bytes).unwrap();
    // An optimiser state tensor missing.
    let mut missing = tensors.clone();
    missing.remove("state.weight_hh_l0.second");
    let damaged = write_safetensors_with(&missing, &meta).unwrap();
    let err = Checkpoint::from_safetensors(&damaged, &program).unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint(m) if m.contains("weight_hh_l0") && m.contains("second")),
        "{err:?}"
    );
    // A tensor of nothing.
    let mut extra = tensors.clone();
    extra.insert(
        "state.nope.first".into(),
        Tensor::new(vec![1], vec![0.0]).unwrap(),
    );
    let damaged = write_safetensors_with(&extra, &meta).unwrap();
    let err = Checkpoint::from_safetensors(&damaged, &program).unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint(m) if m.contains("state.nope.first")),
        "{err:?}"
    );
    // A hyperparameter PyTorch would refuse.
    let mut bad = meta.clone();
    bad.insert("beta1".into(), "1.5".into());
    let damaged = write_safetensors_with(&tensors, &bad).unwrap();
    assert!(Checkpoint::from_safetensors(&damaged, &program).is_err());
    // A step count no run can have reached.
    let mut steps = meta.clone();
    steps.insert("steps.weight_hh_l0".into(), u64::MAX.to_string());
    let damaged = write_safetensors_with(&tensors, &steps).unwrap();
    let err = Checkpoint::from_safetensors(&damaged, &program).unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint(m) if m.contains("steps.weight_hh_l0")),
        "{err:?}"
    );
    // A NaN in the optimiser's state.
    let mut nan = tensors.clone();
    nan.get_mut("state.bias_ih_l0.first").unwrap().data[1] = f32::NAN;
    let damaged = write_safetensors_with(&nan, &meta).unwrap();
    let err = Checkpoint::from_safetensors(&damaged, &program).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { name, index: 1, .. } if name == "state.bias_ih_l0.first"),
        "{err:?}"
    );
    // A weight of the wrong shape.
    let mut shape = tensors;
    shape.insert(
        "weights.bias_hh_l0".into(),
        Tensor::new(vec![4], vec![0.0; 4]).unwrap(),
    );
    let damaged = write_safetensors_with(&shape, &meta).unwrap();
    let err = Checkpoint::from_safetensors(&damaged, &program).unwrap_err();
    assert!(matches!(err, Error::TensorShape { .. }), "{err:?}");
}

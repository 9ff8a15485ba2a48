//! Training, measured on small budgets: the chapter's bottleneck (attention against a plain
//! encoder-decoder on the reversal task) and a character language model on the Shakespeare
//! text. Fixed seeds; the JIT runs the stacks.

use rnn::ir::model::Model;
use rnn::ir::optim::{Adam, Optimizer, Rule};
use rnn::train::{Backend, CharText, LmRunner, Reversal, SeqTask, TaskKind, train_step};

/// Trains a reversal model on sources of exactly `len` symbols for `steps` steps and returns
/// the greedy token accuracy on 256 held-out sources.
fn reversal_accuracy(len: usize, attention: bool, steps: u64, hidden: usize) -> f64 {
    Reversal {
        len,
        attention,
        steps,
        hidden,
        init_seed: 1,
        data_seed: 11,
        held_seed: 999,
    }
    .accuracy(|| ())
    .unwrap()
}

#[test]
fn attention_removes_the_bottleneck_of_the_reversal_task() {
    let attn_20 = reversal_accuracy(20, true, 500, 64);
    assert!(attn_20 >= 0.95, "attention at length 20: {attn_20}");
    let attn_40 = reversal_accuracy(40, true, 400, 64);
    let plain_40 = reversal_accuracy(40, false, 400, 64);
    assert!(
        attn_40 > plain_40 + 0.3,
        "at length 40, attention {attn_40} against plain {plain_40}"
    );
    eprintln!(
        "length 20 attention {attn_20:.3}; length 40 attention {attn_40:.3}, plain {plain_40:.3}"
    );
}

#[test]
fn a_character_model_learns_shakespeare_and_samples_with_a_temperature() {
    let text = include_str!("../data/shakespeare_100k.txt");
    let steps = 64;
    let data = CharText::new(text, steps).unwrap();
    let v = data.vocab();
    let spec = rnn::parse_str(&format!(
        "lstm {{ vocab: {v}, input: 32, hidden: 128, head: {v} }}"
    ))
    .unwrap();
    let model = Model::compile(&spec).unwrap();
    let mut w = model.init(1).unwrap();
    let runner = LmRunner::new(&model, Backend::Jit).unwrap();
    let mut opt = Optimizer::new(Rule::Adam(Adam {
        lr: 3e-3,
        ..Adam::default()
    }))
    .unwrap();
    let held = data.held_out(64, steps).unwrap();
    let before = runner.evaluate(&w, &held).unwrap();
    for step in 0..400 {
        let (x, y) = data.train_batch(7, step, 32, steps).unwrap();
        let loss = runner.loss(&w, &x, &y).unwrap();
        train_step(&mut w, &mut opt, loss, Some(1.0)).unwrap();
    }
    let after = runner.evaluate(&w, &held).unwrap();
    assert!(before > 4.0, "an untrained model is near ln {v}: {before}");
    assert!(
        after < 2.0,
        "held-out loss after 400 steps: {after} nats per character"
    );
    // Samples: the same seed gives the same text; a low temperature is less varied than a
    // high one.
    let prompt = data.encode("\n").unwrap();
    let cold = runner.sample(&w, &prompt, 300, 0.3, 5).unwrap();
    assert_eq!(cold, runner.sample(&w, &prompt, 300, 0.3, 5).unwrap());
    let hot = runner.sample(&w, &prompt, 300, 1.5, 5).unwrap();
    let distinct = |ids: &[i64]| {
        let mut d = ids.to_vec();
        d.sort_unstable();
        d.dedup();
        d.len()
    };
    assert!(
        distinct(&cold) < distinct(&hot),
        "{} vs {}",
        distinct(&cold),
        distinct(&hot)
    );
    let sample = data.decode(&cold);
    assert_eq!(sample.chars().count(), 300);
    assert!(sample.contains(' ') && sample.contains('\n'), "{sample}");
    eprintln!("held-out {before:.3} -> {after:.3}; sample at 0.3:\n{sample}");
    // Bad temperatures and prompts are typed errors.
    assert!(runner.sample(&w, &prompt, 5, 0.0, 5).is_err());
    assert!(runner.sample(&w, &prompt, 5, f64::NAN, 5).is_err());
    assert!(runner.sample(&w, &[], 5, 1.0, 5).is_err());
    assert!(data.encode("€").is_err());
    // Sizes that cannot be held, windows that do not fit: typed errors.
    assert!(data.train_batch(7, 0, usize::MAX, steps).is_err());
    assert!(data.train_batch(7, 0, 2, 0).is_err());
    assert!(data.held_out(2, 1 << 20).is_err());
    assert!(runner.sample(&w, &prompt, usize::MAX, 1.0, 5).is_err());
    let task = SeqTask {
        kind: TaskKind::Copy,
        symbols: 3,
        min_len: 1,
        max_len: usize::MAX,
    };
    assert!(task.batch(0, 0, 2).is_err());
    let task = SeqTask { max_len: 4, ..task };
    assert!(task.batch(0, 0, usize::MAX).is_err());
    // The runners refuse a model of the other layout.
    let mut bf = spec.clone();
    bf.batch_first = true;
    let bf = Model::compile(&bf).unwrap();
    assert!(LmRunner::new(&bf, Backend::Interp).is_err());
}

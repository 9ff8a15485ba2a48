//! The JIT against the interpreter (the oracle) on standard and custom cells: outputs, final
//! states and every gradient, over layers, directions, packed lengths and initial states.

use rnn_ir::spec::GruReset;
use rnn_ir::{CellKind, Exec, ModelSpec, Program, Request, Response, Tensor, Weights};
use rnn_jit::Jit;

/// A deterministic pseudo-random tensor.
fn tensor(shape: Vec<usize>, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::new(shape, data).unwrap()
}

fn close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape, b.shape, "{what}: shapes");
    for (i, (x, y)) in a.data.iter().zip(&b.data).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1.0) + 1e-6,
            "{what}[{i}]: jit {x}, interpreter {y}"
        );
    }
}

fn same(what: &str, jit: &Response, interp: &Response) {
    close(&format!("{what} output"), &jit.output, &interp.output);
    for (k, (a, b)) in jit
        .final_states
        .iter()
        .zip(&interp.final_states)
        .enumerate()
    {
        close(&format!("{what} final state {k}"), a, b);
    }
    if let (Some(a), Some(b)) = (&jit.grads, &interp.grads) {
        close(&format!("{what} grad input"), &a.input, &b.input);
        for (k, (x, y)) in a.initial_states.iter().zip(&b.initial_states).enumerate() {
            close(&format!("{what} grad state {k}"), x, y);
        }
        for (name, g) in &b.params {
            close(&format!("{what} grad {name}"), &a.params[name], g);
        }
    } else {
        assert_eq!(
            jit.grads.is_some(),
            interp.grads.is_some(),
            "{what}: gradients"
        );
    }
}

/// Runs `spec` on both backends over a grid of (T, B), packed and not, forward and backward.
fn check(name: &str, spec: &ModelSpec) {
    check_threads(name, spec, 1);
}

/// [`check`] with the JIT's batches split over `threads` threads.
fn check_threads(name: &str, spec: &ModelSpec, threads: usize) {
    let program = Program::compile(spec).unwrap();
    let jit = std::sync::Arc::new(Jit::compile(&program).unwrap());
    let weights = Weights::init(&program, 7).unwrap();
    let model = jit.bind(&weights).unwrap().with_threads(threads).unwrap();
    let out = spec.output_size() * spec.directions();
    let ld = spec.num_layers * spec.directions();
    let states: Vec<usize> = program.layers[0]
        .forward
        .graph
        .states()
        .iter()
        .map(|s| s.1)
        .collect();
    for (t, b) in [(1usize, 1usize), (5, 3), (4, 2), (3, 7)] {
        let x = tensor(vec![t, b, spec.input_size], 1);
        let gy = tensor(vec![t, b, out], 2);
        let init: Vec<Tensor> = states
            .iter()
            .enumerate()
            .map(|(k, &n)| tensor(vec![ld, b, n], 10 + k as u64))
            .collect();
        let lengths: Vec<i64> = (0..b).map(|i| (t - i.min(t - 1)) as i64).collect();
        for packed in [false, true] {
            for grad in [false, true] {
                let req = Request {
                    input: Some(&x),
                    initial_states: init.iter().map(Some).collect(),
                    lengths: packed.then_some(&lengths[..]),
                    grad_output: grad.then_some(&gy),
                    grad_final_states: Vec::new(),
                };
                let a = model.run(&req).unwrap();
                let e = program
                    .run::<f32>(&weights, &req, &Exec::default())
                    .unwrap();
                same(
                    &format!("{name} T={t} B={b} packed={packed} grad={grad}"),
                    &a,
                    &e,
                );
            }
        }
    }
}

#[test]
fn standard_cells_match_the_interpreter() {
    for cell in [
        CellKind::RnnTanh,
        CellKind::RnnRelu,
        CellKind::Lstm,
        CellKind::Gru,
    ] {
        let mut spec = ModelSpec::new(cell.clone(), 3, 5);
        check(cell.name(), &spec);
        spec.num_layers = 2;
        spec.bidirectional = true;
        check(&format!("{} 2-layer bidirectional", cell.name()), &spec);
    }
    let mut gru = ModelSpec::new(CellKind::Gru, 4, 6);
    gru.gru_reset = GruReset::BeforeMatmul;
    check("gru reset before", &gru);
    let mut lstm = ModelSpec::new(CellKind::Lstm, 4, 7);
    lstm.proj_size = 3;
    check("lstm proj", &lstm);
}

#[test]
fn custom_cells_match_the_interpreter() {
    for (name, text) in [
        ("chapter_gru", include_str!("cells/chapter_gru.rnn")),
        ("elman_output", include_str!("cells/elman_output.rnn")),
        ("indrnn", include_str!("cells/indrnn.rnn")),
        ("min_gru", include_str!("cells/min_gru.rnn")),
        ("min_gru_stack", include_str!("cells/min_gru_stack.rnn")),
        ("min_lstm", include_str!("cells/min_lstm.rnn")),
        ("peephole_lstm", include_str!("cells/peephole_lstm.rnn")),
    ] {
        let spec = rnn_ir::parse::parse_str(text).unwrap();
        check(name, &spec);
    }
}

#[test]
fn batches_split_over_threads_match_the_interpreter() {
    for threads in [2, 3] {
        for cell in [CellKind::Lstm, CellKind::Gru] {
            let mut spec = ModelSpec::new(cell.clone(), 3, 5);
            spec.num_layers = 2;
            spec.bidirectional = true;
            check_threads(
                &format!("{} on {threads} threads", cell.name()),
                &spec,
                threads,
            );
        }
        let spec = rnn_ir::parse::parse_str(include_str!("cells/peephole_lstm.rnn")).unwrap();
        check_threads(&format!("peephole on {threads} threads"), &spec, threads);
    }
    let model = std::sync::Arc::new(
        Jit::compile(&Program::compile(&ModelSpec::new(CellKind::Gru, 2, 3)).unwrap()).unwrap(),
    );
    let weights = Weights::init(model.program(), 1).unwrap();
    assert!(model.bind(&weights).unwrap().with_threads(0).is_err());
}

/// The buffers a run leaves for reuse on the model's worker threads are freed by
/// `release_buffers`, not only the calling thread's.
#[test]
fn release_buffers_reaches_the_worker_threads() {
    let spec = ModelSpec::new(CellKind::Lstm, 16, 32);
    let program = Program::compile(&spec).unwrap();
    let jit = std::sync::Arc::new(Jit::compile(&program).unwrap());
    let weights = Weights::init(&program, 2).unwrap();
    let model = jit.bind(&weights).unwrap().with_threads(2).unwrap();
    let x = tensor(vec![64, 8, 16], 3);
    let req = Request {
        input: Some(&x),
        ..Default::default()
    };
    model.run(&req).unwrap();
    model.release_buffers();
    assert_eq!(model.held_buffers(), 0);
    model.run(&req).unwrap();
    assert!(
        model.held_buffers() > 0,
        "a run leaves buffers for the next"
    );
    model.release_buffers();
    assert_eq!(model.held_buffers(), 0);
}

#[test]
fn backward_refuses_another_models_tape() {
    let program = Program::compile(&ModelSpec::new(CellKind::Gru, 3, 4)).unwrap();
    let jit = std::sync::Arc::new(Jit::compile(&program).unwrap());
    let a = jit.bind(&Weights::init(&program, 1).unwrap()).unwrap();
    let b = jit.bind(&Weights::init(&program, 2).unwrap()).unwrap();
    let x = tensor(vec![3, 2, 3], 1);
    let req = Request {
        input: Some(&x),
        ..Request::default()
    };
    let (out, tape) = a.forward_train(&req).unwrap();
    let e = b.backward(tape, &out.output, &[]).unwrap_err();
    assert!(
        e.to_string().contains("another model's forward pass"),
        "{e}"
    );
    // Its own tape is taken.
    let (out, tape) = a.forward_train(&req).unwrap();
    assert!(a.backward(tape, &out.output, &[]).is_ok());
}

#[test]
fn a_product_with_rows_of_a_weight_reads_those_rows() {
    // `W` is read whole by one product and by rows (its second half) by another, with another
    // operand: the whole matrix's copies must not serve the slice.
    let text = "cell Halves {
        input: 3, hidden: 4,
        param W: [2 * hidden, hidden], param U: [hidden, input],
        state h,
        a = W @ h,
        b = W[hidden .. 2 * hidden, ..] @ tanh(h),
        h = tanh(a[.. hidden] + b + U @ x)
    }";
    let spec = rnn_ir::parse::parse_str(text).unwrap();
    check("row slice of a weight", &spec);
    check_threads("row slice of a weight, 2 threads", &spec, 2);
}

#[test]
fn a_step_checks_its_arguments_before_running() {
    let program = Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 4)).unwrap();
    let jit = std::sync::Arc::new(Jit::compile(&program).unwrap());
    let model = jit.bind(&Weights::init(&program, 1).unwrap()).unwrap();
    let mut state = model.zero_state();
    let e = model.step(&mut state, &[0.0; 2]).unwrap_err();
    assert!(
        matches!(&e, rnn_ir::Error::TensorShape { name, .. } if name == "x"),
        "{e}"
    );
    let e = model.step(&mut state, &[0.0, f32::NAN, 0.0]).unwrap_err();
    assert!(
        matches!(&e, rnn_ir::Error::NonFinite { index: 1, .. }),
        "{e}"
    );
    let mut short = vec![vec![0.0; 4], vec![0.0; 3]];
    let e = model.step(&mut short, &[0.0; 3]).unwrap_err();
    assert!(
        matches!(&e, rnn_ir::Error::TensorShape { name, .. } if name == "c0"),
        "{e}"
    );
    assert!(model.step(&mut state, &[0.5; 3]).is_ok());

    let mut spec = ModelSpec::new(CellKind::Gru, 3, 4);
    spec.bidirectional = true;
    let program = Program::compile(&spec).unwrap();
    let jit = std::sync::Arc::new(Jit::compile(&program).unwrap());
    let model = jit.bind(&Weights::init(&program, 1).unwrap()).unwrap();
    let mut state = model.zero_state();
    let e = model.step(&mut state, &[0.0; 3]).unwrap_err();
    assert!(e.to_string().contains("does not stream"), "{e}");
}

/// A state that reads no carried value is computed before the loop, over every step's rows. A
/// fused group there must not write the carried slot's next value (one step's rows: it is
/// copied at each step); the analysis says so, and a long sequence through the JIT matches the
/// interpreter (the group once wrote `T·B` rows into that `B`-row slot).
#[test]
fn a_state_computed_before_the_loop_matches_the_interpreter() {
    use rnn_ir::fuse::{self, Ctx, Item};
    use rnn_ir::passes::hoist::Phase;
    use rnn_ir::plan::Storage;
    let text = "cell Delay {
        input: 5, hidden: 8,
        param W: [hidden, input], param b: [hidden],
        state h,
        h = tanh(W @ x + b),
    }";
    let spec = rnn_ir::parse::parse_str(text).unwrap();
    let program = Program::compile(&spec).unwrap();
    let cell = &program.layers[0];
    let g = &cell.forward.graph;
    for plan in [&cell.inference, &cell.training] {
        let pre: Vec<_> = g
            .iter()
            .filter(|&v| {
                cell.forward.phases[v.index()] == Phase::Pre
                    && plan.is_computed(g, v)
                    && plan.storage[v.index()] != Storage::Bound
            })
            .collect();
        let ctx = Ctx {
            g,
            plan,
            forward: None,
            at_step: false,
        };
        let groups: Vec<_> = fuse::schedule(ctx, &pre)
            .into_iter()
            .filter_map(|item| match item {
                Item::Fused(group) => Some(group),
                Item::Single(_) => None,
            })
            .collect();
        assert!(
            !groups.is_empty(),
            "the state's value is fused before the loop"
        );
        for group in &groups {
            assert!(group.next.iter().all(Option::is_none), "{group:?}");
        }
    }
    check("delay", &spec);
    let jit = std::sync::Arc::new(Jit::compile(&program).unwrap());
    let weights = Weights::init(&program, 3).unwrap();
    let model = jit.bind(&weights).unwrap();
    let (t, b) = (200, 3);
    let x = tensor(vec![t, b, 5], 4);
    let gy = tensor(vec![t, b, 8], 5);
    for grad in [false, true] {
        let req = Request {
            input: Some(&x),
            grad_output: grad.then_some(&gy),
            ..Default::default()
        };
        let a = model.run(&req).unwrap();
        let e = program
            .run::<f32>(&weights, &req, &Exec::default())
            .unwrap();
        same(&format!("delay T={t} B={b} grad={grad}"), &a, &e);
    }
}

//! The IR and its passes: the verifier's invariants, gate fusion and time hoisting found by
//! dependency analysis, and the printer's stable text (pinned by snapshots).

mod common;

use rnn::ir::graph::{Graph, Op, OutRole, Role, Shape, Value, verify};
use rnn::ir::passes::{
    cse::cse,
    dce::dce,
    fuse::fuse,
    hoist::{Phase, hoist},
};
use rnn::{CellKind, ModelSpec, Program, parse_str};

fn small_graph() -> (Graph, [Value; 3]) {
    let mut g = Graph::new();
    let x = g.x(3);
    let h = g.state("h", 4);
    let w = g.param("W", Shape::Matrix(4, 3));
    let wx = g.matmul(w, x).unwrap();
    let y = g.add(wx, h).unwrap();
    g.set_output(OutRole::State(0), y);
    g.set_output(OutRole::Output, y);
    (g, [x, h, w])
}

#[test]
fn verifier_accepts_a_well_formed_graph() {
    verify(&small_graph().0).unwrap();
}

#[test]
fn builder_rejects_ill_typed_ops() {
    let (mut g, [x, h, w]) = small_graph();
    assert_eq!(
        g.matmul(w, h).unwrap_err().message,
        "matmul needs [o, i] @ batch[i], found [4, 3] @ batch[4]"
    );
    assert!(
        g.add(x, h)
            .unwrap_err()
            .message
            .contains("cannot combine shapes batch[3] and batch[4]")
    );
    assert!(
        g.slice(x, 2, 2)
            .unwrap_err()
            .message
            .contains("out of range")
    );
}

#[test]
fn dce_and_cse_remove_dead_and_repeated_work() {
    let mut g = Graph::new();
    let x = g.x(2);
    let h = g.state("h", 2);
    let a = g.tanh(x).unwrap();
    let b = g.tanh(x).unwrap(); // the same as `a`
    let _dead = g.sigmoid(h).unwrap();
    let s1 = g.add(a, h).unwrap();
    let s2 = g.add(h, b).unwrap(); // commutes to the same as `s1`
    let y = g.mul(s1, s2).unwrap();
    g.set_output(OutRole::State(0), y);
    let opt = dce(&cse(&g));
    verify(&opt).unwrap();
    let count = |op: Op| opt.iter().filter(|&v| opt.data(v).op == op).count();
    assert_eq!(
        (count(Op::Tanh), count(Op::Add), count(Op::Sigmoid)),
        (1, 1, 0)
    );
}

#[test]
fn fusion_stacks_matmuls_that_share_an_operand() {
    let spec = parse_str(common::PEEPHOLE).unwrap();
    let program = Program::compile(&spec).unwrap();
    let f = &program.layers[0].forward;
    let matmuls: Vec<Value> = f
        .graph
        .iter()
        .filter(|&v| f.graph.data(v).op == Op::MatMul)
        .collect();
    // Four gate products of `x` become one, four of `h` another.
    assert_eq!(matmuls.len(), 2, "{}", f.to_text());
    assert_eq!(f.graph.shape(matmuls[0]), Shape::Batch(16));
    // The product with `x` does not depend on the state: it runs before the loop.
    let phases: Vec<Phase> = matmuls.iter().map(|v| f.phases[v.index()]).collect();
    assert_eq!(phases, vec![Phase::Pre, Phase::Loop]);
}

#[test]
fn fusion_leaves_unrelated_matmuls_alone() {
    let (g, _) = small_graph();
    assert_eq!(fuse(&g).unwrap(), g);
}

#[test]
fn hoisting_is_found_by_dependency_analysis() {
    // An Elman cell written by hand: nothing tells the compiler which product is the input's.
    let program = Program::compile(&parse_str(common::RELU_ELMAN).unwrap()).unwrap();
    let f = &program.layers[0].forward;
    let phase_of = |op: Op, arg_role: Role| {
        f.graph
            .iter()
            .find(|&v| {
                f.graph.data(v).op == op
                    && f.graph
                        .data(v)
                        .args
                        .iter()
                        .any(|&a| f.graph.data(a).op == Op::Input(arg_role))
            })
            .map(|v| f.phases[v.index()])
    };
    assert_eq!(phase_of(Op::MatMul, Role::Input), Some(Phase::Pre));
    assert_eq!(phase_of(Op::MatMul, Role::State(0)), Some(Phase::Loop));
    // Backward: weight gradients and the input gradient after the loop; the state's inside.
    let b = &program.layers[0].backward;
    for v in b.graph.iter() {
        let d = b.graph.data(v);
        if d.op == Op::OuterSum || d.op == Op::SumRows {
            assert_eq!(b.phases[v.index()], Phase::Post, "{}", b.to_text());
        }
    }
    let dx = b.graph.output(OutRole::InputGrad).unwrap();
    let dh = b.graph.output(OutRole::StateGrad(0)).unwrap();
    assert_eq!(
        (b.phases[dx.index()], b.phases[dh.index()]),
        (Phase::Post, Phase::Loop)
    );
}

#[test]
fn hoisting_refuses_to_mix_a_reduction_into_rows() {
    let mut g = Graph::new();
    let x = g.x(2);
    let h = g.state("h", 2);
    let s = g.push(Op::SumRows, &[x]).unwrap();
    let y = g.add(h, s).unwrap();
    let z = g.add(x, s).unwrap(); // a per-row value of every step's sum: not exact over all steps
    let out = g.add(y, z).unwrap();
    g.set_output(OutRole::State(0), out);
    let e = hoist(&g).unwrap_err();
    assert!(e.to_string().contains("a sum over the rows"), "{e}");
}

fn lstm_program() -> Program {
    Program::compile(&ModelSpec::new(CellKind::Lstm, 3, 2)).unwrap()
}

#[test]
fn printer_output_is_deterministic() {
    let a = lstm_program();
    let b = lstm_program();
    assert_eq!(
        a.layers[0].backward.to_text(),
        b.layers[0].backward.to_text()
    );
}

#[test]
fn snapshot_lstm_step() {
    insta::assert_snapshot!(lstm_program().layers[0].forward.to_text());
}

#[test]
fn snapshot_lstm_backward_step() {
    insta::assert_snapshot!(lstm_program().layers[0].backward.to_text());
}

#[test]
fn snapshot_gru_step() {
    let p = Program::compile(&ModelSpec::new(CellKind::Gru, 3, 2)).unwrap();
    insta::assert_snapshot!(p.layers[0].forward.to_text());
}

#[test]
fn snapshot_peephole_lstm_step() {
    let p = Program::compile(&parse_str(common::PEEPHOLE).unwrap()).unwrap();
    insta::assert_snapshot!(p.layers[0].forward.to_text());
}

#[test]
fn reassociation_adds_every_bias_to_the_input_projection() {
    // Which values does a bias reach inside the loop? Follow it through slices (which pick
    // parts of it) and report the first loop-phase use of each part, unless that use adds it
    // to a value computed before the loop (the input projection): reassociation makes that
    // sum, and the hoisting pass computes it in the loop only because it is cheaper there
    // than as a pass over all steps' rows.
    let loop_uses = |p: &Program| -> Vec<String> {
        let f = &p.layers[0].forward;
        let users = f.graph.users();
        let mut found = Vec::new();
        for (i, info) in f.graph.params().iter().enumerate() {
            let Some(b) = f.graph.input(Role::Param(i as u32)) else {
                continue;
            };
            if !(info.name.starts_with("bias") || info.name.starts_with("b_")) {
                continue;
            }
            let mut stack = vec![b];
            while let Some(v) = stack.pop() {
                for &u in &users[v.index()] {
                    let data = f.graph.data(u);
                    let to_hoisted = data.op == Op::Add
                        && data
                            .args
                            .iter()
                            .any(|&a| a != v && f.phases[a.index()] == Phase::Pre);
                    match (data.op, f.phases[u.index()]) {
                        (Op::Slice { .. }, Phase::Pre) => stack.push(u),
                        (_, Phase::Loop) if to_hoisted => {}
                        (_, Phase::Loop) => found.push(format!(
                            "{} via {}",
                            info.name,
                            f.graph.data(v).op.mnemonic()
                        )),
                        _ => {}
                    }
                }
            }
        }
        found
    };
    for cell in [CellKind::RnnTanh, CellKind::Lstm] {
        let p = Program::compile(&ModelSpec::new(cell.clone(), 3, 2)).unwrap();
        assert_eq!(loop_uses(&p), Vec::<String>::new(), "{}", cell.name());
    }
    let p = Program::compile(&parse_str(common::PEEPHOLE).unwrap()).unwrap();
    assert_eq!(loop_uses(&p), Vec::<String>::new());
    // PyTorch's GRU scales b_hn by the reset gate: only that slice of `bias_hh` stays inside.
    let p = Program::compile(&ModelSpec::new(CellKind::Gru, 3, 2)).unwrap();
    assert_eq!(loop_uses(&p), vec!["bias_hh via slice".to_string()]);
}

#[test]
fn the_pass_pipeline_reaches_a_fixed_point() {
    use rnn::ir::passes::optimize;
    for spec in common::every_cell(3, 4) {
        let p = Program::compile(&spec).unwrap();
        for g in [&p.layers[0].forward.graph, &p.layers[0].backward.graph] {
            assert_eq!(
                &optimize(g).unwrap(),
                g,
                "{}: optimising again changed the graph",
                spec.cell.name()
            );
        }
    }
}

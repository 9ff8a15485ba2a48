//! Golden results of the interpreter as it was before the sequence-driver rewrite: the rewrite
//! must compute what the old interpreter computed, forward and backward, on every kind of model
//! and request.
//!
//! `tests/fixtures/legacy/` holds `N` cases: `cases.json` gives each case's `.rnn` declaration
//! and the seed of its weights (`Weights::init(&program, seed)`, so the weights are not stored,
//! only a fingerprint of them), and `caseNN.safetensors` holds its request (`request.*`) and
//! every result the old interpreter gave in `f64`: `output`, `<state>_n`, `grad.input`,
//! `grad.<state>0`, `grad.<parameter>`. See the folder's README for when and how they were made.
//!
//! - `driver_matches_legacy` rebuilds every case, runs it with the current library in `f64` and
//!   compares: the same set of result names, the same shapes, and values within
//!   `1e-9` relative + `1e-12` absolute, plus one `f32` rounding (results leave the library as
//!   `f32`, so two `f64` computations that differ only in summation order can round to
//!   neighbouring `f32`s: measured at 6.3e-8 relative on a parameter gradient, one ulp).
//! - `bless_legacy_cases` (ignored) regenerates the cases with the deterministic generator below
//!   and writes the folder. Run it only on the code the goldens are meant to record.

use rnn::ir::weights::{read_safetensors, write_safetensors};
use rnn::{Exec, Program, Request, Response, Tensor, Weights, parse_str};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

mod common;

use common::Rng;

/// The number of cases.
const N: usize = 40;

const RTOL: f64 = 1e-9;
const ATOL: f64 = 1e-12;
/// Half an `f32` ulp, relative: the rounding of each result to `f32`.
const HALF_ULP: f64 = 1.0 / (1u64 << 24) as f64;

fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy")
}

fn case_name(i: usize) -> String {
    format!("case{i:02}")
}

/// Case `i`'s `.rnn` declaration and weight seed. The cell kind cycles through all nine (rnn
/// tanh, rnn relu, lstm, lstm with proj, gru with reset after and before, the three custom cells
/// of `tests/common`), and the bias variant of standard cells (two biases, one, none) changes
/// every nine cases, so each standard kind has each variant; the rest is random.
fn generate_model(i: usize, rng: &mut Rng) -> (String, u64) {
    let kind = i % 9;
    let input = rng.range(1, 9);
    let hidden = rng.range(if kind == 3 { 2 } else { 1 }, 9);
    let common = format!(
        "input: {input}, hidden: {hidden}, layers: {}, bidirectional: {}, batch_first: {}",
        rng.range(1, 3),
        rng.one_in(2),
        rng.one_in(2),
    );
    let bias = match (i / 9) % 3 {
        0 => ", bias: true, bias_convention: two",
        1 => ", bias: true, bias_convention: one",
        _ => ", bias: false",
    };
    let custom = |src: &str| src.replacen("input: 3, hidden: 4", &common, 1);
    let declaration = match kind {
        0 => format!("rnn Case{i:02} {{ {common}{bias}, nonlinearity: tanh }}"),
        1 => format!("rnn Case{i:02} {{ {common}{bias}, nonlinearity: relu }}"),
        2 => format!("lstm Case{i:02} {{ {common}{bias} }}"),
        3 => format!(
            "lstm Case{i:02} {{ {common}{bias}, proj: {} }}",
            rng.range(1, hidden - 1)
        ),
        4 => format!("gru Case{i:02} {{ {common}{bias}, reset: after }}"),
        5 => format!("gru Case{i:02} {{ {common}{bias}, reset: before }}"),
        6 => custom(common::PEEPHOLE),
        7 => custom(common::MINIMAL_GRU),
        _ => custom(common::RELU_ELMAN),
    };
    (declaration, rng.next_u64())
}

/// A random request for `program`, as named tensors: `request.input`, `request.grad_output`,
/// and sometimes `request.lengths` (as `f32`s), `request.<state>0`, `request.grad_<state>_n`.
fn generate_request(program: &Program, rng: &mut Rng) -> BTreeMap<String, Tensor> {
    let spec = &program.spec;
    let (steps, batch) = (rng.range(1, 6), rng.range(1, 4));
    let ld = spec.num_layers * spec.directions();
    let width = spec.directions() * spec.output_size();
    let layout = |n: usize| {
        if spec.batch_first {
            vec![batch, steps, n]
        } else {
            vec![steps, batch, n]
        }
    };
    let mut r = BTreeMap::new();
    r.insert("request.input".into(), rng.tensor(layout(spec.input_size)));
    if !rng.one_in(3) {
        let data = (0..batch).map(|_| rng.range(1, steps) as f32).collect();
        r.insert(
            "request.lengths".into(),
            Tensor::new(vec![batch], data).unwrap(),
        );
    }
    for (name, n) in program.states() {
        if rng.one_in(2) {
            r.insert(format!("request.{name}0"), rng.tensor(vec![ld, batch, *n]));
        }
    }
    r.insert("request.grad_output".into(), rng.tensor(layout(width)));
    for (name, n) in program.states() {
        if rng.one_in(3) {
            r.insert(
                format!("request.grad_{name}_n"),
                rng.tensor(vec![ld, batch, *n]),
            );
        }
    }
    r
}

/// Runs the request held in `tensors` (the `request.*` entries) in `f64`.
fn run(program: &Program, weights: &Weights, tensors: &BTreeMap<String, Tensor>) -> Response {
    let get = |name: &str| tensors.get(&format!("request.{name}"));
    let lengths: Option<Vec<i64>> =
        get("lengths").map(|l| l.data.iter().map(|&n| n as i64).collect());
    let states = program.states();
    let req = Request {
        input: Some(get("input").expect("request.input")),
        initial_states: states.iter().map(|(s, _)| get(&format!("{s}0"))).collect(),
        lengths: lengths.as_deref(),
        grad_output: Some(get("grad_output").expect("request.grad_output")),
        grad_final_states: states
            .iter()
            .map(|(s, _)| get(&format!("grad_{s}_n")))
            .collect(),
    };
    program
        .run::<f64>(weights, &req, &Exec::default())
        .expect("the request runs")
}

/// Every result of a run, by name.
fn results(program: &Program, r: Response) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    let mut put = |name: String, t: Tensor| {
        assert!(
            out.insert(name.clone(), t).is_none(),
            "two results named `{name}`"
        );
    };
    let states = program.states();
    assert_eq!(r.final_states.len(), states.len(), "final states");
    put("output".into(), r.output);
    for ((s, _), t) in states.iter().zip(r.final_states) {
        put(format!("{s}_n"), t);
    }
    let g = r.grads.expect("gradients were asked for");
    assert_eq!(
        g.initial_states.len(),
        states.len(),
        "initial-state gradients"
    );
    put("grad.input".into(), g.input);
    for ((s, _), t) in states.iter().zip(g.initial_states) {
        put(format!("grad.{s}0"), t);
    }
    for (p, t) in g.params {
        put(format!("grad.{p}"), t);
    }
    out
}

/// The sum of every weight, in `f64` in name order: shows whether `Weights::init` still gives
/// the weights the goldens were made with.
fn fingerprint(weights: &Weights) -> f64 {
    weights
        .tensors
        .values()
        .flat_map(|t| &t.data)
        .enumerate()
        .map(|(i, &w)| w as f64 * (1.0 + (i % 7) as f64))
        .sum()
}

#[test]
#[ignore = "writes tests/fixtures/legacy; run only on the code the goldens record"]
fn bless_legacy_cases() {
    let dir = folder();
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = Vec::new();
    for i in 0..N {
        let name = case_name(i);
        let mut rng = Rng(0x1E_6AC7_0000 + i as u64);
        let (declaration, seed) = generate_model(i, &mut rng);
        let spec = parse_str(&declaration).unwrap_or_else(|e| panic!("{declaration}: {e:?}"));
        let program = Program::compile(&spec).unwrap();
        let weights = Weights::init(&program, seed).unwrap();
        let mut tensors = generate_request(&program, &mut rng);
        let response = run(&program, &weights, &tensors);
        for (k, t) in results(&program, response) {
            assert!(tensors.insert(k, t).is_none());
        }
        std::fs::write(
            dir.join(format!("{name}.safetensors")),
            write_safetensors(&tensors).unwrap(),
        )
        .unwrap();
        manifest.push(serde_json::json!({
            "name": name,
            "declaration": declaration,
            "weights_seed": seed,
            "weights_fingerprint": fingerprint(&weights),
        }));
    }
    let text = serde_json::to_string_pretty(&manifest).unwrap() + "\n";
    std::fs::write(dir.join("cases.json"), text).unwrap();
}

/// The element of `actual` furthest outside the tolerance, if any.
fn worst(actual: &Tensor, expected: &Tensor) -> Option<(usize, f64)> {
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&a, &e)) in actual.data.iter().zip(&expected.data).enumerate() {
        let (a, e) = (a as f64, e as f64);
        let excess = (a - e).abs() - (RTOL * e.abs() + ATOL + HALF_ULP * (a.abs() + e.abs()));
        if (excess > 0.0 || a.is_nan() != e.is_nan()) && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    worst
}

#[test]
fn driver_matches_legacy() {
    let dir = folder();
    let manifest: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(dir.join("cases.json")).expect("tests/fixtures/legacy/cases.json"),
    )
    .unwrap();
    let names: Vec<&str> = manifest
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..N).map(case_name).collect();
    assert_eq!(names, want, "cases.json lists every case, in order");

    // Exactly the files the cases need: a missing one fails, a stray one is not silently kept.
    let mut files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for f in ["README.md", "cases.json"] {
        assert!(files.remove(f), "tests/fixtures/legacy/{f} is missing");
    }
    let expected_files: BTreeSet<String> =
        want.iter().map(|n| format!("{n}.safetensors")).collect();
    assert_eq!(files, expected_files, "the files of tests/fixtures/legacy");

    let mut failures = Vec::new();
    for case in &manifest {
        let name = case["name"].as_str().unwrap();
        let declaration = case["declaration"].as_str().unwrap();
        let seed = case["weights_seed"].as_u64().unwrap();
        let path = dir.join(format!("{name}.safetensors"));
        let stored =
            read_safetensors(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
                .unwrap();

        let spec = parse_str(declaration).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let program = Program::compile(&spec).unwrap();
        let weights = Weights::init(&program, seed).unwrap();
        let print = case["weights_fingerprint"].as_f64().unwrap();
        assert!(
            (fingerprint(&weights) - print).abs() <= 1e-9 * (1.0 + print.abs()),
            "{name}: Weights::init no longer gives the weights the goldens were made with \
             (fingerprint {} vs {print}); the goldens cannot be checked",
            fingerprint(&weights)
        );

        let got = results(&program, run(&program, &weights, &stored));
        let expected: BTreeMap<&String, &Tensor> = stored
            .iter()
            .filter(|(k, _)| !k.starts_with("request."))
            .collect();
        let got_names: Vec<&String> = got.keys().collect();
        let expected_names: Vec<&String> = expected.keys().copied().collect();
        assert_eq!(got_names, expected_names, "{name}: the result names");
        for (k, e) in &expected {
            let a = &got[*k];
            assert_eq!(a.shape, e.shape, "{name}: shape of `{k}`");
            assert_eq!(a.data.len(), e.data.len(), "{name}: length of `{k}`");
            if let Some((i, _)) = worst(a, e) {
                failures.push(format!(
                    "{name} `{k}` [{i}]: {} now, {} before ({declaration})",
                    a.data[i], e.data[i]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} results differ from the legacy interpreter's:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

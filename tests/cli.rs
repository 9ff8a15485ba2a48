//! `rnnc` as a user drives it: every PyTorch case through `rnnc run`, the parameter counts of
//! `rnnc inspect`, and every class of bad input answered by exit code 2 and one line naming it.

mod common;

use common::{Case, assert_close, fixtures, rnn_cases};
use rnn::Tensor;
use rnn::ir::{npy, weights};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn rnnc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rnnc"))
        .args(args)
        .output()
        .expect("rnnc runs")
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The arguments of `rnnc run` for a case folder, writing to `out`.
fn run_args(case: &Case, out: &Path) -> Vec<String> {
    let f = |name: &str| case.dir.join(name).to_str().unwrap().to_string();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--weights".into(),
        f("weights.safetensors"),
        "--input".into(),
        f("input.npy"),
    ];
    args.extend([
        "--out".into(),
        path_str(out).into(),
        "--cell".into(),
        // The meta.json spelling (`rnn_tanh`), verbatim: it is `--cell`'s own.
        case.meta["cell"].as_str().unwrap().to_string(),
    ]);
    if case.batch_first() {
        args.push("--batch-first".into());
    }
    for (flag, file) in [
        ("--h0", "h0.npy"),
        ("--c0", "c0.npy"),
        ("--lengths", "lengths.npy"),
        ("--grad-output", "grad_output.npy"),
    ] {
        if case.dir.join(file).exists() {
            args.extend([flag.into(), f(file)]);
        }
    }
    args
}

#[test]
fn every_pytorch_case_matches_through_rnnc_run() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, backend) in rnn_cases()
        .into_iter()
        .flat_map(|n| [(n.clone(), "interp"), (n, "jit")])
    {
        let case = Case::load(&name);
        let out = tmp.path().join(format!("{name}-{backend}.safetensors"));
        let mut args = run_args(&case, &out);
        args.extend(["--backend".to_string(), backend.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = rnnc(&args);
        assert!(
            o.status.success(),
            "{name}: rnnc failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got = weights::read_safetensors(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            case.expected.keys().collect::<Vec<_>>(),
            "{name}: the tensors written"
        );
        for (key, expected) in &case.expected {
            assert_close(&format!("{name}: {key}"), &got[key], expected, 1e-5, 1e-6);
        }
    }
}

#[test]
fn inspect_prints_pytorch_and_one_bias_parameter_counts() {
    for (cell, two, one) in [
        ("lstm", 395264, 394240),
        ("rnn-tanh", 98816, 98560),
        ("gru", 296448, 295680),
    ] {
        let base = [
            "inspect",
            "--cell",
            cell,
            "--input-size",
            "128",
            "--hidden-size",
            "256",
        ];
        let o = rnnc(&base);
        assert!(o.status.success());
        let text = String::from_utf8(o.stdout).unwrap();
        assert!(
            text.lines().any(|l| l == format!("parameters: {two}")),
            "{cell}: {text}"
        );
        let o = rnnc(&[&base[..], &["--one-bias"]].concat());
        let text = String::from_utf8(o.stdout).unwrap();
        assert!(
            text.lines().any(|l| l == format!("parameters: {one}")),
            "{cell} --one-bias: {text}"
        );
    }
}

#[test]
fn inspect_reads_a_rnn_file_and_shows_the_hoisted_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let file = model_file(
        &tmp,
        "enc.rnn",
        "lstm Encoder { input: 128, hidden: 256, layers: 2, bidirectional: true }",
    );
    let o = rnnc(&["inspect", path_str(&file)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("model: lstm Encoder"));
    assert!(text.contains("weight_ih_l1_reverse: [1024, 512]"));
    // The input product runs before the loop, the weight gradients after it.
    assert!(
        text.lines()
            .any(|l| l.contains("matmul v3, v0") && l.contains("; pre")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("outer_sum") && l.contains("; post")),
        "{text}"
    );
    // The whole plan: storage classes and places, buffers, carried slots, products.
    for part in [
        "buffers:",
        "carried 0 `h` B × 256: double-buffered",
        "kept for backward:",
        "layer 1 (input 512): forward step, training plan",
        "T·B rows at once",
    ] {
        assert!(text.contains(part), "`{part}` missing from:\n{text}");
    }
}

// --- bad input: exit code 2, one line on stderr, naming what is wrong ---

/// A `.rnn` file called `name` holding `text` in `dir`.
fn model_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let file = dir.path().join(name);
    std::fs::write(&file, text).unwrap();
    file
}

/// Runs rnnc and returns its one-line complaint, asserting exit code 2.
fn complaint(args: &[&str]) -> String {
    let o = rnnc(args);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit code 2, stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line on stderr, found: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A scratch copy of the `lstm_basic` case whose files can be damaged one at a time.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        for f in ["weights.safetensors", "input.npy", "grad_output.npy"] {
            std::fs::copy(fixtures().join("lstm_basic").join(f), root.join(f)).unwrap();
        }
        Scratch { _dir: dir, root }
    }
    fn path(&self, f: &str) -> String {
        path_str(&self.root.join(f)).to_string()
    }
    fn args(&self) -> Vec<String> {
        [
            "run",
            "--weights",
            &self.path("weights.safetensors"),
            "--input",
            &self.path("input.npy"),
            "--out",
            &self.path("out.safetensors"),
        ]
        .map(String::from)
        .to_vec()
    }
    /// The complaint of `rnnc run` with `extra` arguments: the same one line and exit code 2 on
    /// every backend.
    fn run(&self, extra: &[&str]) -> String {
        let mut args = self.args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let interp = complaint(&args.iter().map(String::as_str).collect::<Vec<_>>());
        args.extend(["--backend".to_string(), "jit".to_string()]);
        let jit = complaint(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            jit, interp,
            "the JIT's complaint differs from the interpreter's"
        );
        interp
    }
    fn weights(&self) -> BTreeMap<String, Tensor> {
        weights::read_safetensors(&std::fs::read(self.root.join("weights.safetensors")).unwrap())
            .unwrap()
    }
    fn write_weights(&self, w: &BTreeMap<String, Tensor>) {
        std::fs::write(
            self.root.join("weights.safetensors"),
            weights::write_safetensors(w).unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn truncated_weights_file() {
    let s = Scratch::new();
    let bytes = std::fs::read(s.root.join("weights.safetensors")).unwrap();
    std::fs::write(
        s.root.join("weights.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = s.run(&[]);
    assert!(
        err.contains("weights.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn corrupted_weights_header() {
    let s = Scratch::new();
    let mut bytes = std::fs::read(s.root.join("weights.safetensors")).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(s.root.join("weights.safetensors"), &bytes).unwrap();
    let err = s.run(&[]);
    assert!(
        err.contains("weights.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn missing_weights_file() {
    let s = Scratch::new();
    std::fs::remove_file(s.root.join("weights.safetensors")).unwrap();
    let err = s.run(&[]);
    assert!(
        err.contains("weights.safetensors") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn wrong_shaped_weight() {
    let s = Scratch::new();
    let mut w = s.weights();
    w.insert("weight_hh_l0".into(), Tensor::zeros(vec![28, 6]));
    s.write_weights(&w);
    let err = s.run(&["--cell", "lstm"]);
    assert!(
        err.contains("`weight_hh_l0` has shape [28, 6], expected [28, 7]"),
        "{err}"
    );
    let err = s.run(&[]);
    assert!(
        err.contains("`weight_hh_l0` has shape [28, 6]: its columns (the hidden size) must divide"),
        "{err}"
    );
    let mut w = s.weights();
    w.insert("weight_hh_l0".into(), Tensor::zeros(vec![28, 7]));
    w.insert("weight_ih_l1".into(), Tensor::zeros(vec![28, 6]));
    w.insert("weight_hh_l1".into(), Tensor::zeros(vec![28, 7]));
    w.insert("bias_ih_l1".into(), Tensor::zeros(vec![28]));
    w.insert("bias_hh_l1".into(), Tensor::zeros(vec![28]));
    s.write_weights(&w);
    let err = s.run(&[]);
    assert!(
        err.contains("`weight_ih_l1` has shape [28, 6], expected [28, 7]"),
        "{err}"
    );
}

#[test]
fn missing_weight() {
    let s = Scratch::new();
    let mut w = s.weights();
    w.remove("bias_hh_l0");
    s.write_weights(&w);
    let err = s.run(&[]);
    assert!(
        err.contains("missing tensor `bias_hh_l0` (expected shape [28])"),
        "{err}"
    );
}

#[test]
fn unexpected_weight() {
    let s = Scratch::new();
    let mut w = s.weights();
    w.insert("weight_ih_l0_reversed".into(), Tensor::zeros(vec![28, 5]));
    s.write_weights(&w);
    let err = s.run(&[]);
    assert!(
        err.contains("unexpected tensor `weight_ih_l0_reversed`"),
        "{err}"
    );
}

#[test]
fn cell_that_contradicts_the_weights() {
    let s = Scratch::new();
    let err = s.run(&["--cell", "gru"]);
    assert!(
        err.contains(
            "`weight_ih_l0` has 28 rows, not a whole number of the 3 gate blocks of `--cell gru`"
        ),
        "{err}"
    );
    let err = s.run(&["--cell", "rnn-tanh"]);
    assert!(err.contains("`--cell rnn_tanh` has 1 gate block(s), but `weight_ih_l0` [28, 5] and `weight_hh_l0` [28, 7] hold 4 blocks of hidden size 7"), "{err}");
}

#[test]
fn input_of_the_wrong_shape() {
    let s = Scratch::new();
    std::fs::write(
        s.root.join("input.npy"),
        npy::write_f32(&Tensor::zeros(vec![6, 3, 4])),
    )
    .unwrap();
    let err = s.run(&[]);
    assert!(
        err.contains("input.npy") && err.contains("[6, 3, 4]") && err.contains("5 features"),
        "{err}"
    );
}

#[test]
fn input_of_the_wrong_dtype() {
    let s = Scratch::new();
    std::fs::write(
        s.root.join("input.npy"),
        npy::write_i64(&[6, 3, 5], &[0; 90]),
    )
    .unwrap();
    let err = s.run(&[]);
    assert!(
        err.contains("input.npy") && err.contains("dtype is `<i8`, expected float32"),
        "{err}"
    );
}

#[test]
fn nan_in_the_input() {
    let s = Scratch::new();
    let mut x = npy::read_f32(&std::fs::read(s.root.join("input.npy")).unwrap()).unwrap();
    x.data[17] = f32::NAN;
    std::fs::write(s.root.join("input.npy"), npy::write_f32(&x)).unwrap();
    let err = s.run(&[]);
    assert!(
        err.contains("input.npy") && err.contains("`input` holds NaN at flat index 17"),
        "{err}"
    );
}

#[test]
fn a_zero_length() {
    let s = Scratch::new();
    std::fs::write(s.root.join("lengths.npy"), npy::write_i64(&[3], &[6, 0, 2])).unwrap();
    let err = s.run(&["--lengths", &s.path("lengths.npy")]);
    assert!(
        err.contains("lengths.npy")
            && err.contains("`lengths[1]` is 0, expected a length in 1..=6"),
        "{err}"
    );
}

#[test]
fn a_length_longer_than_the_input() {
    let s = Scratch::new();
    std::fs::write(s.root.join("lengths.npy"), npy::write_i64(&[3], &[6, 7, 2])).unwrap();
    let err = s.run(&["--lengths", &s.path("lengths.npy")]);
    assert!(
        err.contains("`lengths[1]` is 7, expected a length in 1..=6"),
        "{err}"
    );
}

#[test]
fn lengths_for_the_wrong_batch() {
    let s = Scratch::new();
    std::fs::write(s.root.join("lengths.npy"), npy::write_i64(&[2], &[6, 6])).unwrap();
    let err = s.run(&["--lengths", &s.path("lengths.npy")]);
    assert!(
        err.contains("`lengths` has shape [2], expected [3]"),
        "{err}"
    );
}

#[test]
fn initial_state_of_the_wrong_shape() {
    let s = Scratch::new();
    std::fs::write(
        s.root.join("h0.npy"),
        npy::write_f32(&Tensor::zeros(vec![1, 3, 8])),
    )
    .unwrap();
    let err = s.run(&["--h0", &s.path("h0.npy")]);
    assert!(
        err.contains("h0.npy") && err.contains("`h0` has shape [1, 3, 8], expected [1, 3, 7]"),
        "{err}"
    );
}

#[test]
fn grad_output_of_the_wrong_shape() {
    let s = Scratch::new();
    std::fs::write(
        s.root.join("g.npy"),
        npy::write_f32(&Tensor::zeros(vec![6, 3, 8])),
    )
    .unwrap();
    let err = s.run(&["--grad-output", &s.path("g.npy")]);
    assert!(
        err.contains("`grad_output` has shape [6, 3, 8], expected [6, 3, 7]"),
        "{err}"
    );
}

#[test]
fn not_an_npy_file() {
    let s = Scratch::new();
    std::fs::write(s.root.join("input.npy"), b"time,batch\n1,2\n").unwrap();
    let err = s.run(&[]);
    assert!(
        err.contains("input.npy") && err.contains("not an .npy file"),
        "{err}"
    );
}

#[test]
fn malformed_rnn_file_points_at_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.rnn");
    std::fs::write(&file, "lstm {\n  input: 128,\n  hiden: 256\n}").unwrap();
    let err = complaint(&["inspect", path_str(&file)]);
    assert!(
        err.contains("bad.rnn: 3:3: unknown setting `hiden` for `lstm`"),
        "{err}"
    );
}

#[test]
fn bench_json_prints_one_object_per_workload_with_every_field() {
    let o = rnnc(&["bench", "W5", "--reps", "1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["workload"], "W5");
    assert_eq!(v["backend"], "interp");
    assert_eq!(v["threads"], 1);
    assert_eq!(v["reps"], 1);
    for key in ["median_s", "min_s", "max_s", "gflops", "limit_fraction"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {text}");
    }
    // Within the printed rounding (3 and 4 decimals), whatever the time measured: a slow run
    // has a small fraction, whose rounding is a large share of it.
    let (gflops, fraction) = (
        v["gflops"].as_f64().unwrap(),
        v["limit_fraction"].as_f64().unwrap(),
    );
    assert!(
        (gflops / 103.0 - fraction).abs() <= 0.5e-4 + 0.5e-3 / 103.0 + 1e-12,
        "limit_fraction is gflops / 103: {text}"
    );
}

#[test]
fn bench_rejects_an_unknown_workload() {
    let err = complaint(&["bench", "W9"]);
    assert!(
        err.contains("unknown workload `W9`: expected W1 … W8"),
        "{err}"
    );
}

#[test]
fn inspect_ends_quietly_when_its_reader_stops() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_rnnc"))
        .args([
            "inspect",
            "--cell",
            "lstm",
            "--input-size",
            "64",
            "--hidden-size",
            "64",
            // Far more text than a pipe buffers (the parameter list alone is 16,000 lines).
            "--layers",
            "2000",
            "--bidirectional",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one chunk, then close the pipe, as `| head -1` does.
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

// --- `run --model`: any declared model ---

/// The `.rnn` declaration of a PyTorch case's model (its `batch_first` included).
fn declaration(case: &Case) -> String {
    let m = &case.meta;
    let (kind, nonlinearity) = match m["cell"].as_str().unwrap() {
        "rnn_tanh" => ("rnn", "nonlinearity: tanh, "),
        "rnn_relu" => ("rnn", "nonlinearity: relu, "),
        other => (other, ""),
    };
    let proj = match m["proj_size"].as_u64().unwrap() {
        0 => String::new(),
        p => format!("proj: {p}, "),
    };
    format!(
        "{kind} {{ input: {}, hidden: {}, layers: {}, bidirectional: {}, bias: {}, batch_first: {}, {nonlinearity}{proj}}}",
        m["input_size"],
        m["hidden_size"],
        m["num_layers"],
        m["bidirectional"],
        m["bias"],
        m["batch_first"]
    )
}

/// The arguments of `rnnc run --model` for a case: the initial states by `--state NAME=FILE`,
/// batch-first from the file alone.
fn model_run_args(case: &Case, model: &Path, out: &Path) -> Vec<String> {
    let f = |name: &str| case.dir.join(name).to_str().unwrap().to_string();
    let mut args: Vec<String> = [
        "run",
        "--model",
        path_str(model),
        "--weights",
        &f("weights.safetensors"),
        "--input",
        &f("input.npy"),
        "--out",
        path_str(out),
    ]
    .map(String::from)
    .to_vec();
    for (state, file) in [("h", "h0.npy"), ("c", "c0.npy")] {
        if case.dir.join(file).exists() {
            args.extend(["--state".into(), format!("{state}={}", f(file))]);
        }
    }
    for (flag, file) in [
        ("--lengths", "lengths.npy"),
        ("--grad-output", "grad_output.npy"),
    ] {
        if case.dir.join(file).exists() {
            args.extend([flag.into(), f(file)]);
        }
    }
    args
}

fn run_ok(args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = rnnc(&args);
    assert!(
        o.status.success(),
        "rnnc {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn read_out(path: &Path) -> BTreeMap<String, Tensor> {
    weights::read_safetensors(&std::fs::read(path).unwrap()).unwrap()
}

fn assert_all_close(name: &str, got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{name}: the tensors written"
    );
    for (key, expected) in want {
        assert_close(&format!("{name}: {key}"), &got[key], expected, 1e-5, 1e-6);
    }
}

#[test]
fn every_pytorch_case_matches_through_rnnc_run_model() {
    let tmp = tempfile::tempdir().unwrap();
    for name in rnn_cases() {
        let case = Case::load(&name);
        let model = tmp.path().join(format!("{name}.rnn"));
        std::fs::write(&model, declaration(&case)).unwrap();
        let out = tmp.path().join(format!("{name}.safetensors"));
        run_ok(&model_run_args(&case, &model, &out));
        assert_all_close(&name, &read_out(&out), &case.expected);
    }
}

#[test]
fn batch_first_on_the_command_line_also_sets_it_for_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let case = Case::load("gru_h0_batch_first");
    let model = tmp.path().join("m.rnn");
    std::fs::write(
        &model,
        declaration(&case).replace("batch_first: true, ", ""),
    )
    .unwrap();
    let out = tmp.path().join("out.safetensors");
    let mut args = model_run_args(&case, &model, &out);
    args.push("--batch-first".into());
    run_ok(&args);
    assert_all_close("gru_h0_batch_first", &read_out(&out), &case.expected);
}

const ELMAN: &str = "cell Elman { input: 5, hidden: 7,
    param W_xh: [hidden, input], param W_hh: [hidden, hidden], param b: [hidden],
    state q,
    q = tanh(W_hh @ q + W_xh @ x + b) }";

#[test]
fn a_custom_cell_runs_with_its_own_state_names_and_gradients() {
    use rnn::bench::random_tensor;
    use rnn::{Exec, Program, Request, Weights, parse_str};
    let tmp = tempfile::tempdir().unwrap();
    let p = |f: &str| tmp.path().join(f);
    std::fs::write(p("elman.rnn"), ELMAN).unwrap();
    let program = Program::compile(&parse_str(ELMAN).unwrap()).unwrap();
    let w = Weights::init(&program, 5).unwrap();
    let x = random_tensor(vec![4, 2, 5], 1);
    let q0 = random_tensor(vec![1, 2, 7], 2);
    let gy = random_tensor(vec![4, 2, 7], 3);
    std::fs::write(
        p("w.safetensors"),
        weights::write_safetensors(&w.tensors).unwrap(),
    )
    .unwrap();
    std::fs::write(p("x.npy"), npy::write_f32(&x)).unwrap();
    std::fs::write(p("q0.npy"), npy::write_f32(&q0)).unwrap();
    std::fs::write(p("g.npy"), npy::write_f32(&gy)).unwrap();
    let s = |f: &str| path_str(&p(f)).to_string();
    let args = [
        "run",
        "--model",
        &s("elman.rnn"),
        "--weights",
        &s("w.safetensors"),
        "--input",
        &s("x.npy"),
        "--state",
        &format!("q={}", s("q0.npy")),
        "--grad-output",
        &s("g.npy"),
        "--out",
        &s("out.safetensors"),
    ]
    .map(String::from);
    run_ok(&args);
    let want = program
        .run::<f32>(
            &w,
            &Request {
                input: Some(&x),
                initial_states: vec![Some(&q0)],
                grad_output: Some(&gy),
                ..Default::default()
            },
            &Exec::default(),
        )
        .unwrap();
    let grads = want.grads.unwrap();
    let mut expected = BTreeMap::from([
        ("output".to_string(), want.output),
        ("q_n".to_string(), want.final_states[0].clone()),
        ("grad.input".to_string(), grads.input),
        ("grad.q0".to_string(), grads.initial_states[0].clone()),
    ]);
    for (name, g) in grads.params {
        expected.insert(format!("grad.{name}"), g);
    }
    assert!(
        expected.contains_key("grad.W_xh_l0"),
        "{:?}",
        expected.keys()
    );
    assert_all_close("Elman", &read_out(&p("out.safetensors")), &expected);

    // `--h0` names the state `h`, which this cell does not have.
    let mut bad = args.to_vec();
    bad[7] = "--h0".into();
    bad[8] = s("q0.npy");
    let err = complaint(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("--h0: the model has no state `h`; its states are `q`"),
        "{err}"
    );
    bad[7] = "--state".into();
    bad[8] = format!("r={}", s("q0.npy"));
    let err = complaint(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("--state r: the model has no state `r`; its states are `q`"),
        "{err}"
    );
    bad[8] = s("q0.npy");
    let err = complaint(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("is not NAME=FILE.npy"), "{err}");
    // The same state twice.
    let mut twice = args.to_vec();
    twice.extend(["--state".into(), format!("q={}", s("x.npy"))]);
    let err = complaint(&twice.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("the initial value of state `q` is already given by `--state q`"),
        "{err}"
    );
    // An initial state of the wrong shape is named by its file and state.
    let mut wrong = args.to_vec();
    wrong[8] = format!("q={}", s("x.npy"));
    let err = complaint(&wrong.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("x.npy: `q0` has shape [4, 2, 5], expected [1, 2, 7]"),
        "{err}"
    );
    // Weights for another model are named against the declaration.
    let mut other = w.tensors.clone();
    other.remove("b_l0");
    std::fs::write(
        p("w2.safetensors"),
        weights::write_safetensors(&other).unwrap(),
    )
    .unwrap();
    let mut missing = args.to_vec();
    missing[4] = s("w2.safetensors");
    let err = complaint(&missing.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("w2.safetensors: missing tensor `b_l0` (expected shape [7])"),
        "{err}"
    );
}

#[test]
fn model_and_cell_together_are_refused() {
    let s = Scratch::new();
    std::fs::write(s.root.join("m.rnn"), "lstm { input: 5, hidden: 7 }").unwrap();
    let err = s.run(&["--model", &s.path("m.rnn"), "--cell", "lstm"]);
    assert!(
        err.contains("--cell: the model file")
            && err.contains("give `--model` or `--cell`, not both"),
        "{err}"
    );
}

#[test]
fn a_model_file_that_does_not_parse_is_named() {
    let s = Scratch::new();
    std::fs::write(s.root.join("m.rnn"), "lstm { input: 5, hiden: 7 }").unwrap();
    let err = s.run(&["--model", &s.path("m.rnn")]);
    assert!(
        err.contains("m.rnn: 1:18: unknown setting `hiden`"),
        "{err}"
    );
}

// --- `init` ---

#[test]
fn init_writes_the_declared_names_from_a_seed() {
    use rnn::{Program, Weights, parse_str};
    let tmp = tempfile::tempdir().unwrap();
    let p = |f: &str| tmp.path().join(f);
    std::fs::write(p("elman.rnn"), ELMAN).unwrap();
    let s = |f: &str| path_str(&p(f)).to_string();
    let program = Program::compile(&parse_str(ELMAN).unwrap()).unwrap();
    run_ok(
        &[
            "init",
            "--model",
            &s("elman.rnn"),
            "--out",
            &s("w0.safetensors"),
        ]
        .map(String::from),
    );
    let w0 = read_out(&p("w0.safetensors"));
    assert_eq!(
        w0,
        Weights::init(&program, 0).unwrap().tensors,
        "seed 0 by default"
    );
    assert_eq!(
        w0.keys().collect::<Vec<_>>(),
        ["W_hh_l0", "W_xh_l0", "b_l0"]
    );
    run_ok(
        &[
            "init",
            "--model",
            &s("elman.rnn"),
            "--seed",
            "3",
            "--out",
            &s("w3.safetensors"),
        ]
        .map(String::from),
    );
    assert_eq!(
        read_out(&p("w3.safetensors")),
        Weights::init(&program, 3).unwrap().tensors
    );
    // They run.
    std::fs::write(p("x.npy"), npy::write_f32(&Tensor::zeros(vec![2, 1, 5]))).unwrap();
    run_ok(
        &[
            "run",
            "--model",
            &s("elman.rnn"),
            "--weights",
            &s("w3.safetensors"),
            "--input",
            &s("x.npy"),
            "--out",
            &s("out.safetensors"),
        ]
        .map(String::from),
    );
    assert_eq!(
        read_out(&p("out.safetensors"))["output"].shape,
        vec![2, 1, 7]
    );
    // A bad model is named; nothing is written.
    std::fs::write(p("bad.rnn"), "lstm { input: 5 }").unwrap();
    let err = complaint(&[
        "init",
        "--model",
        &s("bad.rnn"),
        "--out",
        &s("bad.safetensors"),
    ]);
    assert!(err.contains("bad.rnn:"), "{err}");
    assert!(!p("bad.safetensors").exists());
}

// --- `--prefix`: a state dict saved from a whole model ---

/// The `lstm_basic` case's weights as `model.state_dict()` of a module holding the LSTM at each
/// of `prefixes`, plus a linear head.
fn whole_model_state_dict(s: &Scratch, prefixes: &[&str]) {
    let w = s.weights();
    let mut whole = BTreeMap::new();
    for p in prefixes {
        for (k, t) in &w {
            whole.insert(format!("{p}{k}"), t.clone());
        }
    }
    whole.insert("fc.weight".into(), Tensor::zeros(vec![2, 7]));
    whole.insert("fc.bias".into(), Tensor::zeros(vec![2]));
    s.write_weights(&whole);
}

#[test]
fn prefix_loads_the_recurrent_part_of_a_whole_models_state_dict() {
    let s = Scratch::new();
    whole_model_state_dict(&s, &["rnn."]);
    std::fs::write(s.root.join("m.rnn"), "lstm { input: 5, hidden: 7 }").unwrap();
    let case = Case::load("lstm_basic");
    let g = s.path("grad_output.npy");
    for extra in [
        vec!["--prefix", "rnn."],
        vec!["--prefix", "rnn"],
        vec!["--prefix", "rnn.", "--cell", "lstm"],
    ] {
        let mut args = s.args();
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["--grad-output".to_string(), g.clone()]);
        run_ok(&args);
        assert_all_close(
            &format!("{extra:?}"),
            &read_out(&s.root.join("out.safetensors")),
            &case.expected,
        );
    }
    let mut args = s.args();
    args.extend(
        [
            "--prefix",
            "rnn.",
            "--model",
            &s.path("m.rnn"),
            "--grad-output",
            &g,
        ]
        .map(String::from),
    );
    run_ok(&args);
    assert_all_close(
        "--model",
        &read_out(&s.root.join("out.safetensors")),
        &case.expected,
    );
}

#[test]
fn without_prefix_the_error_names_the_prefix_the_file_holds() {
    let s = Scratch::new();
    whole_model_state_dict(&s, &["rnn."]);
    std::fs::write(s.root.join("m.rnn"), "lstm { input: 5, hidden: 7 }").unwrap();
    let hint = "the file's parameters are under the prefix `rnn.`: pass `--prefix rnn.`";
    for extra in [
        vec![],
        vec!["--cell", "lstm"],
        vec!["--model", &s.path("m.rnn")],
    ] {
        let err = s.run(&extra);
        assert!(
            err.contains("weights.safetensors: missing tensor `weight_ih_l0`")
                && err.contains(hint),
            "{extra:?}: {err}"
        );
    }
    // A prefix the file does not hold.
    let err = s.run(&["--prefix", "lstm."]);
    assert!(
        err.contains(
            "no tensor name starts with the prefix `lstm.`: the names are under `fc.`, `rnn.`"
        ),
        "{err}"
    );
    // Names under the prefix are reported as the file spells them.
    let mut w = s.weights();
    w.remove("rnn.bias_hh_l0");
    s.write_weights(&w);
    let err = s.run(&["--prefix", "rnn."]);
    assert!(
        err.contains("missing tensor `rnn.bias_hh_l0` (expected shape [28])"),
        "{err}"
    );
    // Two recurrent submodules: both are named.
    let s = Scratch::new();
    whole_model_state_dict(&s, &["encoder.rnn.", "decoder.rnn."]);
    let err = s.run(&[]);
    assert!(
        err.contains(
            "under the prefixes `decoder.rnn.`, `encoder.rnn.`: pass `--prefix` with the one to run"
        ),
        "{err}"
    );
    // A prefix one level too short still finds the parameters deeper down.
    let err = s.run(&["--prefix", "encoder."]);
    assert!(err.contains("pass `--prefix encoder.rnn.`"), "{err}");
}

#[test]
fn weights_of_another_model_without_model_say_to_give_one() {
    let s = Scratch::new();
    let mut w = BTreeMap::new();
    w.insert("W_xh_l0".to_string(), Tensor::zeros(vec![7, 5]));
    s.write_weights(&w);
    let err = s.run(&[]);
    assert!(
        err.contains("missing tensor `weight_ih_l0`")
            && err.contains("give its `.rnn` file with `--model`"),
        "{err}"
    );
}

// --- rough edges ---

/// Runs rnnc with its standard output a pipe whose reader has already gone.
fn into_a_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_rnnc"))
        .args(args)
        .stdout(writer)
        .output()
        .expect("rnnc runs")
}

#[test]
fn every_printing_command_ends_quietly_on_a_closed_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("m.rnn");
    std::fs::write(&file, ELMAN).unwrap();
    for args in [
        vec![],
        vec![
            "inspect",
            "--cell",
            "gru",
            "--input-size",
            "4",
            "--hidden-size",
            "4",
        ],
        vec!["inspect", path_str(&file)],
        vec!["bench", "W5", "--reps", "1"],
        vec!["bench", "W5", "--reps", "1", "--json"],
        vec!["--help"],
        vec!["run", "--help"],
        vec!["--version"],
    ] {
        let o = into_a_closed_pipe(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(o.status.success(), "{args:?}: {:?}: {stderr}", o.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

#[test]
fn a_parameter_count_beyond_u64_is_printed_exactly() {
    // 2²⁴ features, 4096 layers, both directions: more parameters than u64 counts.
    let o = rnnc(&[
        "inspect",
        "--cell",
        "lstm",
        "--input-size",
        "16777216",
        "--hidden-size",
        "16777216",
        "--layers",
        "4096",
        "--bidirectional",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let h: u128 = 1 << 24;
    let first = 8 * h * h + 8 * h;
    let rest = 12 * h * h + 8 * h;
    let want = 2 * (first + 4095 * rest);
    assert!(want > u64::MAX as u128);
    assert!(
        text.lines().any(|l| l == format!("parameters: {want}")),
        "{}",
        &text[..400]
    );
}

#[test]
fn out_never_overwrites_an_input() {
    let s = Scratch::new();
    std::fs::write(s.root.join("m.rnn"), "lstm { input: 5, hidden: 7 }").unwrap();
    let state = npy::write_f32(&Tensor::zeros(vec![1, 3, 7]));
    for f in ["h0.npy", "c0.npy", "s.npy"] {
        std::fs::write(s.root.join(f), &state).unwrap();
    }
    std::fs::write(s.root.join("lengths.npy"), npy::write_i64(&[3], &[6, 5, 4])).unwrap();
    let before: BTreeMap<String, Vec<u8>> = std::fs::read_dir(&s.root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    let all = |out: &str, model: bool| -> Vec<String> {
        let mut a = vec![
            "run".to_string(),
            "--weights".into(),
            s.path("weights.safetensors"),
            "--input".into(),
            s.path("input.npy"),
            "--lengths".into(),
            s.path("lengths.npy"),
            "--grad-output".into(),
            s.path("grad_output.npy"),
            "--out".into(),
            out.to_string(),
        ];
        if model {
            a.extend([
                "--model".into(),
                s.path("m.rnn"),
                "--h0".into(),
                s.path("h0.npy"),
                "--state".into(),
                format!("c={}", s.path("s.npy")),
            ]);
        } else {
            a.extend([
                "--h0".into(),
                s.path("h0.npy"),
                "--c0".into(),
                s.path("c0.npy"),
            ]);
        }
        a
    };
    for (file, flag, model) in [
        ("weights.safetensors", "--weights", false),
        ("input.npy", "--input", false),
        ("h0.npy", "--h0", false),
        ("c0.npy", "--c0", false),
        ("lengths.npy", "--lengths", false),
        ("grad_output.npy", "--grad-output", false),
        ("m.rnn", "--model", true),
        ("s.npy", "--state c", true),
    ] {
        let args = all(&s.path(file), model);
        let err = complaint(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            err.contains(&format!("`--out` is the file given to `{flag}`")),
            "{file}: {err}"
        );
    }
    // The same file by another path: `dir/./f`, `dir/../dir/f`, a symbolic and a hard link.
    let dir = s.root.file_name().unwrap().to_str().unwrap().to_string();
    let mut others = vec![
        path_str(&s.root.join(".").join("input.npy")).to_string(),
        path_str(&s.root.join("..").join(&dir).join("input.npy")).to_string(),
    ];
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(s.root.join("input.npy"), s.root.join("sym.npy")).unwrap();
        std::fs::hard_link(s.root.join("input.npy"), s.root.join("hard.npy")).unwrap();
        others.push(s.path("sym.npy"));
        others.push(s.path("hard.npy"));
    }
    for out in others {
        let err = complaint(
            &all(&out, false)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        assert!(
            err.contains("`--out` is the file given to `--input`"),
            "{out}: {err}"
        );
    }
    for (name, bytes) in before {
        assert_eq!(
            std::fs::read(s.root.join(&name)).unwrap(),
            bytes,
            "{name} was changed"
        );
    }
    // `init` does not overwrite its model either.
    let err = complaint(&[
        "init",
        "--model",
        &s.path("m.rnn"),
        "--out",
        &s.path("m.rnn"),
    ]);
    assert!(
        err.contains("`--out` is the file given to `--model`"),
        "{err}"
    );
    // A fresh output file next to the inputs is fine.
    run_ok(&all(&s.path("out.safetensors"), true));
}

#[test]
fn inspect_prints_the_dsl_spellings() {
    // What `rnnc inspect` prints for `args`, which must succeed.
    let inspect = |args: &[&str]| -> String {
        let o = rnnc(args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let file = model_file(
        &tmp,
        "cho.rnn",
        "gru Cho { input: 4, hidden: 6, reset: before, bias_convention: one }",
    );
    let sizes = ["--input-size", "4", "--hidden-size", "6"];
    let cases: [(Vec<&str>, &[&str]); 3] = [
        (
            vec!["inspect", path_str(&file)],
            &[
                "model: gru Cho",
                "  reset: before",
                "  bias_convention: one",
            ],
        ),
        (
            [&["inspect", "--cell", "rnn-relu"][..], &sizes].concat(),
            &[
                "model: rnn",
                "  nonlinearity: relu",
                "  bias_convention: two",
            ],
        ),
        (
            [&["inspect", "--cell", "gru"][..], &sizes].concat(),
            &["  reset: after"],
        ),
    ];
    for (args, lines) in cases {
        let text = inspect(&args);
        for line in lines {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "`{line}` in:\n{text}"
            );
        }
        // No Rust debug names anywhere.
        for debug in [
            "AfterMatmul",
            "BeforeMatmul",
            "Matmul",
            "Two",
            "One",
            "RnnRelu",
            "Gru",
        ] {
            assert!(!text.contains(debug), "`{debug}` in:\n{text}");
        }
    }
}

#[test]
fn zero_counts_are_refused() {
    for args in [
        ["bench", "W5", "--reps", "0"],
        ["bench", "W5", "--threads", "0"],
    ] {
        let err = complaint(&args);
        assert!(err.contains("must be at least 1"), "{args:?}: {err}");
    }
    let err = complaint(&[
        "inspect",
        "--cell",
        "lstm",
        "--input-size",
        "4",
        "--hidden-size",
        "4",
        "--layers",
        "0",
    ]);
    assert!(err.contains("`layers` must be at least 1"), "{err}");
}

#[test]
fn a_fortran_order_big_endian_input_is_read_as_numpy_reads_it() {
    // The input in Fortran order (NumPy writes one for a transposed array), the output gradient
    // big-endian, the lengths int32: the same arrays, so the same results.
    let s = Scratch::new();
    let case = Case::load("lstm_basic");
    let x = &case.input;
    let (t, b, i) = (x.shape[0], x.shape[1], x.shape[2]);
    let mut fortran = vec![0f32; x.data.len()];
    for a in 0..t {
        for c in 0..b {
            for d in 0..i {
                fortran[a + t * c + t * b * d] = x.data[(a * b + c) * i + d];
            }
        }
    }
    let npy_file = |dict: &str, data: Vec<u8>| npy::framed(1, dict, &data);
    std::fs::write(
        s.root.join("input.npy"),
        npy_file(
            &format!("{{'descr': '<f4', 'fortran_order': True, 'shape': ({t}, {b}, {i}), }}"),
            fortran.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    )
    .unwrap();
    let g = &case.grad_output;
    std::fs::write(
        s.root.join("grad_output.npy"),
        npy_file(
            &format!(
                "{{'descr': '>f4', 'fortran_order': False, 'shape': ({}, {}, {}), }}",
                g.shape[0], g.shape[1], g.shape[2]
            ),
            g.data.iter().flat_map(|v| v.to_be_bytes()).collect(),
        ),
    )
    .unwrap();
    std::fs::write(
        s.root.join("lengths.npy"),
        npy_file(
            "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }",
            [6i32, 6, 6].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    )
    .unwrap();
    let mut args = s.args();
    args.extend(
        [
            "--grad-output",
            &s.path("grad_output.npy"),
            "--lengths",
            &s.path("lengths.npy"),
        ]
        .map(String::from),
    );
    run_ok(&args);
    assert_all_close(
        "lstm_basic",
        &read_out(&s.root.join("out.safetensors")),
        &case.expected,
    );
}

/// The acceptance cells' PyTorch cases (`tests/fixtures/cells`, see `pytorch_cells.rs`) through
/// `rnnc run --model`, in float32: minGRU and the Elman cell with its output projection at 1e-5
/// relative + 1e-6 absolute; the LayerNorm-LSTM, whose gradients are ill-conditioned in float32,
/// as close as that or as PyTorch's own float32 run, whichever is looser.
#[test]
fn the_acceptance_cells_match_pytorch_through_rnnc_run_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let worst = |a: &Tensor, e: &Tensor| common::tolerance_ratio(a, e, 1e-5, 1e-6);
    for name in common::PYTORCH_CELLS {
        let dir = root.join("tests/fixtures/cells").join(name);
        let model = root.join("examples/cells").join(format!("{name}.rnn"));
        let f = |file: &str| path_str(&dir.join(file)).to_string();
        let out = tmp.path().join(format!("{name}.safetensors"));
        let mut args: Vec<String> = [
            "run",
            "--model",
            path_str(&model),
            "--weights",
            &f("weights.safetensors"),
            "--input",
            &f("input.npy"),
            "--grad-output",
            &f("grad_output.npy"),
            "--out",
            path_str(&out),
        ]
        .map(String::from)
        .to_vec();
        // Every initial state the case holds, by its declared name (`h0.npy` is state `h`).
        let mut states: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter_map(|n| Some(n.strip_suffix("0.npy")?.to_string()))
            .collect();
        states.sort();
        assert!(!states.is_empty(), "{name}: no initial states");
        for s in &states {
            args.extend(["--state".into(), format!("{s}={}", f(&format!("{s}0.npy")))]);
        }
        run_ok(&args);
        let got = read_out(&out);
        // In f64 every tensor of every cell matches at 1e-5 relative + 1e-6 absolute.
        let exact = tmp.path().join(format!("{name}_f64.safetensors"));
        let mut args64 = args.clone();
        let at = args64.iter().position(|a| a == "--out").unwrap();
        args64[at + 1] = path_str(&exact).to_string();
        args64.extend(["--precision".into(), "f64".into()]);
        run_ok(&args64);
        let expected =
            weights::read_safetensors(&std::fs::read(dir.join("expected.safetensors")).unwrap())
                .unwrap();
        let exact = read_out(&exact);
        assert_eq!(
            exact.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{name}: the tensors written in f64"
        );
        for (key, t) in &exact {
            let w = worst(t, &expected[key]);
            assert!(w <= 1.0, "{name} {key} in f64: {w:.2} times the tolerance");
        }
        let torch =
            weights::read_safetensors(&std::fs::read(dir.join("pytorch_f32.safetensors")).unwrap())
                .unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{name}: the tensors written"
        );
        for (key, t) in &got {
            let w = worst(t, &expected[key]);
            let bound = if name == "layernorm_lstm" {
                worst(&torch[key], &expected[key]).max(1.0)
            } else {
                1.0
            };
            assert!(
                w <= bound,
                "{name} {key}: {w:.2} times the tolerance (bound {bound:.2})"
            );
        }
    }
}

#[test]
fn every_mistake_of_a_declaration_is_reported_on_its_own_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = model_file(
        &tmp,
        "bad.rnn",
        "cell C { input: 3, hiden: 4,\n  parm W: [hidden, input],\n  state h,\n  h = tanh(W @ x + V @ h) }\n",
    );
    let o = rnnc(&["inspect", path_str(&file)]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8(o.stderr).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    for (line, want) in lines.iter().zip([
        "1:20: unknown setting `hiden` for `cell`: did you mean `hidden`?",
        "2:3: unknown keyword `parm`: did you mean `param`?",
        "4:20: unknown name `V`",
    ]) {
        assert!(line.starts_with("rnnc: "), "{line}");
        assert!(line.contains(path_str(&file)), "{line}");
        assert!(line.contains(want), "`{want}` in {line}");
    }
}

#[test]
fn weights_of_another_model_without_model_are_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("w.safetensors");
    let mut t = BTreeMap::new();
    t.insert("W_l0".to_string(), Tensor::zeros(vec![4, 3]));
    std::fs::write(&w, weights::write_safetensors(&t).unwrap()).unwrap();
    let x = tmp.path().join("x.npy");
    std::fs::write(&x, npy::write_f32(&Tensor::zeros(vec![2, 1, 3]))).unwrap();
    let out = tmp.path().join("out.safetensors");
    let err = complaint(&[
        "run",
        "--weights",
        path_str(&w),
        "--input",
        path_str(&x),
        "--out",
        path_str(&out),
    ]);
    assert!(
        err.contains("missing tensor `weight_ih_l0` (a matrix)"),
        "{err}"
    );
    assert!(err.contains("give its `.rnn` file with `--model`"), "{err}");
}

#[test]
fn emit_prints_the_formatted_rust_a_macro_would_produce() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cells/min_gru.rnn");
    let o = rnnc(&["emit", path_str(&file)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let code = String::from_utf8(o.stdout).unwrap();
    // The model's name is the file's; the library call prints the same text.
    let program =
        rnn::Program::compile(&rnn::parse_str(&std::fs::read_to_string(&file).unwrap()).unwrap())
            .unwrap();
    assert_eq!(
        code.trim_end(),
        rnn::emit::rust(&program, "MinGru").unwrap().trim_end()
    );
    for part in [
        "pub struct MinGru {",
        "pub W_z_l0: [[f32; 5]; 8],",
        "pub struct MinGruState {",
        "pub fn step(&self, x: &[f32; 5], state: &mut MinGruState) -> [f32; 8]",
        "#[target_feature(enable = \"avx2,fma\")]",
    ] {
        assert!(code.contains(part), "`{part}` in:\n{code}");
    }

    // A standard cell by flags, named on the command line.
    let o = rnnc(&[
        "emit",
        "--cell",
        "lstm",
        "--input-size",
        "3",
        "--hidden-size",
        "4",
        "--layers",
        "2",
        "--name",
        "Encoder",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let code = String::from_utf8(o.stdout).unwrap();
    assert!(code.contains("pub struct Encoder {"), "{code}");
    assert!(code.contains("pub weight_hh_l1: [[f32; 4]; 16],"), "{code}");
}

#[test]
fn emit_prints_a_model_around_its_stack() {
    let dir = tempfile::tempdir().unwrap();
    let file = model_file(
        &dir,
        "char.rnn",
        "lstm CharLm { vocab: 7, input: 2, hidden: 3, head: 7 }",
    );
    let o = rnnc(&["emit", path_str(&file)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let code = String::from_utf8(o.stdout).unwrap();
    for part in [
        "pub struct CharLmStack {",
        "pub struct CharLm {",
        "pub rnn: CharLmStack,",
        "pub embedding_weight: [[f32; 2]; 7],",
        "pub fc_bias: [f32; 7],",
        "(\"rnn.weight_hh_l0\", self.rnn.weight_hh_l0.as_flattened()),",
        "::rnn::rt::compiled_model(",
    ] {
        assert!(code.contains(part), "`{part}` in:\n{code}");
    }
}

#[test]
fn emit_refuses_a_name_that_is_not_a_rust_identifier() {
    let err = complaint(&[
        "emit",
        "--cell",
        "gru",
        "--input-size",
        "3",
        "--hidden-size",
        "4",
        "--name",
        "2fast",
    ]);
    assert!(err.contains("`2fast` is not a Rust identifier"), "{err}");
}

#[test]
fn bench_runs_the_macro_backend_and_refuses_what_it_cannot_run() {
    let o = rnnc(&["bench", "W5", "--backend", "macro", "--reps", "1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
    assert_eq!(v["backend"], "macro");
    assert_eq!(v["workload"], "W5");
    let err = complaint(&["bench", "W6", "--backend", "macro"]);
    assert!(err.contains("the macro backend does not run W6"), "{err}");
    // The encoder-decoder runs on the `seq2seq!` model.
    let o = rnnc(&["bench", "W8", "--backend", "macro", "--reps", "1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
    assert_eq!(v["backend"], "macro");
    assert_eq!(v["workload"], "W8");
    let err = complaint(&["bench", "W5", "--backend", "macro", "--threads", "2"]);
    assert!(
        err.contains("the macro backend runs on one thread"),
        "{err}"
    );
}

#[test]
fn the_jit_refuses_f64_with_a_typed_complaint() {
    let s = Scratch::new();
    let mut args = s.args();
    args.extend(["--backend", "jit", "--precision", "f64"].map(String::from));
    let err = complaint(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("--precision"), "{err}");
    assert!(err.contains("float32"), "{err}");
}

#[test]
fn inspect_clif_prints_every_kernel_the_jit_compiles() {
    let o = rnnc(&[
        "inspect",
        "--cell",
        "lstm",
        "--input-size",
        "3",
        "--hidden-size",
        "4",
        "--clif",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    for plan in ["fwd", "train", "bwd"] {
        for part in ["pre", "step", "post"] {
            assert!(
                text.contains(&format!("; l0_{plan}_{part}\nfunction ")),
                "no CLIF of l0_{plan}_{part}"
            );
        }
    }
    // The step's gate math is vector code.
    assert!(text.contains("f32x4"));
}

/// Sets each `--flag value` pair of `pairs` in `args`: the value of a flag already there is
/// replaced (clap refuses most flags twice), a new flag is appended.
fn set_flags<'a>(args: &mut Vec<&'a str>, pairs: &[&'a str]) {
    for pair in pairs.chunks(2) {
        match args.iter().position(|a| *a == pair[0]) {
            Some(at) => args[at + 1] = pair[1],
            None => args.extend_from_slice(pair),
        }
    }
}

/// `rnnc seq2seq` on the shared fixture with `extra` flags, writing to `out`.
fn seq2seq_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let dir = fixtures().join("seq2seq_greedy");
    let mut args: Vec<String> = [
        "seq2seq",
        "--weights",
        path_str(&dir.join("weights.safetensors")),
        "--src",
        path_str(&dir.join("src.npy")),
        "--steps",
        "5",
        "--sos",
        "1",
        "--out",
        path_str(out),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn rnnc_seq2seq_decodes_the_fixture_to_pytorchs_tokens_on_every_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = std::fs::read(fixtures().join("seq2seq_greedy/expected_tokens.npy")).unwrap();
    let (shape, want) = npy::read_i64(&expected).unwrap();
    for extra in [
        vec!["--backend", "interp"],
        vec!["--backend", "jit"],
        vec!["--backend", "jit", "--beam", "1"],
        vec!["--beam", "1", "--length-penalty", "0"],
    ] {
        let out = tmp.path().join("tokens.npy");
        let args = seq2seq_args(&out, &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = rnnc(&args);
        assert!(
            o.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (got_shape, got) = npy::read_i64(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!((got_shape, got), (shape.clone(), want.clone()), "{extra:?}");
    }
    // A wider beam writes tokens of the same shape, ending in the end token once produced.
    let out = tmp.path().join("beam.npy");
    let args = seq2seq_args(&out, &["--beam", "4", "--eos", "21", "--backend", "jit"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = rnnc(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (got_shape, got) = npy::read_i64(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(got_shape, shape);
    for row in got.chunks(5) {
        if let Some(first) = row.iter().position(|&t| t == 21) {
            assert!(row[first..].iter().all(|&t| t == 21), "{row:?}");
        }
    }
}

#[test]
fn rnnc_seq2seq_bad_inputs_exit_2_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.npy");
    let bad_src = tmp.path().join("bad_src.npy");
    std::fs::write(&bad_src, npy::write_i64(&[2, 3], &[1, 2, 3, 4, 50, 6])).unwrap();
    let empty_src = tmp.path().join("empty.npy");
    std::fs::write(&empty_src, npy::write_i64(&[2, 0], &[])).unwrap();
    let vector_src = tmp.path().join("vector.npy");
    std::fs::write(&vector_src, npy::write_i64(&[3], &[1, 2, 3])).unwrap();
    let lstm = fixtures().join("lstm_basic/weights.safetensors");
    let src_flag = |p: &Path| vec!["--src".to_string(), path_str(p).to_string()];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--sos".into(), "60".into()],
            "--sos: `sos` holds the token id 60",
        ),
        (
            vec!["--eos".into(), "-2".into()],
            "--eos: `eos` holds the token id -2",
        ),
        (
            vec!["--beam".into(), "0".into()],
            "--beam: the beam width must be in 1 ..= 16777216",
        ),
        (
            vec![
                "--beam".into(),
                "2".into(),
                "--length-penalty".into(),
                "-1".into(),
            ],
            "--length-penalty",
        ),
        (
            src_flag(&bad_src),
            "holds the token id 50 at flat index 4, outside the vocabulary of 50",
        ),
        (src_flag(&empty_src), "hold no token"),
        (
            src_flag(&vector_src),
            "the source must be token ids (batch, src_len)",
        ),
        (
            vec!["--weights".into(), path_str(&lstm).into()],
            "missing tensor `encoder.embedding.weight`",
        ),
        (
            vec![
                "--out".into(),
                path_str(&fixtures().join("seq2seq_greedy/src.npy")).into(),
            ],
            "would overwrite an input",
        ),
    ];
    for (extra, message) in cases {
        // A later flag replaces an earlier one of the same name only for --src/--weights/--out,
        // which clap refuses to repeat: build the argument list with the replacement in place.
        let args = seq2seq_args(&out, &[]);
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        set_flags(&mut args, &extra);
        let o = rnnc(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// `rnnc train` with `args` (strings) and `--quiet`.
fn train(args: &[&str]) -> Output {
    let mut all = vec!["train", "--quiet"];
    all.extend_from_slice(args);
    rnnc(&all)
}

#[test]
fn rnnc_train_resumes_from_a_checkpoint_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for (task, backend, extra) in [
        (
            "reverse",
            "interp",
            vec!["--attention", "additive", "--bidirectional"],
        ),
        ("copy", "jit", vec!["--cell", "gru"]),
        ("charlm", "jit", vec!["--seq-len", "16"]),
        // The attention in the decoder's step.
        (
            "reverse",
            "jit",
            vec!["--attention", "general", "--attention-placement", "input"],
        ),
    ] {
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
        let mut common = vec![
            "--task",
            task,
            "--backend",
            backend,
            "--hidden",
            "16",
            "--embedding",
            "8",
            "--min-len",
            "2",
            "--max-len",
            "5",
            "--batch",
            "4",
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--checkpoint-every",
            "10",
            "--sample-len",
            "20",
        ];
        if task == "charlm" {
            common.retain(|&s| !["--min-len", "2", "--max-len", "5"].contains(&s));
        }
        common.extend(extra.iter().copied());
        let whole = [common.clone(), vec!["--out", path_str(&a)]].concat();
        let o = train(&whole);
        assert!(
            o.status.success(),
            "{task}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ckpt = a.join("checkpoint-10.safetensors");
        let resumed = [
            common.clone(),
            vec!["--out", path_str(&b), "--resume", path_str(&ckpt)],
        ]
        .concat();
        let o = train(&resumed);
        assert!(
            o.status.success(),
            "{task}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let full = std::fs::read(a.join("checkpoint-20.safetensors")).unwrap();
        let again = std::fs::read(b.join("checkpoint-20.safetensors")).unwrap();
        assert!(
            full == again,
            "{task} on {backend}: the resumed run's checkpoint differs"
        );
        // The loss log: a header and a line per step; the resumed one continues at step 11
        // with the whole run's numbers (the seconds column aside).
        let log = std::fs::read_to_string(a.join("loss.csv")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 21, "{log}");
        assert!(lines[0].starts_with("step,loss,grad_norm,"));
        let resumed_log = std::fs::read_to_string(b.join("loss.csv")).unwrap();
        let strip = |l: &str| l.rsplit_once(',').unwrap().0.to_string();
        let tail: Vec<String> = resumed_log.lines().skip(1).map(strip).collect();
        assert_eq!(
            resumed_log.lines().next(),
            lines.first().copied(),
            "the header"
        );
        let whole_tail: Vec<String> = lines[11..].iter().map(|l| strip(l)).collect();
        assert_eq!(tail, whole_tail, "{task}");
        if task == "charlm" {
            assert!(a.join("samples-20.txt").exists());
        }
    }
}

#[test]
fn rnnc_train_bad_inputs_exit_2_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let small = [
        "--hidden",
        "8",
        "--embedding",
        "4",
        "--steps",
        "4",
        "--batch",
        "2",
        "--max-len",
        "4",
        "--min-len",
        "2",
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["--task", "reverse", "--out", path_str(&out)];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        train(&args)
    };
    let o = run(&["--checkpoint-every", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = out.join("checkpoint-2.safetensors");
    let not_utf8 = tmp.path().join("bad.txt");
    std::fs::write(&not_utf8, [0xff, 0xfe, 0x00]).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "loss.csv: exists"),
        (
            vec![
                "--resume".into(),
                path_str(&ckpt).into(),
                "--steps".into(),
                "2".into(),
            ],
            "`--steps` must be more",
        ),
        (
            vec![
                "--resume".into(),
                path_str(&ckpt).into(),
                "--hidden".into(),
                "9".into(),
            ],
            "checkpoint",
        ),
        (
            vec![
                "--resume".into(),
                path_str(&ckpt).into(),
                "--lr".into(),
                "0.01".into(),
            ],
            "learning rate differs",
        ),
        (
            vec![
                "--resume".into(),
                path_str(&ckpt).into(),
                "--seed".into(),
                "7".into(),
            ],
            "had `seed` 0, these flags give 7",
        ),
        (
            vec![
                "--resume".into(),
                path_str(&ckpt).into(),
                "--batch".into(),
                "3".into(),
            ],
            "had `batch` 2, these flags give 3",
        ),
        (
            vec!["--resume".into(), path_str(&ckpt).into()],
            "already records step 4, past the checkpoint's step 2",
        ),
        (
            vec!["--batch".into(), "16777217".into()],
            "--batch: a batch of 16777217",
        ),
        (vec!["--lr".into(), "0".into()], "--lr"),
        (vec!["--clip".into(), "-1".into()], "--clip"),
        (
            vec!["--min-len".into(), "5".into()],
            "lengths 1 <= min <= max",
        ),
        (
            vec!["--text".into(), path_str(&not_utf8).into()],
            "only `--task charlm` reads a text",
        ),
        (
            vec!["--attention-placement".into(), "input".into()],
            "--attention-placement: it places an attention",
        ),
    ];
    for (extra, message) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        // A later flag replaces the earlier one of the same name.
        let mut args = vec!["--task", "reverse", "--out", path_str(&out)];
        let mut base: Vec<&str> = small.to_vec();
        set_flags(&mut base, &extra);
        args.extend(base);
        let o = train(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
    }
    // A text that is not UTF-8, and the encoder's options on a language model.
    let o = train(&[
        "--task",
        "charlm",
        "--out",
        path_str(&tmp.path().join("lm")),
        "--text",
        path_str(&not_utf8),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not UTF-8"));
    let o = train(&[
        "--task",
        "charlm",
        "--out",
        path_str(&tmp.path().join("lm")),
        "--attention",
        "dot",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no encoder"));
}

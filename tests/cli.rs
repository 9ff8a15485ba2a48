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
    for name in rnn_cases() {
        let case = Case::load(&name);
        let out = tmp.path().join(format!("{name}.safetensors"));
        let args = run_args(&case, &out);
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
    let file = tmp.path().join("enc.rnn");
    std::fs::write(
        &file,
        "lstm Encoder { input: 128, hidden: 256, layers: 2, bidirectional: true }",
    )
    .unwrap();
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
    fn run(&self, extra: &[&str]) -> String {
        let mut args = self.args();
        args.extend(extra.iter().map(|s| s.to_string()));
        complaint(&args.iter().map(String::as_str).collect::<Vec<_>>())
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
    let ratio = v["gflops"].as_f64().unwrap() / v["limit_fraction"].as_f64().unwrap();
    assert!(
        (ratio - 103.0).abs() < 0.5,
        "limit_fraction is gflops / 103: {text}"
    );
}

#[test]
fn bench_rejects_an_unknown_workload() {
    let err = complaint(&["bench", "W9"]);
    assert!(
        err.contains("unknown workload `W9`: expected W1 … W6"),
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

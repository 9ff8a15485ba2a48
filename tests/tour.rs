//! `rnnc tour --quick`: every section produces its numbers and its plots, the numbers come
//! from the seed (another seed, other numbers), and the report folder never overwrites what
//! the tour did not write.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

const SECTIONS: [&str; 8] = [
    "cell",
    "gradients",
    "properties",
    "bidirectional",
    "seq2seq",
    "sequential",
    "packing",
    "charlm",
];

fn tour(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rnnc"))
        .arg("tour")
        .args(args)
        .output()
        .expect("rnnc runs")
}

/// Runs the quick tour with `seed` into `out` and returns its summary.
fn quick(seed: u64, out: &Path) -> Value {
    let o = tour(&[
        "--quick",
        "--quiet",
        "--seed",
        &seed.to_string(),
        "--out",
        out.to_str().expect("a UTF-8 path"),
    ]);
    assert!(
        o.status.success(),
        "the tour failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    for s in SECTIONS {
        assert!(stdout.contains(s), "the summary table names {s}:\n{stdout}");
    }
    let text = std::fs::read_to_string(out.join("summary.json")).expect("a summary");
    serde_json::from_str(&text).expect("the summary is JSON")
}

/// The numbers of `section` in a summary.
fn numbers<'a>(summary: &'a Value, section: &str) -> &'a serde_json::Map<String, Value> {
    summary["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .find(|s| s["section"] == section)
        .unwrap_or_else(|| panic!("section {section} is in the summary"))["numbers"]
        .as_object()
        .expect("numbers")
}

/// Whether a summary number is a timing (or made from timings), which changes from run to run
/// whatever the seed.
fn is_timing(key: &str) -> bool {
    key.ends_with("_ms")
        || key.ends_with("_us_per_step")
        || key.ends_with("_ratio")
        || key.starts_with("saved_")
        || key.starts_with("mean_saved")
}

#[test]
fn every_section_measures_and_plots_and_another_seed_measures_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let one = quick(1, &a);
    let two = quick(2, &b);
    let report = std::fs::read_to_string(a.join("report.md")).unwrap();
    for s in SECTIONS {
        let entry = one["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["section"] == s)
            .unwrap();
        // Its verdict and backend, and the report's section with the claim and the verdict.
        assert!(["holds", "partly", "differs"].contains(&entry["verdict"].as_str().unwrap()));
        assert!(!entry["backend"].as_str().unwrap().is_empty());
        assert!(
            report.contains(&format!("<a id=\"{s}\"></a>")),
            "{s} in the report"
        );
        // Its plots: PNG files, linked from the report.
        let plots = entry["plots"].as_array().unwrap();
        assert!(!plots.is_empty(), "{s} drew a plot");
        for p in plots {
            let p = p.as_str().unwrap();
            let bytes = std::fs::read(a.join(p)).unwrap();
            assert!(bytes.len() > 5_000, "{p} is a picture, not an empty file");
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{p} is a PNG");
            assert!(report.contains(&format!("]({p})")), "the report shows {p}");
        }
        // Its numbers: not the same under another seed. Timings differ from run to run
        // anyway, so only the numbers the seed decides count here.
        let (x, y) = (numbers(&one, s), numbers(&two, s));
        assert!(!x.is_empty(), "{s} measured numbers");
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            y.keys().collect::<Vec<_>>(),
            "{s}: the same numbers under both seeds"
        );
        let seeded: Vec<&String> = x.keys().filter(|k| !is_timing(k)).collect();
        assert!(!seeded.is_empty(), "{s} has numbers that are not timings");
        assert!(
            seeded.iter().any(|k| y[k.as_str()] != x[k.as_str()]),
            "{s}: another seed changes some number that is not a timing: {seeded:?}"
        );
    }
    // The seed decides the numbers that are not timings: the same seed, the same numbers.
    let again = quick(1, &a);
    for key in ["h_norm_step_0", "jit_agreement"] {
        assert_eq!(numbers(&one, "cell")[key], numbers(&again, "cell")[key]);
    }
    assert_eq!(
        numbers(&one, "gradients")["rnn_grad_t0"],
        numbers(&again, "gradients")["rnn_grad_t0"]
    );
    assert_ne!(
        numbers(&one, "gradients")["rnn_grad_t0"],
        numbers(&two, "gradients")["rnn_grad_t0"]
    );
}

#[test]
fn only_runs_the_sections_named_by_name_or_number() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let o = tour(&[
        "--quick",
        "--quiet",
        "--only",
        "2,gradients",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let names: Vec<&str> = summary["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["section"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cell", "gradients"]);
}

#[test]
fn bad_input_is_a_clear_error_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    // An unknown section.
    let o = tour(&["--only", "attention"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown section `attention`") && err.contains("bidirectional"),
        "{err}"
    );
    // A folder holding the user's files.
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("report.md"), "my notes").unwrap();
    let o = tour(&["--quick", "--quiet", "--out", mine.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("was not written by the tour"), "{err}");
    assert_eq!(
        std::fs::read_to_string(mine.join("report.md")).unwrap(),
        "my notes"
    );
    // A folder an earlier tour wrote: its report is replaced, a file of the user's stays.
    let earlier = dir.path().join("earlier");
    let o = tour(&[
        "--quick",
        "--quiet",
        "--only",
        "2",
        "--out",
        earlier.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    std::fs::write(earlier.join("my-plot.png"), "mine").unwrap();
    let o = tour(&[
        "--quick",
        "--quiet",
        "--only",
        "3",
        "--out",
        earlier.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(earlier.join("my-plot.png")).unwrap(),
        "mine"
    );
    assert!(
        !earlier.join("cell_state_norms.png").exists(),
        "the old run's plot went"
    );
    assert!(earlier.join("gradients.png").exists());
    // A file where the folder should be.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = tour(&["--quick", "--quiet", "--out", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a folder"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

//! The workloads W1–W6 (`docs/workloads.md`) as a bench binary: `cargo bench --bench workloads -- [W1 ...] [--threads N] [--reps N]`.
//!
//! Prints one JSON object per workload (the format of `rnnc bench --json`). Timing happens here
//! and in `rnnc bench`, never in tests.

use rnn::bench::{WORKLOADS, measure, workload};

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let (mut names, mut threads, mut reps) = (Vec::new(), 1, 5);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(5),
            _ => names.push(a),
        }
    }
    let chosen: Vec<_> = if names.is_empty() {
        WORKLOADS.to_vec()
    } else {
        names.iter().filter_map(|n| workload(n)).collect()
    };
    for w in chosen {
        match measure(w, "interp", threads, reps) {
            Ok(m) => println!("{}", m.json()),
            Err(e) => eprintln!("{}: {e}", w.id),
        }
    }
}

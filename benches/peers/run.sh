#!/usr/bin/env bash
# Times our backends (`rnnc bench`) and the peer libraries (`peers`) on W1–W6 in one go, collects
# every JSON line into one file and prints a Markdown table. Run it from the repository root:
#
#   bash benches/peers/run.sh [--reps N] [--threads N] [--out FILE] [--onnx DIR]
#
# Environment:
#   BACKENDS    our backends to time, in order (default "jit macro interp"; the first one
#               present is what the ratio column compares with: "jit" unless you drop it)
#   PEERS_LIBS  the peers' --libs (default: all of candle, burn, burn-flex, tract)
#   PYTHON      the python3 with torch and onnx that writes tract's ONNX models when --onnx is
#               not given (default python3; without torch, tract's workloads are reported
#               unsupported)
#   PEERS_BIN   a built peers binary to use instead of `cargo run --release` (which honours
#               CARGO_TARGET_DIR)
#   NICE        a prefix for every timed command, e.g. "nice -n 19" (default none)
set -euo pipefail

reps=10
threads=1
out=target/peers/bench.jsonl
onnx=""
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) reps="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --onnx) onnx="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

if [ ! -f Cargo.toml ] || [ ! -d benches/peers ]; then
    echo "run.sh: run it from the repository root" >&2
    exit 2
fi
read -r -a nice_prefix <<< "${NICE:-}"

rnnc=./target/release/rnnc
if [ ! -x "$rnnc" ]; then
    echo "run.sh: building rnnc (cargo build --release)" >&2
    cargo build --release --bin rnnc
fi

# tract's models.
if [ -z "$onnx" ]; then
    onnx=$(mktemp -d)
    trap 'rm -rf "$onnx"' EXIT
    if ! "${PYTHON:-python3}" benches/peers/make_onnx.py "$onnx" >&2; then
        echo "run.sh: could not write the ONNX models (torch and onnx needed): tract will be reported unsupported" >&2
    fi
fi

mkdir -p "$(dirname "$out")"
: > "$out"
started=$(date -u '+%Y-%m-%d %H:%M:%S UTC')

for backend in ${BACKENDS:-jit macro interp}; do
    workloads="W1 W2 W3 W4 W5 W6"
    if [ "$backend" = macro ]; then
        # The macro backend runs the recurrent models only (W6 is a Linear layer), on one thread.
        workloads="W1 W2 W3 W4 W5"
        if [ "$threads" != 1 ]; then
            echo "run.sh: skipping macro (one thread only)" >&2
            continue
        fi
    fi
    echo "run.sh: rnnc bench --backend $backend" >&2
    # shellcheck disable=SC2086 # the workload list splits on purpose
    "${nice_prefix[@]}" "$rnnc" bench --json --backend "$backend" --threads "$threads" --reps "$reps" $workloads \
        | grep '^{' >> "$out"
done

echo "run.sh: peers" >&2
peers_args=(--reps "$reps" --threads "$threads" --onnx "$onnx")
[ -n "${PEERS_LIBS:-}" ] && peers_args+=(--libs "$PEERS_LIBS")
if [ -n "${PEERS_BIN:-}" ]; then
    "${nice_prefix[@]}" "$PEERS_BIN" "${peers_args[@]}" | grep '^{' >> "$out"
else
    "${nice_prefix[@]}" cargo run --quiet --release --manifest-path benches/peers/Cargo.toml -- "${peers_args[@]}" \
        | grep '^{' >> "$out"
fi

model=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
cores=$(nproc 2>/dev/null || echo '?')
echo "run.sh: $(wc -l < "$out") results in $out" >&2

python3 - "$out" "$started" "${model:-unknown CPU}" "$cores" "$threads" "$reps" <<'EOF'
import json
import sys

path, started, model, cores, threads, reps = sys.argv[1:]
LIMIT = 103.0
ORDER = ["W1", "W2", "W3", "W4", "W5", "W6"]
NAMES = {
    "W1": "lstm_fwd_seed",
    "W2": "lstm_train_seed",
    "W3": "gru_stream",
    "W4": "lstm_stream",
    "W5": "rnn_vanish",
    "W6": "linear_seed",
}

rows = []
with open(path) as f:
    for line in f:
        line = line.strip()
        if line:
            rows.append(json.loads(line))
rows = [r for r in rows if r.get("workload") in ORDER]

# The reference of the ratio column: our JIT, else the first backend of the file.
ours = [r["backend"] for r in rows if "median_s" in r]
ref_backend = "jit" if "jit" in ours else (ours[0] if ours else None)
ref = {
    r["workload"]: r["median_s"]
    for r in rows
    if r["backend"] == ref_backend and "median_s" in r
}

print(f"Measured {started} on {model} ({cores} cores), {threads} thread(s), {reps} timed repetitions after one warm-up.")
print()
print(f"| workload | backend | median | GFLOP/s | of {LIMIT:g} GFLOP/s | × {ref_backend} median |")
print("| --- | --- | ---: | ---: | ---: | ---: |")


def fmt_time(w, s):
    if w in ("W3", "W4"):
        return f"{s * 1e6:.2f} µs/step"
    return f"{s * 1e3:.3f} ms"


for w in ORDER:
    for r in (r for r in rows if r["workload"] == w):
        name = f"{w} {NAMES[w]}"
        if "median_s" not in r:
            why = r.get("unsupported", "not run").replace("|", "\\|")
            print(f"| {name} | {r['backend']} | unsupported: {why} | | | |")
            continue
        m = r["median_s"]
        ratio = f"{m / ref[w]:.2f}" if w in ref else ""
        print(
            f"| {name} | {r['backend']} | {fmt_time(w, m)} | {r['gflops']:.2f} | "
            f"{r['gflops'] / LIMIT:.3f} | {ratio} |"
        )
EOF

//! The attention ops' kernels: each row of a batch against its sequence's memory.
//!
//! A memory is `S × B` rows of `n` (position `p` of sequence `b` is row `p · B + b`); pairs are
//! `rows × S` rows of `n` (row `r`'s position `p` is row `r · S + p`); row `r` of a batch belongs
//! to sequence `r % B` (rows are time-major: step `t`'s rows are `t · B ..`). Sums are in `f64`,
//! in a fixed order.

use super::Extent;
use crate::graph::Op;
use crate::tensor::Real;

/// Evaluates attention op `op` into `out` from dense `args`, for `rows` batch rows.
pub fn eval<T: Real>(
    op: Op,
    out: &mut [T],
    args: &[&[T]],
    widths: &[usize],
    rows: usize,
    e: &Extent<'_>,
) {
    let (s, b) = (e.positions, e.batch);
    let seq = |r: usize| r % b;
    match op {
        Op::MemoryToPairs => {
            let n = widths[0];
            for r in 0..rows {
                for p in 0..s {
                    let m = (p * b + seq(r)) * n;
                    let o = (r * s + p) * n;
                    out[o..o + n].copy_from_slice(&args[0][m..m + n]);
                }
            }
        }
        Op::PairsToMemory => {
            let n = widths[0];
            let mut acc = vec![0.0f64; s * b * n];
            for r in 0..rows {
                for p in 0..s {
                    let m = (p * b + seq(r)) * n;
                    let i = (r * s + p) * n;
                    for (a, &x) in acc[m..m + n].iter_mut().zip(&args[0][i..i + n]) {
                        *a += x.to_f64();
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = T::from_f64(a);
            }
        }
        Op::SpreadPositions => {
            let n = widths[0];
            for r in 0..rows {
                for p in 0..s {
                    let o = (r * s + p) * n;
                    out[o..o + n].copy_from_slice(&args[0][r * n..(r + 1) * n]);
                }
            }
        }
        Op::SumPositions => {
            let n = widths[0];
            for r in 0..rows {
                let mut acc = vec![0.0f64; n];
                for p in 0..s {
                    let i = (r * s + p) * n;
                    for (a, &x) in acc.iter_mut().zip(&args[0][i..i + n]) {
                        *a += x.to_f64();
                    }
                }
                for (o, a) in out[r * n..(r + 1) * n].iter_mut().zip(acc) {
                    *o = T::from_f64(a);
                }
            }
        }
        Op::PairDot => {
            let n = widths[0];
            for r in 0..rows {
                let q = &args[1][r * n..(r + 1) * n];
                for p in 0..s {
                    let m = (p * b + seq(r)) * n;
                    let dot: f64 = args[0][m..m + n]
                        .iter()
                        .zip(q)
                        .map(|(&x, &y)| x.to_f64() * y.to_f64())
                        .sum();
                    out[r * s + p] = T::from_f64(dot);
                }
            }
        }
        Op::Context => {
            let n = widths[1];
            for r in 0..rows {
                let mut acc = vec![0.0f64; n];
                for p in 0..s {
                    let a = args[0][r * s + p].to_f64();
                    let m = (p * b + seq(r)) * n;
                    for (c, &x) in acc.iter_mut().zip(&args[1][m..m + n]) {
                        *c += a * x.to_f64();
                    }
                }
                for (o, c) in out[r * n..(r + 1) * n].iter_mut().zip(acc) {
                    *o = T::from_f64(c);
                }
            }
        }
        Op::ContextT => {
            let n = widths[1];
            let mut acc = vec![0.0f64; s * b * n];
            for r in 0..rows {
                let d = &args[1][r * n..(r + 1) * n];
                for p in 0..s {
                    let a = args[0][r * s + p].to_f64();
                    let m = (p * b + seq(r)) * n;
                    for (y, &x) in acc[m..m + n].iter_mut().zip(d) {
                        *y += a * x.to_f64();
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = T::from_f64(a);
            }
        }
        Op::SoftmaxPositions => {
            for r in 0..rows {
                let len = e.lengths.map_or(s, |l| l[seq(r)].min(s));
                let x = &args[0][r * s..(r + 1) * s];
                let m = x[..len]
                    .iter()
                    .map(|v| v.to_f64())
                    .fold(
                        f64::NEG_INFINITY,
                        |m, v| if v > m || v.is_nan() { v } else { m },
                    );
                let sum: f64 = x[..len].iter().map(|v| (v.to_f64() - m).exp()).sum();
                for p in 0..s {
                    out[r * s + p] = if p < len {
                        T::from_f64((x[p].to_f64() - m).exp() / sum)
                    } else {
                        T::ZERO
                    };
                }
            }
        }
        _ => unreachable!("only attention ops come here"),
    }
}

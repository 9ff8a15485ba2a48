//! The products and reductions emitted code calls, with the sizes as constants: a matrix times
//! a batch of rows (`x · Wᵀ`), its transpose (`d · W`), the weight gradient (`Σ dᵀ x`) and
//! row and feature sums.
//!
//! One row (the streaming step, a batch of one) runs an explicit 256-bit AVX2 + FMA kernel
//! behind [`Isa::Avx2`] and [`Isa::Avx512`], or a portable loop with the same order of summation
//! behind [`Isa::Portable`]; the SIMD kernel and the portable loop differ only by FMA's single
//! rounding. Several rows go to the `gemm` crate (feature `std`; without it, one row at a time),
//! which chooses its own instruction set whatever the path, except products of at most 512 rows
//! of a weight [`pack`]ed for them on the AVX-512 path (a step of a batch): an explicit 512-bit
//! kernel over 32-output panels ([`matmul_packed`]).
//!
//! PyTorch stores a weight `(out, in)` row-major. `x · Wᵀ` is then a dot product per output
//! (rows of `W` are contiguous): the AVX2 kernel takes four outputs at a time, eight lanes of
//! the input each, so every weight is read once per row of `x`, in order (the streaming step is
//! bound by reading the weights).

use super::Isa;

/// `y[r] = W · x[r]` for `rows` rows: `W` is `O × I` row-major, row `r` of `x` starts at
/// `r · xs`, of `y` at `r · ys`.
#[inline]
pub fn matmul<const O: usize, const I: usize>(
    isa: Isa,
    rows: usize,
    w: &[f32],
    x: &[f32],
    xs: usize,
    y: &mut [f32],
    ys: usize,
) {
    let w = &w[..O * I];
    #[cfg(feature = "std")]
    if rows > 1 {
        gemm(y, ys, rows, O, mat(x, rows, I, xs), mat(w, O, I, I).t());
        return;
    }
    for r in 0..rows {
        let x = &x[r * xs..][..I];
        let y = &mut y[r * ys..][..O];
        matvec::<O, I>(isa, w, x, y);
    }
}

/// A weight the plan reads as `(in, out)` (`WeightLayout::InOut` of `rnn_ir::plan`), copied
/// once per sequence by [`pack`] for [`matmul_packed`]. Give its buffer back with
/// [`recycle`](super::recycle).
#[cfg(feature = "std")]
#[derive(Debug, Default)]
pub struct Packed {
    /// The copy: empty (products of one row read `W` as stored), `Wᵀ` (`I × O` row-major), or
    /// `Wᵀ` in panels of [`PANEL`] outputs (see [`pack`]).
    pub buffer: std::vec::Vec<f32>,
    /// Whether `buffer` holds panels.
    panels: bool,
}

/// The outputs of one panel of a packed weight: two 512-bit vectors.
#[cfg(feature = "std")]
pub use rnn_ir::panels::PANEL;

/// Products of at most this many rows read panels (a batch's step); more (all steps' rows at
/// once) go to the `gemm` crate, which blocks the rows for the caches. The choice is made once
/// per packed weight, from the most rows any of its products runs over.
#[cfg(feature = "std")]
const PANEL_ROWS: usize = 512;

/// `W` (`O × I`, PyTorch's layout) copied for products over `rows` rows at a time on `isa`:
/// - one row: nothing (the single-row kernel reads `W`);
/// - AVX-512 and at most 512 rows (a step of a batch): `Wᵀ` in panels of 32 outputs, panel `j`
///   holding outputs `32j .. 32j + 32` of every input contiguously (`I × 32`, zero past `O`).
///   The kernel keeps eight rows × 32 outputs in sixteen registers and reads each panel once
///   per eight rows, in order. Measured on W1's recurrent product (32 rows, 256 → 1024, one
///   thread): 63 µs, against 80 µs for the `gemm` crate on `Wᵀ` and 137 µs on `W` (which it
///   packs again at every call);
/// - otherwise `Wᵀ` (`I × O` row-major) for the `gemm` crate, which then packs nothing (all
///   of W1's 16,384 rows: 35 ms against 43 ms on `W`).
#[cfg(feature = "std")]
pub fn pack<const O: usize, const I: usize>(isa: Isa, rows: usize, w: &[f32]) -> Packed {
    if rows <= 1 {
        return Packed::default();
    }
    let w = &w[..O * I];
    if isa == Isa::Avx512 && rows <= PANEL_ROWS && super::supports(Isa::Avx512) {
        let mut buffer = super::zeros(rnn_ir::panels::panels_len(O, I));
        rnn_ir::panels::pack_panels(O, I, w, &mut buffer);
        return Packed {
            buffer,
            panels: true,
        };
    }
    let mut wt = super::zeros(O * I);
    rnn_ir::panels::transpose(O, I, w, &mut wt);
    Packed {
        buffer: wt,
        panels: false,
    }
}

/// [`matmul`] with the weight also given as [`pack`] copied it for as many rows or more.
#[cfg(feature = "std")]
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn matmul_packed<const O: usize, const I: usize>(
    isa: Isa,
    rows: usize,
    w: &[f32],
    wt: &Packed,
    x: &[f32],
    xs: usize,
    y: &mut [f32],
    ys: usize,
) {
    if rows <= 1 || wt.buffer.is_empty() {
        matmul::<O, I>(isa, rows, w, x, xs, y, ys);
        return;
    }
    if wt.panels {
        // `pack` makes panels only when the CPU has AVX-512F.
        rnn_ir::panels::matmul_panels(O, I, rows, &wt.buffer, x, xs, y, ys);
        return;
    }
    gemm(
        y,
        ys,
        rows,
        O,
        mat(x, rows, I, xs),
        mat(&wt.buffer, I, O, O),
    );
}

/// `y = W · x` for one row.
#[inline(always)]
fn matvec<const O: usize, const I: usize>(isa: Isa, w: &[f32], x: &[f32], y: &mut [f32]) {
    match isa {
        // `Isa` is a plain enum anyone can name, so the AVX2 kernel runs only when this CPU was
        // detected to have AVX2 and FMA (one relaxed atomic load); otherwise the portable one.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supports` reports AVX2 only when the CPU has AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512 if super::supports(Isa::Avx2) => unsafe {
            avx2::matvec::<O, I>(w, x, y)
        },
        _ => portable::matvec::<O, I>(w, x, y),
    }
}

/// `y[r] = d[r] · W` for `rows` rows (`W` is `O × I`; `y` has `I` features): the product that
/// carries a gradient back through `W · x`.
#[inline]
pub fn matmul_t<const O: usize, const I: usize>(
    isa: Isa,
    rows: usize,
    w: &[f32],
    d: &[f32],
    ds: usize,
    y: &mut [f32],
    ys: usize,
) {
    let w = &w[..O * I];
    #[cfg(feature = "std")]
    if rows > 1 {
        gemm(y, ys, rows, I, mat(d, rows, O, ds), mat(w, O, I, I));
        return;
    }
    let _ = isa;
    for r in 0..rows {
        let d = &d[r * ds..][..O];
        let y = &mut y[r * ys..][..I];
        y.fill(0.0);
        for (o, &s) in d.iter().enumerate() {
            let w = &w[o * I..][..I];
            for i in 0..I {
                y[i] += s * w[i];
            }
        }
    }
}

/// `y = Σ_r d[r]ᵀ · x[r]` (`O × I`, overwritten): a weight's gradient summed over `rows` rows.
#[inline]
pub fn outer_sum<const O: usize, const I: usize>(
    isa: Isa,
    rows: usize,
    d: &[f32],
    ds: usize,
    x: &[f32],
    xs: usize,
    y: &mut [f32],
) {
    let y = &mut y[..O * I];
    #[cfg(feature = "std")]
    if rows > 1 {
        gemm(y, I, O, I, mat(d, rows, O, ds).t(), mat(x, rows, I, xs));
        return;
    }
    let _ = isa;
    y.fill(0.0);
    for r in 0..rows {
        let d = &d[r * ds..][..O];
        let x = &x[r * xs..][..I];
        for (o, &s) in d.iter().enumerate() {
            let y = &mut y[o * I..][..I];
            for i in 0..I {
                y[i] += s * x[i];
            }
        }
    }
}

/// `rows × cols` elements of `data`, rows `stride` apart.
#[cfg(feature = "std")]
fn mat(data: &[f32], rows: usize, cols: usize, stride: usize) -> rnn_ir::tensor::MatRef<'_, f32> {
    rnn_ir::tensor::MatRef {
        data,
        rows,
        cols,
        row_stride: stride,
        col_stride: 1,
    }
}

/// `y = a · b` (`rows × cols`, rows `ys` apart) by the `gemm` crate, on one thread.
#[cfg(feature = "std")]
fn gemm(
    y: &mut [f32],
    ys: usize,
    rows: usize,
    cols: usize,
    a: rnn_ir::tensor::MatRef<'_, f32>,
    b: rnn_ir::tensor::MatRef<'_, f32>,
) {
    let dst = rnn_ir::tensor::MatMut {
        data: y,
        rows,
        cols,
        row_stride: ys,
    };
    rnn_ir::tensor::matmul(dst, a, b, false, 1, false);
}

/// `y = Σ_r a[r]` (`N` features), accumulated in `f64` as the interpreter does (a bias
/// gradient sums a whole sequence's rows).
#[inline]
pub fn sum_rows<const N: usize>(rows: usize, a: &[f32], stride: usize, y: &mut [f32]) {
    const BLOCK: usize = 64;
    let y = &mut y[..N];
    for (b, out) in y.chunks_mut(BLOCK).enumerate() {
        let start = b * BLOCK;
        let mut acc = [0.0f64; BLOCK];
        for r in 0..rows {
            let row = &a[r * stride + start..][..out.len()];
            for (s, &x) in acc.iter_mut().zip(row) {
                *s += x as f64;
            }
        }
        for (o, &s) in out.iter_mut().zip(&acc) {
            *o = s as f32;
        }
    }
}

/// The sum of one row's `N` features, accumulated in `f64` (a layer norm's statistics).
#[inline]
pub fn sum_features<const N: usize>(a: &[f32]) -> f32 {
    let mut sum = 0.0f64;
    for &x in &a[..N] {
        sum += x as f64;
    }
    sum as f32
}

/// The portable kernels: plain loops in the AVX2 kernels' order of summation.
mod portable {
    /// Lanes of the AVX2 kernel, mirrored so both paths sum in the same order.
    const LANES: usize = 8;

    #[inline(always)]
    pub fn matvec<const O: usize, const I: usize>(w: &[f32], x: &[f32], y: &mut [f32]) {
        let x = &x[..I];
        for (o, y) in y[..O].iter_mut().enumerate() {
            let w = &w[o * I..][..I];
            let mut acc = [0.0f32; LANES];
            let full = I / LANES * LANES;
            for c in (0..full).step_by(LANES) {
                for l in 0..LANES {
                    acc[l] += w[c + l] * x[c + l];
                }
            }
            let mut sum = super::hsum(acc);
            for c in full..I {
                sum += w[c] * x[c];
            }
            *y = sum;
        }
    }
}

/// The horizontal sum of eight lanes in the order the AVX2 kernel adds them.
#[inline(always)]
fn hsum(a: [f32; 8]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    /// `y = W · x`: four outputs at a time, each an eight-lane FMA accumulator over the input.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matvec<const O: usize, const I: usize>(w: &[f32], x: &[f32], y: &mut [f32]) {
        let (w, x, y) = (&w[..O * I], &x[..I], &mut y[..O]);
        let full = I / 8 * 8;
        let mut o = 0;
        while o + 4 <= O {
            let rows = [
                &w[o * I..][..I],
                &w[(o + 1) * I..][..I],
                &w[(o + 2) * I..][..I],
                &w[(o + 3) * I..][..I],
            ];
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < full {
                // SAFETY: `c + 8 <= full <= I`, the length of `x` and of every row.
                unsafe {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(c));
                    for k in 0..4 {
                        let wv = _mm256_loadu_ps(rows[k].as_ptr().add(c));
                        acc[k] = _mm256_fmadd_ps(wv, xv, acc[k]);
                    }
                }
                c += 8;
            }
            for k in 0..4 {
                let mut sum = hsum(acc[k]);
                for c in full..I {
                    sum += rows[k][c] * x[c];
                }
                y[o + k] = sum;
            }
            o += 4;
        }
        while o < O {
            let row = &w[o * I..][..I];
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < full {
                // SAFETY: as above.
                unsafe {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(c));
                    let wv = _mm256_loadu_ps(row.as_ptr().add(c));
                    acc = _mm256_fmadd_ps(wv, xv, acc);
                }
                c += 8;
            }
            let mut sum = hsum(acc);
            for c in full..I {
                sum += row[c] * x[c];
            }
            y[o] = sum;
            o += 1;
        }
    }

    /// The eight lanes of `v` added as [`super::hsum`] adds them.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let q = _mm_add_ps(lo, hi); // [a0+a4, a1+a5, a2+a6, a3+a7]
        let p = _mm_add_ps(q, _mm_movehl_ps(q, q)); // [q0+q2, q1+q3, ..]
        let s = _mm_add_ss(p, _mm_shuffle_ps(p, p, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    /// `x · Wᵀ` in f64, the reference.
    fn reference(o: usize, i: usize, rows: usize, w: &[f32], x: &[f32], xs: usize) -> Vec<f64> {
        let mut y = vec![0.0; rows * o];
        for r in 0..rows {
            for out in 0..o {
                y[r * o + out] = (0..i)
                    .map(|k| w[out * i + k] as f64 * x[r * xs + k] as f64)
                    .sum();
            }
        }
        y
    }

    /// One size on every path this CPU has: the packed product (panels or `Wᵀ`, by the row
    /// count and the path) matches the reference, and leaves the output's other columns alone.
    fn check<const O: usize, const I: usize>() {
        for rows in [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 17, 600] {
            let xs = I + 3;
            let ys = O + 5;
            let w: Vec<f32> = (0..O * I)
                .map(|k| ((k * 37 % 101) as f32 - 50.0) / 64.0)
                .collect();
            let x: Vec<f32> = (0..rows * xs)
                .map(|k| ((k * 53 % 89) as f32 - 44.0) / 32.0)
                .collect();
            let want = reference(O, I, rows, &w, &x, xs);
            for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
                if !super::super::supports(isa) {
                    continue;
                }
                let packed = pack::<O, I>(isa, rows, &w);
                let mut y = vec![7.0f32; rows * ys];
                matmul_packed::<O, I>(isa, rows, &w, &packed, &x, xs, &mut y, ys);
                for r in 0..rows {
                    for out in 0..ys {
                        let got = y[r * ys + out];
                        if out >= O {
                            assert_eq!(got, 7.0, "{isa:?} {O}x{I} rows {rows}: column {out}");
                            continue;
                        }
                        let e = want[r * O + out];
                        assert!(
                            (got as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{isa:?} {O}x{I} rows {rows}: y[{r}][{out}] = {got}, expected {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packed_products_match_the_reference_at_every_panel_edge() {
        check::<1, 1>();
        check::<15, 5>();
        check::<16, 16>();
        check::<17, 3>();
        check::<31, 7>();
        check::<32, 32>();
        check::<33, 9>();
        check::<64, 1>();
        check::<70, 13>();
    }
}

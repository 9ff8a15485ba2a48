//! Weights laid out for products over a few rows (a step of a batch): `Wᵀ` in panels of
//! [`PANEL`] outputs, read by an explicit AVX-512 kernel. Shared by the code the macros emit
//! (`rnn::rt`) and the JIT.
//!
//! Panel `j` holds outputs `32j .. 32j + 32` of every input contiguously (`I × 32`, zero past
//! `O`). The kernel keeps eight rows × 32 outputs in sixteen registers and reads each panel
//! once per eight rows, in order. Measured on W1's recurrent product (32 rows, 256 → 1024, one
//! thread): 63 µs, against 80 µs for the `gemm` crate on `Wᵀ` and 137 µs on `W` (which it packs
//! again at every call).

/// The outputs of one panel: two 512-bit vectors.
pub const PANEL: usize = 32;

/// Whether this CPU runs [`matmul_panels`] (AVX-512F, detected at run time).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Elements of the panels of an `o × i` weight.
pub fn panels_len(o: usize, i: usize) -> usize {
    o.div_ceil(PANEL) * i * PANEL
}

/// `w` (`o × i` row-major, PyTorch's layout) into panels (`out` holds [`panels_len`] elements;
/// the padding past `o` is written as zeros).
pub fn pack_panels(o: usize, i: usize, w: &[f32], out: &mut [f32]) {
    let w = &w[..o * i];
    let out = &mut out[..panels_len(o, i)];
    out.fill(0.0);
    for j in 0..o.div_ceil(PANEL) {
        let panel = &mut out[j * i * PANEL..][..i * PANEL];
        for c in 0..PANEL.min(o - j * PANEL) {
            let row = &w[(j * PANEL + c) * i..][..i];
            for (k, &v) in row.iter().enumerate() {
                panel[k * PANEL + c] = v;
            }
        }
    }
}

/// `Wᵀ` (`i × o` row-major, outputs contiguous) of `w` (`o × i`), into `out`: what the `gemm`
/// crate reads without packing it again.
pub fn transpose(o: usize, i: usize, w: &[f32], out: &mut [f32]) {
    let w = &w[..o * i];
    let out = &mut out[..o * i];
    // Blocks of 16 × 16 keep both sides' lines in the L1 cache.
    const B: usize = 16;
    for o0 in (0..o).step_by(B) {
        for i0 in (0..i).step_by(B) {
            for r in o0..(o0 + B).min(o) {
                for c in i0..(i0 + B).min(i) {
                    out[c * o + r] = w[r * i + c];
                }
            }
        }
    }
}

/// `y[r] = W · x[r]` for `rows` rows over `W` packed by [`pack_panels`]: rows of `x` start
/// `xs` apart, of `y` `ys` apart; the sums run over the inputs in order, one FMA each.
///
/// # Panics
/// When this CPU has no AVX-512F ([`available`]), or a slice is too short for the sizes.
#[allow(clippy::too_many_arguments)]
pub fn matmul_panels(
    o: usize,
    i: usize,
    rows: usize,
    panels: &[f32],
    x: &[f32],
    xs: usize,
    y: &mut [f32],
    ys: usize,
) {
    assert!(available(), "matmul_panels needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F (asserted above).
    unsafe {
        avx512::matmul_panels(o, i, rows, panels, x, xs, y, ys)
    };
}

/// `y = W · x` for one row over `W` packed by [`pack_panels`]: the streaming step. Each panel
/// is read once, in order, with eight independent sums (two halves × four inputs at a time)
/// so that the FMAs' latency is hidden.
///
/// # Panics
/// When this CPU has no AVX-512F ([`available`]), or a slice is too short for the sizes.
pub fn matvec_panels(o: usize, i: usize, panels: &[f32], x: &[f32], y: &mut [f32]) {
    assert!(available(), "matvec_panels needs AVX-512F");
    assert!(panels.len() >= panels_len(o, i), "packed weight too short");
    assert!(x.len() >= i && y.len() >= o, "input or output too short");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F and the slices hold the sizes (asserted above).
    unsafe {
        avx512::matvec_panels(o, i, panels, x, y)
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::PANEL;
    use core::arch::x86_64::*;

    /// `y[r] = W · x[r]` over `W` packed in panels ([`super::pack_panels`]): per panel, tiles of
    /// eight rows (then four, then one) whose 8 × 32 sums stay in registers over all inputs.
    /// The sums run over the inputs in order, one FMA each.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_panels(
        o: usize,
        i: usize,
        rows: usize,
        panels: &[f32],
        x: &[f32],
        xs: usize,
        y: &mut [f32],
        ys: usize,
    ) {
        let count = o.div_ceil(PANEL);
        // Every pointer below stays inside these bounds.
        assert!(panels.len() >= count * i * PANEL, "packed weight too short");
        // Checked: `matmul_panels` is safe to call with any strides.
        let fits = |stride: usize, width: usize, len: usize| {
            rows == 0
                || (rows - 1)
                    .checked_mul(stride)
                    .and_then(|n| n.checked_add(width))
                    .is_some_and(|n| n <= len)
        };
        assert!(fits(xs, i, x.len()), "input too short");
        assert!(fits(ys, o, y.len()), "output too short");
        let (pp, xp, yp) = (panels.as_ptr(), x.as_ptr(), y.as_mut_ptr());
        for j in 0..count {
            let width = PANEL.min(o - j * PANEL);
            let (lo, hi) = masks(width);
            // SAFETY: panel `j` and rows `r0 .. r0 + R` are inside the asserted bounds.
            unsafe {
                let panel = pp.add(j * i * PANEL);
                let out = yp.add(j * PANEL);
                let mut r0 = 0;
                while r0 + 8 <= rows {
                    tile::<8>(i, panel, xp.add(r0 * xs), xs, out.add(r0 * ys), ys, lo, hi);
                    r0 += 8;
                }
                while r0 + 4 <= rows {
                    tile::<4>(i, panel, xp.add(r0 * xs), xs, out.add(r0 * ys), ys, lo, hi);
                    r0 += 4;
                }
                while r0 < rows {
                    tile::<1>(i, panel, xp.add(r0 * xs), xs, out.add(r0 * ys), ys, lo, hi);
                    r0 += 1;
                }
            }
        }
    }

    /// The store masks of a panel with `width` outputs (1 ..= 32): outputs 0..16 and 16..32.
    fn masks(width: usize) -> (__mmask16, __mmask16) {
        let lo = if width >= 16 {
            0xffff
        } else {
            (1u16 << width) - 1
        };
        let hi = match width {
            32 => 0xffff,
            17..=31 => (1u16 << (width - 16)) - 1,
            _ => 0,
        };
        (lo, hi)
    }

    /// See [`super::matvec_panels`].
    ///
    /// # Safety
    /// AVX-512F; `panels` holds the panels of an `o × i` weight, `x` `i` and `y` `o` elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn matvec_panels(o: usize, i: usize, panels: &[f32], x: &[f32], y: &mut [f32]) {
        let (pp, xp, yp) = (panels.as_ptr(), x.as_ptr(), y.as_mut_ptr());
        for j in 0..o.div_ceil(PANEL) {
            let width = PANEL.min(o - j * PANEL);
            let (lo, hi) = masks(width);
            // SAFETY: panel `j` holds `i × 32` elements; `x` holds `i`; the masked stores stay
            // within `y`'s `o` elements.
            unsafe {
                let panel = pp.add(j * i * PANEL);
                let mut acc = [_mm512_setzero_ps(); 8];
                let mut k = 0;
                while k + 4 <= i {
                    for u in 0..4 {
                        let xb = _mm512_set1_ps(*xp.add(k + u));
                        let w0 = _mm512_loadu_ps(panel.add((k + u) * PANEL));
                        let w1 = _mm512_loadu_ps(panel.add((k + u) * PANEL + 16));
                        acc[2 * u] = _mm512_fmadd_ps(xb, w0, acc[2 * u]);
                        acc[2 * u + 1] = _mm512_fmadd_ps(xb, w1, acc[2 * u + 1]);
                    }
                    k += 4;
                }
                while k < i {
                    let xb = _mm512_set1_ps(*xp.add(k));
                    let w0 = _mm512_loadu_ps(panel.add(k * PANEL));
                    let w1 = _mm512_loadu_ps(panel.add(k * PANEL + 16));
                    acc[0] = _mm512_fmadd_ps(xb, w0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(xb, w1, acc[1]);
                    k += 1;
                }
                let a = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[4], acc[6]));
                let b = _mm512_add_ps(_mm512_add_ps(acc[1], acc[3]), _mm512_add_ps(acc[5], acc[7]));
                _mm512_mask_storeu_ps(yp.add(j * PANEL), lo, a);
                if hi != 0 {
                    _mm512_mask_storeu_ps(yp.add(j * PANEL + 16), hi, b);
                }
            }
        }
    }

    /// `R` rows of one panel: `y[r][c] = Σ_k x[r][k] · panel[k][c]`, stored under the masks
    /// `lo` (outputs 0..16) and `hi` (16..32).
    ///
    /// # Safety
    /// AVX-512F; `panel` holds `i × 32` floats, `x` rows `r · xs .. r · xs + i` and `y` the
    /// masked outputs of rows `r · ys` for every `r < R`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize>(
        i: usize,
        panel: *const f32,
        x: *const f32,
        xs: usize,
        y: *mut f32,
        ys: usize,
        lo: __mmask16,
        hi: __mmask16,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for k in 0..i {
            // SAFETY: within the bounds the caller guarantees.
            unsafe {
                let w0 = _mm512_loadu_ps(panel.add(k * PANEL));
                let w1 = _mm512_loadu_ps(panel.add(k * PANEL + 16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*x.add(r * xs + k));
                    acc[0] = _mm512_fmadd_ps(xb, w0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(xb, w1, acc[1]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: as above; the masks keep the stores inside the row's outputs.
            unsafe {
                _mm512_mask_storeu_ps(y.add(r * ys), lo, acc[0]);
                // A panel of 16 outputs or fewer has no second half in `y`: not even its
                // address is formed.
                if hi != 0 {
                    _mm512_mask_storeu_ps(y.add(r * ys + 16), hi, acc[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row and several, at every panel edge, against `x · Wᵀ` in `f64`; the outputs past `o`
    /// are left alone.
    #[test]
    fn panel_products_match_the_reference() {
        if !available() {
            eprintln!("no AVX-512F: the panel kernels are not checked");
            return;
        }
        for (o, i) in [
            (1, 1),
            (15, 5),
            (16, 16),
            (17, 3),
            (31, 7),
            (32, 32),
            (33, 9),
            (70, 13),
        ] {
            let w: Vec<f32> = (0..o * i)
                .map(|k| ((k * 37 % 101) as f32 - 50.0) / 64.0)
                .collect();
            let mut p = vec![0.0; panels_len(o, i)];
            pack_panels(o, i, &w, &mut p);
            for rows in [1, 2, 5, 9, 13] {
                let x: Vec<f32> = (0..rows * i)
                    .map(|k| ((k * 53 % 89) as f32 - 44.0) / 32.0)
                    .collect();
                let ys = o + 3;
                let mut y = vec![7.0f32; rows * ys];
                if rows == 1 {
                    matvec_panels(o, i, &p, &x, &mut y);
                } else {
                    matmul_panels(o, i, rows, &p, &x, i, &mut y, ys);
                }
                for r in 0..rows {
                    for c in 0..ys {
                        let got = y[r * ys + c];
                        if c >= o {
                            assert_eq!(got, 7.0, "{o}x{i} rows {rows}: column {c} written");
                            continue;
                        }
                        let e: f64 = (0..i)
                            .map(|k| w[c * i + k] as f64 * x[r * i + k] as f64)
                            .sum();
                        assert!(
                            (got as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{o}x{i} rows {rows}: y[{r}][{c}] = {got}, expected {e}"
                        );
                    }
                }
            }
        }
    }
}

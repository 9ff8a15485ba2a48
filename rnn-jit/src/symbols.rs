//! The Rust functions generated code calls, registered in the JIT module under their names:
//! products and sums over rows. Products go to the `gemm` crate through
//! `rnn_ir::tensor::matmul` (one thread), or, for weights copied in panels, to the AVX-512
//! kernels of `rnn_ir::panels`; sums over rows and features accumulate in `f64` as the
//! interpreter does.
//!
//! Each takes sizes and strides in elements and raw addresses. The generated code passes what
//! the plan and the checked `T` and `B` give, so every slice built here lies inside the buffers
//! the executor allocated for that plan.

use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{AbiParam, FuncRef, Function, Signature};
use cranelift_jit::JITModule;
use cranelift_module::{Linkage, Module};
use rnn_ir::tensor::{MatMut, MatRef, matmul};

/// The registered symbols, declared in one function.
pub struct Callees {
    pub(crate) matmul: FuncRef,
    pub(crate) matmul_packed: FuncRef,
    pub(crate) matmul_t: FuncRef,
    pub(crate) matmul_t_packed: FuncRef,
    pub(crate) outer_sum: FuncRef,
    pub(crate) sum_rows: FuncRef,
    pub(crate) sum_features: FuncRef,
}

/// `(name, address, integer-or-pointer arguments, returns an f32)` of every symbol.
pub(crate) fn table() -> [(&'static str, *const u8, usize, bool); 7] {
    [
        ("rnn_jit_matmul", rnn_jit_matmul as *const u8, 8, false),
        (
            "rnn_jit_matmul_packed",
            rnn_jit_matmul_packed as *const u8,
            10,
            false,
        ),
        ("rnn_jit_matmul_t", rnn_jit_matmul_t as *const u8, 8, false),
        (
            "rnn_jit_matmul_t_packed",
            rnn_jit_matmul_t_packed as *const u8,
            9,
            false,
        ),
        (
            "rnn_jit_outer_sum",
            rnn_jit_outer_sum as *const u8,
            8,
            false,
        ),
        ("rnn_jit_sum_rows", rnn_jit_sum_rows as *const u8, 5, false),
        (
            "rnn_jit_sum_features",
            rnn_jit_sum_features as *const u8,
            2,
            true,
        ),
    ]
}

/// Declares every symbol in `func`.
pub(crate) fn declare(module: &mut JITModule, func: &mut Function) -> Result<Callees, String> {
    let mut refs = Vec::new();
    for (name, _, args, ret) in table() {
        let mut sig = Signature::new(module.isa().default_call_conv());
        for _ in 0..args {
            sig.params.push(AbiParam::new(I64));
        }
        if ret {
            sig.returns.push(AbiParam::new(F32));
        }
        let id = module
            .declare_function(name, Linkage::Import, &sig)
            .map_err(|e| e.to_string())?;
        refs.push(module.declare_func_in_func(id, func));
    }
    Ok(Callees {
        matmul: refs[0],
        matmul_packed: refs[1],
        matmul_t: refs[2],
        matmul_t_packed: refs[3],
        outer_sum: refs[4],
        sum_rows: refs[5],
        sum_features: refs[6],
    })
}

/// The `len` elements at `p` (none when `len` is 0).
///
/// # Safety
/// `p` must address `len` readable elements when `len > 0`.
unsafe fn slice<'a>(p: *const f32, len: usize) -> &'a [f32] {
    if len == 0 {
        &[]
    } else {
        // SAFETY: the caller's guarantee.
        unsafe { std::slice::from_raw_parts(p, len) }
    }
}

/// `rows × cols` elements of `data` with rows `stride` apart, contiguous within a row.
fn rowwise(data: &[f32], rows: usize, cols: usize, stride: usize) -> MatRef<'_, f32> {
    MatRef {
        data,
        rows,
        cols,
        row_stride: stride,
        col_stride: 1,
    }
}

/// Elements spanned by `rows` rows of `width`, `stride` apart.
fn span(rows: usize, width: usize, stride: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * stride + width
    }
}

/// `y[r] = W · x[r]` (`W` is `o × i` row-major) for `rows` rows.
extern "C" fn rnn_jit_matmul(
    o: usize,
    i: usize,
    rows: usize,
    w: *const f32,
    x: *const f32,
    xs: usize,
    y: *mut f32,
    ys: usize,
) {
    // SAFETY: the generated code passes the plan's extents (module doc).
    let (w, x, y) = unsafe {
        (
            slice(w, o * i),
            slice(x, span(rows, i, xs)),
            std::slice::from_raw_parts_mut(y, span(rows, o, ys)),
        )
    };
    let a = rowwise(x, rows, i, xs);
    let b = MatRef {
        data: w,
        rows: i,
        cols: o,
        row_stride: 1,
        col_stride: i,
    };
    let dst = MatMut {
        data: y,
        rows,
        cols: o,
        row_stride: ys,
    };
    matmul(dst, a, b, false, 1, false);
}

/// Products of at most this many rows read panels; more go to the `gemm` crate on `Wᵀ`.
const PANEL_ROWS: usize = 512;

/// [`rnn_jit_matmul`] with the weight also as `Wᵀ` (`wt`, `i × o`) and in panels (`panels`),
/// either null when the model has no such copy: a step of a batch, or of one row, reads the
/// panels on AVX-512; all steps' rows at once read `Wᵀ` (the `gemm` crate then packs nothing).
extern "C" fn rnn_jit_matmul_packed(
    o: usize,
    i: usize,
    rows: usize,
    w: *const f32,
    wt: *const f32,
    panels: *const f32,
    x: *const f32,
    xs: usize,
    y: *mut f32,
    ys: usize,
) {
    if rows == 1 && !panels.is_null() {
        // SAFETY: as above.
        let (p, x, y) = unsafe {
            (
                slice(panels, rnn_ir::panels::panels_len(o, i)),
                slice(x, i),
                std::slice::from_raw_parts_mut(y, o),
            )
        };
        rnn_ir::panels::matvec_panels(o, i, p, x, y);
        return;
    }
    if rows > 1 && !panels.is_null() && rows <= PANEL_ROWS {
        // SAFETY: as above; a non-null `panels` holds the panels of `W` (`JitModel::bind`).
        let (p, x, y) = unsafe {
            (
                slice(panels, rnn_ir::panels::panels_len(o, i)),
                slice(x, span(rows, i, xs)),
                std::slice::from_raw_parts_mut(y, span(rows, o, ys)),
            )
        };
        rnn_ir::panels::matmul_panels(o, i, rows, p, x, xs, y, ys);
        return;
    }
    if rows > 1 && !wt.is_null() {
        // SAFETY: as above; a non-null `wt` holds `Wᵀ`.
        let (wt, x, y) = unsafe {
            (
                slice(wt, o * i),
                slice(x, span(rows, i, xs)),
                std::slice::from_raw_parts_mut(y, span(rows, o, ys)),
            )
        };
        let a = rowwise(x, rows, i, xs);
        let b = rowwise(wt, i, o, o);
        let dst = MatMut {
            data: y,
            rows,
            cols: o,
            row_stride: ys,
        };
        matmul(dst, a, b, false, 1, false);
        return;
    }
    rnn_jit_matmul(o, i, rows, w, x, xs, y, ys);
}

/// `y[r] = d[r] · W` (`W` is `o × i`; `y` has `i` features) for `rows` rows.
extern "C" fn rnn_jit_matmul_t(
    o: usize,
    i: usize,
    rows: usize,
    w: *const f32,
    d: *const f32,
    ds: usize,
    y: *mut f32,
    ys: usize,
) {
    // SAFETY: as above.
    let (w, d, y) = unsafe {
        (
            slice(w, o * i),
            slice(d, span(rows, o, ds)),
            std::slice::from_raw_parts_mut(y, span(rows, i, ys)),
        )
    };
    let a = rowwise(d, rows, o, ds);
    let b = rowwise(w, o, i, i);
    let dst = MatMut {
        data: y,
        rows,
        cols: i,
        row_stride: ys,
    };
    matmul(dst, a, b, false, 1, false);
}

/// [`rnn_jit_matmul_t`] with `W` also in 32-output panels of the product it is (`panels`: `W`
/// read as `(in = o, out = i)`, or null): a step's rows (up to `PANEL_ROWS`) run the AVX-512
/// panel kernel on them, which `gemm` would otherwise pack again at every step.
extern "C" fn rnn_jit_matmul_t_packed(
    o: usize,
    i: usize,
    rows: usize,
    w: *const f32,
    panels: *const f32,
    d: *const f32,
    ds: usize,
    y: *mut f32,
    ys: usize,
) {
    if !panels.is_null() && (1..=PANEL_ROWS).contains(&rows) {
        // SAFETY: as above; a non-null `panels` holds the panels of `W` as `(o, i)` in, out
        // (`JitModel::bind`).
        let (p, d, y) = unsafe {
            (
                slice(panels, rnn_ir::panels::panels_len(i, o)),
                slice(d, span(rows, o, ds)),
                std::slice::from_raw_parts_mut(y, span(rows, i, ys)),
            )
        };
        if rows == 1 {
            rnn_ir::panels::matvec_panels(i, o, p, d, y);
        } else {
            rnn_ir::panels::matmul_panels(i, o, rows, p, d, ds, y, ys);
        }
        return;
    }
    rnn_jit_matmul_t(o, i, rows, w, d, ds, y, ys);
}

/// `y = Σ_r d[r]ᵀ · x[r]` (`o × i`, overwritten).
extern "C" fn rnn_jit_outer_sum(
    o: usize,
    i: usize,
    rows: usize,
    d: *const f32,
    ds: usize,
    x: *const f32,
    xs: usize,
    y: *mut f32,
) {
    // SAFETY: as above.
    let (d, x, y) = unsafe {
        (
            slice(d, span(rows, o, ds)),
            slice(x, span(rows, i, xs)),
            std::slice::from_raw_parts_mut(y, o * i),
        )
    };
    let a = MatRef {
        data: d,
        rows: o,
        cols: rows,
        row_stride: 1,
        col_stride: ds,
    };
    let b = rowwise(x, rows, i, xs);
    let dst = MatMut {
        data: y,
        rows: o,
        cols: i,
        row_stride: i,
    };
    matmul(dst, a, b, false, 1, false);
}

/// `y = Σ_r a[r]` (`n` features), in `f64`.
extern "C" fn rnn_jit_sum_rows(n: usize, rows: usize, a: *const f32, stride: usize, y: *mut f32) {
    // SAFETY: as above.
    let (a, y) = unsafe {
        (
            slice(a, span(rows, n, stride)),
            std::slice::from_raw_parts_mut(y, n),
        )
    };
    rnn_ir::tensor::sum_rows_f64(rows, a, stride, y);
}

/// The sum of `n` features, in `f64`.
extern "C" fn rnn_jit_sum_features(n: usize, a: *const f32) -> f32 {
    // SAFETY: as above.
    let a = unsafe { slice(a, n) };
    a.iter().map(|&x| x as f64).sum::<f64>() as f32
}

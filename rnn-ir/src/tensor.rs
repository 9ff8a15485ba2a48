//! Dense tensors, the float types the interpreter computes in, and the matrix products it hands
//! to the `gemm` crate.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// A dense, row-major `f32` tensor: what users load, pass and get back.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` elements in row-major order.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of `shape` holding `data`; `None` if the element count does not match.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        let count = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        (count == data.len()).then_some(Tensor { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The index and value of the first NaN or infinite element.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        // Blocks without a branch per element (they vectorise: a whole sequence's input is
        // checked at memory speed); the first bad element is looked for in its block only.
        const BLOCK: usize = 256;
        let bad = |x: &f32| x.to_bits() & 0x7f80_0000 == 0x7f80_0000;
        let block = self
            .data
            .chunks(BLOCK)
            .position(|c| c.iter().fold(false, |any, x| any | bad(x)))?;
        self.data[block * BLOCK..]
            .iter()
            .copied()
            .enumerate()
            .find(|(_, x)| bad(x))
            .map(|(i, x)| (block * BLOCK + i, x))
    }
}

/// `f32`s from their little-endian bytes (as safetensors and `.npy` store them); a trailing
/// partial element is ignored, so callers check the byte count first.
pub fn f32s_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The little-endian bytes of `xs`.
pub fn f32s_to_le_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The float types the interpreter computes in: `f32` (PyTorch's precision, and fast) and `f64`
/// (for gradient checks against finite differences).
pub trait Real:
    Copy
    + Default
    + Debug
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Conversion from `f32`.
    fn from_f32(x: f32) -> Self;
    /// Conversion to `f32` (rounding).
    fn to_f32(self) -> f32;
    /// Conversion to `f64`.
    fn to_f64(self) -> f64;
    /// Conversion from `f64` (rounding).
    fn from_f64(x: f64) -> Self;
    /// `1 / (1 + e^-x)`.
    fn sigmoid(self) -> Self;
    /// `tanh(x)`.
    fn tanh(self) -> Self;
    /// `e^x`.
    fn exp(self) -> Self;
    /// The natural logarithm.
    fn ln(self) -> Self;
    /// The square root.
    fn sqrt(self) -> Self;
    /// `|x|`.
    fn abs(self) -> Self;
    /// `ln(1 + e^x)`, and `x` itself above 20, as PyTorch's `softplus` (beta 1, threshold 20).
    fn softplus(self) -> Self;
    /// `f32`s in this type: borrowed as they are for `f32` (a whole sequence's input is not
    /// copied), converted otherwise.
    fn slice_from_f32(x: &[f32]) -> std::borrow::Cow<'_, [Self]>;
    /// These values as `f32`s: moved as they are for `f32`, converted (rounding) otherwise.
    fn vec_into_f32(x: Vec<Self>) -> Vec<f32>;
    /// `n` zeros: for `f32` in a buffer this thread gave back ([`crate::pool::zeros`], after
    /// [`crate::pool::recycle`]), so that a large value (a vocabulary's logits) is not paged
    /// in afresh at every call.
    fn zeros(n: usize) -> Vec<Self>;
    /// `n` elements whose values are unspecified, for a value every element of which is
    /// written before it is read (a product's): [`crate::pool::scratch`] for `f32`.
    fn scratch(n: usize) -> Vec<Self>;
}

/// `Real` for a primitive float: every function is the type's own, and conversions are `as`
/// casts (exact widening, round-to-nearest narrowing).
macro_rules! real {
    ($t:ty, $x:ident => $from:expr, $v:ident => $into:expr, $zeros:expr, $scratch:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn sigmoid(self) -> Self {
                1.0 / (1.0 + (-self).exp())
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn softplus(self) -> Self {
                if self > 20.0 {
                    self
                } else {
                    <$t>::ln_1p(<$t>::exp(self))
                }
            }
            fn slice_from_f32($x: &[f32]) -> std::borrow::Cow<'_, [Self]> {
                $from
            }
            fn vec_into_f32($v: Vec<Self>) -> Vec<f32> {
                $into
            }
            fn zeros(n: usize) -> Vec<Self> {
                $zeros(n)
            }
            fn scratch(n: usize) -> Vec<Self> {
                $scratch(n)
            }
        }
    };
}

real!(
    f32,
    x => std::borrow::Cow::Borrowed(x),
    v => v,
    crate::pool::zeros,
    crate::pool::scratch
);
real!(
    f64,
    x => std::borrow::Cow::Owned(x.iter().map(|&v| v as f64).collect()),
    v => v.iter().map(|&v| v as f32).collect(),
    |n| vec![0.0; n],
    |n| vec![0.0; n]
);

/// A strided view of a matrix: element `(i, j)` is at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// A mutable row-major view: `rows × cols` elements, rows `row_stride` apart.
pub struct MatMut<'a, T> {
    /// The elements; element `(i, j)` is at `data[i * row_stride + j]`.
    pub data: &'a mut [T],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
}

/// Products of at most this many rows run one row at a time (see [`matmul`]).
const SMALL_ROWS: usize = 8;

/// `dst = a · b` (or `dst += a · b` when `accumulate`), computed by the `gemm` crate on
/// `threads` threads; `by_row` runs products of a few rows one row at a time (no allocation).
/// Every operand's extent is checked against its slice.
pub fn matmul<T: Real>(
    dst: MatMut<'_, T>,
    a: MatRef<T>,
    b: MatRef<T>,
    accumulate: bool,
    threads: usize,
    by_row: bool,
) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    assert!(
        dst.rows == a.rows && dst.cols == b.cols,
        "matmul: destination size"
    );
    assert!(
        a.in_bounds() && b.in_bounds(),
        "matmul: operand out of bounds"
    );
    assert!(
        dst.rows == 0
            || dst.cols == 0
            || (dst.cols <= dst.row_stride || dst.rows == 1)
                && (dst.rows - 1) * dst.row_stride + dst.cols <= dst.data.len(),
        "matmul: destination out of bounds"
    );
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst.data[r * dst.row_stride..r * dst.row_stride + n].fill(T::ZERO);
            }
        }
        return;
    }
    // With `by_row`, a product of a few rows (one step of a small batch) runs a row at a time:
    // the gemm crate allocates a packing buffer for every product of two rows or more, while a
    // single row takes its matrix-vector path, which allocates nothing. Streaming asks for it
    // to stay allocation-free; whole sequences keep one product (the two orders of summation
    // differ in the last bits).
    if by_row && (2..=SMALL_ROWS).contains(&m) {
        for r in 0..m {
            let row = MatRef {
                data: &a.data[r * a.row_stride..],
                rows: 1,
                ..a
            };
            let out = MatMut {
                data: &mut dst.data[r * dst.row_stride..],
                rows: 1,
                cols: n,
                row_stride: dst.row_stride,
            };
            matmul(out, row, b, accumulate, threads, false);
        }
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every operand's extent was checked against its slice above, and the operands do
    // not alias `dst` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `y = Σ_r a[r]` over `rows` rows of `y.len()` features, rows `stride` apart, accumulated in
/// `f64` (a bias gradient sums a whole sequence's rows), each feature in row order. The rows
/// are streamed once per block of 1,024 features (8 KiB of sums, in L1), and the loop is
/// compiled for AVX-512 too, chosen at run time: the same additions in the same order, so the
/// same bits either way. The JIT's row sums call it.
pub fn sum_rows_f64(rows: usize, a: &[f32], stride: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::panels::available() {
        // SAFETY: AVX-512F was detected.
        unsafe { sum_rows_f64_avx512(rows, a, stride, y) };
        return;
    }
    sum_rows_f64_body(rows, a, stride, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_rows_f64_avx512(rows: usize, a: &[f32], stride: usize, y: &mut [f32]) {
    sum_rows_f64_body(rows, a, stride, y);
}

#[inline(always)]
fn sum_rows_f64_body(rows: usize, a: &[f32], stride: usize, y: &mut [f32]) {
    const BLOCK: usize = 1024;
    let mut acc = [0.0f64; BLOCK];
    for (b, out) in y.chunks_mut(BLOCK).enumerate() {
        let start = b * BLOCK;
        let acc = &mut acc[..out.len()];
        acc.fill(0.0);
        for r in 0..rows {
            let row = &a[r * stride + start..][..out.len()];
            for (s, &x) in acc.iter_mut().zip(row) {
                *s += x as f64;
            }
        }
        for (o, &s) in out.iter_mut().zip(acc.iter()) {
            *o = s as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sum_rows_f64;

    /// Every feature's sum is the `f64` sum of its column in row order, across the blocks of
    /// 1,024 features, with rows longer than the features summed (a stride).
    #[test]
    fn row_sums_are_each_columns_f64_sum_in_order() {
        let (rows, n, stride) = (37, 2500, 2503);
        let a: Vec<f32> = (0..rows * stride)
            .map(|k| ((k * 7919 % 1013) as f32 - 506.0) * 1.37e-3)
            .collect();
        let mut y = vec![f32::NAN; n];
        sum_rows_f64(rows, &a, stride, &mut y);
        for (j, &got) in y.iter().enumerate() {
            let mut s = 0.0f64;
            for r in 0..rows {
                s += a[r * stride + j] as f64;
            }
            assert_eq!(got.to_bits(), (s as f32).to_bits(), "feature {j}");
        }
    }
}

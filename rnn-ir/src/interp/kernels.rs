//! The op kernels: each op of the IR as a plain loop over strided views, writing into the
//! destination's place (a buffer, a column range of one, a carried slot). Matrix products go to
//! the `gemm` crate. Nothing here allocates.
//!
//! A [`View`] is `rows` rows of `width` elements, row `r` starting at `offset + r · stride`.
//! Unbatched values are one row (a matrix is one row of `rows · cols` elements, since its slices
//! take whole matrix rows and stay contiguous).

use super::Exec;
use crate::graph::{Op, Shape};
use crate::tensor::{MatMut, MatRef, Real, matmul};

/// A read-only strided view.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    /// The underlying elements.
    pub data: &'a [T],
    /// Where row 0 starts.
    pub offset: usize,
    /// Rows.
    pub rows: usize,
    /// Elements per row.
    pub width: usize,
    /// Distance between rows.
    pub stride: usize,
}

impl<'a, T: Copy> View<'a, T> {
    /// All of `data` as `rows` rows of `width` contiguous elements.
    pub fn dense(data: &'a [T], rows: usize, width: usize) -> Self {
        View {
            data,
            offset: 0,
            rows,
            width,
            stride: width,
        }
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &'a [T] {
        let s = self.offset + r * self.stride;
        &self.data[s..s + self.width]
    }

    /// Rows `start .. start + rows`.
    pub fn rows(&self, start: usize, rows: usize) -> Self {
        View {
            offset: self.offset + start * self.stride,
            rows,
            ..*self
        }
    }

    /// Columns `start .. start + width` of every row.
    pub fn columns(&self, start: usize, width: usize) -> Self {
        View {
            offset: self.offset + start,
            width,
            ..*self
        }
    }

    fn mat(&self, rows: usize, cols: usize) -> MatRef<'a, T> {
        let data = &self.data[self.offset..];
        MatRef {
            data,
            rows,
            cols,
            row_stride: self.stride,
            col_stride: 1,
        }
    }
}

/// A mutable strided view (see [`View`]).
#[derive(Debug)]
pub struct ViewMut<'a, T> {
    /// The underlying elements.
    pub data: &'a mut [T],
    /// Where row 0 starts.
    pub offset: usize,
    /// Rows.
    pub rows: usize,
    /// Elements per row.
    pub width: usize,
    /// Distance between rows.
    pub stride: usize,
}

impl<T: Copy> ViewMut<'_, T> {
    /// Row `r`.
    pub fn row(&mut self, r: usize) -> &mut [T] {
        let s = self.offset + r * self.stride;
        &mut self.data[s..s + self.width]
    }

    /// Sets every element to `x`.
    pub fn fill(&mut self, x: T) {
        for r in 0..self.rows {
            self.row(r).fill(x);
        }
    }

    /// Copies `src` (same rows and width) in.
    pub fn copy_from(&mut self, src: View<'_, T>) {
        for r in 0..self.rows {
            self.row(r).copy_from_slice(src.row(r));
        }
    }
}

/// The element of argument `a` (of shape `shape`) that pairs with row `r` of a result `width`
/// wide: a scalar everywhere, a vector on every row, one feature across its row (a scalar
/// parameter, a per-row mean), anything else row by row.
fn at<'a, T: Copy>(a: &View<'a, T>, shape: Shape, r: usize, width: usize) -> Arg<'a, T> {
    let row = if a.rows == 1 { 0 } else { r };
    match shape {
        Shape::Scalar => Arg::Scalar(a.data[a.offset]),
        _ if a.width == 1 && width > 1 => Arg::Scalar(a.row(row)[0]),
        _ => Arg::Row(a.row(row)),
    }
}

enum Arg<'a, T> {
    Scalar(T),
    Row(&'a [T]),
}

fn binary<T: Real>(
    dst: &mut ViewMut<'_, T>,
    (a, sa): (View<'_, T>, Shape),
    (b, sb): (View<'_, T>, Shape),
    f: impl Fn(T, T) -> T,
) {
    let width = dst.width;
    for r in 0..dst.rows {
        let out = dst.row(r);
        match (at(&a, sa, r, width), at(&b, sb, r, width)) {
            (Arg::Row(x), Arg::Row(y)) => {
                for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
                    *o = f(x, y);
                }
            }
            (Arg::Row(x), Arg::Scalar(y)) => {
                for (o, &x) in out.iter_mut().zip(x) {
                    *o = f(x, y);
                }
            }
            (Arg::Scalar(x), Arg::Row(y)) => {
                for (o, &y) in out.iter_mut().zip(y) {
                    *o = f(x, y);
                }
            }
            (Arg::Scalar(x), Arg::Scalar(y)) => out.fill(f(x, y)),
        }
    }
}

fn unary<T: Real>(dst: &mut ViewMut<'_, T>, a: View<'_, T>, f: impl Fn(T) -> T) {
    for r in 0..dst.rows {
        for (o, &x) in dst.row(r).iter_mut().zip(a.row(r)) {
            *o = f(x);
        }
    }
}

/// Evaluates `op` into `dst` from `args` of shapes `shapes`; `by_row` runs products of a few
/// rows one row at a time, allocating nothing (streaming). `dst` and every argument have the
/// rows and widths their shapes give at the current row count (the executor makes them so);
/// `Concat` and `Input` are the executor's, not kernels.
pub fn eval<T: Real>(
    op: Op,
    dst: &mut ViewMut<'_, T>,
    args: &[View<'_, T>],
    shapes: &[Shape],
    exec: &Exec,
    by_row: bool,
) {
    let threads = exec.threads;
    match op {
        Op::Input(_) | Op::Concat => unreachable!("inputs are fed and concats assembled"),
        Op::MemoryToPairs
        | Op::PairsToMemory
        | Op::SpreadPositions
        | Op::SumPositions
        | Op::PairDot
        | Op::Context
        | Op::ContextT
        | Op::SoftmaxPositions => {
            unreachable!("attention ops run in eval_graph_with; Program::bind refuses them")
        }
        Op::Const(bits) => dst.fill(T::from_f32(f32::from_bits(bits))),
        Op::MatMul => {
            // y = x · wᵀ
            let Shape::Matrix(o, i) = shapes[0] else {
                unreachable!("verified: matmul's weight is a matrix")
            };
            let rows = dst.rows;
            let w = args[0].mat(o, i).t_dense(i);
            let x = args[1].mat(rows, i);
            matmul(dst.mat(rows, o), x, w, false, threads, by_row);
        }
        Op::MatMulT => {
            // y = d · w
            let Shape::Matrix(o, i) = shapes[0] else {
                unreachable!("verified: matmul_t's weight is a matrix")
            };
            let rows = dst.rows;
            let w = args[0].mat(o, i).dense(i);
            let d = args[1].mat(rows, o);
            matmul(dst.mat(rows, i), d, w, false, threads, by_row);
        }
        Op::OuterSum => {
            // W = dᵀ · x, summed over the rows
            let (o, i) = (shapes[0].row_len(), shapes[1].row_len());
            let rows = args[0].rows;
            let d = args[0].mat(rows, o).transposed();
            let x = args[1].mat(rows, i);
            let out = MatMut {
                data: &mut dst.data[dst.offset..dst.offset + o * i],
                rows: o,
                cols: i,
                row_stride: i,
            };
            matmul(out, d, x, false, threads, by_row);
        }
        Op::SumRows => {
            // Accumulated in f64 like every sum of a kernel's own (a bias gradient sums a whole
            // sequence's rows), rows in order, per block of 1,024 columns (8 KiB of sums): a
            // vocabulary head's bias gradient sums 960 rows of 24 KB in 6 passes (blocks of 64
            // made 94, each touching every row's page).
            const BLOCK: usize = 1024;
            let a = args[0];
            let out = dst.row(0);
            for (b, o) in out.chunks_mut(BLOCK).enumerate() {
                let start = b * BLOCK;
                let mut acc = [0.0f64; BLOCK];
                for r in 0..a.rows {
                    for (s, &x) in acc.iter_mut().zip(&a.row(r)[start..start + o.len()]) {
                        *s += x.to_f64();
                    }
                }
                for (o, &s) in o.iter_mut().zip(&acc) {
                    *o = T::from_f64(s);
                }
            }
        }
        Op::Broadcast => {
            let a = args[0].row(0);
            for r in 0..dst.rows {
                dst.row(r).copy_from_slice(a);
            }
        }
        Op::Add => binary(dst, (args[0], shapes[0]), (args[1], shapes[1]), |x, y| {
            x + y
        }),
        Op::Sub => binary(dst, (args[0], shapes[0]), (args[1], shapes[1]), |x, y| {
            x - y
        }),
        Op::Mul => binary(dst, (args[0], shapes[0]), (args[1], shapes[1]), |x, y| {
            x * y
        }),
        Op::Div => binary(dst, (args[0], shapes[0]), (args[1], shapes[1]), |x, y| {
            x / y
        }),
        Op::Neg => unary(dst, args[0], |x| -x),
        Op::Exp => unary(dst, args[0], T::exp),
        Op::Log => unary(dst, args[0], T::ln),
        Op::Sqrt => unary(dst, args[0], T::sqrt),
        Op::Softplus => unary(dst, args[0], T::softplus),
        Op::Abs => unary(dst, args[0], T::abs),
        Op::Sign => unary(dst, args[0], |x| {
            if x > T::ZERO {
                T::ONE
            } else if x < T::ZERO {
                -T::ONE
            } else {
                T::ZERO
            }
        }),
        Op::Max(bits) => {
            let c = T::from_f32(f32::from_bits(bits));
            unary(dst, args[0], |x| if x < c { c } else { x })
        }
        Op::Min(bits) => {
            let c = T::from_f32(f32::from_bits(bits));
            unary(dst, args[0], |x| if x > c { c } else { x })
        }
        Op::SumFeatures => {
            // Accumulated in f64: a layer norm's gradient subtracts sums of nearly cancelling
            // terms, and f32 accumulation there costs digits the tests can see.
            for r in 0..dst.rows {
                let mut sum = 0.0f64;
                for &x in args[0].row(r) {
                    sum += x.to_f64();
                }
                dst.row(r)[0] = T::from_f64(sum);
            }
        }
        Op::Spread(_) => {
            for r in 0..dst.rows {
                let x = args[0].row(r)[0];
                dst.row(r).fill(x);
            }
        }
        Op::Sigmoid => unary(dst, args[0], |x| x.sigmoid()),
        Op::Tanh => unary(dst, args[0], |x| x.tanh()),
        Op::Relu => unary(dst, args[0], |x| if x > T::ZERO { x } else { T::ZERO }),
        Op::Step => unary(dst, args[0], |x| if x > T::ZERO { T::ONE } else { T::ZERO }),
        Op::Slice { start, len } => {
            // A slice that is not a view (a kept slice of a carried value) is a copy.
            let unit = shapes[0].feature_len();
            let src = args[0].columns(start as usize * unit, len as usize * unit);
            dst.copy_from(src);
        }
        Op::Gather => {
            // An id outside the table (the safe entry points refuse one first) reads NaN.
            let Shape::Matrix(v, e) = shapes[0] else {
                unreachable!("verified: gather's table is a matrix")
            };
            let table = args[0].row(0);
            for r in 0..dst.rows {
                match token(args[1].row(r)[0], v) {
                    Some(i) => dst.row(r).copy_from_slice(&table[i * e..(i + 1) * e]),
                    None => dst.row(r).fill(T::from_f32(f32::NAN)),
                }
            }
        }
        Op::ScatterRows(v) => {
            // Rows are added in order; a row whose id is outside the table adds nowhere.
            let e = dst.width / v as usize;
            let out = dst.row(0);
            out.fill(T::ZERO);
            for r in 0..args[0].rows {
                if let Some(i) = token(args[1].row(r)[0], v as usize) {
                    for (o, &x) in out[i * e..(i + 1) * e].iter_mut().zip(args[0].row(r)) {
                        *o += x;
                    }
                }
            }
        }
        Op::LogSoftmax => {
            // x - m - ln Σ e^(x - m) around the row's maximum m, the sum in f64. A row holding
            // NaN is NaN; a row of -inf is NaN, as PyTorch's.
            for r in 0..dst.rows {
                let a = args[0].row(r);
                let m = a.iter().fold(f64::NEG_INFINITY, |m, &x| {
                    let x = x.to_f64();
                    if x > m || x.is_nan() { x } else { m }
                });
                let m = if m.is_nan() { f64::NAN } else { m };
                let sum: f64 = a.iter().map(|&x| (x.to_f64() - m).exp()).sum();
                let lse = m + sum.ln();
                for (o, &x) in dst.row(r).iter_mut().zip(a) {
                    *o = T::from_f64(x.to_f64() - lse);
                }
            }
        }
        Op::Pick { ignore } => {
            let n = shapes[0].features();
            for r in 0..dst.rows {
                let id = args[1].row(r)[0];
                dst.row(r)[0] = if id.to_f64() == f64::from(ignore) {
                    T::ZERO
                } else {
                    match token(id, n) {
                        Some(i) => args[0].row(r)[i],
                        None => T::from_f32(f32::NAN),
                    }
                };
            }
        }
        Op::Place { n, ignore } => {
            for r in 0..dst.rows {
                let id = args[1].row(r)[0];
                let d = args[0].row(r)[0];
                let row = dst.row(r);
                row.fill(T::ZERO);
                if id.to_f64() != f64::from(ignore) {
                    match token(id, n as usize) {
                        Some(i) => row[i] = d,
                        None => row.fill(T::from_f32(f32::NAN)),
                    }
                }
            }
        }
        Op::ArgMax => {
            for r in 0..dst.rows {
                dst.row(r)[0] = T::from_f64(argmax(args[0].row(r)) as f64);
            }
        }
    }
}

/// The index an id held in a lane stands for, if it is one of `0 .. n`.
pub fn token<T: Real>(id: T, n: usize) -> Option<usize> {
    let x = id.to_f64();
    (x >= 0.0 && x < n as f64 && x.fract() == 0.0).then_some(x as usize)
}

/// The index of the largest element of `row`, the first of equals; the first NaN wins
/// (`torch.argmax`). An empty row gives 0.
pub fn argmax<T: Real>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x.to_f64().is_nan() {
            return i;
        }
        if x.to_f64() > row[best].to_f64() {
            best = i;
        }
    }
    best
}

/// [`argmax`] of `f32`s in two passes a compiler vectorises (lane maxima and a NaN flag, then
/// the first index holding the maximum, or the first NaN): a greedy decoding step's arg-max
/// over a vocabulary. The same index as [`argmax`] for every row.
pub fn argmax_f32(row: &[f32]) -> usize {
    let (m, nan) = lane_max(row);
    if nan {
        return row.iter().position(|x| x.is_nan()).unwrap_or(0);
    }
    row.iter().position(|&x| x == m).unwrap_or(0)
}

/// The largest of `row`'s non-NaN elements (−∞ for none), and whether any element is NaN: in
/// 16 independent lanes a compiler keeps in vector registers (a sequential fold waits on each
/// comparison). [`argmax_f32`] and the fused cross-entropy's maximum.
#[inline(always)]
pub fn lane_max(row: &[f32]) -> (f32, bool) {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut nan = [false; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for ((m, n), &x) in lanes.iter_mut().zip(&mut nan).zip(c) {
            *m = if x > *m { x } else { *m };
            *n |= x.is_nan();
        }
    }
    let rest = chunks.remainder();
    let m = rest
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    (m, nan.contains(&true) || rest.iter().any(|x| x.is_nan()))
}

impl<T: Copy> ViewMut<'_, T> {
    fn mat(&mut self, rows: usize, cols: usize) -> MatMut<'_, T> {
        MatMut {
            data: &mut self.data[self.offset..],
            rows,
            cols,
            row_stride: self.stride,
        }
    }
}

impl<'a, T> MatRef<'a, T> {
    /// The `rows × cols` matrix stored contiguously from the start of the view (a weight).
    fn dense(self, cols: usize) -> Self {
        MatRef {
            row_stride: cols,
            col_stride: 1,
            ..self
        }
    }

    /// The transpose of the dense matrix stored from the start of the view.
    fn t_dense(self, cols: usize) -> Self {
        self.dense(cols).t()
    }

    /// The transpose (no copy).
    fn transposed(self) -> Self {
        self.t()
    }
}

#[cfg(test)]
mod argmax_tests {
    use super::*;

    #[test]
    fn the_vectorised_argmax_agrees_with_the_plain_one() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for len in [0, 1, 2, 15, 16, 17, 33, 100, 6000] {
            for case in 0..40 {
                let row: Vec<f32> = (0..len)
                    .map(|_| match next() % 23 {
                        // Ties, signed zeros, infinities and, in some rows, NaNs.
                        0 => 0.0,
                        1 => -0.0,
                        2 => f32::INFINITY,
                        3 => f32::NEG_INFINITY,
                        4 if case % 4 == 0 => f32::NAN,
                        5 => 1.0,
                        _ => (next() % 1000) as f32 / 999.0 - 0.5,
                    })
                    .collect();
                assert_eq!(argmax_f32(&row), argmax(&row), "{row:?}");
            }
        }
        assert_eq!(argmax_f32(&[f32::NEG_INFINITY; 20]), 0);
    }
}

//! The runtime of the code that `rnn!`, `lstm!` and `gru!` emit: the only items the expansion
//! names besides `core`. Not meant to be called by hand; its items are public because the
//! expansion lives in the user's crate.
//!
//! What needs only `core` (the streaming `step`): the SIMD path ([`Isa`], [`isa`]), the
//! products ([`matmul`], [`matmul_t`], [`outer_sum`]), sums and the element-wise functions
//! ([`math`]). What needs `std` (feature `std`): buffers, the sequence executor's glue, weight
//! files and initialisation.

pub mod linalg;
pub mod math;
#[cfg(feature = "std")]
mod model;

#[cfg(feature = "std")]
pub use linalg::{Packed, matmul_packed, pack};
pub use linalg::{matmul, matmul_t, outer_sum, sum_features, sum_rows};
#[cfg(feature = "std")]
pub use model::*;

use core::sync::atomic::{AtomicU8, Ordering};

/// The instruction set a kernel runs on. The emitted code compiles its whole body once per
/// variant: the AVX2 one inside a `#[target_feature(enable = "avx2,fma")]` function and the
/// AVX-512 one inside `#[target_feature(enable = "avx512f,avx2,fma")]`, so that the
/// element-wise loops are 256- or 512-bit as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Isa {
    /// Plain Rust loops, compiled for the target's baseline.
    Portable,
    /// 256-bit AVX2 with FMA (x86-64 only).
    Avx2,
    /// 512-bit AVX-512F, with AVX2 and FMA (x86-64 only).
    Avx512,
}

/// 0: not yet detected; 1: portable; 2: AVX2; 3: AVX-512.
static DETECTED: AtomicU8 = AtomicU8::new(0);

#[cfg(feature = "std")]
std::thread_local! {
    /// The path this thread's kernels take instead of the detected one ([`with_isa`]).
    static OVERRIDE: core::cell::Cell<Option<Isa>> = const { core::cell::Cell::new(None) };
}

/// The path kernels take: the widest this CPU has (detected once at run time with `std`;
/// without `std`, the target features the crate is compiled with), unless this thread runs
/// inside [`with_isa`].
#[inline]
pub fn isa() -> Isa {
    #[cfg(feature = "std")]
    if let Some(isa) = OVERRIDE.with(|o| o.get()) {
        return isa;
    }
    detected()
}

/// The widest path this machine supports; every narrower one is supported too.
pub fn detected() -> Isa {
    match DETECTED.load(Ordering::Relaxed) {
        3 => Isa::Avx512,
        2 => Isa::Avx2,
        1 => Isa::Portable,
        _ => {
            let isa = detect();
            let code = match isa {
                Isa::Portable => 1,
                Isa::Avx2 => 2,
                Isa::Avx512 => 3,
            };
            DETECTED.store(code, Ordering::Relaxed);
            isa
        }
    }
}

/// Whether this machine runs `isa`.
pub fn supports(isa: Isa) -> bool {
    isa <= detected()
}

fn detect() -> Isa {
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
    }
    #[cfg(all(
        target_arch = "x86_64",
        not(feature = "std"),
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        #[cfg(target_feature = "avx512f")]
        return Isa::Avx512;
        #[cfg(not(target_feature = "avx512f"))]
        return Isa::Avx2;
    }
    #[allow(unreachable_code)]
    Isa::Portable
}

/// Runs `f` with every emitted kernel on this thread taking `isa` (to test the portable and
/// AVX2 paths on a machine with AVX-512, or to compare them). `None` when this CPU does not
/// have `isa`: then `f` does not run.
#[cfg(feature = "std")]
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> Option<R> {
    if !supports(isa) {
        return None;
    }
    let previous = OVERRIDE.with(|o| o.replace(Some(isa)));
    struct Restore(Option<Isa>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(previous);
    Some(f())
}

/// A slice of the wrong length given to an emitted model's `core`-only entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthError {
    /// The argument.
    pub argument: &'static str,
    /// The length it must have.
    pub expected: usize,
    /// The length it has.
    pub found: usize,
}

impl core::fmt::Display for LengthError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "`{}` has {} elements, expected {}",
            self.argument, self.found, self.expected
        )
    }
}

#[cfg(feature = "std")]
impl std::error::Error for LengthError {}

/// `|x|`.
#[inline(always)]
pub fn abs(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & 0x7fff_ffff)
}

/// `1`, `-1` or `0` by the sign of `x` (0 for zero and NaN), as the interpreter's `sign`.
#[inline(always)]
pub fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `max(x, 0)` (0 for NaN, as the interpreter).
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    if x > 0.0 { x } else { 0.0 }
}

/// `1` where `x > 0`, else `0`: relu's derivative.
#[inline(always)]
pub fn step(x: f32) -> f32 {
    if x > 0.0 { 1.0 } else { 0.0 }
}

/// `max(x, c)` as the interpreter computes it (`x` when not below `c`).
#[inline(always)]
pub fn max(x: f32, c: f32) -> f32 {
    if x < c { c } else { x }
}

/// `min(x, c)` as the interpreter computes it (`x` when not above `c`).
#[inline(always)]
pub fn min(x: f32, c: f32) -> f32 {
    if x > c { c } else { x }
}

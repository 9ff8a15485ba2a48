//! Element-wise `f32` math for emitted code, using only `core`.
//!
//! The kernels that our proc macros generate call these functions inside their innermost loops,
//! and they compile into a `#![no_std]` crate. On stable Rust `core` has no `exp`, `ln`, `tanh`
//! or `sqrt` for `f32`, and a call into the platform's `libm` would stop LLVM's loop vectoriser
//! anyway, so this module owns its own implementations: argument reduction, a short polynomial
//! and a reconstruction from the exponent bits, written branch-free (selects only, no calls, no
//! float-to-int `as` casts) so that a loop such as `for i in 0..N { y[i] = tanh(a[i]) }` inside a
//! `#[target_feature(enable = "avx2,fma")]` function becomes straight 256-bit SIMD code.
//!
//! The polynomials are the published Cephes single-precision ones (`expf`, `logf`, `tanhf`).
//! Each function's doc states its maximum error against the `f64` functions of `std`, measured
//! over all 2^32 inputs wherever the exact result is a normal `f32` (the ignored `exhaustive`
//! test); every one stays within 2.41 ulp (`1.8e-7` relative), far inside the `1e-5` relative
//! tolerance we hold against PyTorch. `sqrt` is correctly rounded. Results in the subnormal range
//! lie within `0.75 · 2^-149` of the exact value; special values (`±0`, `±inf`, NaN) follow
//! IEEE 754 and C99 Annex F. No operation is contracted into a fused multiply-add (Rust never
//! does so implicitly), so each function returns the same bits whether it runs scalar or is
//! inlined into an AVX2/FMA loop.

/// `1.5 · 2^23`: adding it to a float of magnitude below `2^22` rounds that float to an integer
/// (ties to even), which is left in the low mantissa bits of the sum.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `log2(e)`, the multiplier that turns `x` into a count of halvings of `e^x`.
const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// High part of a Cody–Waite split of `ln 2` (`0x3f317200`, 15 significant bits): `n · LN2_HI` is
/// exact for every `|n| < 2^9`, which covers every exponent an `f32` can produce.
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);

/// Low part of the split: `LN2_HI + LN2_LO` equals `ln 2` to about `2^-45`.
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);

/// Inputs of [`exp`] above this are clamped to it: `e^89` overflows to `+inf` all the same.
const EXP_MAX_ARG: f32 = 89.0;

/// Inputs of [`exp`] below this are clamped to it: `e^-104 < 2^-150` still rounds to `0`.
const EXP_MIN_ARG: f32 = -104.0;

/// Above this [`tanh`] switches from the odd polynomial to `1 - 2 / (e^(2|x|) + 1)`, whose
/// subtraction cancels at most one bit there because the result is at least `0.55`.
const TANH_POLY_LIMIT: f32 = 0.625;

/// PyTorch's default `threshold` of `Softplus`: above it the output is the input itself.
const SOFTPLUS_THRESHOLD: f32 = 20.0;

/// Bits of `√½` (`0x3f3504f3`); [`ln`] reduces its argument into `[√½, √2)`.
const SQRT_HALF_BITS: i32 = 0x3f35_04f3;

/// `2^23`, which scales a subnormal input of [`ln`] into the normal range.
const TWO_POW_23: f32 = 8_388_608.0;

/// `2^k` for `k` in `[-126, 127]`, built from its exponent bits.
#[inline(always)]
fn pow2i(k: i32) -> f32 {
    f32::from_bits((k.wrapping_add(127) as u32) << 23)
}

/// `e^r` for `|r| ≤ ln 2 / 2` (and a little beyond): `1 + r + r²·P(r)`, Cephes `expf`'s degree-5
/// minimax `P`; relative error below one ulp before rounding.
#[inline(always)]
fn exp_reduced(r: f32) -> f32 {
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    (p * (r * r) + r) + 1.0
}

/// `ln x` plus `k_bias · ln 2`, for a positive normal (finite) `x`; no special values.
#[inline(always)]
fn ln_normal(x: f32, k_bias: i32) -> f32 {
    // Write x = 2^k · m with m in [√½, √2): subtracting the bits of √½ makes the exponent field
    // step at √½ instead of at 1, and taking k back off the exponent field leaves m.
    let bits = x.to_bits() as i32;
    let k = bits.wrapping_sub(SQRT_HALF_BITS) >> 23;
    let m = f32::from_bits(bits.wrapping_sub(k << 23) as u32);
    // Exact by Sterbenz's lemma, so ln near 1 keeps its full relative accuracy.
    let f = m - 1.0;
    let kf = k.wrapping_add(k_bias) as f32;
    // ln(1 + f) = f - f²/2 + f³·P(f), Cephes logf's degree-8 P.
    let z = f * f;
    let mut p = 7.037_683_6e-2_f32;
    p = p * f - 1.151_461e-1;
    p = p * f + 1.167_699_9e-1;
    p = p * f - 1.242_014_1e-1;
    p = p * f + 1.424_932_3e-1;
    p = p * f - 1.666_805_8e-1;
    p = p * f + 2.000_071_5e-1;
    p = p * f - 2.499_999_4e-1;
    p = p * f + 3.333_333e-1;
    let y = p * f * z + kf * LN2_LO - 0.5 * z;
    (f + y) + kf * LN2_HI
}

/// `e^x`; error at most 0.99 ulp (`8.2e-8` relative), `+inf` above 88.72, `0` below -103.97.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Two selects, not f32::max/min (which would replace a NaN by the bound): a NaN fails both
    // comparisons and flows through the arithmetic below.
    let x = if x > EXP_MAX_ARG { EXP_MAX_ARG } else { x };
    let x = if x < EXP_MIN_ARG { EXP_MIN_ARG } else { x };
    // x = n·ln 2 + r with n = round(x·log2 e) in [-150, 128], read as an integer k from the
    // magic sum's low bits; |x·log2 e| < 2^22 after the clamp, as the trick requires.
    let t = x * LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let k = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // 2^k as 2^(k/2) · 2^(k - k/2), both normal for k in [-150, 128]. The first product is exact,
    // so after the polynomial the only rounding left is the second product's, which happens only
    // into the subnormal range or on overflow to +inf.
    let k1 = k >> 1;
    exp_reduced(r) * pow2i(k1) * pow2i(k.wrapping_sub(k1))
}

/// Hyperbolic tangent; error at most 1.34 ulp (`1.43e-7` relative), exactly `±1` for `|x| ≥ 9.02`.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    // |x| < 0.625: odd polynomial a + a³·P(a²) (Cephes tanhf), relatively accurate down to the
    // subnormals, where it returns a itself.
    let z = a * a;
    let mut p = -5.704_988_7e-3_f32;
    p = p * z + 2.063_909e-2;
    p = p * z - 5.373_971_6e-2;
    p = p * z + 1.333_144_2e-1;
    p = p * z - 3.333_328e-1;
    let small = p * z * a + a;
    // Otherwise 1 - 2/(e^(2a) + 1): e^(2a) = +inf gives exactly 1, and the quotient already
    // drops below half an ulp of 1 at a ≈ 9.01.
    let large = 1.0 - 2.0 / (exp(a + a) + 1.0);
    // A NaN fails the comparison and takes the second formula, which keeps it NaN. Computing on
    // |x| and restoring the sign keeps tanh odd and tanh(-0) = -0.
    let t = if a < TANH_POLY_LIMIT { small } else { large };
    t.copysign(x)
}

/// Logistic sigmoid `1 / (1 + e^-x)`; error at most 2.41 ulp (`1.79e-7` relative), never overflows.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    // e = e^-|x| lies in [0, 1], so nothing overflows: σ(x) = 1/(1 + e) for x ≥ 0 and
    // e/(1 + e) for x < 0, which stays relatively accurate where σ underflows toward 0.
    let e = exp(-x.abs());
    let numerator = if x < 0.0 { e } else { 1.0 };
    numerator / (1.0 + e)
}

/// PyTorch's softplus, `x` for `x > 20` and `ln(1 + e^x)` otherwise; error at most 2 ulp (`1.79e-7`
/// relative).
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    // ln(1 + e^x) = max(x, 0) + log1p(u) with u = e^-|x| in [0, 1]. For log1p, w = 1 + u is
    // rounded, but w - 1 and u - (w - 1) are exact, and ln(1 + u) = ln w + (u - (w - 1))/w to
    // first order in that rounding error: relative accuracy holds as u → 0, where it returns u.
    let u = exp(-x.abs());
    let w = 1.0 + u;
    let log1p_u = ln_normal(w, 0) + (u - (w - 1.0)) / w;
    let y = if x > 0.0 { x + log1p_u } else { log1p_u };
    if x > SOFTPLUS_THRESHOLD { x } else { y }
}

/// Natural logarithm; error at most 0.83 ulp (`8.2e-8` relative); `ln 0 = -inf`, `ln(x < 0) = NaN`.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let subnormal = x < f32::MIN_POSITIVE;
    let scaled = if subnormal { x * TWO_POW_23 } else { x };
    let y = ln_normal(scaled, if subnormal { -23 } else { 0 });
    let y = if x == f32::INFINITY { x } else { y };
    let y = if x == 0.0 { f32::NEG_INFINITY } else { y };
    if x >= 0.0 { y } else { f32::NAN }
}

/// Square root, correctly rounded (0 ulp error: IEEE 754 `squareRoot`).
#[inline(always)]
pub fn sqrt(x: f32) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    {
        // The SSE instruction, which LLVM sees as `llvm.sqrt.f32` and widens to `vsqrtps`.
        use core::arch::x86_64::{_mm_cvtss_f32, _mm_set_ss, _mm_sqrt_ss};
        // SAFETY: the cfg above guarantees that every CPU this code runs on has SSE.
        unsafe { _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(x))) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    {
        sqrt_portable(x)
    }
}

/// Correctly rounded square root from `f64` multiplications and additions only: [`sqrt`] on
/// targets without SSE (every one but x86_64, and soft-float x86_64), about 6x slower than
/// `sqrtps`.
#[cfg_attr(
    all(target_arch = "x86_64", target_feature = "sse", not(test)),
    allow(dead_code)
)]
#[inline(always)]
fn sqrt_portable(x: f32) -> f32 {
    let d = f64::from(x);
    // 1/√d from the bits (relative error below 3.5%), then three Newton steps on 1/√d, each
    // squaring the error: 1.8e-3, 4.6e-6, 3.2e-11.
    let half_d = 0.5 * d;
    let mut r = f64::from_bits(0x5fe6_eb50_c7b5_37a9_u64.wrapping_sub(d.to_bits() >> 1));
    r *= 1.5 - half_d * r * r;
    r *= 1.5 - half_d * r * r;
    r *= 1.5 - half_d * r * r;
    // One Newton step on √d itself: d - s·s is exact (Sterbenz), so s ends within 1.5·2^-53 of
    // √d. An f32 square root is never closer than 2^-51 (relative) to a midpoint between two
    // f32s, so rounding s to f32 rounds √d correctly.
    let s = d * r;
    let s = s + 0.5 * r * (d - s * s);
    let y = s as f32;
    // ±0, +inf and NaN are their own square roots; negative numbers have none.
    let y = if x > 0.0 && x < f32::INFINITY { y } else { x };
    if x < 0.0 { f32::NAN } else { y }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::vec::Vec;

    /// Sweep stride through the 2^32 bit patterns: every 97th in optimised builds; in debug builds
    /// (opt-level 1) every 499th, about 8.6 million inputs per function, so the suite takes under a
    /// second on an idle two-core machine.
    const STRIDE: usize = if cfg!(debug_assertions) { 499 } else { 97 };

    /// An error bound stated in a doc comment, for results whose exact value is a normal `f32`.
    #[derive(Clone, Copy)]
    struct Bound {
        ulps: f64,
        relative: f64,
    }

    const EXP: Bound = Bound {
        ulps: 0.99,
        relative: 8.2e-8,
    };
    const TANH: Bound = Bound {
        ulps: 1.34,
        relative: 1.43e-7,
    };
    const SIGMOID: Bound = Bound {
        ulps: 2.41,
        relative: 1.79e-7,
    };
    const SOFTPLUS: Bound = Bound {
        ulps: 2.0,
        relative: 1.79e-7,
    };
    const LN: Bound = Bound {
        ulps: 0.83,
        relative: 8.2e-8,
    };

    /// Bound on the distance from the exact value of results in the subnormal range, in units of
    /// the subnormal step `2^-149`.
    const SUBNORMAL_STEPS: f64 = 0.75;

    /// Each function with an error bound, its `f64` reference and that bound.
    type Case = (&'static str, fn(f32) -> f32, fn(f64) -> f64, Bound);
    const CASES: [Case; 5] = [
        ("exp", exp, f64::exp, EXP),
        ("tanh", tanh, f64::tanh, TANH),
        ("sigmoid", sigmoid, sigmoid_f64, SIGMOID),
        ("softplus", softplus, softplus_f64, SOFTPLUS),
        ("ln", ln, f64::ln, LN),
    ];

    fn sigmoid_f64(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn softplus_f64(x: f64) -> f64 {
        if x > 20.0 { x } else { x.exp().ln_1p() }
    }

    /// Largest errors seen: over results whose exact value is a normal `f32` (relative and in ulps,
    /// with the input of the worst relative error) and over those in the subnormal range.
    #[derive(Debug, Default)]
    struct MaxError {
        relative: f64,
        ulps: f64,
        at: f32,
        subnormal_steps: f64,
    }

    /// The ulp of the `f32` binade holding the normal value `v`.
    fn ulp(v: f64) -> f64 {
        let exponent = ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023;
        2f64.powi(exponent - 23)
    }

    /// Measures `f` against `reference` at `xs`, asserting that NaNs and overflows agree.
    fn measure(
        f: fn(f32) -> f32,
        reference: fn(f64) -> f64,
        xs: impl Iterator<Item = f32>,
    ) -> MaxError {
        let mut max = MaxError::default();
        for x in xs {
            let got = f(x);
            let want = reference(f64::from(x));
            if want.is_nan() || got.is_nan() {
                assert!(
                    want.is_nan() && got.is_nan(),
                    "f({x:e}) = {got:e}, want {want:e}"
                );
                continue;
            }
            let rounded = want as f32;
            if rounded.is_infinite() && got == rounded {
                continue;
            }
            let err = (f64::from(got) - want).abs();
            if want.abs() < f64::from(f32::MIN_POSITIVE) {
                let steps = err / f64::from(f32::from_bits(1));
                max.subnormal_steps = max.subnormal_steps.max(steps);
                continue;
            }
            let relative = err / want.abs();
            if relative > max.relative {
                max.relative = relative;
                max.at = x;
            }
            max.ulps = max.ulps.max(err / ulp(want));
        }
        max
    }

    /// Measures `f` at `xs` and asserts its documented bounds.
    fn check(case: Case, xs: impl Iterator<Item = f32>) {
        let (name, f, reference, bound) = case;
        let max = measure(f, reference, xs);
        std::println!("{name}: {max:?}");
        assert!(max.ulps <= bound.ulps, "{name}: {max:?}");
        assert!(max.relative <= bound.relative, "{name}: {max:?}");
        assert!(max.subnormal_steps <= SUBNORMAL_STEPS, "{name}: {max:?}");
    }

    /// Asserts that `f` returns the correctly rounded square root at every one of `xs`.
    fn check_correctly_rounded(f: fn(f32) -> f32, xs: impl Iterator<Item = f32>) {
        for x in xs {
            let want = f64::from(x).sqrt() as f32;
            let got = f(x);
            let same = got.to_bits() == want.to_bits() || want.is_nan() && got.is_nan();
            assert!(same, "sqrt({x:e}) = {got:e}, want {want:e}");
        }
    }

    /// Every `stride`th `f32` bit pattern, after the special and boundary values of both signs.
    fn inputs(stride: usize) -> impl Iterator<Item = f32> {
        let specials: Vec<f32> = [
            0.0,
            f32::INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x007f_ffff),
            f32::EPSILON,
            0.625,
            1.0,
            9.02,
            9.1,
            20.0,
            87.33654,
            88.7,
            88.72283,
            88.72284,
            103.97,
            104.0,
        ]
        .iter()
        .flat_map(|&v| [v, -v])
        .collect();
        specials
            .into_iter()
            .chain((0..=u32::MAX).step_by(stride).map(f32::from_bits))
    }

    #[test]
    fn exp_error() {
        check(CASES[0], inputs(STRIDE));
    }

    #[test]
    fn tanh_error() {
        check(CASES[1], inputs(STRIDE));
    }

    #[test]
    fn sigmoid_error() {
        check(CASES[2], inputs(STRIDE));
    }

    #[test]
    fn softplus_error() {
        check(CASES[3], inputs(STRIDE));
    }

    #[test]
    fn ln_error() {
        check(CASES[4], inputs(STRIDE));
    }

    #[test]
    fn sqrt_is_correctly_rounded() {
        check_correctly_rounded(sqrt, inputs(STRIDE));
        check_correctly_rounded(sqrt_portable, inputs(STRIDE));
    }

    #[test]
    fn special_values() {
        let same = |got: f32, want: f32| got.to_bits() == want.to_bits();
        let inf = f32::INFINITY;
        let tiny = f32::from_bits(1);

        assert!(same(exp(inf), inf) && same(exp(-inf), 0.0) && exp(f32::NAN).is_nan());
        assert!(same(exp(89.0), inf) && same(exp(88.72284), inf) && exp(88.72283).is_finite());
        assert!((0.0..f32::MIN_POSITIVE).contains(&exp(-104.0)));
        assert!(same(exp(-f32::MAX), 0.0) && same(exp(f32::MAX), inf));
        for x in [0.0, tiny, f32::from_bits(0x007f_ffff), f32::MIN_POSITIVE] {
            assert!(same(exp(x), 1.0) && same(exp(-x), 1.0), "exp(±{x:e})");
        }

        assert!(same(tanh(0.0), 0.0) && same(tanh(-0.0), -0.0) && tanh(f32::NAN).is_nan());
        assert!(same(tanh(inf), 1.0) && same(tanh(-inf), -1.0));
        assert!(same(tanh(tiny), tiny) && same(tanh(-tiny), -tiny));
        for x in [9.02, 9.1, 10.0, 88.7, 1e30, f32::MAX] {
            assert!(same(tanh(x), 1.0) && same(tanh(-x), -1.0), "tanh(±{x})");
        }

        assert!(same(sigmoid(-inf), 0.0) && same(sigmoid(inf), 1.0));
        assert!(sigmoid(f32::NAN).is_nan());
        assert!(same(sigmoid(0.0), 0.5) && same(sigmoid(-0.0), 0.5));
        assert!(same(sigmoid(-f32::MAX), 0.0) && same(sigmoid(f32::MAX), 1.0));

        assert!(same(softplus(inf), inf) && same(softplus(-inf), 0.0));
        assert!(softplus(f32::NAN).is_nan());
        assert!(same(softplus(20.5), 20.5) && same(softplus(f32::MAX), f32::MAX));
        assert!(same(softplus(-f32::MAX), 0.0));

        assert!(same(ln(0.0), -inf) && same(ln(-0.0), -inf));
        assert!(same(ln(inf), inf) && same(ln(1.0), 0.0));
        assert!(ln(-1.0).is_nan() && ln(-inf).is_nan() && ln(f32::NAN).is_nan());
        assert!(ln(-tiny).is_nan());

        for f in [sqrt, sqrt_portable] {
            assert!(same(f(0.0), 0.0) && same(f(-0.0), -0.0) && same(f(inf), inf));
            assert!(f(-1.0).is_nan() && f(-inf).is_nan() && f(f32::NAN).is_nan());
            assert!(same(f(4.0), 2.0) && f(-tiny).is_nan());
        }
    }

    /// All 2^32 inputs of every function, which is where the documented bounds come from; about
    /// eight minutes on two cores: `cargo test --release -- --ignored --nocapture exhaustive`.
    #[test]
    #[ignore = "exhaustive, minutes even in release: run with --release -- --ignored"]
    fn exhaustive() {
        let all = || (0..=u32::MAX).map(f32::from_bits);
        std::thread::scope(|scope| {
            for case in CASES {
                scope.spawn(move || check(case, all()));
            }
            scope.spawn(move || check_correctly_rounded(sqrt, all()));
            scope.spawn(move || check_correctly_rounded(sqrt_portable, all()));
        });
    }
}

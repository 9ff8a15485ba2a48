//! Inline `f32x4` approximations of the functions CLIF lacks: `exp`, `ln`, `tanh`, `sigmoid` and
//! PyTorch's `softplus`, each emitted straight into the kernel that needs it (no call, no
//! branch: comparisons and bit selects only).
//!
//! `exp`, `ln` and `softplus` are the algorithms of the emitted Rust's `core`-only math
//! (`rnn::rt::math`): Cody–Waite argument reduction, the published Cephes single-precision
//! polynomials, and a reconstruction from the exponent bits. `sigmoid` uses the same reduction
//! and polynomial with a one-step reconstruction (it flushes results below `σ(-86.5)` to zero),
//! and `tanh` is a rational minimax approximation with one division and no exponential: an
//! LSTM step computes five of these functions per hidden unit, and their instruction count is
//! most of the step's element-wise time in 128-bit vectors. Products and sums are fused into
//! FMAs (`vfmadd` where the host has them), so the bits differ from the emitted Rust's in the
//! last place.
//!
//! This crate's tests (`tests/approx.rs`) measure the maximum error against `f64`'s functions
//! over a dense sweep of the whole `f32` range (every 2^11-th bit pattern of each sign, 4.2
//! million inputs) plus the special values (NaN with several payloads among them), and hold each
//! function to the bound below. With `RNN_APPROX_EXHAUSTIVE=1` they check every one of the 2^32
//! inputs (three minutes); the maxima below are from that run:
//!
//! | function | max relative error, every input | bound held | special values |
//! |---|---|---|---|
//! | [`exp`] | 8.5e-8 | 1.2e-7 | `+inf` above 88.72, `0` below -103.97, NaN stays NaN |
//! | [`ln`] | 8.1e-8 | 1.2e-7 | `ln 0 = -inf`, `ln(x < 0) = NaN`, `ln(+inf) = +inf` |
//! | [`tanh`] | 2.9e-7 | 3.0e-7 | odd, `tanh(-0) = -0`, exactly `±1` above 7.9053 |
//! | [`sigmoid`] | 1.8e-7 | 2.5e-7 | `0` below -86.5 (absolute error under `2.72e-38`); `σ(+inf) = 1`, `σ(-inf) = 0` |
//! | [`softplus`] | 1.8e-7 | 2.5e-7 | `x` itself above 20 (PyTorch's threshold) |
//!
//! The relative bounds hold where the exact result is a normal `f32` (for `sigmoid`, above
//! `σ(-86.5)`); where it is subnormal the absolute error is below `2^-149` (for `sigmoid`, which
//! returns 0 there, below `2.72e-38`).

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32X4, I32X4};
use cranelift_codegen::ir::{ConstantData, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

/// `1.5 · 2^23`: added to a float below `2^22` in magnitude, rounds it to an integer (ties to
/// even) left in the sum's low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// High part of a Cody–Waite split of `ln 2` (`n · LN2_HI` is exact for `|n| < 2^9`).
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
/// Low part: `LN2_HI + LN2_LO` is `ln 2` to about `2^-45`.
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// `exp`'s clamps: `e^89` overflows all the same, `e^-104` rounds to 0 all the same.
const EXP_MAX_ARG: f32 = 89.0;
const EXP_MIN_ARG: f32 = -104.0;
/// Cephes' `expf` polynomial: `e^r = 1 + r + r²·P(r)` on `|r| ≤ ln(2)/2`.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// Above this magnitude `tanh` is `±1` (within `2.7e-7`).
const TANH_CLAMP: f32 = 7.905_311;
/// Below this magnitude `tanh` returns `x` (within `5.4e-8` relative: `x³/3` is below it).
const TANH_TINY: f32 = 4e-4;
/// `tanh`'s numerator `P(x²)` (odd: times `x`), from the highest degree down.
const TANH_NUM: [f32; 7] = [
    -2.760_768_4e-16,
    2.000_188e-13,
    -8.604_672e-11,
    5.122_297_3e-8,
    1.485_722_35e-5,
    6.372_619_5e-4,
    4.893_524_6e-3,
];
/// `tanh`'s denominator `Q(x²)`.
const TANH_DEN: [f32; 4] = [1.198_258_4e-6, 1.185_347_1e-4, 2.268_434_7e-3, 4.893_525e-3];
/// Below this `sigmoid`'s `e^x` would leave the normal range: the result is flushed to 0.
const SIGMOID_FLUSH: f32 = -86.5;
/// PyTorch's `Softplus` threshold.
const SOFTPLUS_THRESHOLD: f32 = 20.0;
/// Bits of `√½`: `ln` reduces its argument into `[√½, √2)`.
const SQRT_HALF_BITS: i32 = 0x3f35_04f3;

/// A function builder with the vector helpers the approximations share.
pub struct Vec4<'a, 'b> {
    /// The builder the instructions go to.
    pub b: &'a mut FunctionBuilder<'b>,
}

impl Vec4<'_, '_> {
    /// `c` in every lane.
    pub fn splat(&mut self, c: f32) -> Value {
        let bytes: Vec<u8> = (0..4).flat_map(|_| c.to_le_bytes()).collect();
        let k = self.b.func.dfg.constants.insert(ConstantData::from(bytes));
        self.b.ins().vconst(F32X4, k)
    }

    /// The integer `c` in every lane.
    pub fn splat_i(&mut self, c: i32) -> Value {
        let bytes: Vec<u8> = (0..4).flat_map(|_| c.to_le_bytes()).collect();
        let k = self.b.func.dfg.constants.insert(ConstantData::from(bytes));
        self.b.ins().vconst(I32X4, k)
    }

    /// The lanes' bits as integers.
    pub fn bits(&mut self, x: Value) -> Value {
        self.b.ins().bitcast(I32X4, MemFlagsData::new(), x)
    }

    /// Integer lanes' bits as floats.
    pub fn float(&mut self, x: Value) -> Value {
        self.b.ins().bitcast(F32X4, MemFlagsData::new(), x)
    }

    /// `cc(a, b)` per lane as a float mask (all ones or all zeros).
    pub fn cmp(&mut self, cc: FloatCC, a: Value, b: Value) -> Value {
        let m = self.b.ins().fcmp(cc, a, b);
        self.float(m)
    }

    /// Per lane `mask ? a : b`.
    pub fn select(&mut self, mask: Value, a: Value, b: Value) -> Value {
        self.b.ins().bitselect(mask, a, b)
    }

    /// `a · b + c` with one rounding (`vfmadd` where the host has FMA).
    pub fn mul_add(&mut self, a: Value, b: Value, c: Value) -> Value {
        self.b.ins().fma(a, b, c)
    }

    /// `p(r)` by Horner's rule with `coefficients` from the highest degree down.
    fn horner(&mut self, r: Value, coefficients: &[f32]) -> Value {
        let mut p = self.splat(coefficients[0]);
        for &c in &coefficients[1..] {
            let c = self.splat(c);
            p = self.mul_add(p, r, c);
        }
        p
    }

    /// `|x|` (the sign bit cleared).
    pub fn abs(&mut self, x: Value) -> Value {
        let bits = self.bits(x);
        let mask = self.splat_i(0x7fff_ffff);
        let a = self.b.ins().band(bits, mask);
        self.float(a)
    }

    /// `2^k` per lane for integer lanes `k` in `[-126, 127]`.
    fn pow2i(&mut self, k: Value) -> Value {
        let bias = self.splat_i(127);
        let e = self.b.ins().iadd(k, bias);
        let e = self.b.ins().ishl_imm_u(e, 23);
        self.float(e)
    }
}

/// `e^x` per lane: at most 0.99 ulp (1.2e-7 relative) where the result is normal; `+inf` above
/// 88.72, `0` below -103.97, NaN in, NaN out.
pub fn exp(v: &mut Vec4, x: Value) -> Value {
    // Clamps as selects (a NaN fails both comparisons and flows through).
    let hi = v.splat(EXP_MAX_ARG);
    let lo = v.splat(EXP_MIN_ARG);
    let above = v.cmp(FloatCC::GreaterThan, x, hi);
    let x = v.select(above, hi, x);
    let below = v.cmp(FloatCC::LessThan, x, lo);
    let x = v.select(below, lo, x);
    let (k, e) = reduce_exp(v, x);
    // 2^k as 2^(k/2) · 2^(k - k/2), both normal for k in [-150, 128].
    let k1 = v.b.ins().sshr_imm_u(k, 1);
    let k2 = v.b.ins().isub(k, k1);
    let s1 = v.pow2i(k1);
    let s2 = v.pow2i(k2);
    let e = v.b.ins().fmul(e, s1);
    v.b.ins().fmul(e, s2)
}

/// `ln x + k_bias · ln 2` for positive normal finite lanes (no special values).
fn ln_normal(v: &mut Vec4, x: Value, k_bias: Value) -> Value {
    let bits = v.bits(x);
    let sh = v.splat_i(SQRT_HALF_BITS);
    let d = v.b.ins().isub(bits, sh);
    let k = v.b.ins().sshr_imm_u(d, 23);
    let ks = v.b.ins().ishl_imm_u(k, 23);
    let mb = v.b.ins().isub(bits, ks);
    let m = v.float(mb);
    let one = v.splat(1.0);
    let f = v.b.ins().fsub(m, one);
    let kk = v.b.ins().iadd(k, k_bias);
    let kf = v.b.ins().fcvt_from_sint(F32X4, kk);
    let z = v.b.ins().fmul(f, f);
    let p = v.horner(
        f,
        &[
            7.037_683_6e-2,
            -1.151_461e-1,
            1.167_699_9e-1,
            -1.242_014_1e-1,
            1.424_932_3e-1,
            -1.666_805_8e-1,
            2.000_071_5e-1,
            -2.499_999_4e-1,
            3.333_333e-1,
        ],
    );
    // y = p·f·z + kf·LN2_LO - 0.5·z
    let pf = v.b.ins().fmul(p, f);
    let pfz = v.b.ins().fmul(pf, z);
    let ln2lo = v.splat(LN2_LO);
    let y = v.mul_add(kf, ln2lo, pfz);
    let half = v.splat(0.5);
    let hz = v.b.ins().fmul(half, z);
    let y = v.b.ins().fsub(y, hz);
    let fy = v.b.ins().fadd(f, y);
    let ln2hi = v.splat(LN2_HI);
    v.mul_add(kf, ln2hi, fy)
}

/// Natural logarithm per lane: at most 0.83 ulp (1.2e-7 relative); `ln 0 = -inf`,
/// `ln(x < 0) = NaN`, `ln(+inf) = +inf`, subnormal inputs scaled by `2^23` first.
pub fn ln(v: &mut Vec4, x: Value) -> Value {
    let min_pos = v.splat(f32::MIN_POSITIVE);
    let subnormal = v.cmp(FloatCC::LessThan, x, min_pos);
    let two23 = v.splat(8_388_608.0);
    let xs = v.b.ins().fmul(x, two23);
    let scaled = v.select(subnormal, xs, x);
    let m23 = v.splat_i(-23);
    let zero_i = v.splat_i(0);
    let sub_i = v.bits(subnormal);
    let bias = v.b.ins().bitselect(sub_i, m23, zero_i);
    let y = ln_normal(v, scaled, bias);
    let inf = v.splat(f32::INFINITY);
    let is_inf = v.cmp(FloatCC::Equal, x, inf);
    let y = v.select(is_inf, x, y);
    let zero = v.splat(0.0);
    let is_zero = v.cmp(FloatCC::Equal, x, zero);
    let ninf = v.splat(f32::NEG_INFINITY);
    let y = v.select(is_zero, ninf, y);
    let nonneg = v.cmp(FloatCC::GreaterThanOrEqual, x, zero);
    let nan = v.splat(f32::NAN);
    v.select(nonneg, y, nan)
}

/// `e^x` for `x` in `[-86.5, 88.7]` (callers clamp; other inputs, NaN among them, give
/// garbage): the reduction and polynomial of [`exp`] with one scaling by `2^k` added straight to
/// the exponent bits, which is exact while the result stays at or above `2^-125`.
fn exp_core(v: &mut Vec4, x: Value) -> Value {
    let (k, e) = reduce_exp(v, x);
    let eb = v.bits(e);
    let scale = v.b.ins().ishl_imm_u(k, 23);
    let y = v.b.ins().iadd(eb, scale);
    v.float(y)
}

/// `e^x = 2^k · e^r`: the integer lanes `k = round(x·log2 e)` (read from the magic sum's low
/// bits) and `e^r = 1 + r + r²·P(r)` for `x = k·ln 2 + r` (Cody–Waite with FMA, `|r| ≤ ln(2)/2`).
/// The scaling by `2^k` is the caller's.
fn reduce_exp(v: &mut Vec4, x: Value) -> (Value, Value) {
    let log2e = v.splat(core::f32::consts::LOG2_E);
    let magic = v.splat(ROUND_MAGIC);
    let t = v.mul_add(x, log2e, magic);
    let n = v.b.ins().fsub(t, magic);
    let tb = v.bits(t);
    let mb = v.splat_i(ROUND_MAGIC.to_bits() as i32);
    let k = v.b.ins().isub(tb, mb);
    let ln2hi = v.splat(-LN2_HI);
    let ln2lo = v.splat(-LN2_LO);
    let r = v.mul_add(n, ln2hi, x);
    let r = v.mul_add(n, ln2lo, r);
    let p = v.horner(r, &EXP_POLY);
    let r2 = v.b.ins().fmul(r, r);
    let q = v.mul_add(p, r2, r);
    let one = v.splat(1.0);
    (k, v.b.ins().fadd(q, one))
}

/// Hyperbolic tangent per lane: at most 3.0e-7 relative error (about 2.5 ulp), odd, exactly
/// `±1` above `|x| = 7.9053`, `x` itself below `4e-4` in magnitude, NaN in, NaN out.
///
/// A rational minimax approximation, `x·P(x²) / Q(x²)` of degrees 13 and 6 (the one Eigen and
/// tract use; `1 - tanh` is below `2.7e-7` beyond its range): one division, no exponential. About half the
/// instructions of `1 - 2/(e^{2|x|} + 1)`, and a step of an LSTM computes five of these
/// functions per hidden unit.
pub fn tanh(v: &mut Vec4, x: Value) -> Value {
    let x2 = v.b.ins().fmul(x, x);
    let p = v.horner(x2, &TANH_NUM);
    let p = v.b.ins().fmul(p, x);
    let q = v.horner(x2, &TANH_DEN);
    let y = v.b.ins().fdiv(p, q);
    // ±1 beyond the clamp (where `P/Q` loses accuracy, and far beyond overflows to NaN), with
    // the sign of x.
    let a = v.abs(x);
    let hi = v.splat(TANH_CLAMP);
    let big = v.cmp(FloatCC::GreaterThan, a, hi);
    let xb = v.bits(x);
    let sign = v.splat_i(i32::MIN);
    let s = v.b.ins().band(xb, sign);
    let one = v.splat_i(1.0f32.to_bits() as i32);
    let unit = v.b.ins().bor(s, one);
    let unit = v.float(unit);
    let y = v.select(big, unit, y);
    let tiny = v.splat(TANH_TINY);
    let is_tiny = v.cmp(FloatCC::LessThan, a, tiny);
    v.select(is_tiny, x, y)
}

/// Logistic sigmoid per lane: at most 2.5e-7 relative error (about 2 ulp) above `x = -86.5`
/// (where `σ(x) > 2.71e-38`); below, `0` (an absolute error under `2.72e-38`). Never
/// overflows; `σ(-inf) = 0`, `σ(+inf) = 1`, NaN in, NaN out.
///
/// `e^{-|x|}` by [`exp`]'s reduction and polynomial with a one-step scaling, then
/// `1 / (1 + e)` or `e / (1 + e)` by the sign of `x`.
pub fn sigmoid(v: &mut Vec4, x: Value) -> Value {
    let xb = v.bits(x);
    let sign = v.splat_i(i32::MIN);
    let nab = v.b.ins().bor(xb, sign);
    let na = v.float(nab);
    let lo = v.splat(SIGMOID_FLUSH);
    let below = v.cmp(FloatCC::LessThan, na, lo);
    let na = v.select(below, lo, na);
    let e = exp_core(v, na);
    let zero = v.splat(0.0);
    let e = v.select(below, zero, e);
    let one = v.splat(1.0);
    let negative = v.cmp(FloatCC::LessThan, x, zero);
    let num = v.select(negative, e, one);
    let den = v.b.ins().fadd(one, e);
    let y = v.b.ins().fdiv(num, den);
    // The bit arithmetic of `exp_core` does not carry a NaN through: put it back.
    let nan = v.cmp(FloatCC::Unordered, x, x);
    v.select(nan, x, y)
}

/// PyTorch's softplus per lane, `x` above 20 and `ln(1 + e^x)` otherwise: at most 2 ulp
/// (2.5e-7 relative).
pub fn softplus(v: &mut Vec4, x: Value) -> Value {
    let a = v.abs(x);
    let na = v.b.ins().fneg(a);
    let u = exp(v, na);
    let one = v.splat(1.0);
    let w = v.b.ins().fadd(one, u);
    let zero_i = v.splat_i(0);
    let lw = ln_normal(v, w, zero_i);
    let w1 = v.b.ins().fsub(w, one);
    let c = v.b.ins().fsub(u, w1);
    let c = v.b.ins().fdiv(c, w);
    let log1p = v.b.ins().fadd(lw, c);
    let zero = v.splat(0.0);
    let positive = v.cmp(FloatCC::GreaterThan, x, zero);
    let xl = v.b.ins().fadd(x, log1p);
    let y = v.select(positive, xl, log1p);
    let th = v.splat(SOFTPLUS_THRESHOLD);
    let above = v.cmp(FloatCC::GreaterThan, x, th);
    v.select(above, x, y)
}

/// One of the approximated functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Function {
    /// [`exp`].
    Exp,
    /// [`ln`].
    Ln,
    /// [`tanh`].
    Tanh,
    /// [`sigmoid`].
    Sigmoid,
    /// [`softplus`].
    Softplus,
}

impl Function {
    /// Every function.
    pub const ALL: [Function; 5] = [
        Function::Exp,
        Function::Ln,
        Function::Tanh,
        Function::Sigmoid,
        Function::Softplus,
    ];

    /// Emits the function of `x`.
    pub fn emit(self, v: &mut Vec4, x: Value) -> Value {
        match self {
            Function::Exp => exp(v, x),
            Function::Ln => ln(v, x),
            Function::Tanh => tanh(v, x),
            Function::Sigmoid => sigmoid(v, x),
            Function::Softplus => softplus(v, x),
        }
    }
}

/// A function compiled alone over a slice: `y[i] = f(x[i])`, four lanes at a time (what the
/// accuracy tests and `rnnc inspect --clif` read).
pub struct Mapped {
    // Keeps the code alive; freed on drop.
    module: Option<cranelift_jit::JITModule>,
    code: unsafe extern "C" fn(*const f32, *mut f32, usize),
    clif: String,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some(module) = self.module.take() {
            // SAFETY: `code` is the only pointer into the module, and it goes with `self`.
            unsafe { module.free_memory() };
        }
    }
}

impl Mapped {
    /// Compiles `f` over slices.
    pub fn compile(f: Function) -> Result<Mapped, crate::JitError> {
        use cranelift_codegen::ir::{AbiParam, condcodes::IntCC, types::I64};
        use cranelift_frontend::FunctionBuilderContext;
        use cranelift_module::{Linkage, Module};
        let mut module = crate::new_module(&[])?;
        let mut ctx = module.make_context();
        let config = module.target_config();
        let ptr = config.pointer_type();
        for _ in 0..3 {
            ctx.func.signature.params.push(AbiParam::new(ptr));
        }
        let mut fbc = FunctionBuilderContext::new();
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
            let entry = b.create_block();
            let head = b.create_block();
            let body = b.create_block();
            let exit = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let (x, y, n) = {
                let p = b.block_params(entry);
                (p[0], p[1], p[2])
            };
            let zero = b.ins().iconst(I64, 0);
            b.ins().jump(head, &[zero.into()]);
            b.switch_to_block(head);
            let i = b.append_block_param(head, I64);
            let done = b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, i, n);
            b.ins().brif(done, exit, &[], body, &[]);
            b.switch_to_block(body);
            let off = b.ins().ishl_imm_u(i, 2);
            let src = b.ins().iadd(x, off);
            let dst = b.ins().iadd(y, off);
            let flags = MemFlagsData::trusted();
            let xv = b.ins().load(F32X4, flags, src, 0);
            let yv = f.emit(&mut Vec4 { b: &mut b }, xv);
            b.ins().store(flags, yv, dst, 0);
            let next = b.ins().iadd_imm_s(i, 4);
            b.ins().jump(head, &[next.into()]);
            b.switch_to_block(exit);
            b.ins().return_(&[]);
            b.seal_all_blocks();
            b.finalize(config);
        }
        let clif = ctx.func.display().to_string();
        let name = format!("{f:?}").to_lowercase();
        let id = module
            .declare_function(&name, Linkage::Local, &ctx.func.signature)
            .map_err(crate::JitError::from)?;
        module
            .define_function(id, &mut ctx)
            .map_err(crate::JitError::from)?;
        module.clear_context(&mut ctx);
        module
            .finalize_definitions()
            .map_err(crate::JitError::from)?;
        let raw = module.get_finalized_function(id);
        // SAFETY: the function was just defined with this signature (three pointer-sized
        // arguments, no result) and its module lives as long as `Mapped`.
        let code = unsafe {
            std::mem::transmute::<*const u8, unsafe extern "C" fn(*const f32, *mut f32, usize)>(raw)
        };
        Ok(Mapped {
            module: Some(module),
            code,
            clif,
        })
    }

    /// `y[i] = f(x[i])` for every `i`.
    ///
    /// # Panics
    /// When `x` and `y` differ in length.
    pub fn apply(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "x and y differ in length");
        let full = x.len() / 4 * 4;
        // SAFETY: the kernel reads and writes `full` elements, a multiple of 4 within both.
        unsafe { (self.code)(x.as_ptr(), y.as_mut_ptr(), full) };
        if full < x.len() {
            let mut a = [0.0f32; 4];
            let mut b = [0.0f32; 4];
            a[..x.len() - full].copy_from_slice(&x[full..]);
            // SAFETY: four elements in each array.
            unsafe { (self.code)(a.as_ptr(), b.as_mut_ptr(), 4) };
            y[full..].copy_from_slice(&b[..x.len() - full]);
        }
    }

    /// The function's CLIF, as compiled.
    pub fn clif(&self) -> &str {
        &self.clif
    }
}

//! The inline approximations against `f64`: the maximum error over a dense sweep of the whole
//! `f32` range and the special values, held to the bound each function's doc states.

use rnn_jit::approx::{Function, Mapped};

/// The exact value in `f64`.
fn exact(f: Function, x: f64) -> f64 {
    match f {
        Function::Exp => x.exp(),
        Function::Ln => x.ln(),
        Function::Tanh => x.tanh(),
        Function::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Function::Softplus => {
            if x > 20.0 {
                x
            } else if x > 0.0 {
                x + (-x).exp().ln_1p()
            } else {
                x.exp().ln_1p()
            }
        }
    }
}

/// The documented bound on the relative error where the exact result is a normal `f32`.
fn bound(f: Function) -> f64 {
    match f {
        Function::Exp | Function::Ln => 1.2e-7,
        Function::Tanh => 3.0e-7,
        Function::Sigmoid | Function::Softplus => 2.5e-7,
    }
}

/// Below this magnitude of the exact result the bound is absolute, this value itself
/// (`sigmoid` flushes its results below `x = -86.5` to zero); elsewhere the smallest subnormal.
fn floor(f: Function) -> f64 {
    match f {
        Function::Sigmoid => 1.0 / (1.0 + 86.5f64.exp()),
        _ => f32::MIN_POSITIVE as f64,
    }
}

/// Every 2^11-th bit pattern of each sign (4.2 million inputs) and the special values.
fn sweep() -> Vec<f32> {
    let mut xs: Vec<f32> = (0..1u32 << 21)
        .flat_map(|k| {
            let bits = k << 11 | (k & 0x7ff);
            [f32::from_bits(bits), f32::from_bits(bits | 0x8000_0000)]
        })
        .collect();
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7fc0_0001),
        f32::from_bits(0xffc0_1234),
        f32::from_bits(0x7f80_0001),
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        f32::MAX,
        f32::MIN,
        88.72,
        88.73,
        -103.9,
        -104.1,
        0.625,
        -0.625,
        9.02,
        20.0,
        20.000002,
        1.0,
        -1.0,
    ]);
    xs
}

#[test]
fn every_approximation_holds_its_documented_bound() {
    let xs = sweep();
    let mut report = String::new();
    for f in Function::ALL {
        let mapped = Mapped::compile(f).expect("compiles");
        let mut ys = vec![0.0f32; xs.len()];
        mapped.apply(&xs, &mut ys);
        let mut worst = (0.0f64, 0.0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            let e = exact(f, x as f64);
            if e.is_nan() {
                assert!(y.is_nan(), "{f:?}({x:e}) = {y:e}, expected NaN");
                continue;
            }
            if e.is_infinite() || e.abs() > f32::MAX as f64 {
                assert_eq!(
                    y as f64,
                    if e > 0.0 {
                        f64::INFINITY
                    } else {
                        f64::NEG_INFINITY
                    },
                    "{f:?}({x:e}) = {y:e}"
                );
                continue;
            }
            if e.abs() < floor(f) {
                // Subnormal or zero results: absolute error below the smallest subnormal (or
                // the function's flush threshold).
                let allowed = if floor(f) > f32::MIN_POSITIVE as f64 {
                    floor(f)
                } else {
                    f32::from_bits(1) as f64
                };
                assert!(
                    (y as f64 - e).abs() <= allowed,
                    "{f:?}({x:e}) = {y:e}, expected {e:e}"
                );
                continue;
            }
            let rel = (y as f64 - e).abs() / e.abs();
            if rel > worst.0 {
                worst = (rel, x);
            }
        }
        report.push_str(&format!("{f:?}: {:.3e} at {:e}\n", worst.0, worst.1));
        assert!(
            worst.0 <= bound(f),
            "{f:?}: relative error {:.3e} at {:e} above the documented {:.1e}",
            worst.0,
            worst.1,
            bound(f)
        );
    }
    eprintln!("{report}");
}

#[test]
fn special_values_follow_ieee() {
    let f = |func: Function, x: f32| {
        let m = Mapped::compile(func).unwrap();
        let mut y = [0.0f32];
        m.apply(&[x], &mut y);
        y[0]
    };
    assert_eq!(f(Function::Exp, f32::NEG_INFINITY), 0.0);
    assert_eq!(f(Function::Exp, f32::INFINITY), f32::INFINITY);
    assert_eq!(f(Function::Exp, 0.0), 1.0);
    assert_eq!(f(Function::Ln, 0.0), f32::NEG_INFINITY);
    assert_eq!(f(Function::Ln, -0.0), f32::NEG_INFINITY);
    assert!(f(Function::Ln, -1.0).is_nan());
    assert_eq!(f(Function::Ln, f32::INFINITY), f32::INFINITY);
    assert_eq!(f(Function::Ln, 1.0), 0.0);
    assert_eq!(f(Function::Tanh, -0.0).to_bits(), (-0.0f32).to_bits());
    assert_eq!(f(Function::Tanh, f32::INFINITY), 1.0);
    assert_eq!(f(Function::Tanh, f32::NEG_INFINITY), -1.0);
    assert_eq!(f(Function::Tanh, 9.1), 1.0);
    assert_eq!(f(Function::Tanh, 7.91), 1.0);
    assert_eq!(f(Function::Tanh, -7.91), -1.0);
    assert_eq!(f(Function::Sigmoid, f32::NEG_INFINITY), 0.0);
    assert_eq!(f(Function::Sigmoid, f32::INFINITY), 1.0);
    assert_eq!(f(Function::Sigmoid, 0.0), 0.5);
    assert_eq!(f(Function::Softplus, 30.0), 30.0);
    assert_eq!(f(Function::Softplus, f32::INFINITY), f32::INFINITY);
    assert_eq!(f(Function::Softplus, f32::NEG_INFINITY), 0.0);
    for func in Function::ALL {
        for nan in [
            0x7fc0_0000u32,
            0xffc0_0000,
            0x7fc0_0001,
            0xffc0_1234,
            0x7f80_0001,
        ] {
            let x = f32::from_bits(nan);
            assert!(f(func, x).is_nan(), "{func:?}({nan:#x})");
        }
    }
}

/// Every `f32` input (2^32 of them), each function against its bound: minutes, so only when
/// `RNN_APPROX_EXHAUSTIVE` is set (run once for the numbers in `approx`'s documentation).
#[test]
fn every_input_when_asked() {
    if std::env::var_os("RNN_APPROX_EXHAUSTIVE").is_none() {
        return;
    }
    for f in Function::ALL {
        let mapped = Mapped::compile(f).expect("compiles");
        let mut worst = (0.0f64, 0.0f32);
        let chunk = 1u64 << 20;
        let mut xs = vec![0.0f32; chunk as usize];
        let mut ys = vec![0.0f32; chunk as usize];
        for start in (0..1u64 << 32).step_by(chunk as usize) {
            for (k, x) in xs.iter_mut().enumerate() {
                *x = f32::from_bits((start + k as u64) as u32);
            }
            mapped.apply(&xs, &mut ys);
            for (&x, &y) in xs.iter().zip(&ys) {
                let e = exact(f, x as f64);
                if e.is_nan() {
                    assert!(y.is_nan(), "{f:?}({x:e}) = {y:e}, expected NaN");
                } else if e.is_infinite() || e.abs() > f32::MAX as f64 {
                    assert_eq!(y as f64, e.signum() * f64::INFINITY, "{f:?}({x:e})");
                } else if e.abs() < floor(f) {
                    let allowed = if floor(f) > f32::MIN_POSITIVE as f64 {
                        floor(f)
                    } else {
                        f32::from_bits(1) as f64
                    };
                    assert!((y as f64 - e).abs() <= allowed, "{f:?}({x:e}) = {y:e}");
                } else {
                    let rel = (y as f64 - e).abs() / e.abs();
                    if rel > worst.0 {
                        worst = (rel, x);
                    }
                }
            }
        }
        eprintln!("{f:?}: {:.3e} at {:e} over every input", worst.0, worst.1);
        assert!(
            worst.0 <= bound(f),
            "{f:?}: {:.3e} at {:e}",
            worst.0,
            worst.1
        );
    }
}

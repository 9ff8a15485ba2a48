//! TEMPORARY placeholder (std only) until the core-only approximations land.
#![allow(missing_docs)]
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    x.exp()
}
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    x.tanh()
}
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    x.ln()
}
#[inline(always)]
pub fn sqrt(x: f32) -> f32 {
    x.sqrt()
}

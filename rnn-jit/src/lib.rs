//! `rnn-jit`: the Cranelift backend of `rnn`.
//!
//! It lowers an `rnn_ir::program::Program` (its pre-loop, per-step and post-loop values, as time
//! hoisting scheduled them, and their storage plans) to native code at run time: fused
//! element-wise step kernels in Cranelift's `f32x4`, with inline approximations of the
//! functions CLIF lacks ([`approx`]), and batched products through a registered tuned GEMM.
//! The interpreter in `rnn-ir` is the oracle.
//!
//! Code generation settings come from the host (`cranelift_native`: SSE4.1, AVX, FMA where the
//! CPU has them) with `opt_level = "none"`, which the design notes measured to give faster
//! numeric kernels than `"speed"` and to compile 5,000-instruction kernels in about 20 ms.

#![warn(missing_docs)]

pub mod approx;

use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};

/// A failed compilation: the code generator refused the program or the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JitError {
    /// The host machine is not one Cranelift generates code for.
    Host(String),
    /// Cranelift refused a setting or a function (a bug of this crate, reported rather than
    /// panicking).
    Codegen(String),
}

impl std::fmt::Display for JitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JitError::Host(m) => write!(f, "the JIT does not support this machine: {m}"),
            JitError::Codegen(m) => write!(f, "the JIT failed to compile a kernel: {m}"),
        }
    }
}

impl std::error::Error for JitError {}

impl From<cranelift_module::ModuleError> for JitError {
    fn from(e: cranelift_module::ModuleError) -> Self {
        JitError::Codegen(e.to_string())
    }
}

impl From<settings::SetError> for JitError {
    fn from(e: settings::SetError) -> Self {
        JitError::Codegen(e.to_string())
    }
}

/// A JIT module for this host with `symbols` registered (name, address).
pub(crate) fn new_module(symbols: &[(&str, *const u8)]) -> Result<JITModule, JitError> {
    let mut flags = settings::builder();
    flags.set("opt_level", "none")?;
    flags.set("use_colocated_libcalls", "false")?;
    flags.set("is_pic", "false")?;
    let isa = cranelift_native::builder()
        .map_err(|m| JitError::Host(m.to_string()))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    let mut builder = JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
    for &(name, ptr) in symbols {
        builder.symbol(name, ptr);
    }
    Ok(JITModule::new(builder))
}

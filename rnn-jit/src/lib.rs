//! `rnn-jit`: the Cranelift backend of `rnn`.
//!
//! It will lower an `rnn_ir::program::Program` (its pre-loop, per-step and post-loop values, as
//! time hoisting scheduled them) to native code at run time: fused element-wise step kernels in
//! Cranelift, batched products through a registered tuned GEMM. The crate is a shell until the
//! JIT's issue; the interpreter in `rnn-ir` is the backend meanwhile and the oracle after.

#![warn(missing_docs)]

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

pub mod exec;
pub mod lower;
pub mod symbols;

use rnn_ir::driver::{self, Backward, Forward, Seq, SequenceExecutor};
use rnn_ir::{Program, Request, Response, Weights};

/// The compiled plans of one layer's cell: inference, training and backward.
struct CellCode {
    inference: exec::Plan,
    training: exec::Plan,
    backward: exec::Plan,
}

/// A [`Program`] compiled to native code: compile once, bind weights, run many.
pub struct Jit {
    program: Program,
    cells: Vec<CellCode>,
    clif: Vec<(String, String)>,
    // Owns the code every `CellCode` points into; declared last, dropped last.
    _module: cranelift_jit::JITModule,
}

impl Jit {
    /// Compiles every layer's plans.
    pub fn compile(program: &Program) -> Result<Jit, JitError> {
        let symbols: Vec<(&str, *const u8)> = symbols::table()
            .iter()
            .map(|&(name, ptr, ..)| (name, ptr))
            .collect();
        let mut module = new_module(&symbols)?;
        let mut lowered = Vec::new();
        let mut clif = Vec::new();
        for (l, cell) in program.layers.iter().enumerate() {
            let fwd = |plan| lower::Body {
                s: &cell.forward,
                plan,
                forward: None,
                as_forward: false,
            };
            let inference = lower::lower(&mut module, fwd(&cell.inference), &format!("l{l}_fwd"))
                .map_err(JitError::Codegen)?;
            let training = lower::lower(&mut module, fwd(&cell.training), &format!("l{l}_train"))
                .map_err(JitError::Codegen)?;
            let backward = lower::lower(
                &mut module,
                lower::Body {
                    s: &cell.backward,
                    plan: &cell.backward_plan,
                    forward: Some((&cell.forward, &cell.training)),
                    as_forward: false,
                },
                &format!("l{l}_bwd"),
            )
            .map_err(JitError::Codegen)?;
            for p in [&inference, &training, &backward] {
                clif.extend(p.clif.iter().cloned());
            }
            lowered.push((inference, training, backward));
        }
        module.finalize_definitions()?;
        let finish = |l: lower::Lowered| {
            let f = |id| {
                // SAFETY: every function was defined with the signature of `KernelFn`.
                unsafe {
                    std::mem::transmute::<*const u8, exec::KernelFn>(
                        module.get_finalized_function(id),
                    )
                }
            };
            exec::Plan {
                pre: f(l.pre),
                step: f(l.step),
                post: f(l.post),
                lowered: l,
            }
        };
        let cells = lowered
            .into_iter()
            .map(|(i, t, b)| CellCode {
                inference: finish(i),
                training: finish(t),
                backward: finish(b),
            })
            .collect();
        Ok(Jit {
            program: program.clone(),
            cells,
            clif,
            _module: module,
        })
    }

    /// The program compiled.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Every compiled function's CLIF, by name, in compilation order.
    pub fn clif(&self) -> &[(String, String)] {
        &self.clif
    }

    /// Binds `weights` (PyTorch's names and shapes, checked).
    pub fn bind(&self, weights: &Weights) -> rnn_ir::Result<JitModel<'_>> {
        weights.check(&self.program)?;
        let spec = &self.program.spec;
        let mut params = Vec::new();
        for (layer, cell) in self.program.layers.iter().enumerate() {
            for dir in 0..spec.directions() {
                let suffix = rnn_ir::ModelSpec::param_suffix(layer, dir);
                params.push(
                    cell.forward
                        .graph
                        .params()
                        .iter()
                        .map(|info| {
                            weights.tensors[&format!("{}{suffix}", info.name)]
                                .data
                                .clone()
                        })
                        .collect(),
                );
            }
        }
        Ok(JitModel { jit: self, params })
    }
}

/// A [`Jit`] with its weights bound.
pub struct JitModel<'j> {
    jit: &'j Jit,
    /// Per (layer, direction), the cell's parameters in order.
    params: Vec<Vec<Vec<f32>>>,
}

impl JitModel<'_> {
    /// Forward, and backward when `req` has `grad_output`: the interpreter's `run`.
    pub fn run(&self, req: &Request) -> rnn_ir::Result<Response> {
        driver::run_response(&self.jit.program.layout(), self, req)
    }

    fn params(&self, layer: usize, dir: usize) -> &[Vec<f32>] {
        &self.params[layer * self.jit.program.spec.directions() + dir]
    }
}

impl SequenceExecutor<f32> for JitModel<'_> {
    type Tape = Vec<Vec<f32>>;

    fn forward(
        &self,
        layer: usize,
        dir: usize,
        seq: Seq<'_>,
        x: &[f32],
        initial: Vec<Vec<f32>>,
        training: bool,
    ) -> rnn_ir::Result<Forward<f32, Self::Tape>> {
        let cell = &self.jit.program.layers[layer];
        let code = &self.jit.cells[layer];
        let (plan, sp) = if training {
            (&code.training, &cell.training)
        } else {
            (&code.inference, &cell.inference)
        };
        let body = lower::Body {
            s: &cell.forward,
            plan: sp,
            forward: None,
            as_forward: false,
        };
        let inputs = exec::Inputs {
            params: self.params(layer, dir),
            x,
            dy: None,
            tape: None,
            initial,
        };
        Ok(exec::forward_result(
            exec::run(plan, body, seq, inputs, false),
            training,
        ))
    }

    fn backward(
        &self,
        layer: usize,
        dir: usize,
        seq: Seq<'_>,
        x: &[f32],
        tape: Self::Tape,
        dy: &[f32],
        final_grads: Vec<Vec<f32>>,
    ) -> rnn_ir::Result<Backward<f32>> {
        let cell = &self.jit.program.layers[layer];
        let code = &self.jit.cells[layer];
        let body = lower::Body {
            s: &cell.backward,
            plan: &cell.backward_plan,
            forward: Some((&cell.forward, &cell.training)),
            as_forward: false,
        };
        let params = self.params(layer, dir);
        let inputs = exec::Inputs {
            params,
            x,
            dy: Some(dy),
            tape: Some(&tape),
            initial: final_grads,
        };
        let r = exec::run(&code.backward, body, seq, inputs, true);
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        Ok(exec::backward_result(r, &sizes, x.len()))
    }
}

//! `rnn-jit`: the Cranelift backend of `rnn`.
//!
//! It lowers an `rnn_ir::program::Program` (its pre-loop, per-step and post-loop values, as time
//! hoisting scheduled them, and their storage plans) to native code at run time: fused
//! element-wise step kernels in Cranelift's `f32x4`, with inline approximations of the
//! functions CLIF lacks ([`approx`]), and batched products through a registered tuned GEMM.
//! The interpreter in `rnn-ir` is the oracle.
//!
//! Code generation settings come from the host (`cranelift_native`: SSE4.1, AVX, FMA where the
//! CPU has them) with `opt_level = "none"`, chosen by measurement. Before element-wise values
//! were fused, `"speed"` ran W1 in 178 ms against 187 ms. Since (`rnn_ir::fuse`) a step's cell
//! math is one loop, in which `"speed"` hoists the approximations' constants out of the loop
//! and spills them to the stack (16 `xmm` registers): W1 ran in 89.6 and 91.1 ms with `"none"`
//! against 90.7 and 92.2 ms with `"speed"` (alternating runs, one session), and a 256/256
//! LSTM's three plans compiled in 2.3 ms against 3.2 ms (2.4 ms with `"none"` since each plan
//! also has its `_bound` function).

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

impl From<JitError> for rnn_ir::Error {
    fn from(e: JitError) -> Self {
        rnn_ir::Error::Jit(e.to_string())
    }
}

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
    // Without the host's FMA, Cranelift lowers `fma` to calls of `fmaf` (lane by lane).
    builder.symbol("fmaf", fmaf as *const u8);
    for &(name, ptr) in symbols {
        builder.symbol(name, ptr);
    }
    Ok(JITModule::new(builder))
}

mod exec;
mod lower;
mod symbols;

/// `a · b + c` with one rounding: what Cranelift calls for `fma` on a host without FMA.
extern "C" fn fmaf(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

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
    _module: CodeOwner,
}

/// The finished JIT module, kept so that its code lives as long as the [`Jit`], and freed
/// with it (a `JITModule` that merely drops leaks its executable memory).
struct CodeOwner(Option<cranelift_jit::JITModule>);

impl Drop for CodeOwner {
    fn drop(&mut self) {
        if let Some(module) = self.0.take() {
            // SAFETY: every pointer into this module's code is held by the `Jit` that owns this
            // `CodeOwner` (its `CellCode`s), which is being dropped; a `JitModel` holds an
            // `Arc<Jit>`, so no model outlives the code it calls.
            unsafe { module.free_memory() };
        }
    }
}

// SAFETY: after `finalize_definitions` nothing calls the module again (until `Drop`): a shared
// `&Jit` never reaches it. The compiled functions are reentrant: they read and write only the
// buffers a call passes them.
unsafe impl Sync for CodeOwner {}

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
                bound: f(l.bound),
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
            _module: CodeOwner(Some(module)),
        })
    }

    /// The program compiled.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Whether every layer's steps (inference, training and backward) run on the rows still
    /// running when a packed batch is ordered by decreasing length, as PyTorch packs one: then
    /// a packed batch costs its sequences' own steps, not the longest one's at every row. A
    /// batch in another order, or a plan whose step reads a buffer both per step and whole,
    /// runs every row at every step and holds the finished rows' states (the same results).
    pub fn shrinks_packed_batches(&self) -> bool {
        self.cells.iter().all(|c| {
            [&c.inference, &c.training, &c.backward]
                .iter()
                .all(|p| p.lowered.step_shift.is_some())
        })
    }

    /// Every compiled function's CLIF, by name, in compilation order.
    pub fn clif(&self) -> &[(String, String)] {
        &self.clif
    }

    /// Compiles the model `spec` declares.
    pub fn from_spec(spec: &rnn_ir::ModelSpec) -> rnn_ir::Result<Jit> {
        Ok(Jit::compile(&Program::compile(spec)?)?)
    }

    /// Compiles the model of a `.rnn` text.
    pub fn from_source(text: &str) -> rnn_ir::Result<Jit> {
        Jit::from_spec(&rnn_ir::parse::parse_str(text)?)
    }

    /// Binds `weights` (PyTorch's names and shapes, checked): the compiled code is shared by
    /// every model bound from it.
    pub fn bind(self: &std::sync::Arc<Self>, weights: &Weights) -> rnn_ir::Result<JitModel> {
        weights.check(&self.program)?;
        let spec = &self.program.spec;
        let mut params = Vec::new();
        let mut packed: Vec<Vec<exec::Packed>> = Vec::new();
        for (layer, cell) in self.program.layers.iter().enumerate() {
            let g = &cell.forward.graph;
            let infos = g.params();
            // The parameters some product reads as (in, out), and those a backward step's
            // rows multiply by (`d · W`): copied once, here.
            let param = |p: usize| rnn_ir::graph::Op::Input(rnn_ir::graph::Role::Param(p as u32));
            let in_out: Vec<bool> = (0..infos.len())
                .map(|p| {
                    [&cell.inference, &cell.training].iter().any(|plan| {
                        plan.products.iter().any(|q| {
                            q.layout == rnn_ir::plan::WeightLayout::InOut
                                && q.weight.is_some_and(|w| g.data(w).op == param(p))
                        })
                    })
                })
                .collect();
            let bg = &cell.backward.graph;
            let step_t: Vec<bool> = (0..infos.len())
                .map(|p| {
                    cell.backward_plan.products.iter().any(|q| {
                        q.rows == rnn_ir::plan::Rows::Step
                            && bg.data(q.value).op == rnn_ir::graph::Op::MatMulT
                            && q.weight.is_some_and(|w| bg.data(w).op == param(p))
                    })
                })
                .collect();
            for dir in 0..spec.directions() {
                let suffix = rnn_ir::ModelSpec::param_suffix(layer, dir);
                let values: Vec<Vec<f32>> = infos
                    .iter()
                    .map(|info| {
                        weights.tensors[&format!("{}{suffix}", info.name)]
                            .data
                            .clone()
                    })
                    .collect();
                let panels = rnn_ir::panels::available();
                let copies = values
                    .iter()
                    .zip(infos)
                    .enumerate()
                    .map(|(p, (w, info))| match info.shape {
                        rnn_ir::graph::Shape::Matrix(o, i) if in_out[p] || step_t[p] => {
                            let mut wt = vec![0.0; o * i];
                            rnn_ir::panels::transpose(o, i, w, &mut wt);
                            let mut c = exec::Packed::default();
                            if panels && in_out[p] {
                                c.panels = vec![0.0; rnn_ir::panels::panels_len(o, i)];
                                rnn_ir::panels::pack_panels(o, i, w, &mut c.panels);
                            }
                            if panels && step_t[p] {
                                // `d · W` is the product with `Wᵀ` as its (out, in) weight.
                                c.panels_t = vec![0.0; rnn_ir::panels::panels_len(i, o)];
                                rnn_ir::panels::pack_panels(i, o, &wt, &mut c.panels_t);
                            }
                            if in_out[p] {
                                c.wt = wt;
                            }
                            c
                        }
                        _ => exec::Packed::default(),
                    })
                    .collect();
                params.push(values);
                packed.push(copies);
            }
        }
        // The values of the parameters alone (fused weights, bias sums), once per plan.
        let mut bound = Vec::new();
        let dirs = spec.directions();
        for (l, (cell, code)) in self.program.layers.iter().zip(&self.cells).enumerate() {
            for d in 0..dirs {
                let (ps, pk) = (&params[l * dirs + d], &packed[l * dirs + d]);
                let body = |plan| lower::Body {
                    s: &cell.forward,
                    plan,
                    forward: None,
                };
                let inference =
                    exec::bound_values(&code.inference, body(&cell.inference), ps, pk, &[]);
                let training =
                    exec::bound_values(&code.training, body(&cell.training), ps, pk, &[]);
                let backward_body = lower::Body {
                    s: &cell.backward,
                    plan: &cell.backward_plan,
                    forward: Some((&cell.forward, &cell.training)),
                };
                let backward = exec::bound_values(&code.backward, backward_body, ps, pk, &training);
                bound.push(Bound {
                    inference,
                    training,
                    backward,
                });
            }
        }
        Ok(JitModel {
            jit: self.clone(),
            params,
            packed,
            bound,
            pool: None,
            id: NEXT_MODEL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// A [`Jit`] with its weights bound.
pub struct JitModel {
    jit: std::sync::Arc<Jit>,
    /// Per (layer, direction), the cell's parameters in order.
    params: Vec<Vec<Vec<f32>>>,
    /// Per (layer, direction) and parameter, its copies as `Wᵀ` and in panels (empty when no
    /// product needs them).
    packed: Vec<Vec<exec::Packed>>,
    /// Per (layer, direction), each plan's bound buffers, computed at `bind`.
    bound: Vec<Bound>,
    /// The threads a batch is split over ([`JitModel::with_threads`]).
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    /// Unique per bound model: a tape records it, and `backward` refuses another model's.
    id: u64,
}

/// One (layer, direction)'s bound buffers per plan ([`exec::bound_values`]).
struct Bound {
    inference: Vec<Vec<f32>>,
    training: Vec<Vec<f32>>,
    backward: Vec<Vec<f32>>,
}

/// What [`JitModel::forward_train`] keeps for [`JitModel::backward`].
pub struct JitTape {
    tape: driver::Tape<f32, Vec<Vec<Vec<f32>>>>,
    /// The [`JitModel::id`] of the model that made it.
    owner: u64,
}

/// The source of [`JitModel`] identities.
static NEXT_MODEL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl JitModel {
    /// Frees the buffers kept for reuse (by this model's runs and any other code using the
    /// per-thread pool) on the calling thread and on each of the model's worker threads
    /// ([`JitModel::with_threads`]): every thread keeps up to 256 MiB of them between runs, so
    /// that the next run does not fault its pages in again. The workers' buffers also go when
    /// the model is dropped and its worker threads exit.
    pub fn release_buffers(&self) {
        rnn_ir::pool::release_buffers();
        if let Some(pool) = &self.pool {
            pool.broadcast(|_| rnn_ir::pool::release_buffers());
        }
    }

    /// Elements of the buffers the per-thread pool keeps for reuse on the calling thread and on
    /// the model's worker threads ([`JitModel::release_buffers`] frees them).
    pub fn held_buffers(&self) -> usize {
        let workers: usize = self.pool.as_ref().map_or(0, |pool| {
            pool.broadcast(|_| rnn_ir::pool::held()).into_iter().sum()
        });
        rnn_ir::pool::held() + workers
    }

    /// Splits each batch over `threads` threads (rows in contiguous shares; 1, the default,
    /// runs on the caller's thread). Every sequence is computed as in a batch of its share's
    /// rows: results equal one thread's up to the last bits (the products' kernels depend on
    /// the rows they run over, and parameter gradients are summed over the shares).
    pub fn with_threads(mut self, threads: usize) -> rnn_ir::Result<JitModel> {
        if threads == 0 {
            return Err(rnn_ir::Error::Argument(
                "`threads` is 0: at least 1 is needed".into(),
            ));
        }
        self.pool = if threads == 1 {
            None
        } else {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| rnn_ir::Error::Argument(format!("no thread pool: {e}")))?;
            Some(std::sync::Arc::new(pool))
        };
        Ok(self)
    }

    /// The rows of a batch of `batch` each thread takes.
    fn shards(&self, batch: usize) -> Vec<std::ops::Range<usize>> {
        let n = self
            .pool
            .as_ref()
            .map_or(1, |p| p.current_num_threads())
            .min(batch)
            .max(1);
        (0..n).map(|k| k * batch / n..(k + 1) * batch / n).collect()
    }

    /// Runs `f` on every shard, on the pool's threads when there are several.
    fn each<R: Send>(
        &self,
        shards: &[std::ops::Range<usize>],
        f: impl Fn(&std::ops::Range<usize>) -> R + Sync,
    ) -> Vec<R> {
        match (&self.pool, shards.len()) {
            (Some(pool), 2..) => {
                use rayon::prelude::*;
                pool.install(|| shards.par_iter().map(&f).collect())
            }
            _ => shards.iter().map(f).collect(),
        }
    }

    /// Forward, and backward when `req` has `grad_output`: the interpreter's `run`, with the same
    /// checks and errors.
    pub fn run(&self, req: &Request) -> rnn_ir::Result<Response> {
        driver::run_response(&self.jit.program.layout(), &Runner(self), req)
    }

    /// The forward pass (outputs and final states).
    pub fn forward(&self, req: &Request) -> rnn_ir::Result<Response> {
        driver::forward_response(&self.jit.program.layout(), &Runner(self), req, false).map(|r| r.0)
    }

    /// [`Self::forward`], keeping what [`Self::backward`] needs.
    pub fn forward_train(&self, req: &Request) -> rnn_ir::Result<(Response, JitTape)> {
        let (response, tape) =
            driver::forward_response(&self.jit.program.layout(), &Runner(self), req, true)?;
        let tape = tape.ok_or_else(|| rnn_ir::Error::Argument("no tape was kept".into()))?;
        Ok((
            response,
            JitTape {
                tape,
                owner: self.id,
            },
        ))
    }

    /// Back-propagation through time from a [`Self::forward_train`] of this model's layout.
    pub fn backward(
        &self,
        tape: JitTape,
        grad_output: &rnn_ir::Tensor,
        grad_final_states: &[Option<&rnn_ir::Tensor>],
    ) -> rnn_ir::Result<rnn_ir::Gradients> {
        if tape.owner != self.id {
            return Err(rnn_ir::Error::Argument(
                "the tape comes from another model's forward pass: pass `backward` the tape of \
                 this model's own `forward_train`"
                    .into(),
            ));
        }
        driver::backward(
            &self.jit.program.layout(),
            &Runner(self),
            tape.tape,
            grad_output,
            grad_final_states,
        )
    }

    /// Zero states for [`Self::step`]: per state, `layers × size`.
    pub fn zero_state(&self) -> Vec<Vec<f32>> {
        let spec = &self.jit.program.spec;
        let ld = spec.num_layers;
        self.jit.program.layers[0]
            .forward
            .graph
            .states()
            .iter()
            .map(|(_, n)| vec![0.0; ld * n])
            .collect()
    }

    /// One step of one sequence from `state` (updated in place): the streaming API, with the
    /// whole-sequence semantics of a run of length 1, layer by layer through the compiled
    /// inference plans (no request, no driver: the sizes are checked here).
    pub fn step(&self, state: &mut [Vec<f32>], x: &[f32]) -> rnn_ir::Result<Vec<f32>> {
        let program = &self.jit.program;
        let spec = &program.spec;
        if spec.bidirectional {
            return Err(rnn_ir::Error::Argument(
                "a bidirectional model does not stream: its backward direction needs the whole \
                 sequence"
                    .into(),
            ));
        }
        driver::check_step_input(x, 1, spec.input_size)?;
        let states = program.states();
        if state.len() != states.len() {
            return Err(rnn_ir::Error::Argument(format!(
                "{} states given, the model has {}",
                state.len(),
                states.len()
            )));
        }
        for (s, (name, n)) in state.iter().zip(states) {
            if s.len() != spec.num_layers * n {
                return Err(rnn_ir::Error::TensorShape {
                    name: format!("{name}0"),
                    expected: vec![spec.num_layers, *n],
                    found: vec![s.len()],
                });
            }
        }
        let lengths = [1usize];
        let seq = Seq {
            steps: 1,
            batch: 1,
            lengths: &lengths,
        };
        let mut input: Vec<f32> = x.to_vec();
        for (layer, cell) in program.layers.iter().enumerate() {
            let initial: Vec<Vec<f32>> = state
                .iter()
                .zip(states)
                .map(|(s, (_, n))| s[layer * n..(layer + 1) * n].to_vec())
                .collect();
            let body = lower::Body {
                s: &cell.forward,
                plan: &cell.inference,
                forward: None,
            };
            let inputs = exec::Inputs {
                params: self.params(layer, 0),
                x: &input,
                dy: None,
                tape: None,
                initial,
                packed: self.packed(layer, 0),
                bound: &self.bound(layer, 0).inference,
                fwd_bound: &[],
                keep: false,
            };
            let r = exec::forward_result(
                exec::run(&self.jit.cells[layer].inference, body, seq, inputs, false),
                false,
            );
            for ((s, (_, n)), f) in state.iter_mut().zip(states).zip(&r.finals) {
                s[layer * n..(layer + 1) * n].copy_from_slice(f);
            }
            rnn_ir::pool::recycle(r.finals);
            rnn_ir::pool::recycle([std::mem::replace(&mut input, r.output)]);
        }
        Ok(input)
    }

    fn params(&self, layer: usize, dir: usize) -> &[Vec<f32>] {
        &self.params[layer * self.jit.program.spec.directions() + dir]
    }

    fn bound(&self, layer: usize, dir: usize) -> &Bound {
        &self.bound[layer * self.jit.program.spec.directions() + dir]
    }

    fn packed(&self, layer: usize, dir: usize) -> &[exec::Packed] {
        &self.packed[layer * self.jit.program.spec.directions() + dir]
    }
}

/// Rows `r` of each of `steps` steps of a time-major `(steps · batch) × n` buffer.
fn gather(x: &[f32], steps: usize, batch: usize, n: usize, r: &std::ops::Range<usize>) -> Vec<f32> {
    let mut out = rnn_ir::pool::scratch(steps * r.len() * n);
    for t in 0..steps {
        out[t * r.len() * n..(t + 1) * r.len() * n]
            .copy_from_slice(&x[(t * batch + r.start) * n..(t * batch + r.end) * n]);
    }
    out
}

/// Rows `r` of each carried value (`B × size` each; an empty one, not given, stays empty).
fn state_rows(
    values: &[Vec<f32>],
    states: &[(String, usize)],
    r: &std::ops::Range<usize>,
) -> Vec<Vec<f32>> {
    values
        .iter()
        .zip(states)
        .map(|(s, (_, n))| {
            if s.is_empty() {
                Vec::new()
            } else {
                s[r.start * n..r.end * n].to_vec()
            }
        })
        .collect()
}

/// The inverse of [`gather`]: `part` into rows `r` of each step of `dst`.
fn scatter(
    dst: &mut [f32],
    part: &[f32],
    steps: usize,
    batch: usize,
    n: usize,
    r: &std::ops::Range<usize>,
) {
    for t in 0..steps {
        dst[(t * batch + r.start) * n..(t * batch + r.end) * n]
            .copy_from_slice(&part[t * r.len() * n..(t + 1) * r.len() * n]);
    }
}

/// The model as the shared driver's executor. Private: the driver checks every argument
/// before it calls the executor, and the executor calls generated code that trusts them.
struct Runner<'m>(&'m JitModel);

impl std::ops::Deref for Runner<'_> {
    type Target = JitModel;
    fn deref(&self) -> &JitModel {
        self.0
    }
}

impl SequenceExecutor<f32> for Runner<'_> {
    /// Per shard of the batch, the plan's buffers.
    type Tape = Vec<Vec<Vec<f32>>>;

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
        };
        let (steps, batch) = (seq.steps, seq.batch);
        let n_in = cell.input_size;
        let states = cell.forward.graph.states();
        let shards = self.shards(batch);
        let run = |r: &std::ops::Range<usize>| {
            let whole = r.len() == batch;
            let xs = if whole {
                std::borrow::Cow::Borrowed(x)
            } else {
                std::borrow::Cow::Owned(gather(x, steps, batch, n_in, r))
            };
            let init = state_rows(&initial, states, r);
            let inputs = exec::Inputs {
                params: self.params(layer, dir),
                x: &xs,
                dy: None,
                tape: None,
                initial: init,
                packed: self.packed(layer, dir),
                bound: if training {
                    &self.bound(layer, dir).training
                } else {
                    &self.bound(layer, dir).inference
                },
                fwd_bound: &[],
                keep: training,
            };
            let part = Seq {
                steps,
                batch: r.len(),
                lengths: &seq.lengths[r.clone()],
            };
            exec::forward_result(exec::run(plan, body, part, inputs, false), training)
        };
        let mut parts = self.each(&shards, run);
        if parts.len() == 1 {
            let f = parts.pop().expect("one shard");
            return Ok(Forward {
                output: f.output,
                finals: f.finals,
                tape: f.tape.map(|t| vec![t]),
            });
        }
        let n_out = cell.output_size();
        let mut output = rnn_ir::pool::zeros(steps * batch * n_out);
        let mut finals: Vec<Vec<f32>> = vec![Vec::new(); states.len()];
        let mut tapes = Vec::new();
        for (r, f) in shards.iter().zip(parts) {
            scatter(&mut output, &f.output, steps, batch, n_out, r);
            for (k, fin) in f.finals.into_iter().enumerate() {
                finals[k].extend_from_slice(&fin);
            }
            tapes.extend(f.tape);
            rnn_ir::pool::recycle([f.output]);
        }
        Ok(Forward {
            output,
            finals,
            tape: training.then_some(tapes),
        })
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
        };
        let params = self.params(layer, dir);
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        let (steps, batch) = (seq.steps, seq.batch);
        let (n_in, n_out) = (cell.input_size, cell.output_size());
        let states = cell.forward.graph.states();
        let shards = self.shards(batch);
        if shards.len() != tape.len() {
            return Err(rnn_ir::Error::Argument(
                "the tape was made with another number of threads".into(),
            ));
        }
        let run = |(r, tape): (&std::ops::Range<usize>, &Vec<Vec<f32>>)| {
            let whole = r.len() == batch;
            let (xs, dys) = if whole {
                (
                    std::borrow::Cow::Borrowed(x),
                    std::borrow::Cow::Borrowed(dy),
                )
            } else {
                (
                    std::borrow::Cow::Owned(gather(x, steps, batch, n_in, r)),
                    std::borrow::Cow::Owned(gather(dy, steps, batch, n_out, r)),
                )
            };
            let grads = state_rows(&final_grads, states, r);
            let inputs = exec::Inputs {
                params,
                x: &xs,
                dy: Some(&dys),
                tape: Some(tape),
                initial: grads,
                packed: self.packed(layer, dir),
                bound: &self.bound(layer, dir).backward,
                fwd_bound: &self.bound(layer, dir).training,
                keep: false,
            };
            let part = Seq {
                steps,
                batch: r.len(),
                lengths: &seq.lengths[r.clone()],
            };
            let r = exec::run(&code.backward, body, part, inputs, true);
            exec::backward_result(r, &sizes, xs.len())
        };
        let pairs: Vec<(&std::ops::Range<usize>, &Vec<Vec<f32>>)> =
            shards.iter().zip(tape.iter()).collect();
        let mut parts = match (&self.pool, pairs.len()) {
            (Some(pool), 2..) => {
                use rayon::prelude::*;
                pool.install(|| pairs.par_iter().map(|&p| run(p)).collect::<Vec<_>>())
            }
            _ => pairs.iter().map(|&p| run(p)).collect(),
        };
        for t in tape {
            rnn_ir::pool::recycle(t);
        }
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one shard"));
        }
        let mut input_grad = rnn_ir::pool::zeros(steps * batch * n_in);
        let mut initial_grads: Vec<Vec<f32>> = vec![Vec::new(); states.len()];
        let mut param_grads: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        for (r, b) in shards.iter().zip(parts) {
            scatter(&mut input_grad, &b.input_grad, steps, batch, n_in, r);
            for (k, g) in b.initial_grads.into_iter().enumerate() {
                initial_grads[k].extend_from_slice(&g);
            }
            for (sum, g) in param_grads.iter_mut().zip(&b.param_grads) {
                for (s, v) in sum.iter_mut().zip(g) {
                    *s += v;
                }
            }
        }
        Ok(Backward {
            input_grad,
            initial_grads,
            param_grads,
        })
    }
}

impl rnn_ir::model::Recurrent for JitModel {
    type Tape = JitTape;
    fn forward(&self, req: &Request) -> rnn_ir::Result<Response> {
        JitModel::forward(self, req)
    }
    fn forward_train(&self, req: &Request) -> rnn_ir::Result<(Response, JitTape)> {
        JitModel::forward_train(self, req)
    }
    fn backward(
        &self,
        tape: JitTape,
        grad_output: &rnn_ir::Tensor,
        grad_final_states: &[Option<&rnn_ir::Tensor>],
    ) -> rnn_ir::Result<rnn_ir::Gradients> {
        JitModel::backward(self, tape, grad_output, grad_final_states)
    }
}

/// Binds a model's stack on the JIT: the closure [`rnn_ir::model::Model::bind`] and
/// [`rnn_ir::seq2seq::Seq2Seq::bind`] take, compiling the stack's program.
pub fn bind_stack(program: &Program, weights: &Weights) -> rnn_ir::Result<JitModel> {
    std::sync::Arc::new(Jit::compile(program)?).bind(weights)
}

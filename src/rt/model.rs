//! What an emitted model needs beyond `core` (feature `std`): buffers, the glue between its
//! kernels and the shared sequence driver, weights in and out, and initialisation.

pub use rnn_ir::driver::{
    Backward, Forward, LayerLayout, Layout, Seq, SequenceExecutor, any_finished, backward, forward,
    forward_response, hold_finished, restore_finished, run_layout, run_response,
};
pub use rnn_ir::{Error, Gradients, Request, Response, Result, Tensor, Weights};
pub use std::borrow::Cow;
pub use std::boxed::Box;
pub use std::vec;
pub use std::vec::Vec;

/// The buffers an emitted sequence kernel leaves: what its backward pass reads.
pub type Buffers = Vec<Vec<f32>>;

/// What an emitted model's `forward_train` keeps for its `backward`: the driver's tape, the
/// model it came from, and a borrow of that model, so that its weights cannot change between
/// the two calls (the compiler refuses `parameters_mut` while a tape is alive).
pub struct Tape<'m> {
    tape: rnn_ir::driver::Tape<f32, Buffers>,
    owner: usize,
    _model: core::marker::PhantomData<&'m ()>,
}

impl core::fmt::Debug for Tape<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tape")
            .field("tape", &self.tape)
            .finish_non_exhaustive()
    }
}

impl<'m> Tape<'m> {
    /// The tape of a forward pass of the model at `owner`.
    pub fn new<M>(tape: rnn_ir::driver::Tape<f32, Buffers>, owner: &'m M) -> Self {
        Tape {
            tape,
            owner: owner as *const M as usize,
            _model: core::marker::PhantomData,
        }
    }

    /// The driver's tape, when `model` is the one that made it.
    pub fn take<M>(self, model: &M) -> Result<rnn_ir::driver::Tape<f32, Buffers>> {
        if self.owner != model as *const M as usize {
            return Err(Error::Argument(
                "the tape was made by another model's forward pass: pass `backward` the tape \
                 of this model's own `forward_train`"
                    .into(),
            ));
        }
        Ok(self.tape)
    }
}

/// What an emitted sequence kernel returns: the per-step outputs (zero past each length), the
/// parameter gradients by index, the carried values after the last step, and its buffers.
pub type KernelResult = (
    Vec<Vec<f32>>,
    Vec<(usize, Vec<f32>)>,
    Vec<Vec<f32>>,
    Buffers,
);

pub use rnn_ir::pool::{recycle, release_buffers, scratch, zeros};

/// A forward kernel's result as the driver takes it.
pub fn forward_result(r: KernelResult, training: bool) -> Result<Forward<f32, Buffers>> {
    let (mut per_step, _, finals, tape) = r;
    let output = per_step
        .pop()
        .ok_or_else(|| Error::Argument("the cell has no output".into()))?;
    let tape = if training {
        Some(tape)
    } else {
        recycle(tape);
        None
    };
    Ok(Forward {
        output,
        finals,
        tape,
    })
}

/// A backward kernel's result as the driver takes it: parameters whose gradient the graph does
/// not compute (they do not reach the output) get zeros; so does the input.
pub fn backward_result(r: KernelResult, param_sizes: &[usize], input_len: usize) -> Backward<f32> {
    let (mut per_step, grads, initial_grads, buffers) = r;
    recycle(buffers);
    let mut param_grads: Vec<Vec<f32>> = param_sizes.iter().map(|&n| zeros(n)).collect();
    for (p, g) in grads {
        param_grads[p] = g;
    }
    Backward {
        input_grad: per_step.pop().unwrap_or_else(|| zeros(input_len)),
        initial_grads,
        param_grads,
    }
}

/// A type whose every field is `f32` (arrays of them), so that all-zero bytes are a valid value.
///
/// # Safety
/// Every bit pattern of zeros must be a valid value of the type.
pub unsafe trait Zeroable: Sized {}

/// A zeroed `T` on the heap, never on the stack (a model's weights can be megabytes).
pub fn boxed_zeroed<T: Zeroable>() -> Box<T> {
    let layout = std::alloc::Layout::new::<T>();
    if layout.size() == 0 {
        // SAFETY: a zero-sized `T` needs no allocation; a dangling, aligned pointer is valid.
        return unsafe { Box::from_raw(std::ptr::NonNull::<T>::dangling().as_ptr()) };
    }
    // SAFETY: the layout is `T`'s and not zero-sized; zeros are a valid `T` (`Zeroable`).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut T;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(ptr)
    }
}

/// One parameter of an emitted model: its PyTorch name, dimensions, declared initial value and
/// elements.
pub struct Param<'a> {
    /// The `state_dict` name (`weight_ih_l0`).
    pub name: &'static str,
    /// The stored tensor's dimensions (`[]` for a scalar).
    pub dims: &'static [usize],
    /// The value every element starts at, when declared.
    pub init: Option<f32>,
    /// The elements, row-major.
    pub data: &'a mut [f32],
}

/// PyTorch's initialisation from `seed`: the same numbers as `Weights::init` gives the same
/// declaration.
pub fn init(params: &mut [Param<'_>], hidden: usize, seed: u64) {
    rnn_ir::weights::init_into(
        params.iter_mut().map(|p| (p.init, &mut *p.data)),
        hidden,
        seed,
    );
}

/// Copies `w` into the parameters after checking it holds exactly them, with their shapes and
/// finite values.
pub fn load(w: &Weights, params: &mut [Param<'_>]) -> Result<()> {
    w.check_params(params.iter().map(|p| (p.name, p.dims)))?;
    for p in params.iter_mut() {
        p.data.copy_from_slice(&w.tensors[p.name].data);
    }
    Ok(())
}

/// Reads safetensors bytes (a PyTorch `state_dict`) into the parameters.
pub fn from_safetensors(bytes: &[u8], params: &mut [Param<'_>]) -> Result<()> {
    let w = Weights {
        tensors: rnn_ir::weights::read_safetensors(bytes)?,
    };
    load(&w, params)
}

/// The parameters as [`Weights`], by PyTorch name.
pub fn to_weights(params: &[(&'static str, &'static [usize], &[f32])]) -> Weights {
    let tensors = params
        .iter()
        .map(|(name, dims, data)| {
            (
                name.to_string(),
                Tensor {
                    shape: dims.to_vec(),
                    data: data.to_vec(),
                },
            )
        })
        .collect();
    Weights { tensors }
}

/// The parameters as safetensors bytes with PyTorch's names.
pub fn to_safetensors(params: &[(&'static str, &'static [usize], &[f32])]) -> Result<Vec<u8>> {
    rnn_ir::weights::write_safetensors(&to_weights(params).tensors)
}

/// A [`Layout`] built from constant tables (what the emitted code writes).
pub const fn layout(
    input_size: usize,
    batch_first: bool,
    directions: usize,
    output_size: usize,
    states: &'static [(Cow<'static, str>, usize)],
    layers: &'static [LayerLayout<'static>],
) -> Layout<'static> {
    Layout {
        input_size,
        batch_first,
        directions,
        output_size,
        states: Cow::Borrowed(states),
        layers: Cow::Borrowed(layers),
    }
}

/// One layer of a constant [`Layout`].
pub const fn layer(
    input_size: usize,
    params: &'static [(Cow<'static, str>, Cow<'static, [usize]>)],
) -> LayerLayout<'static> {
    LayerLayout {
        input_size,
        params: Cow::Borrowed(params),
    }
}

/// A constant parameter entry of a [`LayerLayout`].
pub const fn param(
    name: &'static str,
    dims: &'static [usize],
) -> (Cow<'static, str>, Cow<'static, [usize]>) {
    (Cow::Borrowed(name), Cow::Borrowed(dims))
}

/// A constant state entry of a [`Layout`].
pub const fn state(name: &'static str, size: usize) -> (Cow<'static, str>, usize) {
    (Cow::Borrowed(name), size)
}

pub use rnn_ir::model::{BoundModel, Model, Recurrent};
pub use rnn_ir::parse::parse_str;
pub use rnn_ir::seq2seq::{BoundSeq2Seq, Seq2Seq};
pub use std::string::String;
pub use std::sync::OnceLock;

/// A recurrent stack the macros emitted, as a model around it drives it: the inherent
/// `forward`, `forward_train` and `backward` of every `rnn!`, `lstm!` and `gru!` declaration,
/// behind one object-safe trait so that an encoder and a decoder of different types share
/// [`Emitted`].
pub trait Stack {
    /// The emitted `forward`.
    fn forward(&self, request: &Request<'_>) -> Result<Response>;
    /// The emitted `forward_train`.
    fn forward_train(&self, request: &Request<'_>) -> Result<(Response, Tape<'_>)>;
    /// The emitted `backward`.
    fn backward(
        &self,
        tape: Tape<'_>,
        grad_output: &Tensor,
        grad_final_states: &[Option<&Tensor>],
    ) -> Result<Gradients>;
}

/// An emitted stack as a model's backend ([`Recurrent`]): what `seq2seq!` and the models with
/// an embedding or a head bind their stacks to.
#[derive(Clone, Copy)]
pub struct Emitted<'m>(pub &'m dyn Stack);

impl core::fmt::Debug for Emitted<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Emitted(..)")
    }
}

impl<'m> Recurrent for Emitted<'m> {
    type Tape = Tape<'m>;
    fn forward(&self, req: &Request) -> Result<Response> {
        self.0.forward(req)
    }
    fn forward_train(&self, req: &Request) -> Result<(Response, Tape<'m>)> {
        self.0.forward_train(req)
    }
    fn backward(
        &self,
        tape: Tape<'m>,
        grad_output: &Tensor,
        grad_final_states: &[Option<&Tensor>],
    ) -> Result<Gradients> {
        self.0.backward(tape, grad_output, grad_final_states)
    }
}

/// The model a declaration's text (`kind { settings }`) compiles to, compiled once per
/// process into `cell`: what an emitted model around a stack runs its layers with. The text is
/// the declaration the macro compiled, so this fails only if the two disagree.
pub fn compiled_model(
    cell: &'static OnceLock<core::result::Result<Model, String>>,
    text: &str,
) -> Result<&'static Model> {
    cell.get_or_init(|| {
        parse_str(text)
            .and_then(|spec| Model::compile(&spec))
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| recompiled(e))
}

/// The error of a declaration that compiled in the macro and not at run time: the macro and
/// the runtime disagree (different versions of `rnn`).
fn recompiled(e: &str) -> Error {
    Error::Spec(format!(
        "the declaration the macro compiled does not compile at run time (are the macros and the runtime from one version of `rnn`?): {e}"
    ))
}

/// [`compiled_model`] for an encoder-decoder declared by its two parts' texts.
pub fn compiled_seq2seq(
    cell: &'static OnceLock<core::result::Result<Seq2Seq, String>>,
    encoder: &str,
    decoder: &str,
) -> Result<&'static Seq2Seq> {
    cell.get_or_init(|| {
        let part = |text: &str| parse_str(text).map_err(|e| e.to_string());
        Seq2Seq::new(&part(encoder)?, &part(decoder)?).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| recompiled(e))
}
pub use rnn_ir::weights::read_safetensors;

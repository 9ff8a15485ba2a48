//! Models around stacks as Rust: a declaration with an embedding, an attention or a head
//! (`lstm! { ..., vocab: 65, head: 65 }`) and the encoder-decoder of `seq2seq!`.
//!
//! # What a declaration becomes
//! Each recurrent stack is emitted as `rnn!` / `lstm!` / `gru!` emit it, as a struct of its own
//! beside the model (`NameStack` for a model, `NameEncoder` and `NameDecoder` for an
//! encoder-decoder), with its `step`, `forward`, `forward_train` and `backward` on the emitted
//! kernels. The model's struct holds the stacks as fields (`rnn`, or `encoder` and `decoder`) and
//! every parameter of the layers around them as a fixed-size array named after its PyTorch name
//! (`encoder.embedding.weight` is the field `encoder_embedding_weight`), so the whole model is
//! exactly its parameters; `parameters()` lists them all by PyTorch name.
//!
//! # How it runs
//! `bind()` gives the runtime's [`crate::model::BoundModel`] or
//! [`crate::seq2seq::BoundSeq2Seq`] with the stacks on the emitted kernels (through
//! `rnn::rt::Emitted`) and the layers around them (embedding, attention, head, loss) on the
//! shared kernels, as the JIT runs them: the layers run once over all rows around the stacks'
//! time loops, so they are a handful of calls to the shared products (an attention in the
//! decoder's step runs once per step, the stack one step per call). The layers' graphs come
//! from compiling the declaration's text once per process (`compiled()`), the text the macro
//! itself compiled; every check and every error is the runtime's.

use super::{Field, compile_error, fields_of, lit, rust_ident};
use crate::graph::Shape;
use crate::program::Program;
use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote};

/// A stack of a model: the field that holds it, its emitted type, the prefix of its
/// parameters' names in the model, and its program.
pub(super) struct Part<'a> {
    pub field: &'static str,
    pub ty: Ident,
    pub prefix: String,
    pub program: &'a Program,
    pub doc: String,
}

/// What the model's runtime twin is.
pub(super) enum Runtime {
    /// A `Model` compiled from this declaration's text.
    Model { text: String },
    /// A `Seq2Seq` of two declarations' texts.
    Seq2Seq { encoder: String, decoder: String },
}

/// One parameter of the model: a field of the model (a layer's) or of one of its stacks.
struct Param {
    name: String,
    dims: Vec<usize>,
    field: Field,
    /// The stack's field that holds it, or `None` for the model's own (a layer's).
    part: Option<Ident>,
}

/// Emits `vis struct name` (with `attrs`) around `parts`, the model's parameters being
/// `params` (full names and shapes, in the runtime's order).
pub(super) fn emit(
    name: &Ident,
    vis: &TokenStream,
    attrs: &[TokenStream],
    doc: &str,
    parts: &[Part<'_>],
    params: &[(String, Vec<usize>)],
    runtime: &Runtime,
) -> TokenStream {
    let mut out = TokenStream::new();
    // The model's derives hold only if its stacks have them too.
    let derives: Vec<&TokenStream> = attrs
        .iter()
        .filter(|a| a.to_string().replace(' ', "").starts_with("#[derive("))
        .collect();
    for part in parts {
        let doc = &part.doc;
        let mut stack_attrs = vec![quote!(#[doc = #doc])];
        stack_attrs.extend(derives.iter().map(|a| (*a).clone()));
        out.extend(super::emit_model(part.program, &part.ty, vis, &stack_attrs));
    }
    let mut list = Vec::new();
    for (pname, dims) in params {
        let stack = parts
            .iter()
            .find_map(|p| Some((p, pname.strip_prefix(p.prefix.as_str())?)));
        let param = match stack {
            Some((part, rest)) => {
                let Some(field) = fields_of(part.program).into_iter().find(|f| f.name == rest)
                else {
                    return compile_error(
                        name.span(),
                        &format!("internal: `{pname}` is not a parameter of the stack"),
                    );
                };
                Param {
                    name: pname.clone(),
                    dims: dims.clone(),
                    field,
                    part: Some(format_ident!("{}", part.field)),
                }
            }
            None => {
                let ident = rust_ident(&pname.replace('.', "_"));
                let shape = match dims.as_slice() {
                    [r, c] => Shape::Matrix(*r, *c),
                    d => Shape::Vector(d.iter().product()),
                };
                Param {
                    name: pname.clone(),
                    dims: dims.clone(),
                    part: None,
                    field: Field {
                        name: pname.clone(),
                        ident,
                        dims: dims.clone(),
                        shape,
                        scalar: dims.is_empty(),
                        init: None,
                    },
                }
            }
        };
        list.push(param);
    }
    let nparams: usize = list.iter().map(|p| p.dims.iter().product::<usize>()).sum();
    let nparams_lit = lit(nparams);
    let nfields = lit(list.len());
    let part_decls = parts.iter().map(|p| {
        let (f, ty) = (format_ident!("{}", p.field), &p.ty);
        let doc = format!(" The {} stack (parameters `{}*`).", p.field, p.prefix);
        quote!(#[doc = #doc] pub #f: #ty,)
    });
    let own_decls = list.iter().filter(|p| p.part.is_none()).map(|p| {
        let (id, ty) = (&p.field.ident, p.field.ty());
        let doc = format!(" `{}`, shape {:?}.", p.name, p.dims);
        quote!(#[doc = #doc] pub #id: #ty,)
    });
    let names: Vec<&str> = list.iter().map(|p| p.name.as_str()).collect();
    let dims: Vec<TokenStream> = list
        .iter()
        .map(|p| {
            let d = p.dims.iter().map(|&d| lit(d));
            quote!(&[#(#d),*])
        })
        .collect();
    // `self.encoder.weight_ih_l0` as a flat slice: the field's own accessor on its owner.
    let access = |p: &Param, this: &TokenStream, mutable: bool| {
        let owner = match &p.part {
            None => this.clone(),
            Some(f) => quote!(#this.#f),
        };
        if mutable {
            p.field.slice_mut(&owner)
        } else {
            p.field.slice(&owner)
        }
    };
    let this = quote!(self);
    let model = quote!(model);
    let slices: Vec<TokenStream> = list.iter().map(|p| access(p, &this, false)).collect();
    let slices_mut: Vec<TokenStream> = list.iter().map(|p| access(p, &this, true)).collect();
    let loads: Vec<TokenStream> = list.iter().map(|p| access(p, &model, true)).collect();

    // The layers' own parameters: what `bind` hands the runtime (the stacks hold theirs).
    let own: Vec<&Param> = list.iter().filter(|p| p.part.is_none()).collect();
    let own_names: Vec<&str> = own.iter().map(|p| p.name.as_str()).collect();
    let own_slices: Vec<TokenStream> = own.iter().map(|p| access(p, &this, false)).collect();
    let (compiled_ty, compiled_body, bound_ty, bind_body) = match runtime {
        Runtime::Model { text } => {
            let f = format_ident!("{}", parts[0].field);
            (
                quote!(::rnn::rt::Model),
                quote!(::rnn::rt::compiled_model(&COMPILED, #text)),
                quote!(::rnn::rt::BoundModel<'static, ::rnn::rt::Emitted<'_>>),
                quote! {
                    Self::compiled()?.bind_layers(
                        &[#((#own_names, #own_slices)),*],
                        ::rnn::rt::Emitted(&self.#f),
                    )
                },
            )
        }
        Runtime::Seq2Seq { encoder, decoder } => (
            quote!(::rnn::rt::Seq2Seq),
            quote!(::rnn::rt::compiled_seq2seq(&COMPILED, #encoder, #decoder)),
            quote!(::rnn::rt::BoundSeq2Seq<'static, ::rnn::rt::Emitted<'_>>),
            quote! {
                Self::compiled()?.bind_stacks(
                    &[#((#own_names, #own_slices)),*],
                    ::rnn::rt::Emitted(&self.encoder),
                    ::rnn::rt::Emitted(&self.decoder),
                )
            },
        ),
    };
    let (bound_doc, kind_doc) = match runtime {
        Runtime::Model { .. } => (
            " The model bound for running: `forward`, `forward_train` / `backward`, `loss` \
             (the cross-entropy and every gradient), `prepare`; the stack on this model's \
             emitted kernels, the layers around it on the shared ones.",
            "rnn::ir::model::Model",
        ),
        Runtime::Seq2Seq { .. } => (
            " The encoder-decoder bound for running: `encode`, `greedy`, `beam`, and `loss` \
             (teacher forcing, every gradient); the stacks on this model's emitted kernels, \
             the embeddings, attention and head on the shared ones.",
            "rnn::ir::seq2seq::Seq2Seq",
        ),
    };
    let compiled_doc = format!(
        " The runtime's view of this declaration (a [`{kind_doc}`] compiled once per \
         process from the declaration's text): its layers' graphs, checks and names."
    );
    out.extend(quote! {
        #(#attrs)*
        #[doc = #doc]
        #[allow(non_snake_case)]
        #vis struct #name {
            #(#part_decls)*
            #(#own_decls)*
        }

        #[automatically_derived]
        impl #name {
            /// The number of parameters (PyTorch's count).
            pub const PARAMETERS: usize = #nparams_lit;

            /// Every parameter by PyTorch name, in the `state_dict`'s order.
            pub fn parameters(&self) -> [(&'static str, &[f32]); #nfields] {
                [#((#names, #slices)),*]
            }

            /// [`Self::parameters`], mutable.
            pub fn parameters_mut(&mut self) -> [(&'static str, &mut [f32]); #nfields] {
                [#((#names, #slices_mut)),*]
            }
        }

        // Every field is an `f32`, an array of them or a stack made of them: the struct is
        // exactly its parameters.
        const _: () = ::core::assert!(::core::mem::size_of::<#name>() == #nparams_lit * 4);

        // SAFETY: every field is an `f32`, an array of them or an emitted stack (itself
        // `Zeroable`); the size is asserted above.
        #[::rnn::__std]
        unsafe impl ::rnn::rt::Zeroable for #name {}

        #[::rnn::__std]
        const _: () = {
            static COMPILED: ::rnn::rt::OnceLock<::core::result::Result<#compiled_ty, ::rnn::rt::String>> =
                ::rnn::rt::OnceLock::new();

            #[automatically_derived]
            impl #name {
                #[doc = #compiled_doc]
                pub fn compiled() -> ::rnn::rt::Result<&'static #compiled_ty> {
                    #compiled_body
                }

                /// A model with every weight zero, on the heap.
                pub fn zeroed() -> ::rnn::rt::Box<Self> {
                    ::rnn::rt::boxed_zeroed::<Self>()
                }

                /// The runtime's initialisation from `seed`: the same weights as
                /// `Self::compiled()?.init(seed)`.
                pub fn init(seed: u64) -> ::rnn::rt::Result<::rnn::rt::Box<Self>> {
                    Self::from_weights(&Self::compiled()?.init(seed)?)
                }

                /// The model with the weights of a PyTorch `state_dict` (every parameter by
                /// its PyTorch name, with its shape, finite, and nothing else).
                pub fn from_weights(
                    weights: &::rnn::rt::Weights,
                ) -> ::rnn::rt::Result<::rnn::rt::Box<Self>> {
                    let mut model = Self::zeroed();
                    model.load(weights)?;
                    ::core::result::Result::Ok(model)
                }

                /// Replaces every weight by `weights`' (checked as [`Self::from_weights`]
                /// checks them; nothing changes on an error): how a training loop puts an
                /// optimiser's step back.
                pub fn load(&mut self, weights: &::rnn::rt::Weights) -> ::rnn::rt::Result<()> {
                    let model = self;
                    ::rnn::rt::load(
                        weights,
                        &mut [#(::rnn::rt::Param {
                            name: #names,
                            dims: #dims,
                            init: ::core::option::Option::None,
                            data: #loads,
                        }),*],
                    )
                }

                /// [`Self::from_weights`] from safetensors bytes.
                pub fn from_safetensors(bytes: &[u8]) -> ::rnn::rt::Result<::rnn::rt::Box<Self>> {
                    let tensors = ::rnn::rt::read_safetensors(bytes)?;
                    Self::from_weights(&::rnn::rt::Weights { tensors })
                }

                /// The weights by PyTorch name.
                pub fn to_weights(&self) -> ::rnn::rt::Weights {
                    ::rnn::rt::to_weights(&[#((#names, #dims, #slices)),*])
                }

                /// The weights as safetensors bytes, PyTorch's names.
                pub fn to_safetensors(&self) -> ::rnn::rt::Result<::rnn::rt::Vec<u8>> {
                    ::rnn::rt::to_safetensors(&[#((#names, #dims, #slices)),*])
                }

                #[doc = #bound_doc]
                pub fn bind(&self) -> ::rnn::rt::Result<#bound_ty> {
                    #bind_body
                }
            }
        };
    });
    out
}

//! The Rust emitter: a compiled [`Program`] and its plans as size-specialised Rust, the code
//! that `rnn!`, `lstm!` and `gru!` expand to (the macros are one call into [`expand`]; `rnnc
//! emit` and the snapshot tests call [`emit_model`]).
//!
//! # What a declaration becomes
//! For `lstm! { pub struct Encoder { input: 8, hidden: 16 } }`:
//! - `pub struct Encoder`: every parameter a field of fixed size, named as PyTorch names it
//!   (`weight_ih_l0: [[f32; 8]; 64]`, a scalar parameter an `f32`), with the constants
//!   `PARAMETERS`, `INPUT_SIZE`, `HIDDEN_SIZE`, `OUTPUT_SIZE`, `LAYERS`, `DIRECTIONS`,
//!   `BATCH_FIRST` and `ZERO` (every weight zero, for a `static`);
//!   `parameters()` / `parameters_mut()` list `(name, elements)`.
//! - `pub struct EncoderState` (unidirectional models): each recurrent state of each layer,
//!   and `Encoder::step(&self, &x, &mut state) -> y`, one time step of one sequence. `step`
//!   and the state use only `core`: no heap, no `std`.
//! - With the facade's `std` feature: `Encoder::init(seed)`, `zeroed()`,
//!   `from_safetensors(bytes)`, `to_safetensors()`, `from_weights` / `to_weights`; `forward`,
//!   `forward_train` and `backward` over a batch of sequences, and `run` (both, as the
//!   interpreter's `Program::run`). The models are boxed: their weights never sit on the stack.
//!
//! # How it runs
//! Layers, directions, packed lengths, initial states, batch-first layout and the
//! reverse-time backward pass are the shared driver's ([`crate::driver`]): the model supplies a
//! `SequenceExecutor` whose kernels are the plans of [`Program`] emitted by [`kernel`] with
//! every size a constant. The streaming `step` cannot call the driver (it is `core`-only), so
//! it runs the same inference plan per layer, in layer order, itself.
//!
//! Every kernel is emitted once and compiled three times: inside a `#[target_feature(enable =
//! "avx512f,avx2,fma")]` function and inside a `#[target_feature(enable = "avx2,fma")]` one
//! (each taken when the CPU has them: products in explicit 512- or 256-bit FMA kernels, the
//! element-wise loops vectorised by the compiler at that width), and as portable code.
//!
//! # Hygiene
//! Output is deterministic (the program's orders, never a hash map's), names every outside item
//! by an absolute path (`::core::`, `::rnn::`), marks its impls `#[automatically_derived]`,
//! and keeps its helpers inside `const _: () = { ... };` blocks, so that nothing but the
//! declared struct and its state type enters the user's namespace (for a model around a stack,
//! also the stack's struct and state, `NameStack`; for `seq2seq!`, `NameEncoder` and
//! `NameDecoder` and their states: see [`composite`]).

pub mod composite;
pub mod kernel;

use crate::error::{Diagnostic, Error};
use crate::graph::{OutRole, Shape};
use crate::parse::{parse_body, span_at};
use crate::program::{CellProgram, Program};
use kernel::{Body, Mode};
use proc_macro2::{Delimiter, Ident, Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};

/// The most floats of values derived from weights alone that a streaming step computes per
/// step on its stack (16 KiB); above it the step runs the unfused graphs.
const STEP_BOUND_LIMIT: usize = 4096;

fn lit(n: usize) -> Literal {
    Literal::usize_unsuffixed(n)
}

/// Expands a macro invocation `[#[attr]] [vis] struct Name { declaration }` of kind `kind`
/// (`rnn`, `lstm` or `gru`; an `rnn` body with equations is a custom `cell`). Mistakes come
/// back as `compile_error!`s at the offending tokens, all at once, beside an empty struct of
/// the declared name (so that its other uses do not add errors of their own).
pub fn expand(kind: &str, input: TokenStream) -> TokenStream {
    let head = match Head::parse(input) {
        Ok(head) => head,
        Err((span, message)) => return compile_error(span, &message),
    };
    let kind = if kind == "rnn" && is_custom(&head.body) {
        "cell"
    } else {
        kind
    };
    let fail = |errors: Vec<(Span, String)>| head.fail(&errors);
    // What the body lacks as a whole (a size, a state) is reported at the model's name.
    let spec = parse_body(
        kind,
        head.name.span(),
        Some(head.name.to_string()),
        head.body.clone(),
        head.body_close,
    );
    let report = |e: Error| match e {
        Error::Parse(diagnostics) => fail(
            diagnostics
                .iter()
                .map(|d| (diagnostic_span(d, &head), d.message.clone()))
                .collect(),
        ),
        e => fail(vec![(head.body_span, e.to_string())]),
    };
    let spec = match spec {
        Ok(spec) => spec,
        Err(e) => return report(e),
    };
    if spec.has_model_layers() {
        // An embedding, an attention or a head around the stack: a model.
        let model = match crate::model::Model::compile(&spec) {
            Ok(model) => model,
            Err(e) => return report(e),
        };
        let text = format!("{kind} {} {{ {} }}", head.name, head.body);
        return emit_around(&model, &head.name, &head.vis, &head.attrs, &text);
    }
    match Program::compile(&spec) {
        Ok(program) => emit_model(&program, &head.name, &head.vis, &head.attrs),
        Err(e) => report(e),
    }
}

/// The Rust a declaration with an embedding, an attention or a head expands to: `vis struct
/// name` (with `attrs`) around `nameStack`, the stack `model.stack` emitted as [`emit_model`]
/// emits it. `text` is the declaration in the `.rnn` language, which the emitted model compiles
/// at run time for its layers' graphs (it must declare `model`).
pub fn emit_around(
    model: &crate::model::Model,
    name: &Ident,
    vis: &TokenStream,
    attrs: &[TokenStream],
    text: &str,
) -> TokenStream {
    let spec = &model.spec;
    let ty = format_ident!("{}Stack", name);
    let doc = format!(
        " A model around a recurrent stack: {}the stack [`{ty}`]{}; {} parameters.",
        spec.vocab
            .map_or(String::new(), |v| format!("an embedding of {v} ids, ")),
        spec.head
            .map_or(String::new(), |n| format!(", a head of {n} classes")),
        model.parameter_count()
    );
    let part = composite::Part {
        field: "rnn",
        ty,
        prefix: model.stack_prefix().to_string(),
        program: &model.stack,
        doc: format!(" The recurrent stack of [`{name}`]."),
    };
    composite::emit(
        name,
        vis,
        attrs,
        &doc,
        &[part],
        &model.parameters(),
        &composite::Runtime::Model {
            text: text.to_string(),
        },
    )
}

/// Expands `seq2seq! { [#[attr]] [vis] struct Name { encoder: kind { .. }, decoder: kind { .. } } }`:
/// each part is a declaration of `rnn!`, `lstm!` or `gru!` (a custom cell too), the decoder
/// with a `head` over the target vocabulary and optionally an `attention`. Mistakes come back
/// as `compile_error!`s at the offending tokens, beside an empty struct of the declared name.
pub fn expand_seq2seq(input: TokenStream) -> TokenStream {
    let head = match Head::parse(input) {
        Ok(head) => head,
        Err((span, message)) => return compile_error(span, &message),
    };
    let fail = |errors: Vec<(Span, String)>| head.fail(&errors);
    let parts = match seq2seq_parts(&head) {
        Ok(parts) => parts,
        Err(e) => return fail(vec![e]),
    };
    let mut specs = Vec::new();
    let mut errors = Vec::new();
    for (role, kind, group) in &parts {
        let kind = if kind == "rnn" && is_custom(&group.stream()) {
            "cell".to_string()
        } else {
            kind.to_string()
        };
        let name = format!("{}{}", head.name, capitalised(&role.to_string()));
        let text = format!("{kind} {name} {{ {} }}", group.stream());
        match parse_body(
            &kind,
            role.span(),
            Some(name),
            group.stream(),
            group.span_close(),
        ) {
            Ok(spec) => specs.push((spec, text)),
            Err(Error::Parse(diagnostics)) => errors.extend(diagnostics.iter().map(|d| {
                let span = d
                    .span
                    .or_else(|| span_at(&group.stream(), d.loc()))
                    .unwrap_or(group.span());
                (span, d.message.clone())
            })),
            Err(e) => errors.push((group.span(), e.to_string())),
        }
    }
    if !errors.is_empty() {
        return fail(errors);
    }
    let [(enc, enc_text), (dec, dec_text)] = <[_; 2]>::try_from(specs).expect("two parts");
    let model = match crate::seq2seq::Seq2Seq::new(&enc, &dec) {
        Ok(model) => model,
        Err(e) => return fail(vec![(head.body_span, e.to_string())]),
    };
    let (enc_ty, dec_ty) = (
        format_ident!("{}Encoder", head.name),
        format_ident!("{}Decoder", head.name),
    );
    let doc = format!(
        " An encoder-decoder: source ids below {} through the encoder [`{enc_ty}`], its final \
         states into the decoder [`{dec_ty}`]{}, a head over {} target ids; {} parameters.",
        enc.vocab.unwrap_or(0),
        if dec.attention.is_some() {
            ", which attends over the encoder's outputs"
        } else {
            ""
        },
        dec.head.unwrap_or(0),
        model.encoder.parameter_count() + model.decoder.parameter_count()
    );
    let name = &head.name;
    let parts = [
        composite::Part {
            field: "encoder",
            ty: enc_ty,
            prefix: format!("encoder.{}", model.encoder.stack_prefix()),
            program: &model.encoder.stack,
            doc: format!(" The encoder's recurrent stack of [`{name}`]."),
        },
        composite::Part {
            field: "decoder",
            ty: dec_ty,
            prefix: format!("decoder.{}", model.decoder.stack_prefix()),
            program: &model.decoder.stack,
            doc: format!(" The decoder's recurrent stack of [`{name}`]."),
        },
    ];
    composite::emit(
        name,
        &head.vis,
        &head.attrs,
        &doc,
        &parts,
        &model.parameters(),
        &composite::Runtime::Seq2Seq {
            encoder: enc_text,
            decoder: dec_text,
        },
    )
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// A part of a `seq2seq!` body: its role, its kind and its braced settings.
type PartTokens = (Ident, Ident, proc_macro2::Group);

/// The two parts of a `seq2seq!` body, `encoder: kind { .. }` then `decoder: kind { .. }`
/// (either order, each once), as (role, kind, body), the encoder first.
fn seq2seq_parts(head: &Head) -> Result<Vec<PartTokens>, (Span, String)> {
    const ROLES: [&str; 2] = ["encoder", "decoder"];
    let mut found: [Option<PartTokens>; 2] = [None, None];
    let mut it = head.body.clone().into_iter().peekable();
    while let Some(t) = it.next() {
        let role = match t {
            TokenTree::Ident(i) => i,
            t => {
                return Err((
                    t.span(),
                    format!(
                        "expected `encoder` or `decoder`, found `{t}`: an encoder-decoder reads `encoder: lstm {{ .. }}, decoder: lstm {{ .. }}`"
                    ),
                ));
            }
        };
        let r = role.to_string();
        let Some(k) = ROLES.iter().position(|x| *x == r) else {
            let hint = crate::error::suggest(&r, ROLES)
                .map_or_else(String::new, |s| format!(" (did you mean `{s}`?)"));
            return Err((
                role.span(),
                format!(
                    "unknown part `{r}`{hint}: an encoder-decoder has an `encoder` and a `decoder`"
                ),
            ));
        };
        if found[k].is_some() {
            return Err((role.span(), format!("the `{r}` is declared twice")));
        }
        match it.next() {
            Some(TokenTree::Punct(p)) if p.as_char() == ':' => {}
            other => {
                let span = other.as_ref().map_or(role.span(), |t| t.span());
                return Err((span, format!("expected `:` after `{r}`")));
            }
        }
        let kind = match it.next() {
            Some(TokenTree::Ident(i))
                if ["rnn", "lstm", "gru"].contains(&i.to_string().as_str()) =>
            {
                i
            }
            other => {
                let span = other.as_ref().map_or(role.span(), |t| t.span());
                let what = other.map_or_else(|| "nothing".to_string(), |t| format!("`{t}`"));
                return Err((
                    span,
                    format!(
                        "expected the {r}'s cell, `rnn`, `lstm` or `gru` (a custom cell is an `rnn` with equations), found {what}"
                    ),
                ));
            }
        };
        let body = match it.next() {
            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => g,
            other => {
                let span = other.as_ref().map_or(kind.span(), |t| t.span());
                return Err((
                    span,
                    format!("expected `{{` and the {r}'s settings after `{kind}`"),
                ));
            }
        };
        found[k] = Some((role, kind, body));
        match it.next() {
            None => break,
            Some(TokenTree::Punct(p)) if p.as_char() == ',' || p.as_char() == ';' => {}
            Some(t) => {
                return Err((t.span(), format!("expected `,` after the {r}, found `{t}`")));
            }
        }
    }
    let [Some(enc), Some(dec)] = found else {
        let missing = if found[0].is_none() {
            "encoder"
        } else {
            "decoder"
        };
        return Err((
            head.body_close,
            format!("the encoder-decoder has no `{missing}`: declare `{missing}: lstm {{ .. }}`"),
        ));
    };
    Ok(vec![enc, dec])
}

/// Where a diagnostic points: its token, found again from its line and column when lowering
/// reported it, else the whole declaration body.
fn diagnostic_span(d: &Diagnostic, head: &Head) -> Span {
    d.span
        .or_else(|| span_at(&head.body, d.loc()))
        .unwrap_or(head.body_span)
}

fn compile_error(span: Span, message: &str) -> TokenStream {
    quote_spanned!(span=> ::core::compile_error! { #message })
}

/// Whether an `rnn!` body declares a custom cell: an item is an equation or starts with a
/// cell keyword.
fn is_custom(body: &TokenStream) -> bool {
    body.clone().into_iter().any(|t| match t {
        TokenTree::Punct(p) => p.as_char() == '=',
        TokenTree::Ident(i) => crate::parse::KEYWORDS.contains(&i.to_string().as_str()),
        _ => false,
    })
}

/// The part of a macro invocation before the declaration: attributes, visibility, name.
struct Head {
    attrs: Vec<TokenStream>,
    vis: TokenStream,
    name: Ident,
    body: TokenStream,
    body_span: Span,
    /// The body's `}`.
    body_close: Span,
}

impl Head {
    /// The expansion of a declaration with mistakes: a `compile_error!` at each, beside an
    /// empty struct of the declared name (so that its other uses add no errors of their own).
    fn fail(&self, errors: &[(Span, String)]) -> TokenStream {
        let mut out: TokenStream = errors
            .iter()
            .map(|(span, m)| compile_error(*span, m))
            .collect();
        let (attrs, vis, name) = (&self.attrs, &self.vis, &self.name);
        out.extend(quote!(#(#attrs)* #vis struct #name;));
        out
    }

    /// Parses `[#[attr]]* [pub [(..)]] struct Name { body }`.
    fn parse(input: TokenStream) -> Result<Head, (Span, String)> {
        let mut it = input.into_iter().peekable();
        let mut attrs = Vec::new();
        while let Some(TokenTree::Punct(p)) = it.peek() {
            if p.as_char() != '#' {
                break;
            }
            let pound = it.next().expect("peeked");
            match it.next() {
                Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Bracket => {
                    attrs.push(quote!(#pound #g));
                }
                other => {
                    let span = other.map_or(pound.span(), |t| t.span());
                    return Err((span, "expected `[` after `#` (an attribute)".into()));
                }
            }
        }
        let mut vis = TokenStream::new();
        if let Some(TokenTree::Ident(i)) = it.peek()
            && i == "pub"
        {
            vis.extend(it.next());
            if let Some(TokenTree::Group(g)) = it.peek()
                && g.delimiter() == Delimiter::Parenthesis
            {
                vis.extend(it.next());
            }
        }
        let kind_span = match it.next() {
            Some(TokenTree::Ident(i)) if i == "struct" => i.span(),
            Some(t) => {
                return Err((
                    t.span(),
                    format!(
                        "expected `struct Name {{ ... }}`, found `{t}`: a declaration reads \
                         `pub struct Name {{ input: 8, hidden: 16 }}`"
                    ),
                ));
            }
            None => {
                return Err((
                    Span::call_site(),
                    "expected `struct Name { ... }`: a declaration reads \
                     `pub struct Name { input: 8, hidden: 16 }`"
                        .into(),
                ));
            }
        };
        let name = match it.next() {
            Some(TokenTree::Ident(i)) => i,
            Some(t) => return Err((t.span(), format!("expected the model's name, found `{t}`"))),
            None => return Err((kind_span, "expected the model's name after `struct`".into())),
        };
        let (body, body_span, body_close) = match it.next() {
            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => {
                (g.stream(), g.span(), g.span_close())
            }
            Some(t) => {
                return Err((
                    t.span(),
                    format!("expected `{{` and the declaration's settings, found `{t}`"),
                ));
            }
            None => {
                return Err((
                    name.span(),
                    "expected `{` and the declaration's settings after the name".into(),
                ));
            }
        };
        if let Some(t) = it.next() {
            return Err((
                t.span(),
                format!("unexpected `{t}` after the declaration: one model per invocation"),
            ));
        }
        Ok(Head {
            attrs,
            vis,
            name,
            body,
            body_span,
            body_close,
        })
    }
}

/// One parameter of the model as a field.
struct Field {
    /// The PyTorch name, which is the field's name.
    name: String,
    ident: Ident,
    dims: Vec<usize>,
    shape: Shape,
    scalar: bool,
    init: Option<f32>,
}

impl Field {
    fn ty(&self) -> TokenStream {
        match self.shape {
            _ if self.scalar => quote!(f32),
            Shape::Matrix(o, i) => {
                let (o, i) = (lit(o), lit(i));
                quote!([[f32; #i]; #o])
            }
            s => {
                let n = lit(s.row_len());
                quote!([f32; #n])
            }
        }
    }

    fn zero(&self) -> TokenStream {
        match self.shape {
            _ if self.scalar => quote!(0.0),
            Shape::Matrix(o, i) => {
                let (o, i) = (lit(o), lit(i));
                quote!([[0.0; #i]; #o])
            }
            s => {
                let n = lit(s.row_len());
                quote!([0.0; #n])
            }
        }
    }

    /// `&self.name` as a flat slice.
    fn slice(&self, this: &TokenStream) -> TokenStream {
        let id = &self.ident;
        match self.shape {
            _ if self.scalar => quote!(::core::slice::from_ref(&#this.#id)),
            Shape::Matrix(..) => quote!(#this.#id.as_flattened()),
            _ => quote!(&#this.#id[..]),
        }
    }

    fn slice_mut(&self, this: &TokenStream) -> TokenStream {
        let id = &self.ident;
        match self.shape {
            _ if self.scalar => quote!(::core::slice::from_mut(&mut #this.#id)),
            Shape::Matrix(..) => quote!(#this.#id.as_flattened_mut()),
            _ => quote!(&mut #this.#id[..]),
        }
    }
}

/// The parameters of `program` as the fields of its struct, in its order.
fn fields_of(program: &Program) -> Vec<Field> {
    program
        .parameter_infos()
        .into_iter()
        .map(|(n, info)| Field {
            ident: rust_ident(&n),
            name: n,
            dims: info.dims(),
            shape: info.shape,
            scalar: info.scalar,
            init: info.init,
        })
        .collect()
}

/// The Rust a macro emits for `program`, declared as `vis struct name` with `attrs`.
pub fn emit_model(
    program: &Program,
    name: &Ident,
    vis: &TokenStream,
    attrs: &[TokenStream],
) -> TokenStream {
    let spec = &program.spec;
    let names = program
        .parameters()
        .into_iter()
        .map(|(n, _)| n)
        .chain(program.states().iter().map(|(n, _)| n.clone()));
    let unusable: Vec<TokenStream> = names
        .filter(|n| matches!(n.as_str(), "self" | "Self" | "super" | "crate" | "_"))
        .map(|n| {
            compile_error(
                name.span(),
                &format!("`{n}` cannot name a field of the model in Rust: rename it"),
            )
        })
        .collect();
    if !unusable.is_empty() {
        return quote!(#(#unusable)* #vis struct #name;);
    }
    let unsupported: Vec<TokenStream> = program
        .layers
        .iter()
        .flat_map(|c| [&c.forward.graph, &c.backward.graph])
        .filter_map(|g| g.codegen_unsupported("Rust emitter"))
        .take(1)
        .map(|why| compile_error(name.span(), &why))
        .collect();
    if !unsupported.is_empty() {
        return quote!(#(#unsupported)* #vis struct #name;);
    }
    let state_name = format_ident!("{}State", name);
    let dirs = spec.directions();
    let layers = program.layers.len();
    let fields = fields_of(program);
    let per_cell = fields.len() / (layers * dirs);
    let cell_fields = |layer: usize, dir: usize| {
        let start = (layer * dirs + dir) * per_cell;
        &fields[start..start + per_cell]
    };
    let this = quote!(self);
    let m = quote!(m);

    // The struct.
    let field_decls = fields.iter().map(|f| {
        let (id, ty) = (&f.ident, f.ty());
        let doc = format!(" `{}`, shape {:?}.", f.name, f.dims);
        quote!(#[doc = #doc] pub #id: #ty,)
    });
    let zero_fields = fields.iter().map(|f| {
        let (id, z) = (&f.ident, f.zero());
        quote!(#id: #z,)
    });
    let nparams: usize = fields
        .iter()
        .map(|f| f.dims.iter().product::<usize>())
        .sum();
    let nfields = lit(fields.len());
    let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    let slices: Vec<TokenStream> = fields.iter().map(|f| f.slice(&this)).collect();
    let slices_mut: Vec<TokenStream> = fields.iter().map(|f| f.slice_mut(&this)).collect();
    let out_size = program.output_size();
    let (input_size, hidden) = (lit(spec.input_size), lit(spec.hidden_size));
    let width = lit(dirs * out_size);
    let (layers_lit, dirs_lit) = (lit(layers), lit(dirs));
    let batch_first = spec.batch_first;
    let nparams_lit = lit(nparams);
    let kind = match spec.cell {
        crate::spec::CellKind::RnnTanh => "A tanh RNN",
        crate::spec::CellKind::RnnRelu => "A ReLU RNN",
        crate::spec::CellKind::Lstm => "An LSTM",
        crate::spec::CellKind::Gru => "A GRU",
        crate::spec::CellKind::Custom(_) => "A custom cell's",
    };
    let doc = format!(
        " {kind} model: input {}, hidden {}, {} layer(s), {} direction(s), {} parameters.",
        spec.input_size, spec.hidden_size, layers, dirs, nparams
    );

    // Parameters of each (layer, direction) in the cell's order, for the kernels.
    let param_fns = (0..layers).map(|l| {
        let f = format_ident!("params_l{}", l);
        let np = lit(per_cell);
        let dir_lists = (0..dirs).map(|d| {
            let list = cell_fields(l, d).iter().map(|f| f.slice(&m));
            let d = lit(d);
            quote!(#d => [#(#list),*],)
        });
        quote! {
            #[inline(always)]
            fn #f(m: &#name, dir: usize) -> [&[f32]; #np] {
                match dir {
                    #(#dir_lists)*
                    _ => ::core::unreachable!(),
                }
            }
        }
    });
    let param_fns: TokenStream = param_fns.collect();

    // Kernels: one set per distinct layer input size.
    let kernel_of = |l: usize| {
        let size = program.layers[l].input_size;
        program
            .layers
            .iter()
            .position(|c| c.input_size == size)
            .expect("layer l itself matches")
    };
    // The streaming step keeps its buffers on the stack and computes the values derived from
    // weights alone (bias sums, fused gate matrices) at every step. Where those are large (the
    // fusion of a custom cell's products stacks its matrices), the step runs the graphs as
    // lowered instead: no copy of a weight matrix per step, nothing large on the stack.
    let bound_floats = |c: &CellProgram| -> usize {
        let plan = c.forward_plan(false);
        plan.buffers
            .iter()
            .filter(|b| b.storage == crate::plan::Storage::Bound)
            .map(|b| b.width)
            .sum()
    };
    let unfused = if program
        .layers
        .iter()
        .any(|c| bound_floats(c) > STEP_BOUND_LIMIT)
    {
        Program::compile_with(
            &program.spec,
            crate::program::CompileOptions { optimize: false },
        )
        .ok()
        .filter(|p| p.parameters() == program.parameters())
    } else {
        None
    };
    let step_program = unfused.as_ref().unwrap_or(program);
    let mut step_kernels = TokenStream::new();
    let mut seq_kernels = TokenStream::new();
    for (l, cell) in program.layers.iter().enumerate() {
        if kernel_of(l) != l {
            continue;
        }
        if dirs == 1 {
            step_kernels.extend(step_kernel(&step_program.layers[l], l, per_cell));
        }
        seq_kernels.extend(sequence_kernels(cell, l, per_cell));
    }

    // The streaming step (unidirectional models).
    let states = program.states();
    let state_fields = states.iter().map(|(n, size)| {
        let id = rust_ident(n);
        let size = lit(*size);
        let doc = format!(" `{n}` of each layer.");
        quote!(#[doc = #doc] pub #id: [[f32; #size]; #layers_lit],)
    });
    let state_zero = states.iter().map(|(n, size)| {
        let id = rust_ident(n);
        let size = lit(*size);
        quote!(#id: [[0.0; #size]; #layers_lit],)
    });
    let step_items = if dirs == 1 {
        let mut calls = TokenStream::new();
        let mut input = quote!(&x[..]);
        for l in 0..layers {
            let k = format_ident!("step_l{}", kernel_of(l));
            let pf = format_ident!("params_l{}", l);
            let y = format_ident!("y{}", l);
            let carried = states.iter().map(|(n, _)| {
                let id = rust_ident(n);
                let l = lit(l);
                quote!(&mut state.#id[#l])
            });
            let out = lit(out_size);
            calls.extend(quote! {
                let mut #y = [0.0f32; #out];
                #k(#pf(self, 0), #input, #(#carried,)* &mut #y);
            });
            input = quote!(&#y[..]);
        }
        let last = format_ident!("y{}", layers - 1);
        let out = lit(out_size);
        let state_doc =
            format!(" The recurrent state of a [`{name}`] between two calls of [`{name}::step`].");
        quote! {
            #[doc = #state_doc]
            #[allow(non_snake_case)]
            #[derive(::core::clone::Clone, ::core::marker::Copy, ::core::fmt::Debug, ::core::cmp::PartialEq)]
            #vis struct #state_name {
                #(#state_fields)*
            }

            #[automatically_derived]
            impl #state_name {
                /// Every state zero: the start of a sequence.
                pub const ZERO: Self = Self { #(#state_zero)* };
            }

            #[automatically_derived]
            impl ::core::default::Default for #state_name {
                fn default() -> Self {
                    Self::ZERO
                }
            }

            const _: () = {
                #param_fns
                #step_kernels

                #[automatically_derived]
                impl #name {
                    /// One time step of one sequence: reads `x`, updates `state` in place and
                    /// returns the output. Allocates nothing and needs only `core`.
                    pub fn step(&self, x: &[f32; #input_size], state: &mut #state_name) -> [f32; #out] {
                        #calls
                        #last
                    }

                    /// [`Self::step`] on slices: `x` must hold `INPUT_SIZE` numbers and `y`
                    /// `OUTPUT_SIZE`; anything else is an error naming the argument.
                    pub fn step_slices(
                        &self,
                        x: &[f32],
                        state: &mut #state_name,
                        y: &mut [f32],
                    ) -> ::core::result::Result<(), ::rnn::rt::LengthError> {
                        let x: &[f32; #input_size] = x.try_into().map_err(|_| {
                            ::rnn::rt::LengthError { argument: "x", expected: #input_size, found: x.len() }
                        })?;
                        if y.len() != #out {
                            return ::core::result::Result::Err(::rnn::rt::LengthError {
                                argument: "y", expected: #out, found: y.len(),
                            });
                        }
                        y.copy_from_slice(&self.step(x, state));
                        ::core::result::Result::Ok(())
                    }
                }
            };
        }
    } else {
        TokenStream::new()
    };

    // Everything that needs `std`.
    let layout_states = states.iter().map(|(n, size)| {
        let size = lit(*size);
        quote!(::rnn::rt::state(#n, #size))
    });
    // The layout's tables are statics (a `Cow` has a destructor, so no constant promotion).
    let mut layout_tables = TokenStream::new();
    let layout_layers: Vec<TokenStream> = program
        .layers
        .iter()
        .enumerate()
        .map(|(l, cell)| {
            let input = lit(cell.input_size);
            let params = cell_fields(l, 0).iter().zip(&cell.forward.graph.params).map(|(f, p)| {
                let dims = f.dims.iter().map(|&d| lit(d));
                let base = &p.name;
                quote!(::rnn::rt::param(#base, &[#(#dims),*]))
            });
            let table = format_ident!("PARAMS_L{}", l);
            let n = lit(per_cell);
            layout_tables.extend(quote! {
                static #table: [(::rnn::rt::Cow<'static, str>, ::rnn::rt::Cow<'static, [usize]>); #n] =
                    [#(#params),*];
            });
            quote!(::rnn::rt::layer(#input, &#table))
        })
        .collect();
    let nstates = lit(states.len());
    let param_entries = fields.iter().map(|f| {
        let n = &f.name;
        let dims = f.dims.iter().map(|&d| lit(d));
        let data = f.slice_mut(&quote!(model));
        let init = match f.init {
            Some(v) => {
                let v = Literal::f32_suffixed(v);
                quote!(::core::option::Option::Some(#v))
            }
            None => quote!(::core::option::Option::None),
        };
        quote!(::rnn::rt::Param { name: #n, dims: &[#(#dims),*], init: #init, data: #data })
    });
    let param_entries: Vec<TokenStream> = param_entries.collect();
    let save_entries = fields.iter().map(|f| {
        let n = &f.name;
        let dims = f.dims.iter().map(|&d| lit(d));
        let data = f.slice(&this);
        quote!((#n, &[#(#dims),*], #data))
    });
    let save_entries: Vec<TokenStream> = save_entries.collect();
    let exec_forward = (0..layers).map(|l| {
        let k = kernel_of(l);
        let (inf, train) = (
            format_ident!("forward_l{}", k),
            format_ident!("forward_train_l{}", k),
        );
        let pf = format_ident!("params_l{}", l);
        let l = lit(l);
        quote! {
            #l => if training {
                #train(#pf(m, dir), seq.steps, seq.batch, seq.lengths, x, initial)
            } else {
                #inf(#pf(m, dir), seq.steps, seq.batch, seq.lengths, x, initial)
            },
        }
    });
    let exec_backward = (0..layers).map(|l| {
        let k = kernel_of(l);
        let f = format_ident!("backward_l{}", k);
        let pf = format_ident!("params_l{}", l);
        let sizes = cell_fields(l, 0)
            .iter()
            .map(|f| lit(f.dims.iter().product::<usize>()));
        let input = lit(program.layers[l].input_size);
        let l = lit(l);
        quote! {
            #l => {
                let r = ::rnn::rt::backward_result(
                    #f(#pf(m, dir), seq.steps, seq.batch, seq.lengths, x, &tape, dy, final_grads),
                    &[#(#sizes),*],
                    seq.steps * seq.batch * #input,
                );
                ::rnn::rt::recycle(tape);
                r
            }
        }
    });
    let std_items = quote! {
        // Every field is an `f32` or an array of them: the struct is exactly its parameters.
        const _: () = ::core::assert!(::core::mem::size_of::<#name>() == #nparams_lit * 4);

        // SAFETY: every field is an `f32` or an array of them (the size is asserted above).
        #[::rnn::__std]
        unsafe impl ::rnn::rt::Zeroable for #name {}

        #[::rnn::__std]
        const _: () = {
                #layout_tables
                static STATES: [(::rnn::rt::Cow<'static, str>, usize); #nstates] =
                    [#(#layout_states),*];
                static LAYERS: [::rnn::rt::LayerLayout<'static>; #layers_lit] =
                    [#(#layout_layers),*];
                static LAYOUT: ::rnn::rt::Layout<'static> = ::rnn::rt::layout(
                    #input_size,
                    #batch_first,
                    #dirs_lit,
                    #out_size,
                    &STATES,
                    &LAYERS,
                );

                #param_fns
                #seq_kernels

                struct __RnnExecutor<'a>(&'a #name);

                impl ::rnn::rt::SequenceExecutor<f32> for __RnnExecutor<'_> {
                    type Tape = ::rnn::rt::Buffers;

                    fn forward(
                        &self,
                        layer: usize,
                        dir: usize,
                        seq: ::rnn::rt::Seq<'_>,
                        x: &[f32],
                        initial: ::rnn::rt::Vec<::rnn::rt::Vec<f32>>,
                        training: bool,
                    ) -> ::rnn::rt::Result<::rnn::rt::Forward<f32, ::rnn::rt::Buffers>> {
                        let m = self.0;
                        let r = match layer {
                            #(#exec_forward)*
                            _ => ::core::unreachable!(),
                        };
                        ::rnn::rt::forward_result(r, training)
                    }

                    fn backward(
                        &self,
                        layer: usize,
                        dir: usize,
                        seq: ::rnn::rt::Seq<'_>,
                        x: &[f32],
                        tape: ::rnn::rt::Buffers,
                        dy: &[f32],
                        final_grads: ::rnn::rt::Vec<::rnn::rt::Vec<f32>>,
                    ) -> ::rnn::rt::Result<::rnn::rt::Backward<f32>> {
                        let m = self.0;
                        ::core::result::Result::Ok(match layer {
                            #(#exec_backward)*
                            _ => ::core::unreachable!(),
                        })
                    }
                }

                #[automatically_derived]
                impl #name {
                    /// A model with every weight zero, on the heap.
                    pub fn zeroed() -> ::rnn::rt::Box<Self> {
                        ::rnn::rt::boxed_zeroed::<Self>()
                    }

                    /// PyTorch's initialisation (every weight uniform in `±1/√hidden`, declared
                    /// values kept) from `seed`: the same weights as `rnn::Weights::init` gives
                    /// the same declaration.
                    pub fn init(seed: u64) -> ::rnn::rt::Box<Self> {
                        let mut model = Self::zeroed();
                        ::rnn::rt::init(&mut [#(#param_entries),*], #hidden, seed);
                        model
                    }

                    /// The model with the weights of a PyTorch `state_dict` (every parameter
                    /// by its PyTorch name, with its shape, finite, and nothing else).
                    pub fn from_weights(weights: &::rnn::rt::Weights) -> ::rnn::rt::Result<::rnn::rt::Box<Self>> {
                        let mut model = Self::zeroed();
                        ::rnn::rt::load(weights, &mut [#(#param_entries),*])?;
                        ::core::result::Result::Ok(model)
                    }

                    /// [`Self::from_weights`] from safetensors bytes.
                    pub fn from_safetensors(bytes: &[u8]) -> ::rnn::rt::Result<::rnn::rt::Box<Self>> {
                        let mut model = Self::zeroed();
                        ::rnn::rt::from_safetensors(bytes, &mut [#(#param_entries),*])?;
                        ::core::result::Result::Ok(model)
                    }

                    /// The weights by PyTorch name.
                    pub fn to_weights(&self) -> ::rnn::rt::Weights {
                        ::rnn::rt::to_weights(&[#(#save_entries),*])
                    }

                    /// The weights as safetensors bytes, PyTorch's names.
                    pub fn to_safetensors(&self) -> ::rnn::rt::Result<::rnn::rt::Vec<u8>> {
                        ::rnn::rt::to_safetensors(&[#(#save_entries),*])
                    }

                    /// The forward pass over a batch of sequences: `request.input` is
                    /// `(time, batch, INPUT_SIZE)` (or batch-first as declared), with optional
                    /// per-sequence lengths (packed semantics) and initial states. Returns the
                    /// outputs and final states; every argument is checked first.
                    pub fn forward(&self, request: &::rnn::rt::Request<'_>) -> ::rnn::rt::Result<::rnn::rt::Response> {
                        ::rnn::rt::forward_response(&LAYOUT, &__RnnExecutor(self), request, false)
                            .map(|(response, _)| response)
                    }

                    /// [`Self::forward`], keeping what [`Self::backward`] needs.
                    pub fn forward_train(
                        &self,
                        request: &::rnn::rt::Request<'_>,
                    ) -> ::rnn::rt::Result<(::rnn::rt::Response, ::rnn::rt::Tape<'_>)> {
                        let (response, tape) = ::rnn::rt::forward_response(&LAYOUT, &__RnnExecutor(self), request, true)?;
                        let tape = tape.expect("a tape was asked for");
                        ::core::result::Result::Ok((response, ::rnn::rt::Tape::new(tape, self)))
                    }

                    /// Back-propagation through time from a [`Self::forward_train`]: the
                    /// gradients of `Σ output · grad_output + Σ h_n · grad_h_n` with respect to
                    /// every parameter (by PyTorch name), the input and the initial states.
                    pub fn backward(
                        &self,
                        tape: ::rnn::rt::Tape<'_>,
                        grad_output: &::rnn::rt::Tensor,
                        grad_final_states: &[::core::option::Option<&::rnn::rt::Tensor>],
                    ) -> ::rnn::rt::Result<::rnn::rt::Gradients> {
                        let tape = tape.take(self)?;
                        ::rnn::rt::backward(&LAYOUT, &__RnnExecutor(self), tape, grad_output, grad_final_states)
                    }

                    /// Forward, and backward when the request has `grad_output`: what the
                    /// interpreter's `Program::run` does, with this model's kernels.
                    pub fn run(&self, request: &::rnn::rt::Request<'_>) -> ::rnn::rt::Result<::rnn::rt::Response> {
                        ::rnn::rt::run_response(&LAYOUT, &__RnnExecutor(self), request)
                    }
                }

                #[automatically_derived]
                impl ::rnn::rt::Stack for #name {
                    fn forward(&self, request: &::rnn::rt::Request<'_>) -> ::rnn::rt::Result<::rnn::rt::Response> {
                        #name::forward(self, request)
                    }

                    fn forward_train(
                        &self,
                        request: &::rnn::rt::Request<'_>,
                    ) -> ::rnn::rt::Result<(::rnn::rt::Response, ::rnn::rt::Tape<'_>)> {
                        #name::forward_train(self, request)
                    }

                    fn backward(
                        &self,
                        tape: ::rnn::rt::Tape<'_>,
                        grad_output: &::rnn::rt::Tensor,
                        grad_final_states: &[::core::option::Option<&::rnn::rt::Tensor>],
                    ) -> ::rnn::rt::Result<::rnn::rt::Gradients> {
                        #name::backward(self, tape, grad_output, grad_final_states)
                    }
                }
            };
    };

    quote! {
        #(#attrs)*
        #[doc = #doc]
        #[allow(non_snake_case)]
        #vis struct #name {
            #(#field_decls)*
        }

        #[automatically_derived]
        impl #name {
            /// The number of parameters (PyTorch's count).
            pub const PARAMETERS: usize = #nparams_lit;
            /// Features of the input.
            pub const INPUT_SIZE: usize = #input_size;
            /// Features of the hidden state.
            pub const HIDDEN_SIZE: usize = #hidden;
            /// Features of the output at each step (both directions').
            pub const OUTPUT_SIZE: usize = #width;
            /// Stacked layers.
            pub const LAYERS: usize = #layers_lit;
            /// Directions per layer.
            pub const DIRECTIONS: usize = #dirs_lit;
            /// Whether inputs and outputs are `(batch, time, features)`.
            pub const BATCH_FIRST: bool = #batch_first;
            /// Every weight zero (for a `static`; on the heap, `zeroed()` builds it in place).
            pub const ZERO: Self = Self { #(#zero_fields)* };

            /// Every parameter as `(PyTorch name, elements)`, in `state_dict` order.
            pub fn parameters(&self) -> [(&'static str, &[f32]); #nfields] {
                [#((#names, #slices)),*]
            }

            /// Every parameter as `(PyTorch name, elements)`, mutable (an optimiser's step).
            pub fn parameters_mut(&mut self) -> [(&'static str, &mut [f32]); #nfields] {
                [#((#names, #slices_mut)),*]
            }
        }

        #step_items
        #std_items
    }
}

/// The streaming step of layer `l`'s cell: its inference plan, one row, arrays only.
fn step_kernel(cell: &CellProgram, l: usize, nparams: usize) -> TokenStream {
    let body = Body {
        s: &cell.forward,
        plan: cell.forward_plan(false),
        forward: None,
        reverse: false,
        mode: Mode::Step,
    }
    .emit();
    let g = &cell.forward.graph;
    let carried: Vec<Ident> = (0..g.states.len())
        .map(|k| format_ident!("cur{}", k))
        .collect();
    let sizes = g.states.iter().map(|(_, n)| lit(*n));
    let out = lit(g
        .shape(g.output(OutRole::Output).expect("a cell has an output"))
        .row_len());
    let unpack = param_unpack(nparams);
    let np = lit(nparams);
    let args = quote! {
        p: [&[f32]; #np], x: &[f32], #(#carried: &mut [f32; #sizes],)* y: &mut [f32; #out]
    };
    let names = quote!(p, x, #(#carried,)* y);
    dispatched(
        &format_ident!("step_l{}", l),
        args,
        names,
        quote!(()),
        quote! {
            #unpack
            #body
        },
    )
}

/// Layer `l`'s sequence kernels: the forward pass for inference and for training, and the
/// backward pass.
fn sequence_kernels(cell: &CellProgram, l: usize, nparams: usize) -> TokenStream {
    let unpack = param_unpack(nparams);
    let g = &cell.forward.graph;
    let carried: Vec<Ident> = (0..g.states.len())
        .map(|k| format_ident!("cur{}", k))
        .collect();
    let take = quote! {
        let mut initial = initial.into_iter();
        #(let mut #carried = initial.next().unwrap_or_default();)*
    };
    let mut out = TokenStream::new();
    for (name, training) in [("forward_l", false), ("forward_train_l", true)] {
        let body = Body {
            s: &cell.forward,
            plan: cell.forward_plan(training),
            forward: None,
            reverse: false,
            mode: Mode::Sequence,
        }
        .emit();
        let np = lit(nparams);
        let args = quote! {
            p: [&[f32]; #np], steps: usize, batch: usize, lengths: &[usize], x: &[f32],
            initial: ::rnn::rt::Vec<::rnn::rt::Vec<f32>>
        };
        out.extend(dispatched(
            &format_ident!("{}{}", name, l),
            args,
            quote!(p, steps, batch, lengths, x, initial),
            quote!(::rnn::rt::KernelResult),
            quote! {
                #unpack
                #take
                #body
            },
        ));
    }
    let body = Body {
        s: &cell.backward,
        plan: &cell.backward_plan,
        forward: Some((&cell.forward, &cell.training)),
        reverse: true,
        mode: Mode::Sequence,
    }
    .emit();
    let bg = &cell.backward.graph;
    let bcarried: Vec<Ident> = (0..bg.states.len())
        .map(|k| format_ident!("cur{}", k))
        .collect();
    let np = lit(nparams);
    let args = quote! {
        p: [&[f32]; #np], steps: usize, batch: usize, lengths: &[usize], x: &[f32],
        tape: &[::rnn::rt::Vec<f32>], dy: &[f32], initial: ::rnn::rt::Vec<::rnn::rt::Vec<f32>>
    };
    out.extend(dispatched(
        &format_ident!("backward_l{}", l),
        args,
        quote!(p, steps, batch, lengths, x, tape, dy, initial),
        quote!(::rnn::rt::KernelResult),
        quote! {
            #unpack
            let mut initial = initial.into_iter();
            #(let mut #bcarried = initial.next().unwrap_or_default();)*
            #body
        },
    ));
    out
}

/// `let p0 = p[0]; ...`.
fn param_unpack(n: usize) -> TokenStream {
    let names = (0..n).map(|i| format_ident!("p{}", i));
    quote!(let [#(#names),*] = p;)
}

/// A kernel `name(args) -> ret` whose body is compiled three times, for AVX-512, for AVX2 +
/// FMA and portably, and which takes the path `::rnn::rt::isa()` chooses.
fn dispatched(
    name: &Ident,
    args: TokenStream,
    arg_names: TokenStream,
    ret: TokenStream,
    body: TokenStream,
) -> TokenStream {
    let inner = format_ident!("{}_body", name);
    let avx2 = format_ident!("{}_avx2", name);
    let avx512 = format_ident!("{}_avx512", name);
    quote! {
        #[inline(always)]
        #[allow(unused_mut, unused_variables, clippy::all)]
        fn #inner(isa: ::rnn::rt::Isa, #args) -> #ret {
            #body
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::all)]
        fn #avx2(#args) -> #ret {
            #inner(::rnn::rt::Isa::Avx2, #arg_names)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        #[allow(clippy::all)]
        fn #avx512(#args) -> #ret {
            #inner(::rnn::rt::Isa::Avx512, #arg_names)
        }

        #[allow(clippy::all)]
        fn #name(#args) -> #ret {
            #[cfg(target_arch = "x86_64")]
            {
                let isa = ::rnn::rt::isa();
                if isa == ::rnn::rt::Isa::Avx512 {
                    // SAFETY: `isa()` reports a path only when the CPU has its features.
                    return unsafe { #avx512(#arg_names) };
                }
                if isa == ::rnn::rt::Isa::Avx2 {
                    // SAFETY: as above.
                    return unsafe { #avx2(#arg_names) };
                }
            }
            #inner(::rnn::rt::Isa::Portable, #arg_names)
        }
    }
}

/// `name` as a Rust identifier: a raw one (`r#type`) for a keyword.
fn rust_ident(name: &str) -> Ident {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "box", "break", "const", "continue", "do", "dyn", "else", "enum",
        "extern", "false", "final", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "macro",
        "match", "mod", "move", "mut", "override", "priv", "pub", "ref", "return", "static",
        "struct", "trait", "true", "try", "type", "typeof", "unsafe", "unsized", "use", "virtual",
        "where", "while", "yield", "abstract", "become",
    ];
    if KEYWORDS.contains(&name) {
        Ident::new_raw(name, Span::call_site())
    } else {
        Ident::new(name, Span::call_site())
    }
}

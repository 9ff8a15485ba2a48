//! The encoder-decoder: an encoder [`Model`] (an embedding and a recurrent stack) reads the
//! source; its final states start a decoder [`Model`] (an embedding, a stack and a vocabulary
//! head), which then writes the target one token at a time.
//!
//! Parameter names are those of a PyTorch module holding `encoder` and `decoder`, each holding
//! `embedding`, `rnn` and (the decoder) `fc`: `encoder.embedding.weight`,
//! `encoder.rnn.weight_ih_l0`, …, `decoder.fc.bias`.
//!
//! **The bridge.** The decoder starts from the encoder's final states, layer by layer: the
//! encoder and decoder have the same cell states (`h`, and `c` for an LSTM) and the same number
//! of layers. A unidirectional encoder's states are taken as they are, so the decoder's sizes
//! equal the encoder's. A bidirectional encoder has two final states per layer; the decoder's
//! layer `l` starts from the two joined along the features, forward direction first
//! (`[h_fwd; h_bwd]`), so the decoder's sizes are twice the encoder's. The decoder itself is
//! unidirectional: it runs forward in time, one token after another.
//!
//! **Greedy decoding** starts every row from the start token, and at each step feeds back the
//! arg-max of the head's logits (the first of equals, as `torch.argmax`). With an end token, a
//! row that has produced it produces it again at every later step, and decoding stops early
//! once every row has; the tokens are always `(batch, steps)`.

use crate::driver::Response;
use crate::error::{Error, Result};
use crate::interp::{Exec, argmax};
use crate::model::{BoundModel, Ids, Input, Interpreted, Model, Recurrent, Run};
use crate::program::Program;
use crate::spec::{CellKind, ModelSpec};
use crate::tensor::Tensor;
use crate::weights::{Weights, infer_spec};
use std::collections::BTreeMap;

/// A compiled encoder-decoder.
#[derive(Clone, Debug)]
pub struct Seq2Seq {
    /// The encoder: an embedding and a stack, no head.
    pub encoder: Model,
    /// The decoder: an embedding, a unidirectional stack and a head over the target vocabulary.
    pub decoder: Model,
}

/// How to decode ([`BoundSeq2Seq::greedy`]).
#[derive(Clone, Copy, Debug)]
pub struct Decode {
    /// Tokens to produce per row (at least 1).
    pub steps: usize,
    /// The start token fed at the first step.
    pub sos: i64,
    /// The end token, if any.
    pub eos: Option<i64>,
}

impl Seq2Seq {
    /// Compiles an encoder and a decoder declared apart, checking that they fit together (see
    /// the module doc's bridge).
    pub fn new(encoder: &ModelSpec, decoder: &ModelSpec) -> Result<Seq2Seq> {
        let bad = |m: String| Err(Error::Spec(m));
        if encoder.vocab.is_none() {
            return bad(
                "the encoder needs an embedding (`vocab`): it reads source token ids".into(),
            );
        }
        if encoder.head.is_some() {
            return bad("the encoder has no head: its final states are what it passes on".into());
        }
        if decoder.vocab.is_none() || decoder.head.is_none() {
            return bad(
                "the decoder needs an embedding (`vocab`) and a head (`head`): it reads and writes target token ids".into(),
            );
        }
        if decoder.bidirectional {
            return bad(
                "the decoder cannot be bidirectional: it writes one token after another".into(),
            );
        }
        if encoder.batch_first != decoder.batch_first {
            return bad("the encoder and the decoder must agree on `batch_first`".into());
        }
        if encoder.num_layers != decoder.num_layers {
            return bad(format!(
                "the decoder starts from the encoder's final states layer by layer: the encoder has {} layer(s), the decoder {}",
                encoder.num_layers, decoder.num_layers
            ));
        }
        let encoder = Model::compile(encoder)?;
        let decoder = Model::compile(decoder)?;
        let (es, ds) = (encoder.stack.states(), decoder.stack.states());
        let dirs = encoder.spec.directions();
        let fits = es.len() == ds.len()
            && es
                .iter()
                .zip(ds)
                .all(|((a, n), (b, m))| a == b && n * dirs == *m);
        if !fits {
            let show = |s: &[(String, usize)], k: usize| {
                s.iter()
                    .map(|(n, size)| format!("`{n}` of {}", size * k))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return bad(format!(
                "the decoder starts from the encoder's final states{}: it needs states {}, but has {}",
                if dirs == 2 {
                    " (both directions joined)"
                } else {
                    ""
                },
                show(es, dirs),
                show(ds, 1)
            ));
        }
        Ok(Seq2Seq { encoder, decoder })
    }

    /// The model a PyTorch state dict with the shared fixture's names describes:
    /// `encoder.embedding.weight`, `encoder.rnn.*`, `decoder.embedding.weight`,
    /// `decoder.rnn.*`, `decoder.fc.weight` and `decoder.fc.bias`; sizes, layers and
    /// directions from the shapes and names, `cell` settling what shapes cannot (as
    /// [`infer_spec`]). Batch-first, as the fixture's model.
    pub fn from_state_dict(weights: &Weights, cell: Option<CellKind>) -> Result<Seq2Seq> {
        let matrix = |name: &str| -> Result<(usize, usize)> {
            match weights.tensors.get(name).map(|t| &t.shape[..]) {
                Some(&[r, c]) => Ok((r, c)),
                Some(s) => Err(Error::WeightsMismatch(format!(
                    "`{name}` must be a matrix, found shape {s:?}"
                ))),
                None => Err(Error::MissingTensor {
                    name: name.into(),
                    expected: vec![],
                }),
            }
        };
        let part = |prefix: &str| -> Result<ModelSpec> {
            let (vocab, _) = matrix(&format!("{prefix}.embedding.weight"))?;
            let rnn = weights.clone().strip_prefix(&format!("{prefix}.rnn."))?;
            let mut spec = infer_spec(&rnn.tensors, cell.clone())?;
            spec.vocab = Some(vocab);
            spec.batch_first = true;
            Ok(spec)
        };
        let encoder = part("encoder")?;
        let mut decoder = part("decoder")?;
        let (classes, _) = matrix("decoder.fc.weight")?;
        decoder.head = Some(classes);
        let s = Seq2Seq::new(&encoder, &decoder)?;
        s.check(weights)?;
        Ok(s)
    }

    /// Every parameter with its full name and shape.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let named = |prefix: &str, m: &Model| {
            m.parameters()
                .into_iter()
                .map(move |(n, d)| (format!("{prefix}{n}"), d))
                .collect::<Vec<_>>()
        };
        let mut out = named("encoder.", &self.encoder);
        out.extend(named("decoder.", &self.decoder));
        out
    }

    /// Checks `weights` against [`Seq2Seq::parameters`]: each present, its shape, finite,
    /// nothing else.
    pub fn check(&self, weights: &Weights) -> Result<()> {
        let params = self.parameters();
        weights.check_params(params.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
    }

    /// Initial weights from `seed` ([`Model::init`] for each part, from different streams).
    pub fn init(&self, seed: u64) -> Result<Weights> {
        let mut tensors = BTreeMap::new();
        for (prefix, m, s) in [
            ("encoder.", &self.encoder, seed),
            (
                "decoder.",
                &self.decoder,
                seed.wrapping_add(0x9e37_79b9_7f4a_7c15),
            ),
        ] {
            for (n, t) in m.init(s)?.tensors {
                tensors.insert(format!("{prefix}{n}"), t);
            }
        }
        Ok(Weights { tensors })
    }

    /// Binds `weights`, each part's stack through `bind_stack` (any backend's).
    pub fn bind<'m, R: Recurrent>(
        &'m self,
        weights: &Weights,
        mut bind_stack: impl FnMut(&'m Program, &Weights) -> Result<R>,
    ) -> Result<BoundSeq2Seq<'m, R>> {
        self.check(weights)?;
        let part = |prefix: &str| Weights {
            tensors: weights
                .tensors
                .iter()
                .filter_map(|(n, t)| Some((n.strip_prefix(prefix)?.to_string(), t.clone())))
                .collect(),
        };
        let encoder = self.encoder.bind(&part("encoder."), &mut bind_stack)?;
        let decoder = self.decoder.bind(&part("decoder."), &mut bind_stack)?;
        Ok(BoundSeq2Seq { encoder, decoder })
    }

    /// [`Seq2Seq::bind`] with the interpreter running both stacks.
    pub fn bind_interp(
        &self,
        weights: &Weights,
        exec: Exec,
    ) -> Result<BoundSeq2Seq<'_, Interpreted<'_>>> {
        self.bind(weights, |program, w| {
            Ok(Interpreted {
                bound: program.bind::<f32>(w)?,
                exec,
            })
        })
    }
}

/// An encoder-decoder bound to its weights, the stacks on backend `R`.
pub struct BoundSeq2Seq<'m, R> {
    /// The encoder.
    pub encoder: BoundModel<'m, R>,
    /// The decoder.
    pub decoder: BoundModel<'m, R>,
}

impl<R: Recurrent> BoundSeq2Seq<'_, R> {
    /// Encodes `src` (`(B, S)` ids, or `(S, B)` when not batch-first; `lengths` per row, as
    /// packed sequences) and returns the decoder's initial states through the bridge.
    pub fn encode(&self, src: &Ids, lengths: Option<&[i64]>) -> Result<Vec<Tensor>> {
        let run = Run {
            lengths,
            ..Run::new(Input::Ids(src))
        };
        let Response { final_states, .. } = self.encoder.forward(&run)?;
        let spec = &self.encoder.model().spec;
        if !spec.bidirectional {
            return Ok(final_states);
        }
        // (layers·2, B, n) -> (layers, B, 2n): each layer's two directions side by side.
        Ok(final_states
            .into_iter()
            .map(|s| {
                let [ld, b, n] = [s.shape[0], s.shape[1], s.shape[2]];
                let mut data = Vec::with_capacity(s.data.len());
                for l in 0..ld / 2 {
                    for r in 0..b {
                        for d in 0..2 {
                            let at = ((2 * l + d) * b + r) * n;
                            data.extend_from_slice(&s.data[at..at + n]);
                        }
                    }
                }
                Tensor {
                    shape: vec![ld / 2, b, 2 * n],
                    data,
                }
            })
            .collect())
    }

    /// Greedy decoding of `src` (see the module doc): the tokens, `(B, decode.steps)`.
    pub fn greedy(&self, src: &Ids, lengths: Option<&[i64]>, decode: &Decode) -> Result<Ids> {
        let batch_first = self.encoder.model().spec.batch_first;
        let batch = src
            .shape
            .get(usize::from(!batch_first))
            .copied()
            .unwrap_or(0);
        self.check_decode(decode)?;
        let mut states = self.encode(src, lengths)?;
        let mut tokens = vec![decode.sos; batch];
        let mut out = vec![0i64; batch * decode.steps];
        let mut done = vec![false; batch];
        let classes = self.decoder.model().features();
        for step in 0..decode.steps {
            let shape = if batch_first {
                vec![batch, 1]
            } else {
                vec![1, batch]
            };
            let ids = Ids::new(shape, tokens.clone())?;
            let run = Run {
                initial_states: states.iter().map(Some).collect(),
                ..Run::new(Input::Ids(&ids))
            };
            let response = self.decoder.forward(&run)?;
            for (r, token) in tokens.iter_mut().enumerate() {
                let logits = &response.output.data[r * classes..(r + 1) * classes];
                *token = match decode.eos {
                    Some(eos) if done[r] => eos,
                    _ => argmax(logits) as i64,
                };
                done[r] |= Some(*token) == decode.eos;
                out[r * decode.steps + step] = *token;
            }
            states = response.final_states;
            if decode.eos.is_some() && done.iter().all(|&d| d) {
                if let Some(eos) = decode.eos {
                    for r in 0..batch {
                        for t in step + 1..decode.steps {
                            out[r * decode.steps + t] = eos;
                        }
                    }
                }
                break;
            }
        }
        Ids::new(vec![batch, decode.steps], out)
    }

    fn check_decode(&self, decode: &Decode) -> Result<()> {
        if decode.steps == 0 {
            return Err(Error::Argument(
                "decoding needs at least one step (`steps` is 0)".into(),
            ));
        }
        let vocab = self.decoder.model().spec.vocab.unwrap_or(0);
        let classes = self.decoder.model().features();
        if !(0..vocab as i64).contains(&decode.sos) {
            return Err(Error::Token {
                name: "sos".into(),
                index: 0,
                found: decode.sos,
                vocab,
            });
        }
        if let Some(eos) = decode.eos
            && !(0..classes as i64).contains(&eos)
        {
            return Err(Error::Token {
                name: "eos".into(),
                index: 0,
                found: eos,
                vocab: classes,
            });
        }
        Ok(())
    }
}

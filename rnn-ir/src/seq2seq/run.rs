//! Running a [`Seq2Seq`]: loading, binding, encoding, decoding and the training loss (the
//! runtime half of [`super`]).

use super::*;
use crate::driver::Response;
use crate::error::{Error, Result};
use crate::interp::{Exec, argmax_f32};
use crate::model::{
    BoundModel, Ids, Input, Interpreted, Loss, MemoryRef, ModelGrads, Recurrent, Run,
};
use crate::program::Program;
use crate::spec::{Attention, CellKind, ModelSpec, Placement, Score};
use crate::tensor::Tensor;
use crate::weights::{Weights, infer_spec};
use std::collections::BTreeMap;

impl Seq2Seq {
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
        let has = |n: &str| {
            weights
                .tensors
                .contains_key(&format!("decoder.attention.{n}"))
        };
        // The attention after the stack has `combine.weight`; one in the step has none, and
        // its stack reads more features than its embedding gives (the context).
        let (_, embedded) = matrix("decoder.embedding.weight")?;
        let in_step = decoder.input_size > embedded;
        if has("combine.weight") || in_step {
            let score = if has("score.weight") {
                Score::General
            } else if has("key.weight") {
                Score::Additive(matrix("decoder.attention.key.weight")?.0)
            } else {
                Score::Dot
            };
            // The memory's size is the encoder's; `Seq2Seq::new` sets it.
            decoder.attention = Some(Attention {
                score,
                memory: 1,
                placement: if in_step {
                    Placement::Input
                } else {
                    Placement::Output
                },
            });
            if in_step {
                decoder.input_size = embedded;
            }
        }
        let s = Seq2Seq::new(&encoder, &decoder)?;
        s.check(weights)?;
        Ok(s)
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

    /// Binds two stacks bound already (an emitted model's, which hold their own weights) with
    /// the layers around them: `layers` holds the parameters of the parts' layers by full name
    /// (`encoder.embedding.weight`, `decoder.attention.*`, `decoder.fc.*`: each part's
    /// [`Model::layer_parameters`] under its prefix), as [`Model::bind_layers`] takes them.
    /// Nothing of the stacks is copied or checked again.
    pub fn bind_stacks<'m, R: Recurrent>(
        &'m self,
        layers: &[(&str, &[f32])],
        encoder: R,
        decoder: R,
    ) -> Result<BoundSeq2Seq<'m, R>> {
        let mut params = Vec::new();
        for (prefix, m) in [("encoder.", &self.encoder), ("decoder.", &self.decoder)] {
            for (n, d) in m.layer_parameters() {
                params.push((format!("{prefix}{n}"), d));
            }
        }
        crate::model::check_slices(layers, &params, "")?;
        let part = |prefix: &'static str| {
            move |name: &str| crate::model::slice_of(layers, &format!("{prefix}{name}"))
        };
        Ok(BoundSeq2Seq {
            encoder: self.encoder.bound_with(encoder, part("encoder.")),
            decoder: self.decoder.bound_with(decoder, part("decoder.")),
        })
    }

    /// [`Seq2Seq::bind`] with the interpreter running both stacks.
    pub fn bind_interp(
        &self,
        weights: &Weights,
        exec: Exec,
    ) -> Result<BoundSeq2Seq<'_, Interpreted<'_>>> {
        self.bind(weights, |program, w| {
            Interpreted::bind_with(program, w, exec)
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
        Ok(self.encode_all(src, lengths)?.0)
    }

    /// [`BoundSeq2Seq::encode`], also returning the encoder's outputs when the decoder attends
    /// over them.
    pub fn encode_all(
        &self,
        src: &Ids,
        lengths: Option<&[i64]>,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let run = Run {
            lengths,
            ..Run::new(Input::Ids(src))
        };
        let Response {
            final_states,
            output,
            ..
        } = self.encoder.forward(&run)?;
        let memory = self.decoder.model().attention.is_some().then_some(output);
        Ok((self.bridge(final_states), memory))
    }

    /// The encoder's final states as the decoder's initial states (the module doc's bridge).
    fn bridge(&self, states: Vec<Tensor>) -> Vec<Tensor> {
        if !self.encoder.model().spec.bidirectional {
            return states;
        }
        // (layers·2, B, n) -> (layers, B, 2n): each layer's two directions side by side.
        states
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
            .collect()
    }

    /// The bridge backwards: gradients of the decoder's initial states as gradients of the
    /// encoder's final states.
    fn unbridge(&self, grads: Vec<Tensor>) -> Vec<Tensor> {
        if !self.encoder.model().spec.bidirectional {
            return grads;
        }
        grads
            .into_iter()
            .map(|g| {
                let [l, b, n2] = [g.shape[0], g.shape[1], g.shape[2]];
                let n = n2 / 2;
                let mut data = vec![0.0; g.data.len()];
                for layer in 0..l {
                    for r in 0..b {
                        for d in 0..2 {
                            let from = (layer * b + r) * n2 + d * n;
                            let to = ((2 * layer + d) * b + r) * n;
                            data[to..to + n].copy_from_slice(&g.data[from..from + n]);
                        }
                    }
                }
                Tensor {
                    shape: vec![2 * l, b, n],
                    data,
                }
            })
            .collect()
    }

    /// The teacher-forced training loss: the decoder reads `tgt_in` (the target shifted right,
    /// starting with the start token) from the encoded `src`, and its logits are scored against
    /// `tgt_out` by the mean cross-entropy with `ignore` (see [`BoundModel::loss`]); the
    /// gradients of every parameter of both parts, named `encoder.…` and `decoder.…`, flow back
    /// through the bridge into the encoder.
    pub fn loss(
        &self,
        src: &Ids,
        src_lengths: Option<&[i64]>,
        tgt_in: &Ids,
        tgt_out: &Ids,
        ignore: i64,
    ) -> Result<Loss> {
        let run = Run {
            lengths: src_lengths,
            ..Run::new(Input::Ids(src))
        };
        let (encoded, tape) = self.encoder.forward_train(&run)?;
        let init = self.bridge(encoded.final_states);
        let attends = self.decoder.model().attention.is_some();
        let dec_run = Run {
            initial_states: init.iter().map(Some).collect(),
            memory: attends.then_some(MemoryRef {
                values: &encoded.output,
                lengths: src_lengths,
                prepared: None,
            }),
            ..Run::new(Input::Ids(tgt_in))
        };
        let dec = self.decoder.loss(&dec_run, tgt_out, ignore)?;
        let d_final = self.unbridge(dec.grads.initial_states);
        let d_final: Vec<Option<&Tensor>> = d_final.iter().map(Some).collect();
        // The encoder's outputs reach the loss through the attention only.
        let d_memory = dec
            .grads
            .memory
            .unwrap_or_else(|| Tensor::zeros(encoded.output.shape.clone()));
        let enc = self.encoder.backward(tape, &d_memory, &d_final)?;
        let mut params = BTreeMap::new();
        for (n, g) in enc.params {
            params.insert(format!("encoder.{n}"), g);
        }
        for (n, g) in dec.grads.params {
            params.insert(format!("decoder.{n}"), g);
        }
        Ok(Loss {
            loss: dec.loss,
            counted: dec.counted,
            final_states: dec.final_states,
            grads: ModelGrads {
                params,
                input: None,
                initial_states: Vec::new(),
                memory: None,
            },
        })
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
        let cells = room(&[batch, decode.steps], "the tokens of greedy decoding")?;
        let (mut states, memory) = self.encode_all(src, lengths)?;
        // The memory's per-sequence values (its projection), computed once for every step.
        let prepared = memory
            .as_ref()
            .map(|values| {
                self.decoder.prepare(MemoryRef {
                    values,
                    lengths,
                    prepared: None,
                })
            })
            .transpose()?;
        let mut tokens = vec![decode.sos; batch];
        let mut out = Vec::new();
        out.try_reserve_exact(cells)
            .map_err(|_| Error::Argument(format!("cannot allocate {cells} tokens")))?;
        out.resize(cells, 0i64);
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
                memory: memory.as_ref().map(|values| MemoryRef {
                    values,
                    lengths,
                    prepared: prepared.as_ref(),
                }),
                ..Run::new(Input::Ids(&ids))
            };
            let response = self.decoder.forward(&run)?;
            for (r, token) in tokens.iter_mut().enumerate() {
                let logits = &response.output.data[r * classes..(r + 1) * classes];
                *token = match decode.eos {
                    Some(eos) if done[r] => eos,
                    _ => argmax_f32(logits) as i64,
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

    /// Beam search of `src` (see the module doc): each row's best hypothesis, `(B,
    /// decode.steps)`, and its normalised score.
    pub fn beam(
        &self,
        src: &Ids,
        lengths: Option<&[i64]>,
        decode: &Decode,
        beam: &Beam,
    ) -> Result<(Ids, Vec<f64>)> {
        self.check_decode(decode)?;
        if beam.width == 0 || beam.width > ModelSpec::MAX_SIZE {
            return Err(Error::Argument(format!(
                "the beam width must be in 1 ..= {} (1 is greedy decoding), found {}",
                ModelSpec::MAX_SIZE,
                beam.width
            )));
        }
        if !(beam.alpha >= 0.0 && beam.alpha.is_finite()) {
            return Err(Error::Argument(format!(
                "the length normalisation's exponent must be finite and at least 0, found {}",
                beam.alpha
            )));
        }
        let batch_first = self.encoder.model().spec.batch_first;
        let (w, steps) = (beam.width, decode.steps);
        let batch = src
            .shape
            .get(usize::from(!batch_first))
            .copied()
            .unwrap_or(0);
        // Every hypothesis holds up to `steps` tokens, and each row's memory is repeated for
        // each of its hypotheses: refuse sizes that cannot be held before any work.
        let rows = room(&[batch, w], "the hypotheses of beam search")?;
        room(&[rows, steps], "the tokens of beam search")?;
        let (states, memory) = self.encode_all(src, lengths)?;
        if let Some(m) = &memory {
            room(
                &[m.data.len(), w],
                "the memory repeated for every hypothesis",
            )?;
        }
        // The memory and source lengths of each row, repeated for each of its hypotheses (a
        // hypothesis never moves to another row, so they are never reordered).
        let memory = memory.map(|m| {
            let [d0, d1, n] = [m.shape[0], m.shape[1], m.shape[2]];
            let mut data = Vec::with_capacity(m.data.len() * w);
            if batch_first {
                for b in 0..d0 {
                    for _ in 0..w {
                        data.extend_from_slice(&m.data[b * d1 * n..(b + 1) * d1 * n]);
                    }
                }
                Tensor {
                    shape: vec![d0 * w, d1, n],
                    data,
                }
            } else {
                for p in 0..d0 {
                    for b in 0..d1 {
                        let at = (p * d1 + b) * n;
                        for _ in 0..w {
                            data.extend_from_slice(&m.data[at..at + n]);
                        }
                    }
                }
                Tensor {
                    shape: vec![d0, d1 * w, n],
                    data,
                }
            }
        });
        let beam_lengths: Option<Vec<i64>> =
            lengths.map(|l| l.iter().flat_map(|&n| std::iter::repeat_n(n, w)).collect());
        let prepared = memory
            .as_ref()
            .map(|values| {
                self.decoder.prepare(MemoryRef {
                    values,
                    lengths: beam_lengths.as_deref(),
                    prepared: None,
                })
            })
            .transpose()?;
        // Every row's encoder state, repeated for each of its hypotheses.
        let mut states: Vec<Tensor> = states
            .iter()
            .map(|s| gather_rows(s, &(0..rows).map(|i| i / w).collect::<Vec<_>>()))
            .collect();
        let mut hyps: Vec<Hyp> = (0..rows)
            .map(|i| Hyp {
                tokens: Vec::new(),
                score: if i % w == 0 { 0.0 } else { f64::NEG_INFINITY },
                len: 0,
                finished: false,
            })
            .collect();
        let norm = |h: &Hyp| h.score / (h.len.max(1) as f64).powf(beam.alpha);
        let classes = self.decoder.model().features();
        for _ in 0..steps {
            let last: Vec<i64> = hyps
                .iter()
                .map(|h| h.tokens.last().copied().unwrap_or(decode.sos))
                .collect();
            let shape = if batch_first {
                vec![rows, 1]
            } else {
                vec![1, rows]
            };
            let ids = Ids::new(shape, last)?;
            let run = Run {
                initial_states: states.iter().map(Some).collect(),
                memory: memory.as_ref().map(|values| MemoryRef {
                    values,
                    lengths: beam_lengths.as_deref(),
                    prepared: prepared.as_ref(),
                }),
                ..Run::new(Input::Ids(&ids))
            };
            let response = self.decoder.forward(&run)?;
            let mut next: Vec<Hyp> = Vec::with_capacity(rows);
            let mut parents: Vec<usize> = Vec::with_capacity(rows);
            for b in 0..batch {
                // Candidates (beam, token, hypothesis): a finished beam continues with its end
                // token only, unchanged; an open one with every token.
                let mut cands: Vec<(f64, usize, i64, Hyp)> = Vec::new();
                for k in 0..w {
                    let i = b * w + k;
                    let h = &hyps[i];
                    if h.score == f64::NEG_INFINITY {
                        continue;
                    }
                    if h.finished {
                        let mut c = h.clone();
                        c.tokens.push(decode.eos.unwrap_or(0));
                        cands.push((norm(h), k, -1, c));
                        continue;
                    }
                    let logits = &response.output.data[i * classes..(i + 1) * classes];
                    let logp = log_softmax(logits);
                    // Only the best `w` tokens of a beam can be among its row's best `w`.
                    let mut order: Vec<usize> = (0..classes).collect();
                    let take = w.min(classes);
                    order.select_nth_unstable_by(take - 1, |&a, &b| {
                        logp[b].total_cmp(&logp[a]).then(a.cmp(&b))
                    });
                    for &t in &order[..take] {
                        let mut c = Hyp {
                            tokens: h.tokens.clone(),
                            score: h.score + logp[t],
                            len: h.len + 1,
                            finished: Some(t as i64) == decode.eos,
                        };
                        c.tokens.push(t as i64);
                        cands.push((norm(&c), k, t as i64, c));
                    }
                }
                cands.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
                for k in 0..w {
                    match cands.get(k) {
                        Some((_, parent, _, h)) => {
                            parents.push(b * w + parent);
                            next.push(h.clone());
                        }
                        None => {
                            // Fewer candidates than beams (a tiny vocabulary): an empty slot.
                            parents.push(b * w);
                            next.push(Hyp {
                                tokens: vec![decode.eos.unwrap_or(0); hyps[b * w].tokens.len() + 1],
                                score: f64::NEG_INFINITY,
                                len: 1,
                                finished: true,
                            });
                        }
                    }
                }
            }
            states = response
                .final_states
                .iter()
                .map(|s| gather_rows(s, &parents))
                .collect();
            hyps = next;
            if hyps.iter().all(|h| h.finished) {
                break;
            }
        }
        let mut tokens = Vec::with_capacity(batch * steps);
        let mut scores = Vec::with_capacity(batch);
        for b in 0..batch {
            let best = (0..w)
                .map(|k| &hyps[b * w + k])
                .fold(None::<&Hyp>, |best, h| match best {
                    Some(x) if norm(x) >= norm(h) => Some(x),
                    _ => Some(h),
                })
                .expect("a beam has at least one hypothesis");
            let mut row = best.tokens.clone();
            row.resize(steps, decode.eos.unwrap_or(0));
            tokens.extend(row);
            scores.push(norm(best));
        }
        Ok((Ids::new(vec![batch, steps], tokens)?, scores))
    }

    fn check_decode(&self, decode: &Decode) -> Result<()> {
        if decode.steps == 0 {
            return Err(Error::Argument(
                "decoding needs at least one step (`steps` is 0)".into(),
            ));
        }
        if decode.steps > ModelSpec::MAX_SIZE {
            return Err(Error::Argument(format!(
                "`steps` is {}, more than the largest size supported ({})",
                decode.steps,
                ModelSpec::MAX_SIZE
            )));
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

/// The product of `dims`, when a buffer of that many 8-byte elements can exist; else a typed
/// error naming `what`.
fn room(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize / 8)
        .ok_or_else(|| {
            Error::Argument(format!(
                "{what} would need {} elements: more than memory can hold",
                dims.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" × ")
            ))
        })
}

/// One hypothesis of a beam.
#[derive(Clone, Debug)]
struct Hyp {
    tokens: Vec<i64>,
    score: f64,
    /// Tokens produced up to and including the end token (frozen once finished).
    len: usize,
    finished: bool,
}

/// `log_softmax` of a row of logits, in `f64`.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits
        .iter()
        .map(|&x| f64::from(x))
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logits
        .iter()
        .map(|&x| (f64::from(x) - m).exp())
        .sum::<f64>()
        .ln();
    logits.iter().map(|&x| f64::from(x) - lse).collect()
}

/// The rows `rows` of a `(L, B, n)` state, as a `(L, rows.len(), n)` state.
fn gather_rows(s: &Tensor, rows: &[usize]) -> Tensor {
    let [l, b, n] = [s.shape[0], s.shape[1], s.shape[2]];
    let mut data = Vec::with_capacity(l * rows.len() * n);
    for layer in 0..l {
        for &r in rows {
            let at = (layer * b + r) * n;
            data.extend_from_slice(&s.data[at..at + n]);
        }
    }
    Tensor {
        shape: vec![l, rows.len(), n],
        data,
    }
}

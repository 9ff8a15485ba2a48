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
//! **Attention.** A decoder declared with an [`Attention`](crate::spec::Attention) attends over
//! the encoder's outputs (both directions, the memory's size set by [`Seq2Seq::new`]) at every
//! step, masked past each source's length; its parameters are `decoder.attention.*`. After the
//! stack ([`Placement::Output`](crate::spec::Placement), Luong's) it replaces the stack's
//! output; in the step ([`Placement::Input`](crate::spec::Placement), Bahdanau's, as the decoder
//! of PyTorch's seq2seq tutorial) the previous output (at the first step, the bridged initial
//! state) queries the memory and the context joins the step's input. Decoding and training
//! pass the memory along; in training, its gradient flows back into the encoder's outputs.
//!
//! **Greedy decoding** starts every row from the start token, and at each step feeds back the
//! arg-max of the head's logits (the first of equals, as `torch.argmax`). With an end token, a
//! row that has produced it produces it again at every later step, and decoding stops early
//! once every row has; the tokens are always `(batch, steps)`.
//!
//! **Beam search** keeps `width` hypotheses per row, all rows decoded together (`batch ·
//! width` decoder rows a step). A hypothesis's score is the sum of its tokens'
//! log-probabilities (`log_softmax` of the logits, in `f64`); hypotheses are ranked by the score
//! divided by `length^alpha`, the length counting the tokens produced up to and including the
//! end token (`alpha = 0`: the raw sum; `alpha = 1`: the mean per token). A hypothesis that has
//! produced the end token is finished: it stays in its row's beam with its score and length
//! frozen, competing with the open ones, and ends in end tokens. At the first step only one
//! hypothesis per row is open (every beam starts from the same start token). Ties go to the
//! earlier beam, then the smaller token id, so the search is deterministic; a width of 1 is
//! greedy decoding. Decoding stops once every hypothesis is finished or after `steps`; each
//! row's result is its best-ranked hypothesis.

use crate::error::{Error, Result};
use crate::model::Model;
use crate::spec::ModelSpec;

#[cfg(feature = "runtime")]
mod run;
#[cfg(feature = "runtime")]
pub use run::*;

/// A compiled encoder-decoder.
#[derive(Clone, Debug)]
pub struct Seq2Seq {
    /// The encoder: an embedding and a stack, no head.
    pub encoder: Model,
    /// The decoder: an embedding, a unidirectional stack and a head over the target vocabulary.
    pub decoder: Model,
}

/// How to search ([`BoundSeq2Seq::beam`]).
#[derive(Clone, Copy, Debug)]
pub struct Beam {
    /// Hypotheses kept per row (at least 1).
    pub width: usize,
    /// The length normalisation's exponent (see the module doc; at least 0).
    pub alpha: f64,
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
        if let (Some(v), Some(h)) = (decoder.vocab, decoder.head)
            && h > v
        {
            return bad(format!(
                "the decoder's head has {h} classes but its embedding {v} ids: every token it writes is read back, so the head can have no more classes than the vocabulary"
            ));
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
        let mut decoder = decoder.clone();
        if let Some(a) = &mut decoder.attention {
            // The decoder attends over the encoder's outputs, both directions.
            a.memory = encoder.stack.output_size() * encoder.spec.directions();
        }
        let decoder = Model::compile(&decoder)?;
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
}

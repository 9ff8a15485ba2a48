//! A model whose attention sits in the step ([`Placement::Input`], Bahdanau's placement): the
//! stack runs one step at a time, each step's input the step's embedding joined with the
//! context its previous output queried. The stack is any backend's ([`Recurrent`]): each step
//! is one forward call of one time step, and the backward pass runs the steps' backward calls
//! in reverse, carrying the states' gradients and the query's.
//!
//! The attention's per-sequence values (the projected memory of the `general` and `additive`
//! scores) are computed once before the first step ([`BoundModel::prepare`]) and given to
//! every step, forward and backward.

use super::*;

/// What a training pass through the steps keeps: each step's stack tape and attention run,
/// the prepared memory, and the query state's place.
pub(super) struct Steps<T> {
    steps: Vec<(T, LayerRun)>,
    prepared: Prepared,
    /// The shape of one step's output of the stack (`(1, B, out)`, or `(B, 1, out)`).
    step_shape: Vec<usize>,
    /// The index of the state the query starts from (the cell's output state).
    query_state: usize,
}

/// What [`BoundModel::forward_steps`] returns: the stack's response, the embedding's run, and
/// (when kept) the tape of the steps.
pub(super) type Stepped<T> = (Response, Front, Option<Steps<T>>);

impl<R: Recurrent> BoundModel<'_, R> {
    /// Whether the model's attention sits in the step.
    pub(super) fn in_step(&self) -> bool {
        self.model
            .spec
            .attention
            .is_some_and(|a| a.placement == Placement::Input)
    }

    /// The attention's layer (a model built by hand may declare one it does not have).
    fn attention_layer(&self) -> Result<&Layer> {
        self.model.attention.as_ref().ok_or_else(|| {
            Error::Spec(
                "the model declares an attention in the step but has no attention layer: compile it with `Model::compile`".into(),
            )
        })
    }

    /// The index of the cell's state that is also its output: the query of the first step.
    fn query_state(&self) -> Result<usize> {
        let name = match &self.model.spec.cell {
            crate::spec::CellKind::Custom(c) => c.output.0.as_str(),
            _ => "h",
        };
        self.model
            .stack
            .states()
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| {
                Error::Spec(format!(
                    "an attention in the step queries with the cell's previous output, and this cell's output `{name}` is not one of its states: make the output a state"
                ))
            })
    }

    /// The stack's forward pass, one step at a time, with the attention in the step: the
    /// stack's outputs `(d0, d1, out)` in the model's layout and its final states, the
    /// embedding's run, and (with `keep`) what the backward pass needs.
    pub(super) fn forward_steps(&self, run: &Run<'_>, keep: bool) -> Result<Stepped<R::Tape>> {
        let layer = self.attention_layer()?;
        if run.lengths.is_some() {
            return Err(Error::Argument(
                "a model with an attention in the step runs every row to its end, one step at a time: give no `lengths` (give the steps past a row's end the ignore index in its targets)".into(),
            ));
        }
        let Some(memory) = run.memory else {
            return Err(Error::Argument(
                "the model attends over a memory (an encoder's outputs): give it with the run"
                    .into(),
            ));
        };
        let query_state = self.query_state()?;
        let front = self.front(run.input)?;
        let bf = self.model.spec.batch_first;
        let [d0, d1] = front.dims;
        let (steps, batch) = if bf { (d1, d0) } else { (d0, d1) };
        // A prepared memory serves inference; training prepares its own from the weights bound
        // now (as the attention after the stack ignores it).
        let prepared = match (keep, memory.prepared) {
            (false, Some(p)) => {
                self.check_prepared(p, memory, batch)?;
                std::borrow::Cow::Borrowed(p)
            }
            _ => std::borrow::Cow::Owned(self.prepare(memory)?),
        };
        if prepared.span.batch != batch {
            let bf_shape = |s: usize| {
                if bf {
                    vec![batch, s, 0]
                } else {
                    vec![s, batch, 0]
                }
            };
            let mut expected = bf_shape(prepared.span.positions);
            expected[2] = prepared.shape[2];
            return Err(Error::TensorShape {
                name: "memory".into(),
                expected,
                found: memory.values.shape.clone(),
            });
        }
        let e = self.model.spec.input_size;
        // Features given without an embedding are read here, not by the stack: checked here.
        let x = &front.x;
        let count = d0.checked_mul(d1).and_then(|n| n.checked_mul(e));
        if x.shape != [d0, d1, e] || count != Some(x.data.len()) || d0 == 0 || d1 == 0 {
            return Err(Error::TensorShape {
                name: "input".into(),
                expected: vec![d0.max(1), d1.max(1), e],
                found: x.shape.clone(),
            });
        }
        let m = layer.forward.shape(layer.output()).row_len();
        let out = self.model.stack.output_size();
        let layers = self.model.spec.num_layers;
        // The first query: the top layer's initial output state (zeros when not given).
        let mut query = match run.initial_states.get(query_state).copied().flatten() {
            Some(s) if s.data.len() == layers * batch * out => {
                s.data[(layers - 1) * batch * out..].to_vec()
            }
            // A state of the wrong shape: the stack's own checks name it below.
            _ => vec![0.0; batch * out],
        };
        let one_step = |n: usize| {
            if bf {
                vec![batch, 1, n]
            } else {
                vec![1, batch, n]
            }
        };
        let at = |t: usize, b: usize| if bf { b * steps + t } else { t * batch + b };
        let mut outputs = vec![0.0; steps * batch * out];
        let mut finals: Vec<Tensor> = Vec::new();
        let mut kept = Vec::with_capacity(if keep { steps } else { 0 });
        for t in 0..steps {
            let mut inputs = HashMap::new();
            inputs.insert(Role::Input, std::mem::take(&mut query));
            inputs.insert(Role::Memory, prepared.memory.clone());
            let attention = layer.run_given(
                batch,
                inputs,
                &self.attention,
                prepared.span.clone(),
                &prepared.values,
            )?;
            let context = attention.output(layer);
            let mut x = Vec::with_capacity(batch * (e + m));
            for b in 0..batch {
                x.extend_from_slice(&front.x.data[at(t, b) * e..(at(t, b) + 1) * e]);
                x.extend_from_slice(&context[b * m..(b + 1) * m]);
            }
            let x = Tensor {
                shape: one_step(e + m),
                data: x,
            };
            let initial: Vec<Option<&Tensor>> = if t == 0 {
                run.initial_states.clone()
            } else {
                finals.iter().map(Some).collect()
            };
            let request = Request {
                input: Some(&x),
                initial_states: initial,
                lengths: None,
                grad_output: None,
                grad_final_states: Vec::new(),
            };
            let (response, tape) = if keep {
                let (r, tape) = self.stack.forward_train(&request)?;
                (r, Some(tape))
            } else {
                (self.stack.forward(&request)?, None)
            };
            drop(request);
            for b in 0..batch {
                outputs[at(t, b) * out..(at(t, b) + 1) * out]
                    .copy_from_slice(&response.output.data[b * out..(b + 1) * out]);
            }
            query = response.output.data;
            finals = response.final_states;
            if let Some(tape) = tape {
                kept.push((tape, attention));
            }
        }
        let response = Response {
            output: Tensor {
                shape: vec![d0, d1, out],
                data: outputs,
            },
            final_states: finals,
            grads: None,
        };
        let steps = keep.then(|| Steps {
            steps: kept,
            prepared: prepared.into_owned(),
            step_shape: one_step(out),
            query_state,
        });
        Ok((response, front, steps))
    }

    /// The backward pass through the steps of [`BoundModel::forward_steps`]: `d_output` the
    /// gradient of the stack's outputs `(d0, d1, out)`, `grad_final_states` of its final
    /// states. Returns the stack's gradients (its input's being the embedding's features
    /// only) and the memory's, model layout; the attention's parameters' gradients go into
    /// `params`.
    pub(super) fn back_steps(
        &self,
        tape: Steps<R::Tape>,
        d_output: &Tensor,
        grad_final_states: &[Option<&Tensor>],
        params: &mut BTreeMap<String, Tensor>,
    ) -> Result<(Gradients, Tensor)> {
        let layer = self.attention_layer()?;
        let bf = self.model.spec.batch_first;
        let [d0, d1, out] = [d_output.shape[0], d_output.shape[1], d_output.shape[2]];
        let (steps, batch) = if bf { (d1, d0) } else { (d0, d1) };
        let e = self.model.spec.input_size;
        let m = layer.forward.shape(layer.output()).row_len();
        let at = |t: usize, b: usize| if bf { b * steps + t } else { t * batch + b };
        let wanted = grad_values(layer, &[OutRole::InputGrad, OutRole::MemoryGrad])?;
        let given = &tape.prepared.values;
        let mut d_states: Vec<Option<Tensor>> =
            grad_final_states.iter().map(|g| g.cloned()).collect();
        let mut d_query: Option<Vec<f32>> = None;
        let mut d_input = vec![0.0; steps * batch * e];
        let mut d_memory = vec![0.0; tape.prepared.memory.len()];
        let mut stack_params: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut attention_params: Vec<Vec<f32>> = Vec::new();
        for (t, (stack_tape, attention)) in tape.steps.into_iter().enumerate().rev() {
            let mut dy = Vec::with_capacity(batch * out);
            for b in 0..batch {
                dy.extend_from_slice(&d_output.data[at(t, b) * out..(at(t, b) + 1) * out]);
            }
            // This step's output was also the next step's query.
            if let Some(dq) = d_query.take() {
                for (y, q) in dy.iter_mut().zip(dq) {
                    *y += q;
                }
            }
            let dy = Tensor {
                shape: tape.step_shape.clone(),
                data: dy,
            };
            let finals: Vec<Option<&Tensor>> = d_states.iter().map(Option::as_ref).collect();
            let g = self.stack.backward(stack_tape, &dy, &finals)?;
            for (name, grad) in g.params {
                match stack_params.get_mut(&name) {
                    Some(sum) => add_into(&mut sum.data, &grad.data),
                    None => {
                        stack_params.insert(name, grad);
                    }
                }
            }
            let mut d_context = Vec::with_capacity(batch * m);
            for b in 0..batch {
                let row = &g.input.data[b * (e + m)..(b + 1) * (e + m)];
                d_input[at(t, b) * e..(at(t, b) + 1) * e].copy_from_slice(&row[..e]);
                d_context.extend_from_slice(&row[e..]);
            }
            d_states = g.initial_states.into_iter().map(Some).collect();
            let back = layer.back_given(&attention, &d_context, &self.attention, given)?;
            let mut back = take_values(back, &wanted);
            let dm = back.pop().expect("the memory's gradient was wanted");
            let dq = back.pop().expect("the query's gradient was wanted");
            add_into(&mut d_memory, &dm);
            if attention_params.is_empty() {
                attention_params = back;
            } else {
                for (sum, grad) in attention_params.iter_mut().zip(&back) {
                    add_into(sum, grad);
                }
            }
            d_query = Some(dq);
        }
        layer.insert_grads(params, "attention.", attention_params);
        // The first step's query was the top layer's initial output state.
        if let (Some(dq), Some(Some(state))) = (d_query, d_states.get_mut(tape.query_state)) {
            let layers = self.model.spec.num_layers;
            add_into(&mut state.data[(layers - 1) * batch * out..], &dq);
        }
        let span = &tape.prepared.span;
        let size = tape.prepared.shape[2];
        let memory = Tensor {
            shape: tape.prepared.shape.clone(),
            data: if bf {
                swap_outer(&d_memory, span.positions, span.batch, size)
            } else {
                d_memory
            },
        };
        let grads = Gradients {
            input: Tensor {
                shape: vec![d0, d1, e],
                data: d_input,
            },
            initial_states: d_states.into_iter().flatten().collect(),
            params: stack_params,
        };
        Ok((grads, memory))
    }
}

/// `sum += x`, element by element.
fn add_into(sum: &mut [f32], x: &[f32]) {
    for (s, &v) in sum.iter_mut().zip(x) {
        *s += v;
    }
}

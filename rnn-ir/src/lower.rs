//! Lowering: a [`ModelSpec`]'s cell to the step graph of one layer.
//!
//! Standard cells are built as graphs over PyTorch's parameters (`weight_ih` holds the gates
//! stacked, so one matmul computes them all, then slices pick each gate). Custom cells are built
//! from their equations. Either way the result is only matmuls, adds, products and
//! nonlinearities: the gradient comes from [`autodiff`](crate::autodiff), never from formulas
//! written for a particular cell.
//!
//! A custom cell's mistakes (an unknown name, mismatched shapes) are [`Diagnostic`]s at the
//! [`Loc`]s the spec recorded, with no span: the spec holds none.

use crate::error::{Diagnostic, Error, IrError};
use crate::graph::{Graph, Op, OutRole, Shape, Value};
use crate::spec::{BiasConvention, BinOp, CellKind, CustomCell, Expr, GruReset, Loc, ModelSpec};
use std::collections::HashMap;

/// The step graph of the cell of `spec` for a layer with `input_size` input features.
///
/// Outputs: `State(k)` for every state (`h`, and `c` for an LSTM) and `Output` (`h`).
pub fn lower(spec: &ModelSpec, input_size: usize) -> Result<Graph, Error> {
    spec.validate().map_err(Error::Spec)?;
    match &spec.cell {
        CellKind::Custom(c) => lower_custom(c, input_size, spec.hidden_size),
        _ => Ok(lower_standard(spec, input_size)?),
    }
}

struct Biases {
    ih: Option<Value>,
    hh: Option<Value>,
}

fn biases(g: &mut Graph, spec: &ModelSpec, n: usize) -> Biases {
    if !spec.bias {
        return Biases { ih: None, hh: None };
    }
    let ih = Some(g.param("bias_ih", Shape::Vector(n)));
    let hh = match spec.bias_convention {
        BiasConvention::Two => Some(g.param("bias_hh", Shape::Vector(n))),
        BiasConvention::One => None,
    };
    Biases { ih, hh }
}

fn add_bias(g: &mut Graph, v: Value, b: Option<Value>) -> Result<Value, IrError> {
    match b {
        Some(b) => g.add(v, b),
        None => Ok(v),
    }
}

fn named(g: &mut Graph, v: Value, name: &str) -> Value {
    g.set_name(v, name);
    v
}

fn lower_standard(spec: &ModelSpec, input_size: usize) -> Result<Graph, IrError> {
    let h_size = spec.hidden_size;
    let gates = spec.cell.gates().expect("standard cell");
    let rec_size = if spec.proj_size > 0 {
        spec.proj_size
    } else {
        h_size
    };
    let mut g = Graph::new();
    let x = g.x(input_size);
    let h = g.state("h", rec_size);
    let c = matches!(spec.cell, CellKind::Lstm).then(|| g.state("c", h_size));
    let w_ih = g.param("weight_ih", Shape::Matrix(gates * h_size, input_size));
    let w_hh = g.param("weight_hh", Shape::Matrix(gates * h_size, rec_size));
    let b = biases(&mut g, spec, gates * h_size);
    let w_hr = (spec.proj_size > 0).then(|| g.param("weight_hr", Shape::Matrix(rec_size, h_size)));

    let gx = g.matmul(w_ih, x)?;
    let gx = add_bias(&mut g, gx, b.ih)?;
    named(&mut g, gx, "gates_x");
    let (h_new, c_new) = match spec.cell {
        CellKind::RnnTanh | CellKind::RnnRelu => {
            let gh = g.matmul(w_hh, h)?;
            let gh = add_bias(&mut g, gh, b.hh)?;
            let pre = g.add(gx, gh)?;
            let h_new = if matches!(spec.cell, CellKind::RnnTanh) {
                g.tanh(pre)?
            } else {
                g.relu(pre)?
            };
            (h_new, None)
        }
        CellKind::Lstm => {
            let gh = g.matmul(w_hh, h)?;
            let gh = add_bias(&mut g, gh, b.hh)?;
            let pre = g.add(gx, gh)?;
            let gate = |g: &mut Graph, k: usize, name: &str| -> Result<Value, IrError> {
                let s = g.slice(pre, k * h_size, h_size)?;
                let a = if k == 2 { g.tanh(s)? } else { g.sigmoid(s)? };
                Ok(named(g, a, name))
            };
            let i = gate(&mut g, 0, "i")?;
            let f = gate(&mut g, 1, "f")?;
            let gg = gate(&mut g, 2, "g")?;
            let o = gate(&mut g, 3, "o")?;
            let fc = g.mul(f, c.expect("lstm has c"))?;
            let ig = g.mul(i, gg)?;
            let c_new = {
                let v = g.add(fc, ig)?;
                named(&mut g, v, "c")
            };
            let tc = g.tanh(c_new)?;
            let mut h_new = g.mul(o, tc)?;
            if let Some(w_hr) = w_hr {
                h_new = g.matmul(w_hr, h_new)?;
            }
            (h_new, Some(c_new))
        }
        CellKind::Gru => {
            let gx_rz = g.slice(gx, 0, 2 * h_size)?;
            let gx_n = g.slice(gx, 2 * h_size, h_size)?;
            let (b_rz, b_n) = match b.hh {
                Some(bh) => (
                    Some(g.slice(bh, 0, 2 * h_size)?),
                    Some(g.slice(bh, 2 * h_size, h_size)?),
                ),
                None => (None, None),
            };
            let (z, n) = match spec.gru_reset {
                GruReset::AfterMatmul => {
                    // The bias is sliced rather than added whole, so that its r and z parts can
                    // join the input's before the loop; b_hn is scaled by r and stays inside.
                    let gh = g.matmul(w_hh, h)?;
                    let gh_rz = g.slice(gh, 0, 2 * h_size)?;
                    let gh_rz = add_bias(&mut g, gh_rz, b_rz)?;
                    let rz = g.add(gx_rz, gh_rz)?;
                    let rz = g.sigmoid(rz)?;
                    let r = {
                        let v = g.slice(rz, 0, h_size)?;
                        named(&mut g, v, "r")
                    };
                    let z = {
                        let v = g.slice(rz, h_size, h_size)?;
                        named(&mut g, v, "z")
                    };
                    let gh_n = g.slice(gh, 2 * h_size, h_size)?;
                    let gh_n = add_bias(&mut g, gh_n, b_n)?;
                    let rgh = g.mul(r, gh_n)?;
                    let n = g.add(gx_n, rgh)?;
                    (z, g.tanh(n)?)
                }
                GruReset::BeforeMatmul => {
                    let w_hrz = g.slice(w_hh, 0, 2 * h_size)?;
                    let w_hn = g.slice(w_hh, 2 * h_size, h_size)?;
                    let gh_rz = g.matmul(w_hrz, h)?;
                    let gh_rz = add_bias(&mut g, gh_rz, b_rz)?;
                    let rz = g.add(gx_rz, gh_rz)?;
                    let rz = g.sigmoid(rz)?;
                    let r = {
                        let v = g.slice(rz, 0, h_size)?;
                        named(&mut g, v, "r")
                    };
                    let z = {
                        let v = g.slice(rz, h_size, h_size)?;
                        named(&mut g, v, "z")
                    };
                    let rh = g.mul(r, h)?;
                    let gh_n = g.matmul(w_hn, rh)?;
                    let gh_n = add_bias(&mut g, gh_n, b_n)?;
                    let n = g.add(gx_n, gh_n)?;
                    (z, g.tanh(n)?)
                }
            };
            named(&mut g, n, "n");
            // h' = (1 - z) ⊙ n + z ⊙ h, written as PyTorch computes it: n + z ⊙ (h - n).
            let diff = g.sub(h, n)?;
            let zd = g.mul(z, diff)?;
            (g.add(n, zd)?, None)
        }
        CellKind::Custom(_) => unreachable!("custom cells are lowered from equations"),
    };
    named(&mut g, h_new, "h");
    g.set_output(OutRole::State(0), h_new);
    if let Some(c_new) = c_new {
        g.set_output(OutRole::State(1), c_new);
    }
    g.set_output(OutRole::Output, h_new);
    crate::graph::verify(&g)?;
    Ok(g)
}

fn lower_custom(cell: &CustomCell, input_size: usize, hidden: usize) -> Result<Graph, Error> {
    let mut g = Graph::new();
    let mut errors: Vec<Diagnostic> = Vec::new();
    let mut env: HashMap<String, Value> = HashMap::new();
    let mut fixed: HashMap<String, &'static str> = HashMap::new();
    let x = g.x(input_size);
    env.insert("x".into(), x);
    fixed.insert("x".into(), "the step input");
    let too_big = format!(
        "is larger than the largest size supported ({})",
        ModelSpec::MAX_SIZE
    );
    for (name, dim, loc) in &cell.states {
        let n = dim.eval(input_size, hidden).unwrap_or_else(|| {
            errors.push(diag(*loc, format!("the size of state `{name}` {too_big}")));
            1
        });
        if n == 0 {
            errors.push(diag(*loc, format!("state `{name}` has size 0")));
        }
        let v = g.state(name, n);
        env.insert(name.clone(), v);
    }
    for p in &cell.params {
        let dims: Vec<usize> = p
            .dims
            .iter()
            .map(|d| {
                d.eval(input_size, hidden).unwrap_or_else(|| {
                    errors.push(diag(
                        p.loc,
                        format!("a dimension of `{}` {too_big}", p.name),
                    ));
                    1
                })
            })
            .collect();
        if dims.is_empty() || dims.len() > 2 {
            errors.push(diag(
                p.loc,
                format!(
                    "parameter `{}` needs one dimension (a vector) or two (a matrix)",
                    p.name
                ),
            ));
            continue;
        }
        if dims.contains(&0) {
            errors.push(diag(
                p.loc,
                format!("parameter `{}` has a dimension of size 0", p.name),
            ));
        }
        let shape = if dims.len() == 1 {
            Shape::Vector(dims[0])
        } else {
            Shape::Matrix(dims[0], dims[1])
        };
        if env.contains_key(&p.name) {
            errors.push(diag(
                p.loc,
                format!("`{}` is already the name of a state or of `x`", p.name),
            ));
            continue;
        }
        let v = g.param(&p.name, shape);
        env.insert(p.name.clone(), v);
        fixed.insert(p.name.clone(), "a parameter");
    }
    let mut next_state: HashMap<String, Value> = HashMap::new();
    for (target, expr, loc) in &cell.equations {
        if let Some(what) = fixed.get(target) {
            errors.push(diag(
                *loc,
                format!("cannot assign to `{target}`: it is {what}"),
            ));
            continue;
        }
        match eval(&mut g, &env, expr) {
            Ok(v) => {
                if cell.states.iter().any(|s| s.0 == *target) {
                    let want = g
                        .states
                        .iter()
                        .find(|s| s.0 == *target)
                        .map(|s| s.1)
                        .unwrap_or(0);
                    if g.shape(v) != Shape::Batch(want) {
                        errors.push(diag(
                            *loc,
                            format!(
                                "state `{target}` has size {want}, but this equation gives {}",
                                g.shape(v)
                            ),
                        ));
                        continue;
                    }
                    next_state.insert(target.clone(), v);
                }
                if g.data(v).name.is_none() {
                    g.set_name(v, target);
                }
                env.insert(target.clone(), v);
            }
            Err(d) => errors.push(d),
        }
    }
    // The parser checks these too; a spec built in code may not have been parsed.
    for (name, _, loc) in &cell.states {
        if !cell.equations.iter().any(|(t, _, _)| t == name) {
            errors.push(diag(
                *loc,
                format!("state `{name}` is never assigned: add an equation `{name} = ...`"),
            ));
        }
    }
    if !cell.states.iter().any(|s| s.0 == cell.output.0) {
        errors.push(diag(
            cell.output.1,
            format!(
                "`output {}`: the output must be one of the declared states",
                cell.output.0
            ),
        ));
    }
    if cell.states.is_empty() {
        errors.push(diag(
            cell.output.1,
            "a `cell` needs at least one `state`".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(Error::Parse(errors));
    }
    for (k, (name, _, _)) in cell.states.iter().enumerate() {
        g.set_output(OutRole::State(k as u32), next_state[name]);
    }
    g.set_output(OutRole::Output, next_state[&cell.output.0]);
    crate::graph::verify(&g)?;
    Ok(g)
}

/// Lowering knows only where a mistake was written, not the token's span.
fn diag(loc: Loc, message: String) -> Diagnostic {
    Diagnostic::at(loc, message)
}

fn eval(g: &mut Graph, env: &HashMap<String, Value>, e: &Expr) -> Result<Value, Diagnostic> {
    let at = |e: &Expr, m: String| diag(e.loc(), m);
    match e {
        Expr::Var(name, _) => env.get(name).copied().ok_or_else(|| {
            at(e, format!("unknown name `{name}`: declare it with `param {name}: [..]` or `state {name}`, or assign it before this use"))
        }),
        Expr::Num(n, _) => Ok(g.constant(*n, Shape::Scalar)),
        Expr::Neg(a, _) => {
            let a = eval(g, env, a)?;
            g.push(Op::Neg, &[a]).map_err(|err| at(e, err.message))
        }
        Expr::Binary(op, a, b, _) => {
            let (a, b) = (eval(g, env, a)?, eval(g, env, b)?);
            let op = match op {
                BinOp::Add => Op::Add,
                BinOp::Sub => Op::Sub,
                BinOp::Mul => Op::Mul,
                BinOp::MatMul => Op::MatMul,
            };
            g.push(op, &[a, b]).map_err(|err| at(e, err.message))
        }
        Expr::Call(f, args, _) => {
            let op = match f.as_str() {
                "sigmoid" => Op::Sigmoid,
                "tanh" => Op::Tanh,
                "relu" => Op::Relu,
                "concat" => Op::Concat,
                _ => return Err(at(e, format!("unknown function `{f}`: expected `sigmoid`, `tanh`, `relu` or `concat`"))),
            };
            if op != Op::Concat && args.len() != 1 {
                return Err(at(e, format!("`{f}` takes one argument, found {}", args.len())));
            }
            let vals = args.iter().map(|a| eval(g, env, a)).collect::<Result<Vec<_>, _>>()?;
            g.push(op, &vals).map_err(|err| at(e, err.message))
        }
    }
}

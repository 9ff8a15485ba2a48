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
use crate::graph::{Graph, Op, OutRole, ParamInfo, Shape, Value};
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
        if dims.len() > 2 {
            errors.push(diag(
                p.loc,
                format!(
                    "parameter `{}` needs no dimension (a scalar), one (a vector) or two (a matrix)",
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
        let shape = match dims[..] {
            [] => Shape::Vector(1),
            [n] => Shape::Vector(n),
            [r, c] => Shape::Matrix(r, c),
            _ => unreachable!("checked above"),
        };
        if env.contains_key(&p.name) {
            errors.push(diag(
                p.loc,
                format!("`{}` is already the name of a state or of `x`", p.name),
            ));
            continue;
        }
        let v = g.declare_param(ParamInfo {
            name: p.name.clone(),
            shape,
            scalar: dims.is_empty(),
            init: p.init,
        });
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
        match eval(&mut g, &env, expr, (input_size, hidden)) {
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
    let output = env.get(&cell.output.0).copied().filter(|_| {
        cell.states.iter().any(|s| s.0 == cell.output.0)
            || cell.equations.iter().any(|e| e.0 == cell.output.0)
    });
    match output {
        None if errors.is_empty() => errors.push(diag(
            cell.output.1,
            format!(
                "`output {}`: the output must be a declared state or a name an equation assigns (`output y = W_hy @ h + b_y`)",
                cell.output.0
            ),
        )),
        Some(v) if !g.shape(v).is_batched() => errors.push(diag(
            cell.output.1,
            format!(
                "`output {}` is {}, computed from parameters alone: an output has a value for every sequence in the batch",
                cell.output.0,
                g.shape(v)
            ),
        )),
        _ => {}
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
    let output = next_state
        .get(&cell.output.0)
        .or_else(|| env.get(&cell.output.0))
        .copied()
        .expect("checked above");
    g.set_output(OutRole::Output, output);
    crate::graph::verify(&g)?;
    Ok(g)
}

/// Lowering knows only where a mistake was written, not the token's span.
fn diag(loc: Loc, message: String) -> Diagnostic {
    Diagnostic::at(loc, message)
}

/// Features of the output of `cell` for a layer with `input` features, by lowering it (`None`
/// when it does not lower).
pub(crate) fn custom_output_size(cell: &CustomCell, input: usize, hidden: usize) -> Option<usize> {
    let g = lower_custom(cell, input, hidden).ok()?;
    g.output(OutRole::Output).map(|v| g.shape(v).features())
}

/// The functions of the equation language: name, arguments, what it does.
const FUNCTIONS: &[(&str, &str)] = &[
    ("sigmoid", "1 / (1 + e^-a)"),
    ("tanh", "tanh(a)"),
    ("relu", "max(a, 0)"),
    ("exp", "e^a"),
    ("log", "the natural logarithm"),
    ("sqrt", "the square root"),
    ("softplus", "ln(1 + e^a)"),
    ("abs", "|a|"),
    ("min", "min(a, c) against a constant c"),
    ("max", "max(a, c) against a constant c"),
    (
        "mean",
        "the mean over the feature axis, broadcast back over it",
    ),
    (
        "sum",
        "the sum over the feature axis, broadcast back over it",
    ),
    ("concat", "the arguments joined along the feature axis"),
];

/// The names of the equation language's functions, for suggestions.
pub fn function_names() -> impl Iterator<Item = &'static str> {
    FUNCTIONS.iter().map(|(f, _)| *f)
}

/// A constant written as a number, possibly negated (`max(a, -1)`).
fn constant(e: &Expr) -> Option<f32> {
    match e {
        Expr::Num(n, _) => Some(*n),
        Expr::Neg(a, _) => constant(a).map(|n| -n),
        _ => None,
    }
}

fn eval(
    g: &mut Graph,
    env: &HashMap<String, Value>,
    e: &Expr,
    sizes: (usize, usize),
) -> Result<Value, Diagnostic> {
    let at = |e: &Expr, m: String| diag(e.loc(), m);
    match e {
        Expr::Var(name, _) => env.get(name).copied().ok_or_else(|| {
            at(e, format!("unknown name `{name}`: declare it with `param {name}: [..]` or `state {name}`, or assign it before this use"))
        }),
        Expr::Num(n, _) => Ok(g.constant(*n, Shape::Scalar)),
        Expr::Neg(a, _) => {
            let a = eval(g, env, a, sizes)?;
            g.push(Op::Neg, &[a]).map_err(|err| at(e, err.message))
        }
        Expr::Binary(op, a, b, _) => {
            let (a, b) = (eval(g, env, a, sizes)?, eval(g, env, b, sizes)?);
            let op = match op {
                BinOp::Add => Op::Add,
                BinOp::Sub => Op::Sub,
                BinOp::Mul => Op::Mul,
                BinOp::Div => Op::Div,
                BinOp::MatMul => Op::MatMul,
            };
            g.push(op, &[a, b]).map_err(|err| at(e, err.message))
        }
        Expr::Call(f, args, _) => {
            let unary = |op: Op| (op, 1usize);
            let (op, arity) = match f.as_str() {
                "sigmoid" => unary(Op::Sigmoid),
                "tanh" => unary(Op::Tanh),
                "relu" => unary(Op::Relu),
                "exp" => unary(Op::Exp),
                "log" => unary(Op::Log),
                "sqrt" => unary(Op::Sqrt),
                "softplus" => unary(Op::Softplus),
                "abs" => unary(Op::Abs),
                "mean" | "sum" => unary(Op::SumFeatures),
                "min" => (Op::Min(0), 2),
                "max" => (Op::Max(0), 2),
                "concat" => (Op::Concat, 0),
                _ => {
                    let known: Vec<String> = function_names().map(|f| format!("`{f}`")).collect();
                    let hint = crate::error::suggest(f, function_names())
                        .map_or_else(String::new, |s| format!("did you mean `{s}`? "));
                    return Err(at(
                        e,
                        format!("unknown function `{f}`: {hint}the functions are {}", known.join(", ")),
                    ));
                }
            };
            if arity == 1 && args.len() != 1 {
                return Err(at(e, format!("`{f}` takes one argument, found {}", args.len())));
            }
            if arity == 2 {
                if args.len() != 2 {
                    return Err(at(
                        e,
                        format!("`{f}` takes a value and a constant (`{f}(a, 0.5)`), found {} argument(s)", args.len()),
                    ));
                }
                let Some(c) = constant(&args[1]) else {
                    return Err(at(
                        &args[1],
                        format!("the second argument of `{f}` must be a number: `{f}` compares with a constant"),
                    ));
                };
                let a = eval(g, env, &args[0], sizes)?;
                let op = if f == "min" { Op::Min(c.to_bits()) } else { Op::Max(c.to_bits()) };
                return g.push(op, &[a]).map_err(|err| at(e, err.message));
            }
            if op == Op::Concat && args.is_empty() {
                return Err(at(e, "`concat` needs at least one argument".into()));
            }
            let vals = args
                .iter()
                .map(|a| eval(g, env, a, sizes))
                .collect::<Result<Vec<_>, _>>()?;
            if op != Op::SumFeatures {
                return g.push(op, &vals).map_err(|err| at(e, err.message));
            }
            // `mean` and `sum` reduce the feature axis of each row; the one value they leave
            // broadcasts back over the features wherever it is used.
            let a = vals[0];
            let n = g.shape(a).features();
            if !matches!(g.shape(a), Shape::Vector(_) | Shape::Batch(_)) {
                return Err(at(e, format!("`{f}` reduces the features of a vector or a batch, found {}", g.shape(a))));
            }
            let sum = g.push(Op::SumFeatures, &[a]).map_err(|err| at(e, err.message))?;
            if f == "sum" {
                return Ok(sum);
            }
            let count = g.constant(n as f32, Shape::Scalar);
            g.push(Op::Div, &[sum, count]).map_err(|err| at(e, err.message))
        }
        Expr::Index(a, ranges, _) => {
            let base = eval(g, env, a, sizes)?;
            let shape = g.shape(base);
            let (input, hidden) = sizes;
            if shape == Shape::Scalar {
                return Err(at(e, "a number cannot be sliced".into()));
            }
            if ranges.len() == 2 {
                let Shape::Matrix(_, cols) = shape else {
                    return Err(at(e, format!("two ranges slice a matrix's rows and columns, but this is {shape}: give one range")));
                };
                let c = &ranges[1];
                let full = c.start.as_ref().is_none_or(|d| d.eval(input, hidden) == Some(0))
                    && c.end.as_ref().is_none_or(|d| d.eval(input, hidden) == Some(cols))
                    && !c.single;
                if !full {
                    return Err(at(e, "only a matrix's rows can be sliced: write the columns as `..` (`W[0 .. hidden, ..]`)".into()));
                }
            }
            let r = &ranges[0];
            let len = shape.features();
            let size = |d: &Option<crate::spec::Dim>, default: usize| -> Result<usize, Diagnostic> {
                match d {
                    None => Ok(default),
                    Some(d) => d.eval(input, hidden).ok_or_else(|| at(e, format!("a bound of this slice is larger than the largest size supported ({})", ModelSpec::MAX_SIZE))),
                }
            };
            let start = size(&r.start, 0)?;
            let end = if r.single { start + 1 } else { size(&r.end, len)? };
            if start >= end || end > len {
                let what = if matches!(shape, Shape::Matrix(..)) { "rows" } else { "features" };
                return Err(at(e, format!("the slice {start}..{end} is out of range: the value has {len} {what} ({shape})")));
            }
            if start == 0 && end == len {
                return Ok(base);
            }
            g.slice(base, start, end - start).map_err(|err| at(e, err.message))
        }
    }
}

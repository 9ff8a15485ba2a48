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
use std::collections::{BTreeMap, HashMap};

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
    // Declarations whose size is wrong: reported once, here, and never again where they are used.
    let mut broken: Vec<&str> = Vec::new();
    let mut env: HashMap<&str, Value> = HashMap::new();
    env.insert("x", g.x(input_size));
    let too_big = format!(
        "is larger than the largest size supported ({})",
        ModelSpec::MAX_SIZE
    );
    for (name, dim, loc) in &cell.states {
        let n = match dim.eval(input_size, hidden) {
            Some(0) => {
                errors.push(diag(*loc, format!("state `{name}` has size 0")));
                broken.push(name);
                1
            }
            Some(n) => n,
            None => {
                errors.push(diag(*loc, format!("the size of state `{name}` {too_big}")));
                broken.push(name);
                1
            }
        };
        let v = g.state(name, n);
        // A state called `x` is reported by `check_names`; `x` stays the step input. A state
        // whose size is wrong has no value: its uses are not reported again.
        if !broken.contains(&name.as_str()) {
            env.entry(name).or_insert(v);
        }
    }
    for p in &cell.params {
        let dims: Vec<Option<usize>> = p.dims.iter().map(|d| d.eval(input_size, hidden)).collect();
        let problem = if dims.len() > 2 {
            Some(format!(
                "parameter `{}` needs no dimension (a scalar), one (a vector) or two (a matrix)",
                p.name
            ))
        } else if dims.contains(&None) {
            Some(format!("a dimension of `{}` {too_big}", p.name))
        } else if dims.contains(&Some(0)) {
            Some(format!("parameter `{}` has a dimension of size 0", p.name))
        } else {
            None
        };
        if let Some(m) = problem {
            errors.push(diag(p.loc, m));
            broken.push(&p.name);
            continue;
        }
        let dims: Vec<usize> = dims.into_iter().flatten().collect();
        let shape = match dims[..] {
            [] => Shape::Vector(1),
            [n] => Shape::Vector(n),
            [r, c] => Shape::Matrix(r, c),
            _ => unreachable!("checked above"),
        };
        if env.contains_key(p.name.as_str()) {
            // Already a state or `x`: `check_names` reports it.
            continue;
        }
        let v = g.declare_param(ParamInfo {
            name: p.name.clone(),
            shape,
            scalar: dims.is_empty(),
            init: p.init,
        });
        env.insert(&p.name, v);
    }
    let params: Vec<(&str, Loc)> = cell
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.loc))
        .collect();
    let states: Vec<(&str, Loc)> = cell.states.iter().map(|s| (s.0.as_str(), s.2)).collect();
    let equations: Vec<(&str, Option<&Expr>, Loc)> = cell
        .equations
        .iter()
        .map(|(t, e, l)| (t.as_str(), Some(e), *l))
        .collect();
    let (mut found, sound) = check_names(&params, &states, &broken, &equations);
    errors.append(&mut found);
    let mut next_state: HashMap<&str, Value> = HashMap::new();
    for ((target, expr, loc), sound) in cell.equations.iter().zip(sound) {
        let fixed = target == "x"
            || (params.iter().any(|p| p.0 == target) && !states.iter().any(|s| s.0 == target));
        if fixed {
            // Reported by `check_names`; the parameter or `x` keeps its value.
            continue;
        }
        // A name whose equation failed has no value: equations using it fail silently, so that
        // each mistake is reported once, where it was made. An equation `check_names` refused
        // is still evaluated, for its other mistakes, but gives its target no value.
        let v = eval(&mut g, &env, expr, (input_size, hidden), &mut errors);
        let Some(v) = v.filter(|_| sound) else {
            env.remove(target.as_str());
            continue;
        };
        if broken.contains(&target.as_str()) {
            // A state whose size is wrong: reported at its declaration, not at each equation.
            env.remove(target.as_str());
            continue;
        }
        if let Some(want) = g.states.iter().find(|s| s.0 == *target).map(|s| s.1)
            && cell.states.iter().any(|s| s.0 == *target)
        {
            if g.shape(v) != Shape::Batch(want) {
                errors.push(diag(
                    *loc,
                    format!(
                        "state `{target}` has size {want}, but this equation gives {}",
                        shape_words(g.shape(v))
                    ),
                ));
                env.remove(target.as_str());
                continue;
            }
            next_state.insert(target, v);
        }
        if g.data(v).name.is_none() {
            g.set_name(v, target);
        }
        env.insert(target, v);
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
    let output = env.get(cell.output.0.as_str()).copied().filter(|_| {
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
        // In source order, as a reader goes through them (a spec built in code keeps its order).
        errors.sort_by_key(Diagnostic::loc);
        return Err(Error::Parse(errors));
    }
    for (k, (name, _, _)) in cell.states.iter().enumerate() {
        g.set_output(OutRole::State(k as u32), next_state[name.as_str()]);
    }
    let output = next_state
        .get(cell.output.0.as_str())
        .or_else(|| env.get(cell.output.0.as_str()))
        .copied()
        .expect("checked above");
    g.set_output(OutRole::Output, output);
    crate::graph::verify(&g)?;
    Ok(g)
}

/// The checks of a custom cell that need no sizes, shared by the parser (which runs them on
/// what it could parse, so that they join its own diagnostics) and lowering (for specs built in
/// code):
/// - no name is declared twice (as `x`, a state or a parameter);
/// - no equation assigns `x` or a parameter;
/// - every name an equation uses is declared, or assigned by an earlier equation;
/// - every function exists and gets the arguments it takes.
///
/// `broken` are declarations that failed (a shape that does not parse or is too large) and
/// `None` expressions are equations that did not parse: their mistakes are reported already, so
/// their names are known but have no value. An equation that fails leaves its target without a
/// value too, and a use of a name without a value is not reported again: one error per mistake.
///
/// Returns the diagnostics, and for each equation whether it passed.
pub(crate) fn check_names(
    params: &[(&str, Loc)],
    states: &[(&str, Loc)],
    broken: &[&str],
    equations: &[(&str, Option<&Expr>, Loc)],
) -> (Vec<Diagnostic>, Vec<bool>) {
    let mut errors = Vec::new();
    // Every name in scope, and whether it has a value (false: its declaration or its last
    // equation failed). Ordered, so that suggestions do not depend on hashing.
    let mut scope: BTreeMap<&str, bool> = BTreeMap::new();
    let mut what: BTreeMap<&str, &str> = BTreeMap::new();
    what.insert("x", "the step input");
    let mut declared: Vec<(&str, Loc, &str)> = states
        .iter()
        .map(|s| (s.0, s.1, "a state"))
        .chain(params.iter().map(|p| (p.0, p.1, "a parameter")))
        .collect();
    // The later of two declarations is the one reported (unknown places keep their order).
    declared.sort_by_key(|d| d.1);
    // Names declared twice: their mistake is the second declaration, not the equations.
    let mut twice: Vec<&str> = Vec::new();
    for (name, loc, kind) in declared {
        if let Some(earlier) = what.get(name) {
            twice.push(name);
            errors.push(diag(
                loc,
                format!(
                    "`{name}` is already {earlier}: give this {} another name",
                    kind.trim_start_matches("a ")
                ),
            ));
        } else {
            what.insert(name, kind);
        }
    }
    for name in what.keys() {
        scope.insert(name, true);
    }
    for name in broken {
        scope.insert(name, false);
    }
    let mut sound = Vec::with_capacity(equations.len());
    for (k, &(target, expr, loc)) in equations.iter().enumerate() {
        let mut ok = expr.is_some();
        let it = what.get(target).copied().filter(|w| *w != "a state");
        let fixed = it.is_some();
        if let Some(it) = it {
            if !twice.contains(&target) {
                errors.push(diag(
                    loc,
                    format!("cannot assign to `{target}`: it is {it}"),
                ));
            }
            ok = false;
        }
        if let Some(e) = expr {
            let names = Names {
                scope: &scope,
                target,
                later: &equations[k + 1..],
            };
            ok &= names.check(e, &mut errors);
        }
        if !fixed {
            scope.insert(target, ok);
        }
        sound.push(ok);
    }
    (errors, sound)
}

/// What an expression of one equation may use (see [`check_names`]).
struct Names<'a, 'b> {
    scope: &'b BTreeMap<&'a str, bool>,
    /// The equation's target.
    target: &'a str,
    /// The equations after this one.
    later: &'b [(&'a str, Option<&'a Expr>, Loc)],
}

impl Names<'_, '_> {
    /// Whether `e` is sound; every mistake in it is reported, not only the first.
    fn check(&self, e: &Expr, errors: &mut Vec<Diagnostic>) -> bool {
        match e {
            Expr::Var(name, loc) => match self.scope.get(name.as_str()) {
                Some(has_value) => *has_value,
                None => {
                    errors.push(diag(*loc, self.unknown(name)));
                    false
                }
            },
            Expr::Num(..) => true,
            Expr::Neg(a, _) | Expr::Index(a, _, _) => self.check(a, errors),
            Expr::Binary(_, a, b, _) => {
                let a = self.check(a, errors);
                self.check(b, errors) && a
            }
            Expr::Call(f, args, loc) => {
                let mut ok = true;
                for a in args {
                    ok &= self.check(a, errors);
                }
                let problem = match arity(f) {
                    None => {
                        let known: Vec<String> =
                            function_names().map(|f| format!("`{f}`")).collect();
                        let hint = crate::error::suggest(f, function_names())
                            .map_or_else(String::new, |s| format!("did you mean `{s}`? "));
                        Some((
                            *loc,
                            format!(
                                "unknown function `{f}`: {hint}the functions are {}",
                                known.join(", ")
                            ),
                        ))
                    }
                    Some(Arity::One) if args.len() != 1 => Some((
                        *loc,
                        format!("`{f}` takes one argument, found {}", args.len()),
                    )),
                    Some(Arity::ValueAndConstant) if args.len() != 2 => Some((
                        *loc,
                        format!(
                            "`{f}` takes a value and a constant (`{f}(a, 0.5)`), found {} argument(s)",
                            args.len()
                        ),
                    )),
                    Some(Arity::ValueAndConstant) if constant(&args[1]).is_none() => Some((
                        args[1].loc(),
                        format!(
                            "the second argument of `{f}` must be a number: `{f}` compares with a constant"
                        ),
                    )),
                    Some(Arity::AtLeastOne) if args.is_empty() => {
                        Some((*loc, format!("`{f}` needs at least one argument")))
                    }
                    _ => None,
                };
                if let Some((at, m)) = problem {
                    errors.push(diag(at, m));
                    ok = false;
                }
                ok
            }
        }
    }

    /// Why `name` is not in scope, and what was probably meant.
    fn unknown(&self, name: &str) -> String {
        if name == self.target {
            return format!(
                "`{name}` is used in its own equation before it has a value: only a `state` keeps its value from the previous step (declare `state {name}`)"
            );
        }
        if let Some((_, _, at)) = self.later.iter().find(|e| e.0 == name) {
            let at = if at.is_known() {
                format!(" (at {at})")
            } else {
                String::new()
            };
            return format!(
                "`{name}` is used before the equation that assigns it{at}: equations run in order, and only a `state` keeps its value from the previous step"
            );
        }
        match crate::error::suggest(name, self.scope.keys().copied()) {
            Some(s) => format!("unknown name `{name}`: did you mean `{s}`?"),
            None => format!(
                "unknown name `{name}`: declare it with `param {name}: [..]` or `state {name}`, or assign it before this use"
            ),
        }
    }
}

/// How a function of the equation language takes its arguments.
#[derive(Clone, Copy)]
enum Arity {
    One,
    /// `min(a, c)`, `max(a, c)`: a value and a constant.
    ValueAndConstant,
    /// `concat(a, ...)`.
    AtLeastOne,
}

fn arity(f: &str) -> Option<Arity> {
    FUNCTIONS.iter().find(|(n, _)| *n == f).map(|(_, a)| *a)
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

/// The functions of the equation language and how each takes its arguments (what they do is
/// documented in the parser's module doc and the README, which a test keeps complete).
const FUNCTIONS: &[(&str, Arity)] = &[
    ("sigmoid", Arity::One),
    ("tanh", Arity::One),
    ("relu", Arity::One),
    ("exp", Arity::One),
    ("log", Arity::One),
    ("sqrt", Arity::One),
    ("softplus", Arity::One),
    ("abs", Arity::One),
    ("min", Arity::ValueAndConstant),
    ("max", Arity::ValueAndConstant),
    ("mean", Arity::One),
    ("sum", Arity::One),
    ("concat", Arity::AtLeastOne),
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

/// The value of `e`, or `None` after reporting what is wrong with it. Both operands of an
/// operator, and every argument of a call, are evaluated even when one fails, so that
/// independent mistakes are all reported. [`check_names`] has passed the equation: a name with
/// no value here is one whose own equation failed, which is reported already.
fn eval(
    g: &mut Graph,
    env: &HashMap<&str, Value>,
    e: &Expr,
    sizes: (usize, usize),
    errors: &mut Vec<Diagnostic>,
) -> Option<Value> {
    match e {
        Expr::Var(name, _) => env.get(name.as_str()).copied(),
        Expr::Num(n, _) => Some(g.constant(*n, Shape::Scalar)),
        Expr::Neg(a, _) => {
            let a = eval(g, env, a, sizes, errors)?;
            reported(g.push(Op::Neg, &[a]), e, errors)
        }
        Expr::Binary(bin, ea, eb, _) => {
            let a = eval(g, env, ea, sizes, errors);
            let b = eval(g, env, eb, sizes, errors);
            let (a, b) = (a?, b?);
            let op = match bin {
                BinOp::Add => Op::Add,
                BinOp::Sub => Op::Sub,
                BinOp::Mul => Op::Mul,
                BinOp::Div => Op::Div,
                BinOp::MatMul => Op::MatMul,
            };
            let (sa, sb) = (g.shape(a), g.shape(b));
            if op.infer(&[sa, sb]).is_err() {
                // The graph's objection is in its own terms (`batch[4]`): say it in the
                // equation's, with the operands' names.
                return failed(e, errors, shape_mistake(*bin, ea, sa, eb, sb));
            }
            reported(g.push(op, &[a, b]), e, errors)
        }
        Expr::Call(f, args, _) => {
            // Unknown functions, arities and constants are reported by `check_names`.
            let one = args.len() == 1;
            let op = match f.as_str() {
                _ if !one && !matches!(f.as_str(), "min" | "max" | "concat") => return None,
                "sigmoid" => Op::Sigmoid,
                "tanh" => Op::Tanh,
                "relu" => Op::Relu,
                "exp" => Op::Exp,
                "log" => Op::Log,
                "sqrt" => Op::Sqrt,
                "softplus" => Op::Softplus,
                "abs" => Op::Abs,
                "mean" | "sum" => Op::SumFeatures,
                "min" | "max" => {
                    let c = args.get(1).filter(|_| args.len() == 2).and_then(constant)?;
                    let a = eval(g, env, &args[0], sizes, errors)?;
                    let op = if f == "min" {
                        Op::Min(c.to_bits())
                    } else {
                        Op::Max(c.to_bits())
                    };
                    return reported(g.push(op, &[a]), e, errors);
                }
                "concat" if !args.is_empty() => Op::Concat,
                _ => return None,
            };
            let vals: Vec<Option<Value>> = args
                .iter()
                .map(|a| eval(g, env, a, sizes, errors))
                .collect();
            let vals: Vec<Value> = vals.into_iter().collect::<Option<_>>()?;
            if op != Op::SumFeatures {
                return reported(g.push(op, &vals), e, errors);
            }
            // `mean` and `sum` reduce the feature axis of each row; the one value they leave
            // broadcasts back over the features wherever it is used.
            let a = *vals.first()?;
            let n = g.shape(a).features();
            if !matches!(g.shape(a), Shape::Vector(_) | Shape::Batch(_)) {
                return failed(
                    e,
                    errors,
                    format!(
                        "`{f}` reduces the features of a vector or a batch, found {}",
                        g.shape(a)
                    ),
                );
            }
            let sum = reported(g.push(Op::SumFeatures, &[a]), e, errors)?;
            if f == "sum" {
                return Some(sum);
            }
            let count = g.constant(n as f32, Shape::Scalar);
            reported(g.push(Op::Div, &[sum, count]), e, errors)
        }
        Expr::Index(a, ranges, _) => {
            let base = eval(g, env, a, sizes, errors)?;
            let shape = g.shape(base);
            let (input, hidden) = sizes;
            if shape == Shape::Scalar {
                return failed(e, errors, "a number cannot be sliced".into());
            }
            if ranges.len() == 2 {
                let Shape::Matrix(_, cols) = shape else {
                    return failed(
                        e,
                        errors,
                        format!(
                            "two ranges slice a matrix's rows and columns, but this is {shape}: give one range"
                        ),
                    );
                };
                let c = &ranges[1];
                let full = c
                    .start
                    .as_ref()
                    .is_none_or(|d| d.eval(input, hidden) == Some(0))
                    && c.end
                        .as_ref()
                        .is_none_or(|d| d.eval(input, hidden) == Some(cols))
                    && !c.single;
                if !full {
                    return failed(e, errors, "only a matrix's rows can be sliced: write the columns as `..` (`W[0 .. hidden, ..]`)".into());
                }
            }
            let r = ranges.first()?;
            let len = shape.features();
            let size = |d: &Option<crate::spec::Dim>, default: usize| match d {
                None => Some(default),
                Some(d) => d.eval(input, hidden),
            };
            let (Some(start), Some(end)) = (size(&r.start, 0), size(&r.end, len)) else {
                return failed(
                    e,
                    errors,
                    format!(
                        "a bound of this slice is larger than the largest size supported ({})",
                        ModelSpec::MAX_SIZE
                    ),
                );
            };
            let end = if r.single { start + 1 } else { end };
            if start >= end || end > len {
                let what = if matches!(shape, Shape::Matrix(..)) {
                    "rows"
                } else {
                    "features"
                };
                return failed(
                    e,
                    errors,
                    format!(
                        "the slice {start}..{end} is out of range: the value has {len} {what} ({shape})"
                    ),
                );
            }
            if start == 0 && end == len {
                return Some(base);
            }
            reported(g.slice(base, start, end - start), e, errors)
        }
    }
}

/// A shape in the words of the equation language: `4 features` (a value of the step, one row per
/// sequence: the input, a state, what is computed from them), `a [4] vector` and `a [4, 3]
/// matrix` (parameters), `a number`.
fn shape_words(s: Shape) -> String {
    match s {
        Shape::Batch(n) => format!("{n} features"),
        Shape::Vector(n) => format!("a [{n}] vector"),
        Shape::Matrix(r, c) => format!("a [{r}, {c}] matrix"),
        Shape::Scalar => "a number".into(),
        Shape::Tokens => "token ids".into(),
        Shape::Memory(n) => format!("a memory of {n} features"),
        Shape::Pairs(n) => format!("{n} features per source position"),
    }
}

/// Why `a op b` is ill-shaped, naming the operands that are names, and what would fit.
fn shape_mistake(op: BinOp, a: &Expr, sa: Shape, b: &Expr, sb: Shape) -> String {
    let operand = |e: &Expr, s: Shape| match e {
        Expr::Var(name, _) => format!("`{name}` ({})", shape_words(s)),
        _ => shape_words(s),
    };
    let (da, db) = (operand(a, sa), operand(b, sb));
    let symbol = match op {
        BinOp::Add => '+',
        BinOp::Sub => '-',
        BinOp::Mul => '*',
        BinOp::Div => '/',
        BinOp::MatMul => '@',
    };
    match (op, sa, sb) {
        (BinOp::MatMul, Shape::Matrix(o, i), Shape::Batch(n)) => format!(
            "`@` multiplies an `[out, in]` matrix by a value of `in` features, found {da} @ {db}: make the matrix [{o}, {n}], or multiply it by a value of {i} features"
        ),
        (BinOp::MatMul, Shape::Matrix(..), _) => format!(
            "`@` multiplies a matrix by the input, a state or a value computed from them, found {da} @ {db}"
        ),
        (BinOp::MatMul, ..) => format!(
            "`@` needs a matrix parameter on its left (`W @ x`, with `param W: [out, in]`), found {da} @ {db}"
        ),
        (_, Shape::Matrix(..), _) | (_, _, Shape::Matrix(..)) => format!(
            "`{symbol}` cannot combine {da} and {db}: a matrix combines only with a matrix of its shape or a number; to apply it to a value, write `W @ x`"
        ),
        _ => format!(
            "`{symbol}` cannot combine {da} and {db}: both sides need as many features, or one side a single one (a number, a scalar parameter, a `mean`)"
        ),
    }
}

/// `None`, after reporting `message` at `e`.
fn failed(e: &Expr, errors: &mut Vec<Diagnostic>, message: String) -> Option<Value> {
    errors.push(diag(e.loc(), message));
    None
}

/// The value an op made, or `None` after reporting the graph's objection at `e`.
fn reported(r: Result<Value, IrError>, e: &Expr, errors: &mut Vec<Diagnostic>) -> Option<Value> {
    r.map_err(|err| errors.push(diag(e.loc(), err.message)))
        .ok()
}

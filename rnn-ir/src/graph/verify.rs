//! The verifier: checks every invariant a [`Graph`] must hold before any pass, interpreter or
//! code generator may rely on it.
//!
//! Invariants checked:
//! 1. **Defined before use**: every argument of `v` is a value with a smaller index. This gives
//!    single definition (the arena defines each value once) and acyclicity together.
//! 2. **Arity and shapes**: every op's shape equals `Op::infer` of its arguments' shapes.
//! 3. **Inputs and constants** take no arguments; a constant's bits are a finite `f32`.
//! 4. **Roles**: each input role occurs at most once; `Param(p)` names an entry of the parameter
//!    table with the same shape, which is a `Vector` or `Matrix`; `State(k)` names a declared
//!    state with shape `Batch(size)`; `Input` has shape `Batch(input_size)`.
//! 5. **Outputs**: roles are unique; each output value exists; `State(k)` outputs have the state's
//!    shape and `ParamGrad(p)` the parameter's shape.

use super::IrError;
use super::{Graph, Op, OutRole, Role, Shape, Value};
use std::collections::HashSet;

/// Checks every invariant listed in the module doc; the first violation is returned.
pub fn verify(g: &Graph) -> Result<(), IrError> {
    let mut roles = HashSet::new();
    for v in g.iter() {
        let d = g.data(v);
        let err = |m: String| IrError::new(Some(v), d.op, m);
        for &a in &d.args {
            if a.index() >= v.index() {
                return Err(err(format!("argument {a} is not defined before its use")));
            }
        }
        match d.op {
            Op::Input(role) => {
                if !d.args.is_empty() {
                    return Err(err("an input takes no arguments".into()));
                }
                if !roles.insert(role) {
                    return Err(err(format!("input role {role:?} is defined twice")));
                }
                check_role(g, role, d.shape).map_err(err)?;
            }
            Op::Const(bits) => {
                if !d.args.is_empty() {
                    return Err(err("a constant takes no arguments".into()));
                }
                if !f32::from_bits(bits).is_finite() {
                    return Err(err("a constant must be finite".into()));
                }
            }
            op => {
                let shapes: Vec<Shape> = d.args.iter().map(|&a| g.shape(a)).collect();
                let inferred = op.infer(&shapes).map_err(err)?;
                if inferred != d.shape {
                    return Err(err(format!(
                        "declared shape {} but the op gives {inferred}",
                        d.shape
                    )));
                }
            }
        }
    }
    let mut seen = HashSet::new();
    for o in &g.outputs {
        let err = |m: String| IrError::new(Some(o.value), op_of(g, o.value), m);
        if o.value.index() >= g.len() {
            return Err(IrError::new(
                None,
                Op::Concat,
                format!("output {:?} is undefined value {}", o.role, o.value),
            ));
        }
        if !seen.insert(o.role) {
            return Err(err(format!("output role {:?} is given twice", o.role)));
        }
        let shape = g.shape(o.value);
        match o.role {
            OutRole::State(k) | OutRole::StateGrad(k) => match g.states.get(k as usize) {
                Some((_, n)) if shape == Shape::Batch(*n) => {}
                Some((name, n)) => {
                    return Err(err(format!(
                        "state `{name}` has size {n}, but its output is {shape}"
                    )));
                }
                None => return Err(err(format!("output for undeclared state {k}"))),
            },
            OutRole::ParamGrad(p) => match g.params.get(p as usize) {
                Some(info) if info.shape == shape => {}
                Some(info) => {
                    return Err(err(format!(
                        "gradient of `{}` must be {}, found {shape}",
                        info.name, info.shape
                    )));
                }
                None => return Err(err(format!("gradient of undeclared parameter {p}"))),
            },
            OutRole::MemoryGrad => {
                if !matches!(shape, Shape::Memory(_)) {
                    return Err(err(format!(
                        "the memory's gradient must be a memory, found {shape}"
                    )));
                }
            }
            OutRole::Output | OutRole::InputGrad => {
                if !shape.is_batched() {
                    return Err(err(format!("{:?} must be batched, found {shape}", o.role)));
                }
            }
        }
    }
    Ok(())
}

fn op_of(g: &Graph, v: Value) -> Op {
    g.values.get(v.index()).map_or(Op::Concat, |d| d.op)
}

fn check_role(g: &Graph, role: Role, shape: Shape) -> Result<(), String> {
    match role {
        Role::Param(p) => match g.params.get(p as usize) {
            Some(info) if info.shape != shape => Err(format!(
                "parameter `{}` is {} but its input is {shape}",
                info.name, info.shape
            )),
            Some(_) if !matches!(shape, Shape::Vector(_) | Shape::Matrix(..)) => Err(format!(
                "a parameter must be a vector or matrix, found {shape}"
            )),
            Some(_) => Ok(()),
            None => Err(format!("parameter {p} is not in the parameter table")),
        },
        Role::State(k) => match g.states.get(k as usize) {
            Some((_, n)) if shape == Shape::Batch(*n) => Ok(()),
            Some((name, n)) => Err(format!("state `{name}` has size {n}, its input is {shape}")),
            None => Err(format!("state {k} is not declared")),
        },
        Role::Input => {
            if shape == g.input_shape() {
                Ok(())
            } else {
                Err(format!(
                    "the step input is {}, its input is {shape}",
                    g.input_shape()
                ))
            }
        }
        Role::Memory => {
            if matches!(shape, Shape::Memory(_)) {
                Ok(())
            } else {
                Err(format!(
                    "an attention's memory is a memory, its input is {shape}"
                ))
            }
        }
        Role::Target => {
            if shape == Shape::Tokens {
                Ok(())
            } else {
                Err(format!("a loss's target is tokens, its input is {shape}"))
            }
        }
        Role::Saved(_) | Role::Cotangent(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    //! Invariants broken by editing a graph's arena directly, which only this crate can do.
    use super::verify;
    use crate::graph::{Graph, Op, OutRole, Role, Shape, Value, ValueData};

    fn small_graph() -> (Graph, [Value; 3]) {
        let mut g = Graph::new();
        let x = g.x(3);
        let h = g.state("h", 4);
        let w = g.param("W", Shape::Matrix(4, 3));
        let wx = g.matmul(w, x).unwrap();
        let y = g.add(wx, h).unwrap();
        g.set_output(OutRole::State(0), y);
        g.set_output(OutRole::Output, y);
        (g, [x, h, w])
    }

    #[test]
    fn verifier_rejects_use_before_definition() {
        let (mut g, _) = small_graph();
        g.values[3].args[1] = Value::new(4);
        let e = verify(&g).unwrap_err();
        assert_eq!(
            e.to_string(),
            "v3 = matmul: argument v4 is not defined before its use"
        );
    }

    #[test]
    fn verifier_rejects_a_wrong_declared_shape() {
        let (mut g, _) = small_graph();
        g.values[3].shape = Shape::Batch(5);
        let e = verify(&g).unwrap_err();
        assert!(
            e.to_string()
                .contains("declared shape batch[5] but the op gives batch[4]"),
            "{e}"
        );
    }

    #[test]
    fn verifier_rejects_duplicate_roles_and_bad_outputs() {
        let (mut g, _) = small_graph();
        g.values.push(ValueData {
            op: Op::Input(Role::Input),
            args: vec![],
            shape: Shape::Batch(3),
            name: None,
        });
        assert!(
            verify(&g)
                .unwrap_err()
                .to_string()
                .contains("defined twice")
        );

        let (mut g, [x, ..]) = small_graph();
        g.set_output(OutRole::State(0), x);
        assert!(
            verify(&g)
                .unwrap_err()
                .to_string()
                .contains("state `h` has size 4, but its output is batch[3]")
        );
    }
}

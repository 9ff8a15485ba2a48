//! Common-subexpression elimination: values with the same op, the same arguments and the same
//! shape are computed once. Arguments of commutative ops are compared as a sorted pair, so
//! `a + b` and `b + a` merge. Inputs merge by role and constants by value and shape.

use super::rebuild;
use crate::graph::{Graph, Op, Shape, Value};
use std::collections::HashMap;

/// `g` with every repeated computation merged into its first occurrence.
pub fn cse(g: &Graph) -> Graph {
    let mut seen: HashMap<(Op, Vec<Value>, Shape), Value> = HashMap::new();
    rebuild(g, |out, _, d| {
        let mut key_args = d.args.clone();
        if d.op.is_commutative() {
            key_args.sort();
        }
        let key = (d.op, key_args, d.shape);
        if let Some(&v) = seen.get(&key) {
            if out.data(v).name.is_none() && d.name.is_some() {
                out.values[v.index()].name = d.name;
            }
            return Ok(v);
        }
        let v = out.push_raw(d.op, d.args, d.shape, d.name);
        seen.insert(key, v);
        Ok(v)
    })
    .expect("cse never fails")
}

//! Gate fusion: matmuls that share their right operand become one matmul with the weights
//! stacked, as PyTorch stores an LSTM's four gates in one `weight_ih`.
//!
//! `W_i @ x`, `W_f @ x`, `W_g @ x`, `W_o @ x` turn into `(concat W_i, W_f, W_g, W_o) @ x` and one
//! slice per gate. The stacked weight depends on parameters alone, so time hoisting computes it
//! once per sequence; the product becomes one wide GEMM instead of four narrow ones, and its
//! gradient one `matmul_t` instead of four. The pass knows nothing about gates: any group of two
//! or more matmuls with the same right operand and unbatched weights defined before the first of
//! them is fused, in arena order, so the output is deterministic.
//!
//! Weights that are consecutive row slices of one matrix (`W[0 .. h, ..]`, `W[h .. 2h, ..]`, ...,
//! a cell written over PyTorch's stacked layout) are not stacked again: the product reads the
//! matrix itself, or the one slice that covers them.

use super::rebuild;
use crate::graph::IrError;
use crate::graph::{Graph, Op, Value};
use std::collections::BTreeMap;

/// `g` with every group of matmuls sharing a right operand fused into one.
pub fn fuse(g: &Graph) -> Result<Graph, IrError> {
    // Group the matmuls by right operand; a weight must be defined before the group's first
    // matmul, or be a slice of a value that is (`W[h .. 2h, ..]` written beside its product),
    // so that the stacked weight can be built there.
    let mut groups: BTreeMap<Value, Vec<Value>> = BTreeMap::new();
    for v in g.iter() {
        let d = g.data(v);
        if d.op == Op::MatMul && !g.shape(d.args[0]).is_batched() {
            groups.entry(d.args[1]).or_default().push(v);
        }
    }
    let mut member: BTreeMap<Value, (Value, usize)> = BTreeMap::new();
    for (_, members) in groups.iter_mut() {
        let first = members[0];
        members.retain(|&m| {
            let w = g.data(m).args[0];
            let d = g.data(w);
            w < first || m == first || matches!(d.op, Op::Slice { .. }) && d.args[0] < first
        });
        let mut seen_weights = Vec::new();
        members.retain(|&m| {
            let w = g.data(m).args[0];
            let fresh = !seen_weights.contains(&w);
            seen_weights.push(w);
            fresh
        });
        if members.len() >= 2 {
            let mut offset = 0;
            for &m in members.iter() {
                member.insert(m, (members[0], offset));
                offset += g.shape(m).features();
            }
        }
    }
    if member.is_empty() {
        return Ok(g.clone());
    }
    let mut fused: BTreeMap<Value, Value> = BTreeMap::new();
    let mut map: BTreeMap<Value, Value> = BTreeMap::new();
    rebuild(g, |out, v, d| {
        let Some(&(leader, offset)) = member.get(&v) else {
            let nv = out.push_raw(d.op, d.args, d.shape, d.name);
            map.insert(v, nv);
            return Ok(nv);
        };
        if v == leader {
            let mut weights = Vec::new();
            for m in &groups[&g.data(v).args[1]] {
                let w = g.data(*m).args[0];
                weights.push(match map.get(&w) {
                    Some(&nw) => nw,
                    // A slice defined after the leader: taken again here, of the same source.
                    None => {
                        let d = g.data(w);
                        out.push(d.op, &[map[&d.args[0]]])?
                    }
                });
            }
            let stacked = match rejoin(out, &weights)? {
                Some(whole) => whole,
                None => {
                    let stacked = out.push(Op::Concat, &weights)?;
                    out.set_name(stacked, "fused_weights");
                    stacked
                }
            };
            let product = out.push(Op::MatMul, &[stacked, d.args[1]])?;
            out.set_name(product, "fused_matmul");
            fused.insert(leader, product);
        }
        let product = fused[&leader];
        let nv = out.slice(product, offset, d.shape.features())?;
        if let Some(n) = d.name {
            out.set_name(nv, &n);
        }
        map.insert(v, nv);
        Ok(nv)
    })
}

/// When `weights` are consecutive slices of one value, in order, that value (or the one slice
/// of it they cover together); otherwise `None`.
fn rejoin(out: &mut Graph, weights: &[Value]) -> Result<Option<Value>, IrError> {
    let mut root = None;
    let mut first = 0;
    let mut end = 0;
    for (i, &w) in weights.iter().enumerate() {
        let d = out.data(w);
        let Op::Slice { start, len } = d.op else {
            return Ok(None);
        };
        let (start, len) = (start as usize, len as usize);
        if i == 0 {
            root = Some(d.args[0]);
            first = start;
        } else if root != Some(d.args[0]) || start != end {
            return Ok(None);
        }
        end = start + len;
    }
    let Some(root) = root else {
        return Ok(None);
    };
    if first == 0 && end == out.shape(root).features() {
        return Ok(Some(root));
    }
    Ok(Some(out.slice(root, first, end - first)?))
}

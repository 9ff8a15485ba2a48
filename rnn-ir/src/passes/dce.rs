//! Dead-code elimination: drops every value no output depends on.
//!
//! A value is live if it is an output or an argument of a live value. One reverse sweep over the
//! arena finds them all, since arguments precede their users.

use crate::graph::dataflow::live;
use crate::graph::{Graph, Value};

/// `g` without the values no output depends on.
pub fn dce(g: &Graph) -> Graph {
    let live = live(g);
    let mut out = Graph::with_signature_of(g);
    let mut map = vec![Value::new(0); g.len()];
    for v in g.iter() {
        if live[v.index()] {
            let d = g.data(v);
            let args = d.args.iter().map(|a| map[a.index()]).collect();
            map[v.index()] = out.push_raw(d.op, args, d.shape, d.name.clone());
        }
    }
    for o in &g.outputs {
        out.set_output(o.role, map[o.value.index()]);
    }
    out
}

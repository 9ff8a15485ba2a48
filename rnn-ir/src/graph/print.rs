//! The printer: a stable, deterministic text form of a graph, one value per line in arena
//! order, optionally annotated (the schedule and the storage plan add each value's phase and
//! place; the printer knows nothing of them).
//!
//! ```text
//! v4 = matmul v2, v0 : batch[28]          ; pre  gates_x
//! ```
//! Values are printed `v{index}`, shapes as `[r, c]`, `[n]` or `batch[n]`. The output depends on
//! nothing but the graph, so snapshots of it are stable.

use super::{Graph, Op, OutRole, Role, Value};
use std::fmt::{self, Write};

impl Graph {
    /// The role as printed: `param weight_ih`, `x`, `state h`, `saved v3`, `d(state h)`.
    pub fn role_name(&self, role: Role) -> String {
        match role {
            Role::Param(p) => match self.params.get(p as usize) {
                Some(info) => format!("param {}", info.name),
                None => format!("param #{p}"),
            },
            Role::Input => "x".into(),
            Role::Target => "target".into(),
            Role::Memory => "memory".into(),
            Role::State(k) => format!("state {}", self.state_name(k)),
            Role::Saved(v) => format!("saved {v}"),
            Role::Cotangent(o) => format!("d({})", self.out_role_name(o)),
        }
    }

    /// The output role as printed: `state h`, `output`, `grad weight_ih`, `grad x`, `grad state h`.
    pub fn out_role_name(&self, role: OutRole) -> String {
        match role {
            OutRole::State(k) => format!("state {}", self.state_name(k)),
            OutRole::Output => "output".into(),
            OutRole::ParamGrad(p) => match self.params.get(p as usize) {
                Some(info) => format!("grad {}", info.name),
                None => format!("grad param #{p}"),
            },
            OutRole::InputGrad => "grad x".into(),
            OutRole::StateGrad(k) => format!("grad state {}", self.state_name(k)),
            OutRole::MemoryGrad => "grad memory".into(),
        }
    }

    fn state_name(&self, k: u32) -> String {
        self.states
            .get(k as usize)
            .map_or_else(|| format!("#{k}"), |(n, _)| n.clone())
    }

    /// The graph as text, one value a line, each followed by `note(v)` when it is not empty.
    pub fn to_text_with(&self, note: impl Fn(Value) -> String) -> String {
        let mut out = String::new();
        for v in self.iter() {
            let d = self.data(v);
            let mut line = format!("  {v} = ");
            match d.op {
                Op::Input(role) => line.push_str(&self.role_name(role)),
                Op::Const(bits) => {
                    let _ = write!(line, "const {:?}", f32::from_bits(bits));
                }
                Op::Max(bits) | Op::Min(bits) => {
                    let c = f32::from_bits(bits);
                    let _ = write!(line, "{} {}, {c:?}", d.op.mnemonic(), d.args[0]);
                }
                Op::Spread(n) => {
                    let _ = write!(line, "spread {} [{n}]", d.args[0]);
                }
                Op::Slice { start, len } => {
                    let _ = write!(line, "slice {} [{start}..{}]", d.args[0], start + len);
                }
                Op::ScatterRows(n) => {
                    let _ = write!(line, "scatter_rows {}, {} [{n}]", d.args[0], d.args[1]);
                }
                Op::Pick { ignore } => {
                    let _ = write!(line, "pick {}, {} ignore {ignore}", d.args[0], d.args[1]);
                }
                Op::Place { n, ignore } => {
                    let _ = write!(
                        line,
                        "place {}, {} [{n}] ignore {ignore}",
                        d.args[0], d.args[1]
                    );
                }
                op => {
                    line.push_str(op.mnemonic());
                    for (i, a) in d.args.iter().enumerate() {
                        line.push_str(if i == 0 { " " } else { ", " });
                        let _ = write!(line, "{a}");
                    }
                }
            }
            let _ = write!(line, " : {}", d.shape);
            let note = note(v);
            let name = d.name.as_deref().filter(|_| !matches!(d.op, Op::Input(_)));
            if !note.is_empty() || name.is_some() {
                while line.chars().count() < 44 {
                    line.push(' ');
                }
                line.push(';');
                if !note.is_empty() {
                    let _ = write!(line, " {note}");
                }
                if let Some(n) = name {
                    let _ = write!(line, " {n}");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let mut outputs: Vec<_> = self.outputs.clone();
        outputs.sort_by_key(|o| o.role);
        for o in outputs {
            let _ = writeln!(out, "  return {} = {}", self.out_role_name(o.role), o.value);
        }
        out
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text_with(|_| String::new()))
    }
}

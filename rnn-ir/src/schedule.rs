//! A step graph with its time-loop schedule: which values run before the loop, in it, and
//! after it ([`hoist`]). The storage plan and the Program are built on it.

use crate::error::Result;
use crate::graph::{Graph, Value};
use crate::passes::hoist::{self, Phase};

/// A step graph with its time-loop schedule.
#[derive(Clone, Debug)]
pub struct Scheduled {
    /// The graph.
    pub graph: Graph,
    /// The phase of each value (indexed by value).
    pub phases: Vec<Phase>,
}

impl Scheduled {
    /// Schedules `graph` with time hoisting, or everything in the loop when `hoisting` is off.
    pub fn new(graph: Graph, hoisting: bool) -> Result<Self> {
        let phases = if hoisting {
            hoist::hoist(&graph)?
        } else {
            hoist::no_hoist(&graph)
        };
        Ok(Scheduled { graph, phases })
    }

    /// The values of `phase`, in order.
    pub fn values(&self, phase: Phase) -> Vec<Value> {
        self.graph
            .iter()
            .filter(|v| self.phases[v.index()] == phase)
            .collect()
    }

    /// The graph as text with each value's phase.
    pub fn to_text(&self) -> String {
        self.graph
            .to_text_with(|v| format!("{:<4}", self.phases[v.index()].name()))
    }
}

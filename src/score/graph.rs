//! SJEDD's label graph and its legal states (SJEDD.md section 4).

use serde::{Deserialize, Serialize};

/// Most nodes a graph may have: legal states are enumerated over `2^n` at load.
pub const MAX_NODES: usize = 20;

/// Level of a label node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The fake/real node; exactly one, first.
    Root,
    /// A global attribute (identity, expression, ...).
    Global,
    /// A face region (eye, mouth, ...).
    Local,
}

/// One label node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelNode {
    pub name: String,
    pub level: Level,
}

/// Why a label graph was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("the graph has {0} nodes; between 1 and {MAX_NODES} are supported")]
    Size(usize),
    #[error("node 0 must be the root (level \"root\"), found {0:?}")]
    RootFirst(String),
    #[error("node {index} ({name:?}) is a second root; exactly one root is allowed")]
    SecondRoot { index: usize, name: String },
    #[error("node names must be unique: {0:?} appears twice")]
    DuplicateName(String),
    #[error("edge {index}: node {node} does not exist (the graph has {n} nodes)")]
    EdgeOutOfRange { index: usize, node: usize, n: usize },
    #[error(
        "edge {index}: {from:?} -> {to:?} is not allowed; edges go root -> global or \
         global -> local"
    )]
    EdgeLevels {
        index: usize,
        from: String,
        to: String,
    },
    #[error("edge {index}: {from:?} -> {to:?} is listed twice")]
    DuplicateEdge {
        index: usize,
        from: String,
        to: String,
    },
    #[error("global node {0:?} has no child region, so it can never be on")]
    ChildlessGlobal(String),
    #[error("node {0:?} has no parent, so it can never be on")]
    Orphan(String),
}

/// A validated label graph with its legal states.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelGraph {
    nodes: Vec<LabelNode>,
    edges: Vec<(usize, usize)>,
    /// Legal states as bit masks (bit j = node j on), the all-zero state first.
    states: Vec<u32>,
}

impl LabelGraph {
    /// Checks the graph and enumerates its legal states: a global node is on only if the root
    /// is on and at least one of its children is on; a local node is on only if at least one
    /// of its parents is on.
    pub fn new(nodes: Vec<LabelNode>, edges: Vec<(usize, usize)>) -> Result<Self, GraphError> {
        let n = nodes.len();
        if n == 0 || n > MAX_NODES {
            return Err(GraphError::Size(n));
        }
        if nodes[0].level != Level::Root {
            return Err(GraphError::RootFirst(nodes[0].name.clone()));
        }
        for (i, node) in nodes.iter().enumerate().skip(1) {
            if node.level == Level::Root {
                return Err(GraphError::SecondRoot {
                    index: i,
                    name: node.name.clone(),
                });
            }
            if nodes[..i].iter().any(|m| m.name == node.name) {
                return Err(GraphError::DuplicateName(node.name.clone()));
            }
        }
        let mut children = vec![0u32; n];
        let mut parents = vec![0u32; n];
        for (index, &(from, to)) in edges.iter().enumerate() {
            for node in [from, to] {
                if node >= n {
                    return Err(GraphError::EdgeOutOfRange { index, node, n });
                }
            }
            let (a, b) = (nodes[from].level, nodes[to].level);
            let names = || (nodes[from].name.clone(), nodes[to].name.clone());
            if !matches!(
                (a, b),
                (Level::Root, Level::Global) | (Level::Global, Level::Local)
            ) {
                let (from, to) = names();
                return Err(GraphError::EdgeLevels { index, from, to });
            }
            if children[from] & (1 << to) != 0 {
                let (from, to) = names();
                return Err(GraphError::DuplicateEdge { index, from, to });
            }
            children[from] |= 1 << to;
            parents[to] |= 1 << from;
        }
        for (j, node) in nodes.iter().enumerate().skip(1) {
            if parents[j] == 0 {
                return Err(GraphError::Orphan(node.name.clone()));
            }
            if node.level == Level::Global && children[j] == 0 {
                return Err(GraphError::ChildlessGlobal(node.name.clone()));
            }
        }
        let legal = |s: u32| {
            (1..n).all(|j| {
                if s & (1 << j) == 0 {
                    return true;
                }
                match nodes[j].level {
                    Level::Global => s & 1 != 0 && s & children[j] != 0,
                    Level::Local => s & parents[j] != 0,
                    Level::Root => true,
                }
            })
        };
        let states = (0..1u32 << n).filter(|&s| legal(s)).collect();
        Ok(LabelGraph {
            nodes,
            edges,
            states,
        })
    }

    pub fn nodes(&self) -> &[LabelNode] {
        &self.nodes
    }

    pub fn edges(&self) -> &[(usize, usize)] {
        &self.edges
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Legal states as bit masks, the all-zero state first.
    pub fn states(&self) -> &[u32] {
        &self.states
    }

    /// The FF++ model's graph (10 nodes), in the checkpoint's order.
    pub fn ffpp() -> Self {
        let nodes = [
            ("fake", Level::Root),
            ("expression", Level::Global),
            ("identity", Level::Global),
            ("physical inconsistency", Level::Global),
            ("eye", Level::Local),
            ("eyebrow", Level::Local),
            ("lip", Level::Local),
            ("mouth", Level::Local),
            ("nose", Level::Local),
            ("skin", Level::Local),
        ];
        let edges = root_edges(3)
            .chain([6, 7].map(|c| (1, c)))
            .chain((4..10).map(|c| (2, c)))
            .chain([4, 6, 7, 8].map(|c| (3, c)))
            .collect();
        Self::new(named(&nodes), edges).expect("the FF++ graph is valid")
    }

    /// The FFSC model's graph (12 nodes), in the checkpoint's order.
    pub fn ffsc() -> Self {
        let nodes = [
            ("fake", Level::Root),
            ("age", Level::Global),
            ("expression", Level::Global),
            ("gender", Level::Global),
            ("identity", Level::Global),
            ("pose", Level::Global),
            ("eye", Level::Local),
            ("eyebrow", Level::Local),
            ("lip", Level::Local),
            ("mouth", Level::Local),
            ("nose", Level::Local),
            ("skin", Level::Local),
        ];
        let edges = root_edges(5)
            .chain([6, 11].map(|c| (1, c)))
            .chain([6, 8, 9, 10, 11].map(|c| (2, c)))
            .chain([6, 7, 8, 9, 11].map(|c| (3, c)))
            .chain((6..12).map(|c| (4, c)))
            .chain((6..12).map(|c| (5, c)))
            .collect();
        Self::new(named(&nodes), edges).expect("the FFSC graph is valid")
    }
}

fn root_edges(globals: usize) -> impl Iterator<Item = (usize, usize)> {
    (1..=globals).map(|g| (0, g))
}

fn named(nodes: &[(&str, Level)]) -> Vec<LabelNode> {
    nodes
        .iter()
        .map(|(name, level)| LabelNode {
            name: (*name).to_string(),
            level: *level,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffpp_has_251_legal_states_and_ffsc_1544() {
        assert_eq!(LabelGraph::ffpp().states().len(), 251);
        assert_eq!(LabelGraph::ffsc().states().len(), 1544);
        assert_eq!(LabelGraph::ffpp().states()[0], 0);
    }

    #[test]
    fn every_non_zero_legal_state_has_the_root_on() {
        for g in [LabelGraph::ffpp(), LabelGraph::ffsc()] {
            assert!(g.states()[1..].iter().all(|s| s & 1 == 1));
        }
    }

    #[test]
    fn bad_graphs_are_refused_with_the_reason() {
        let n = |name: &str, level| LabelNode {
            name: name.into(),
            level,
        };
        let three = vec![
            n("fake", Level::Root),
            n("identity", Level::Global),
            n("eye", Level::Local),
        ];
        assert!(LabelGraph::new(three.clone(), vec![(0, 1), (1, 2)]).is_ok());
        assert_eq!(
            LabelGraph::new(three.clone(), vec![(0, 1), (1, 3)]),
            Err(GraphError::EdgeOutOfRange {
                index: 1,
                node: 3,
                n: 3
            })
        );
        assert!(matches!(
            LabelGraph::new(three.clone(), vec![(0, 1), (0, 2)]),
            Err(GraphError::EdgeLevels { index: 1, .. })
        ));
        assert!(matches!(
            LabelGraph::new(three.clone(), vec![(0, 1)]),
            Err(GraphError::ChildlessGlobal(_))
        ));
        let mut four = three.clone();
        four.push(n("nose", Level::Local));
        assert_eq!(
            LabelGraph::new(four, vec![(0, 1), (1, 2)]),
            Err(GraphError::Orphan("nose".into()))
        );
        assert!(matches!(
            LabelGraph::new(three.clone(), vec![(0, 1), (1, 2), (1, 2)]),
            Err(GraphError::DuplicateEdge { .. })
        ));
        let mut rootless = three.clone();
        rootless.swap(0, 1);
        assert!(matches!(
            LabelGraph::new(rootless, vec![]),
            Err(GraphError::RootFirst(_))
        ));
        assert_eq!(LabelGraph::new(vec![], vec![]), Err(GraphError::Size(0)));
    }
}

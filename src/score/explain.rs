//! Plain-language explanation of a [`FaceScore`].
//!
//! Wording rule: a probability of at least 0.8 is "likely", at least 0.5 "possibly"; below
//! 0.5 nothing is claimed. The sentence names the face verdict, the most probable altered
//! global attribute, and up to three regions at 0.5 or more, strongest first.

use serde::Serialize;

use super::FaceScore;
use super::graph::{LabelGraph, Level};

/// One node's marginal, for the explanation lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeMarginal {
    pub name: String,
    pub q: f64,
}

/// Why a face scored as it did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    /// One plain sentence, e.g. "face likely manipulated (0.97); identity likely altered
    /// (0.93); strongest regions: mouth 0.88, lip 0.85".
    pub sentence: String,
    /// Global attributes, most probable first.
    pub attributes: Vec<NodeMarginal>,
    /// Face regions, most probable first.
    pub regions: Vec<NodeMarginal>,
}

fn strength(q: f64) -> Option<&'static str> {
    if q >= 0.8 {
        Some("likely")
    } else if q >= 0.5 {
        Some("possibly")
    } else {
        None
    }
}

/// The rule of what a sentence names: for a face called manipulated (q0 >= 0.5), the most
/// probable attribute if it is at 0.5 or more, and up to three regions at 0.5 or more, each
/// list sorted strongest first.
fn named<'a>(
    q0: f64,
    attributes: &'a [NodeMarginal],
    regions: &'a [NodeMarginal],
) -> (Option<&'a NodeMarginal>, Vec<&'a NodeMarginal>) {
    if strength(q0).is_none() {
        return (None, Vec::new());
    }
    let attribute = attributes.first().filter(|a| strength(a.q).is_some());
    let regions = regions
        .iter()
        .filter(|r| strength(r.q).is_some())
        .take(3)
        .collect();
    (attribute, regions)
}

impl Explanation {
    /// The attribute and regions the sentence of a face with fake probability `q0` names
    /// (what `dfwatch eval` checks against what a manipulation altered).
    pub fn named(&self, q0: f64) -> (Option<&NodeMarginal>, Vec<&NodeMarginal>) {
        named(q0, &self.attributes, &self.regions)
    }

    pub fn new(graph: &LabelGraph, score: &FaceScore) -> Self {
        let by_level = |level: Level| {
            let mut v: Vec<NodeMarginal> = graph
                .nodes()
                .iter()
                .zip(&score.marginals)
                .filter(|(n, _)| n.level == level)
                .map(|(n, &q)| NodeMarginal {
                    name: n.name.clone(),
                    q,
                })
                .collect();
            v.sort_by(|a, b| b.q.total_cmp(&a.q));
            v
        };
        let attributes = by_level(Level::Global);
        let regions = by_level(Level::Local);
        let (attribute, strong) = named(score.q0, &attributes, &regions);
        let sentence = match strength(score.q0) {
            None => format!("no sign of manipulation (fake probability {:.2})", score.q0),
            Some(s) => {
                let mut parts = vec![format!("face {s} manipulated ({:.2})", score.q0)];
                match attribute.and_then(|a| strength(a.q).map(|s| (a, s))) {
                    Some((a, s)) => parts.push(format!("{} {s} altered ({:.2})", a.name, a.q)),
                    None if !attributes.is_empty() => {
                        parts.push("no single attribute stands out".into())
                    }
                    None => {}
                }
                let strong: Vec<String> = strong
                    .iter()
                    .map(|r| format!("{} {:.2}", r.name, r.q))
                    .collect();
                if !strong.is_empty() {
                    parts.push(format!("strongest regions: {}", strong.join(", ")));
                } else if !regions.is_empty() {
                    parts.push("no region stands out".into());
                }
                parts.join("; ")
            }
        };
        Explanation {
            sentence,
            attributes,
            regions,
        }
    }
}

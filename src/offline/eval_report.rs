//! What `dfwatch eval` reports: the JSON report's types, shared by the run (`eval`) and its
//! page (`eval_html`). A leaf of `offline`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::metrics::{Bootstrap, Estimate, RocPoint};
use super::score_images::ModelIdentity;

/// What a file in the LIST is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Video,
    Crop,
}

/// One file in the report.
#[derive(Debug, Clone, Serialize)]
pub struct FileResult {
    pub path: String,
    pub label: &'static str,
    pub method: Option<String>,
    pub video_id: Option<String>,
    pub kind: Kind,
    pub sha256: Option<String>,
    /// The paper's score: mean q0 over the scored frames (`None`: no face, or an error).
    pub score: Option<f64>,
    pub frames_sampled: usize,
    pub frames_scored: usize,
    /// The attribute and regions the explanation names (attribute: the strongest global
    /// node at q >= 0.5; regions: up to three local nodes at q >= 0.5).
    pub named_attribute: Option<String>,
    pub named_regions: Vec<String>,
    pub cached: bool,
    pub error: Option<String>,
}

/// Metrics at one level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelMetrics {
    pub real: usize,
    pub fake: usize,
    pub auc: Option<Estimate>,
    pub ap: Option<Estimate>,
    pub eer: Option<Estimate>,
    pub accuracy_at_0_5: Option<Estimate>,
    pub roc: Vec<RocPoint>,
}

/// A method's video-level AUC: its fakes against every real unit.
#[derive(Debug, Clone, Serialize)]
pub struct MethodMetrics {
    pub method: String,
    pub fake: usize,
    pub real: usize,
    pub auc: Option<Estimate>,
}

/// How often a known method's explanation names what it alters.
#[derive(Debug, Clone, Serialize)]
pub struct MethodExplanations {
    pub method: String,
    /// Nodes the method alters, of those the model has.
    pub altered: Vec<String>,
    pub units: usize,
    /// Units whose explanation names an attribute at all.
    pub attribute_named: f64,
    /// Units whose named attribute is one the method alters.
    pub attribute_correct: f64,
    /// Of every region named, the share the method alters.
    pub region_precision: Option<f64>,
    /// Per unit, the altered regions named over min(3, altered regions); averaged.
    pub region_recall: Option<f64>,
    /// Per node the model has: the share of units where q >= 0.5 matches the truth.
    pub node_agreement: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub files: usize,
    pub units: usize,
    pub no_face: usize,
    pub failed: usize,
    pub cached: usize,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub dfwatch: &'static str,
    pub list: String,
    pub model: ModelIdentity,
    pub detector: String,
    pub protocol: String,
    pub frames: usize,
    pub definitions: BTreeMap<&'static str, &'static str>,
    pub bootstrap: Bootstrap,
    pub counts: Counts,
    pub video_level: LevelMetrics,
    pub frame_level: LevelMetrics,
    pub per_method: Vec<MethodMetrics>,
    /// Only for methods whose alterations are known (FF++: Deepfakes, FaceSwap, Face2Face,
    /// NeuralTextures).
    pub explanations: Vec<MethodExplanations>,
    pub files: Vec<FileResult>,
}

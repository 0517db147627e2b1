//! Score: image embedding -> SJEDD's label-graph scores and an explanation. Pure Rust, no I/O.
//!
//! What is computed (SJEDD.md section 4, matching the reference code):
//! - logits `f_j = <e, t_j> / 10` for every label node `j` (raw dot products; the text
//!   embeddings `t_j` are not normalised, nor is `e`);
//! - over the legal states `s` of the label graph, `p(s|x) = exp(s.f) / Z`;
//! - `log Z`, `logit(q_0) = log(Z - 1)` (the log-sum-exp over the non-zero states, every one
//!   of which has the root on), `q_0 = sigmoid(logit(q_0))`, and every node marginal `q_j`.
//!
//! Everything is in f64 and in the log domain: `q_0` rounds to exactly 1.0 once `log Z` passes
//! about 37, so evidence downstream must use `logit_q0`, never `q0`.
//!
//! Speed: the states are held column-wise (one 0/1 column per node), so scores and marginals
//! are a few vectorised passes over the states, with an exp that vectorises
//! ([`math::exp_nonpositive`]). `dfwatch bench score` measures it against brute force.

mod explain;
pub mod graph;
pub mod math;

pub use explain::{Explanation, NodeMarginal};
pub use graph::{GraphError, LabelGraph, LabelNode, Level};

use serde::Serialize;

/// Divisor of the raw dot products (SJEDD's fixed temperature; CLIP's logit_scale cancels).
pub const LOGIT_DIVISOR: f64 = 10.0;

/// Why a scorer could not be built or a face not scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    #[error(
        "text embeddings hold {got} values; the graph's {nodes} nodes x {dim} dims need {want}"
    )]
    TextShape {
        got: usize,
        nodes: usize,
        dim: usize,
        want: usize,
    },
    #[error("text embedding of node {node} has a non-finite value at dim {dim}")]
    TextNotFinite { node: usize, dim: usize },
    #[error("image embedding has {got} dims, the model's text embeddings have {want}")]
    EmbeddingDim { got: usize, want: usize },
    #[error("image embedding has a non-finite value at dim {0}")]
    EmbeddingNotFinite(usize),
}

/// Scores of one face.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaceScore {
    /// `f_j`, one per label node, in the graph's order.
    pub logits: Vec<f64>,
    /// `log Z` over the legal states.
    pub log_z: f64,
    /// `log(Z - 1)`: the log-odds that the face is fake. Use this for evidence.
    pub logit_q0: f64,
    /// Probability that the face is fake (`q_0`); saturates to 1.0 for large logits.
    pub q0: f64,
    /// Marginal `q_j` of every node (`marginals[0] == q0`).
    pub marginals: Vec<f64>,
}

/// Scores image embeddings against fixed text embeddings and a label graph.
#[derive(Debug, Clone)]
pub struct Scorer {
    graph: LabelGraph,
    dim: usize,
    /// Text embeddings, row per node, `n x dim`, as given (f32): products are formed in f64 inside the dot product, exactly as if
    /// widened first.
    text: Vec<f32>,
    /// For each node, a 0/1 column over the non-zero legal states (the exact path).
    columns: Vec<Vec<f64>>,
    /// The factored form of the same states (the fast path), for graphs that fit.
    factored: Option<Factored>,
}

/// Every non-zero legal state is the root, a subset `G` of the global nodes and a subset `L`
/// of the local nodes, and its score splits as `f_0 + g(G) + l(L)`. So its weight is a product
/// `EG[G] * EL[L]` of two small tables (`2^globals + 2^locals` exps per face instead of one per
/// state), and the marginals are sums over the list of legal `(G, L)` pairs.
#[derive(Debug, Clone)]
struct Factored {
    /// Node index of each global, in bit order of `G`.
    globals: Vec<usize>,
    /// Node index of each local, in bit order of `L`.
    locals: Vec<usize>,
    /// `legal_gl[G * nL + L]` is 1 when the state (root, G, L) is legal, else 0; dense so the
    /// sums over legal pairs are contiguous, vectorised dot products.
    legal_gl: Vec<f64>,
    /// The same matrix transposed: `legal_lg[L * nG + G]`.
    legal_lg: Vec<f64>,
}

/// Largest `2^globals * 2^locals` for which the factored tables are kept (512 KiB each).
const FACTORED_MAX_PAIRS: usize = 1 << 16;

impl Factored {
    /// `None` when the graph is too wide for dense tables (then only the exact path runs).
    fn new(graph: &LabelGraph) -> Option<Self> {
        let of = |level| {
            (0..graph.len())
                .filter(|&j| graph.nodes()[j].level == level)
                .collect::<Vec<_>>()
        };
        let (globals, locals) = (of(Level::Global), of(Level::Local));
        let compress = |s: u32, idx: &[usize]| {
            idx.iter()
                .enumerate()
                .fold(0u32, |acc, (k, &j)| acc | (((s >> j) & 1) << k))
        };
        let (ng, nl) = (1usize << globals.len(), 1usize << locals.len());
        if ng * nl > FACTORED_MAX_PAIRS {
            return None;
        }
        let mut legal_gl = vec![0.0f64; ng * nl];
        let mut legal_lg = vec![0.0f64; ng * nl];
        for &s in &graph.states()[1..] {
            let (g, l) = (
                compress(s, &globals) as usize,
                compress(s, &locals) as usize,
            );
            legal_gl[g * nl + l] = 1.0;
            legal_lg[l * ng + g] = 1.0;
        }
        Some(Factored {
            globals,
            locals,
            legal_gl,
            legal_lg,
        })
    }
}

/// Sums `f` over every subset of `idx` (bit k of the subset = node `idx[k]`) into `sums`
/// (`2^idx.len()` long).
fn subset_sums(f: &[f64], idx: &[usize], sums: &mut [f64]) {
    sums[0] = 0.0;
    for (k, &j) in idx.iter().enumerate() {
        let half = 1 << k;
        let (lo, hi) = sums.split_at_mut(half);
        for (h, l) in hi[..half].iter_mut().zip(lo.iter()) {
            *h = l + f[j];
        }
    }
}

/// Scratch values the factored path needs per face, on the stack for graphs of up to six
/// globals and six locals (FF++ and FFSC): `2 x (2^globals + 2^locals)` of them.
const FACTORED_STACK: usize = 2 * (64 + 64);

/// Below this relative mass the factored weights may have underflowed; the exact path runs.
const FACTORED_MIN_MASS: f64 = 1e-200;

impl Scorer {
    /// `text` holds `graph.len()` rows of `dim` raw text embeddings.
    pub fn new(graph: LabelGraph, text: &[f32], dim: usize) -> Result<Self, ScoreError> {
        let n = graph.len();
        if dim == 0 || text.len() != n * dim {
            return Err(ScoreError::TextShape {
                got: text.len(),
                nodes: n,
                dim,
                want: n * dim,
            });
        }
        if let Some(i) = text.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::TextNotFinite {
                node: i / dim,
                dim: i % dim,
            });
        }
        let states = &graph.states()[1..];
        let columns = (0..n)
            .map(|j| {
                states
                    .iter()
                    .map(|s| f64::from((s >> j) & 1 == 1))
                    .collect()
            })
            .collect();
        Ok(Scorer {
            dim,
            text: text.to_vec(),
            columns,
            factored: Factored::new(&graph),
            graph,
        })
    }

    pub fn graph(&self) -> &LabelGraph {
        &self.graph
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `f_j = <e, t_j> / 10` for every node.
    pub fn logits(&self, embedding: &[f32]) -> Result<Vec<f64>, ScoreError> {
        if embedding.len() != self.dim {
            return Err(ScoreError::EmbeddingDim {
                got: embedding.len(),
                want: self.dim,
            });
        }
        if let Some(i) = embedding.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::EmbeddingNotFinite(i));
        }
        Ok(self
            .text
            .chunks_exact(self.dim)
            .map(|t| math::dot_f32(t, embedding) / LOGIT_DIVISOR)
            .collect())
    }

    /// Scores one image embedding.
    pub fn score(&self, embedding: &[f32]) -> Result<FaceScore, ScoreError> {
        let logits = self.logits(embedding)?;
        Ok(self.score_logits(logits))
    }

    /// Scores from precomputed logits `f` (one per node).
    pub fn score_logits(&self, logits: Vec<f64>) -> FaceScore {
        match self.score_factored(logits) {
            Ok(s) => s,
            Err(logits) => self.score_exact(logits),
        }
    }

    /// The fast path; gives the logits back when the weights underflow (logits of hundreds
    /// and more) or the graph is too wide for it. Allocates only the result.
    fn score_factored(&self, f: Vec<f64>) -> Result<FaceScore, Vec<f64>> {
        let Some(fz) = self.factored.as_ref() else {
            return Err(f);
        };
        let (ng, nl) = (1usize << fz.globals.len(), 1usize << fz.locals.len());
        let mut stack = [0.0f64; FACTORED_STACK];
        let mut heap = Vec::new();
        let scratch: &mut [f64] = if 2 * (ng + nl) <= FACTORED_STACK {
            &mut stack[..2 * (ng + nl)]
        } else {
            heap.resize(2 * (ng + nl), 0.0);
            &mut heap
        };
        // eg, el: the subsets' sums, then their weights relative to the largest; a, b below.
        let (eg, rest) = scratch.split_at_mut(ng);
        let (el, rest) = rest.split_at_mut(nl);
        let (a, b) = rest.split_at_mut(ng);
        subset_sums(&f, &fz.globals, eg);
        subset_sums(&f, &fz.locals, el);
        let gmax = eg.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lmax = el.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for v in eg.iter_mut() {
            *v = math::exp_nonpositive(*v - gmax);
        }
        for v in el.iter_mut() {
            *v = math::exp_nonpositive(*v - lmax);
        }
        // a[G] = sum of EL[L] over the legal L of G; b[L] = sum of EG[G] over the legal G of L.
        let dot = math::dot;
        for (r, out) in fz.legal_gl.chunks_exact(nl).zip(a.iter_mut()) {
            *out = dot(r, el);
        }
        for (r, out) in fz.legal_lg.chunks_exact(ng).zip(b.iter_mut()) {
            *out = dot(r, eg);
        }
        let sum = dot(eg, a);
        if !(sum >= FACTORED_MIN_MASS && sum.is_finite()) {
            return Err(f);
        }
        let logit_q0 = f[0] + gmax + lmax + sum.ln();
        let log_z = math::log_add_exp(0.0, logit_q0);
        let q0 = (logit_q0 - log_z).exp();
        let mut marginals = vec![0.0f64; f.len()];
        marginals[0] = q0;
        // Node at bit k of a subset: the mass of every subset with bit k set.
        let mut on = |idx: &[usize], e: &[f64], acc: &[f64]| {
            for (k, &j) in idx.iter().enumerate() {
                let bit = 1usize << k;
                let m: f64 = e
                    .iter()
                    .zip(acc)
                    .enumerate()
                    .filter(|(i, _)| i & bit != 0)
                    .map(|(_, (x, y))| x * y)
                    .sum();
                marginals[j] = q0 * (m / sum);
            }
        };
        on(&fz.globals, eg, a);
        on(&fz.locals, el, b);
        Ok(FaceScore {
            logits: f,
            log_z,
            logit_q0,
            q0,
            marginals,
        })
    }

    /// The exact path: one weight per state relative to the best state, so nothing underflows
    /// that matters.
    fn score_exact(&self, logits: Vec<f64>) -> FaceScore {
        let m = self.columns.first().map_or(0, Vec::len);
        // Score of every non-zero legal state: s . f.
        let mut scores = vec![0.0f64; m];
        for (col, &f) in self.columns.iter().zip(&logits) {
            for (s, &c) in scores.iter_mut().zip(col) {
                *s += c * f;
            }
        }
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // Weights relative to the best non-zero state: every one is in (0, 1].
        for s in scores.iter_mut() {
            *s = math::exp_nonpositive(*s - max);
        }
        let weights = scores;
        let sum: f64 = weights.iter().sum();
        let logit_q0 = max + sum.ln();
        let log_z = math::log_add_exp(0.0, logit_q0);
        let q0 = (logit_q0 - log_z).exp();
        // q_j = sum over states with j on of exp(s.f) / Z = q0 * (sum of their weights / sum).
        let marginals = self
            .columns
            .iter()
            .map(|col| {
                let on: f64 = col.iter().zip(&weights).map(|(c, w)| c * w).sum();
                q0 * (on / sum)
            })
            .collect();
        FaceScore {
            logits,
            log_z,
            logit_q0,
            q0,
            marginals,
        }
    }

    /// Explains a score in words and per-level marginals.
    pub fn explain(&self, score: &FaceScore) -> Explanation {
        Explanation::new(&self.graph, score)
    }
}

/// Reference implementation: every legal state, std exp, straightforward log-sum-exp. For
/// tests and the benchmark's equality check.
pub fn brute_force(graph: &LabelGraph, logits: &[f64]) -> FaceScore {
    let n = graph.len();
    let scores: Vec<f64> = graph
        .states()
        .iter()
        .map(|s| (0..n).filter(|j| s >> j & 1 == 1).map(|j| logits[j]).sum())
        .collect();
    let lse = |xs: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = xs.collect();
        let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return m;
        }
        m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    };
    let log_z = lse(&mut scores.iter().copied());
    let logit_q0 = lse(&mut scores.iter().copied().skip(1));
    let marginals = (0..n)
        .map(|j| {
            let l = lse(&mut graph
                .states()
                .iter()
                .zip(&scores)
                .filter(|(s, _)| *s >> j & 1 == 1)
                .map(|(_, &v)| v));
            (l - log_z).exp()
        })
        .collect::<Vec<_>>();
    FaceScore {
        logits: logits.to_vec(),
        log_z,
        logit_q0,
        q0: marginals[0],
        marginals,
    }
}

#[cfg(test)]
mod tests;

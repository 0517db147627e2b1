//! `dfwatch eval LIST --model DIR`: the paper's protocol over a labelled set, with
//! video-level and frame-level AUC, AP, EER and accuracy, bootstrap intervals, per-method AUC,
//! and the explanations checked against what each known manipulation alters.
//!
//! Each video goes through [`Analyzer::video`] under [`Rules::Paper`] (the same chain as
//! `dfwatch analyze`: evenly spaced frames, the largest face of each, the video's score the
//! mean q0); each face crop through [`Analyzer::crop`] (the chain of `dfwatch score`).
//! Results are cached per file (its SHA-256, the model's manifest SHA-256 and the settings),
//! so a run that stops resumes where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::analyze::{Analyzer, Rules, column_means};
pub use super::eval_report::{
    Counts, EvalReport, FileResult, Kind, LevelMetrics, MethodExplanations, MethodMetrics,
};
use super::metrics::{self, Bootstrap, Estimate, Sample};
use crate::score::{FaceScore, Level};

/// At most this many rows in a LIST.
pub const MAX_ROWS: usize = 1_000_000;
/// A LIST file larger than this is refused.
pub const MAX_LIST_BYTES: u64 = 256 << 20;
/// A cached result larger than this is ignored (and made again).
const MAX_CACHE_ENTRY_BYTES: u64 = 16 << 20;

/// One row of a LIST.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based line of the row in the LIST.
    pub line: usize,
    /// As written in the LIST.
    pub path: String,
    /// Resolved against the LIST's directory.
    pub file: PathBuf,
    pub fake: bool,
    pub method: Option<String>,
    pub video_id: Option<String>,
    pub kind: Kind,
}

impl Row {
    /// The row's file, once it is known to be a regular file (a link to one is followed): a
    /// FIFO or a device in a LIST would block a reader or never end. Every command that reads
    /// a LIST's files checks each with this before it opens it.
    pub fn regular_file(&self) -> anyhow::Result<&Path> {
        let is_file = std::fs::metadata(&self.file)
            .with_context(|| format!("line {}: {}", self.line, self.file.display()))?
            .is_file();
        anyhow::ensure!(
            is_file,
            "line {}: {} is not a regular file",
            self.line,
            self.file.display()
        );
        Ok(&self.file)
    }
}

fn kind_of(path: &str) -> Kind {
    let lower = path.to_ascii_lowercase();
    if [".png", ".jpg", ".jpeg"].iter().any(|e| lower.ends_with(e)) {
        Kind::Crop
    } else {
        Kind::Video
    }
}

/// Reads a LIST: CSV with a header naming `path` and `label` (`real` or `fake`) and
/// optionally `method` and `video_id`. Paths are files, relative to the LIST's directory.
/// Every problem names its line.
pub fn read_list(list: &Path) -> anyhow::Result<Vec<Row>> {
    let bytes = crate::files::read_capped(list, MAX_LIST_BYTES, crate::files::Links::Follow)
        .with_context(|| format!("LIST {}", list.display()))?;
    // Absolute, so every command resolves a row the same way whatever its own base.
    let base = list
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(base).with_context(|| format!("LIST {}", list.display()))?;
    parse_list(&bytes, &base).with_context(|| format!("LIST {}", list.display()))
}

/// [`read_list`] on bytes already read; `base` anchors relative paths.
pub fn parse_list(bytes: &[u8], base: &Path) -> anyhow::Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(bytes);
    let headers = reader.headers().context("line 1: no header")?.clone();
    let mut col = BTreeMap::new();
    for (i, h) in headers.iter().enumerate() {
        let name = h.to_ascii_lowercase();
        if !["path", "label", "method", "video_id"].contains(&name.as_str()) {
            anyhow::bail!(
                "line 1: unknown column {h:?}; the columns are path, label, and optionally \
                 method and video_id"
            );
        }
        if col.insert(name, i).is_some() {
            anyhow::bail!("line 1: column {h:?} appears twice");
        }
    }
    for need in ["path", "label"] {
        anyhow::ensure!(
            col.contains_key(need),
            "line 1: the header has no {need:?} column (it must name path and label)"
        );
    }
    let mut rows = Vec::new();
    let mut seen: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            anyhow::anyhow!("line {line}: {e}")
        })?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        anyhow::ensure!(
            rows.len() < MAX_ROWS,
            "line {line}: more than {MAX_ROWS} rows; split the LIST"
        );
        let get = |name: &str| {
            col.get(name)
                .and_then(|&i| record.get(i))
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let path = get("path").with_context(|| format!("line {line}: no path"))?;
        if path.contains("://") {
            anyhow::bail!("line {line}: {path:?} is a URL; eval reads local files only");
        }
        let label = get("label").with_context(|| format!("line {line}: no label"))?;
        // Words only: datasets disagree on what 1 means (Celeb-DF's list marks real with 1).
        let fake = match label.to_ascii_lowercase().as_str() {
            "fake" => true,
            "real" => false,
            other => anyhow::bail!(
                "line {line}: label {other:?} is neither real nor fake (labels are words: \
                 datasets disagree on what 1 means)"
            ),
        };
        let file = base.join(&path);
        if let Some(first) = seen.insert(file.clone(), line) {
            anyhow::bail!("line {line}: {path:?} is already listed on line {first}");
        }
        let method = get("method");
        if method.is_some() && !fake {
            anyhow::bail!("line {line}: a real file has a method ({method:?}); leave it empty");
        }
        rows.push(Row {
            line,
            kind: kind_of(&path),
            path,
            file,
            fake,
            method,
            video_id: get("video_id"),
        });
    }
    anyhow::ensure!(!rows.is_empty(), "no rows after the header");
    // A unit (video_id, else the file) has one label and one method.
    let mut units: BTreeMap<String, &Row> = BTreeMap::new();
    for r in &rows {
        if let Some(id) = &r.video_id
            && let Some(first) = units.insert(id.clone(), r)
            && (first.fake != r.fake || first.method != r.method)
        {
            anyhow::bail!(
                "line {}: video_id {id:?} has a different label or method than on line {}",
                r.line,
                first.line
            );
        }
    }
    Ok(rows)
}

/// What one file gave (what the cache keeps).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileScores {
    /// q0 of each scored frame (of the largest face), in order; one for a crop.
    pub frames: Vec<f64>,
    /// Frames sampled (videos).
    pub frames_sampled: usize,
    /// Mean marginals of the scored frames, in the model's node order.
    pub marginals: Option<Vec<f64>>,
}

impl FileScores {
    fn score(&self) -> Option<f64> {
        (!self.frames.is_empty())
            .then(|| self.frames.iter().sum::<f64>() / self.frames.len() as f64)
    }
}

/// What each FF++ manipulation alters (SJEDD's FF++ label vectors), by node name.
pub fn altered_by(method: &str) -> Option<&'static [&'static str]> {
    const SWAP: &[&str] = &[
        "identity",
        "physical inconsistency",
        "eye",
        "eyebrow",
        "lip",
        "mouth",
        "nose",
        "skin",
    ];
    const REENACT: &[&str] = &["expression", "physical inconsistency", "lip", "mouth"];
    match method
        .to_ascii_lowercase()
        .replace(['_', '-', ' '], "")
        .as_str()
    {
        "deepfakes" | "faceswap" => Some(SWAP),
        "face2face" | "neuraltextures" => Some(REENACT),
        _ => None,
    }
}

/// Options of one run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub frames: usize,
    pub bootstrap: Bootstrap,
    /// Per-file results are kept here (`None`: no cache).
    pub cache: Option<PathBuf>,
}

fn definitions() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        (
            "roc",
            "one point per distinct score from the highest down, plus (0,0); fake when score >= threshold",
        ),
        (
            "auc",
            "area under the ROC by the trapezoid rule (= P(fake scores above real), ties 1/2; scikit-learn's roc_auc_score)",
        ),
        (
            "ap",
            "sum over distinct thresholds, highest first, of (R_k - R_k-1) * P_k with R_0 = 0 (scikit-learn's average_precision_score)",
        ),
        (
            "eer",
            "on the first ROC segment where FPR - FNR (FNR = 1 - TPR) goes from below zero to zero or above, the FPR where it is zero by linear interpolation between the two points (there FPR = FNR)",
        ),
        (
            "accuracy_at_0_5",
            "share of samples whose call at score >= 0.5 matches the label",
        ),
        (
            "bootstrap",
            "resamples of the units (videos; a resampled video brings all its frames) with replacement, SplitMix64 from the seed; resamples with one class skipped; 2.5th and 97.5th percentiles, linear between order statistics",
        ),
        (
            "unit",
            "a video: rows sharing a video_id, else one file; its score is the mean q0 of all its scored frames",
        ),
    ])
}

/// Cache key of a file under a model and settings: the file's and the manifest's SHA-256,
/// what the file is, the frames sampled and `[detect]`, and the version of dfwatch (a new
/// version may score differently).
fn cache_key(sha: &str, model: &str, kind: Kind, frames: usize, detect: &str) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let text = format!("v1|{version}|{sha}|{model}|{kind:?}|{frames}|{detect}");
    crate::model::hex_sha256(text.as_bytes())
}

/// A cached result, if there is one that fits the model (`nodes` label nodes); anything
/// else (damaged, from another model, out of range) is a miss and is made again.
fn cache_read(dir: &Path, key: &str, nodes: usize) -> Option<FileScores> {
    let bytes = crate::files::read_capped(
        &dir.join(format!("{key}.json")),
        MAX_CACHE_ENTRY_BYTES,
        crate::files::Links::Refuse,
    )
    .ok()?;
    let s: FileScores = serde_json::from_slice(&bytes).ok()?;
    let prob = |v: &f64| v.is_finite() && (0.0..=1.0).contains(v);
    let fits = s.frames.len() <= s.frames_sampled
        && s.frames.iter().all(prob)
        && s.marginals
            .as_ref()
            .is_none_or(|m| m.len() == nodes && m.iter().all(prob));
    fits.then_some(s)
}

/// Writes an entry through a new temporary file (`O_EXCL`, never through a symlink, mode
/// 0600) renamed into place.
fn cache_write(dir: &Path, key: &str, scores: &FileScores) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{key}.{}.{nanos}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&serde_json::to_vec(scores)?));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join(format!("{key}.json")))
}

/// The cache directory, made private (0700) when new. An existing one must be a directory
/// (not a link), owned by this user, and writable by nobody else: its entries are trusted
/// as this user's own results, so nobody else may have been able to put one there.
fn prepare_cache_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("the cache directory {}", dir.display()))?;
    let m = std::fs::symlink_metadata(dir)
        .with_context(|| format!("the cache directory {}", dir.display()))?;
    let refuse = if m.file_type().is_symlink() {
        Some("is a symbolic link".to_string())
    } else if !m.is_dir() {
        Some("is not a directory".to_string())
    } else if m.uid() != nix::unistd::geteuid().as_raw() {
        Some(format!("belongs to user {}, not to this one", m.uid()))
    } else if m.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by others (mode {:o}); chmod go-w it",
            m.mode() & 0o777
        ))
    } else {
        None
    };
    match refuse {
        Some(why) => anyhow::bail!(
            "the cache directory {} {why}: its entries could be someone else's (use \
             --cache DIR with a private directory, or --no-cache)",
            dir.display()
        ),
        None => Ok(()),
    }
}

/// Scores one file through the analyzer.
fn score_file(an: &mut Analyzer, row: &Row, frames: usize) -> anyhow::Result<FileScores> {
    match row.kind {
        Kind::Crop => {
            let s = an.crop(&row.file)?;
            Ok(FileScores {
                frames: vec![s.q0],
                frames_sampled: 1,
                marginals: Some(s.marginals),
            })
        }
        Kind::Video => {
            let input = row
                .file
                .to_str()
                .with_context(|| format!("{}: the path is not UTF-8", row.file.display()))?;
            let r = an.video(input, frames, Rules::Paper, &mut |_, _| {})?;
            Ok(FileScores {
                frames: r.frames.iter().filter_map(|f| f.q0).collect(),
                frames_sampled: r.frames_decoded,
                marginals: r.mean_marginals,
            })
        }
    }
}

/// What the explanation of a face with these marginals names (see [`FileResult`]): the rule
/// of `analyze`'s sentence ([`crate::score::Explanation::named`]); q0 is node 0's marginal.
fn named(graph: &crate::score::LabelGraph, marginals: &[f64]) -> (Option<String>, Vec<String>) {
    let q0 = marginals.first().copied().unwrap_or(0.0);
    let score = FaceScore {
        logits: Vec::new(),
        log_z: 0.0,
        logit_q0: 0.0,
        q0,
        marginals: marginals.to_vec(),
    };
    let e = crate::score::Explanation::new(graph, &score);
    let (attribute, regions) = e.named(q0);
    (
        attribute.map(|a| a.name.clone()),
        regions.into_iter().map(|r| r.name.clone()).collect(),
    )
}

/// A unit: its samples and what it is.
struct Unit {
    fake: bool,
    method: Option<String>,
    frames: Vec<f64>,
    marginals: Vec<Vec<f64>>,
}

impl Unit {
    /// The mean q0 of all its scored frames (units without one are dropped first).
    fn score(&self) -> f64 {
        self.frames.iter().sum::<f64>() / self.frames.len().max(1) as f64
    }
}

/// Runs the evaluation; `progress` is told each file done.
pub fn eval(
    list: &Path,
    rows: &[Row],
    analyzer: &mut Analyzer,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> anyhow::Result<EvalReport> {
    anyhow::ensure!(
        (1..=super::analyze::MAX_FRAMES).contains(&opts.frames),
        "--frames must be 1 to {}",
        super::analyze::MAX_FRAMES
    );
    let identity = analyzer.identity();
    let detector = analyzer.detector_name();
    let detector_settings = analyzer.detector_settings();
    if let Some(dir) = &opts.cache {
        prepare_cache_dir(dir)?;
    }
    let graph = analyzer.graph().clone();
    let mut files = Vec::with_capacity(rows.len());
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    let mut counts = Counts {
        files: rows.len(),
        units: 0,
        no_face: 0,
        failed: 0,
        cached: 0,
    };
    for (i, row) in rows.iter().enumerate() {
        progress(i, rows.len(), &row.path);
        let sha = row.regular_file().and_then(|file| {
            crate::model::sha256_file(file)
                .with_context(|| format!("line {}: {}", row.line, file.display()))
        });
        let mut cached = false;
        let result = sha.and_then(|sha| {
            let key = cache_key(
                &sha,
                &identity.manifest_sha256,
                row.kind,
                if row.kind == Kind::Video {
                    opts.frames
                } else {
                    1
                },
                &detector_settings,
            );
            if let Some(dir) = &opts.cache
                && let Some(hit) = cache_read(dir, &key, graph.len())
            {
                cached = true;
                return Ok((sha, hit));
            }
            let scores = score_file(analyzer, row, opts.frames)
                .with_context(|| format!("line {}: {}", row.line, row.path))?;
            if let Some(dir) = &opts.cache
                && let Err(e) = cache_write(dir, &key, &scores)
            {
                tracing::warn!(dir = %dir.display(), error = %e, "A result could not be cached.");
            }
            Ok((sha, scores))
        });
        let label = if row.fake { "fake" } else { "real" };
        let mut file = FileResult {
            path: row.path.clone(),
            label,
            method: row.method.clone(),
            video_id: row.video_id.clone(),
            kind: row.kind,
            sha256: None,
            score: None,
            frames_sampled: 0,
            frames_scored: 0,
            named_attribute: None,
            named_regions: Vec::new(),
            cached,
            error: None,
        };
        match result {
            Ok((sha, scores)) => {
                counts.cached += usize::from(cached);
                file.sha256 = Some(sha);
                file.score = scores.score();
                file.frames_sampled = scores.frames_sampled;
                file.frames_scored = scores.frames.len();
                if file.score.is_none() {
                    counts.no_face += 1;
                }
                if let Some(m) = &scores.marginals {
                    (file.named_attribute, file.named_regions) = named(&graph, m);
                }
                let id = row
                    .video_id
                    .clone()
                    .unwrap_or_else(|| format!("\0{}", row.path));
                let unit = units.entry(id).or_insert_with(|| Unit {
                    fake: row.fake,
                    method: row.method.clone(),
                    frames: Vec::new(),
                    marginals: Vec::new(),
                });
                unit.frames.extend(&scores.frames);
                if let Some(m) = scores.marginals
                    && !scores.frames.is_empty()
                {
                    unit.marginals.push(m);
                }
            }
            Err(e) => {
                counts.failed += 1;
                tracing::warn!(line = row.line, error = %format!("{e:#}"), "A file could not be scored.");
                file.error = Some(format!("{e:#}"));
            }
        }
        files.push(file);
    }
    progress(rows.len(), rows.len(), "bootstrap intervals");
    let units: Vec<Unit> = units
        .into_values()
        .filter(|u| !u.frames.is_empty())
        .collect();
    counts.units = units.len();
    let boot = opts.bootstrap;
    let level = |frame_level: bool, keep: &dyn Fn(&Unit) -> bool| -> LevelMetrics {
        let groups: Vec<Vec<Sample>> = units
            .iter()
            .filter(|u| keep(u))
            .map(|u| {
                if frame_level {
                    u.frames.iter().map(|&q| (q, u.fake)).collect()
                } else {
                    vec![(u.score(), u.fake)]
                }
            })
            .collect();
        let all: Vec<Sample> = groups.iter().flatten().copied().collect();
        LevelMetrics {
            real: all.iter().filter(|s| !s.1).count(),
            fake: all.iter().filter(|s| s.1).count(),
            auc: metrics::estimate(&groups, metrics::auc, boot),
            ap: metrics::estimate(&groups, metrics::average_precision, boot),
            eer: metrics::estimate(&groups, metrics::eer, boot),
            accuracy_at_0_5: metrics::estimate(&groups, metrics::accuracy_at_half, boot),
            roc: metrics::roc(&all).unwrap_or_default(),
        }
    };
    let video_level = level(false, &|_| true);
    let frame_level = level(true, &|_| true);
    let methods: BTreeSet<String> = units.iter().filter_map(|u| u.method.clone()).collect();
    let per_method = methods
        .iter()
        .map(|m| {
            let samples: Vec<Vec<Sample>> = units
                .iter()
                .filter(|u| !u.fake || u.method.as_deref() == Some(m))
                .map(|u| vec![(u.score(), u.fake)])
                .collect();
            MethodMetrics {
                method: m.clone(),
                fake: samples.iter().filter(|s| s[0].1).count(),
                real: samples.iter().filter(|s| !s[0].1).count(),
                auc: metrics::estimate(&samples, metrics::auc, boot),
            }
        })
        .collect();
    let explanations = methods
        .iter()
        .filter_map(|m| {
            let truth = altered_by(m)?;
            let means: Vec<Vec<f64>> = units
                .iter()
                .filter(|u| u.fake && u.method.as_deref() == Some(m))
                .filter_map(|u| column_means(u.marginals.iter().map(Vec::as_slice)))
                .collect();
            (!means.is_empty()).then(|| explain_against(&graph, m, truth, &means))
        })
        .collect();
    Ok(EvalReport {
        dfwatch: env!("CARGO_PKG_VERSION"),
        list: list.display().to_string(),
        model: identity,
        detector: format!(
            "{detector} (the paper used RetinaFace-ResNet50; scores depend on the detector's \
             boxes and landmarks)"
        ),
        protocol: format!(
            "{} evenly spaced frames per video, the largest face of each, the video's score the \
             mean q0 over the frames with a face (fake at 0.5 and above); a crop is one frame; \
             units without a face are left out of the metrics",
            opts.frames
        ),
        frames: opts.frames,
        definitions: definitions(),
        bootstrap: boot,
        counts,
        video_level,
        frame_level,
        per_method,
        explanations,
        files,
    })
}

/// The explanations of one method's fake units against what the method alters.
fn explain_against(
    graph: &crate::score::LabelGraph,
    method: &str,
    truth: &[&str],
    means: &[Vec<f64>],
) -> MethodExplanations {
    let nodes = graph.nodes();
    let has = |name: &str| nodes.iter().any(|n| n.name == name);
    let altered: Vec<String> = truth
        .iter()
        .filter(|t| has(t))
        .map(|t| t.to_string())
        .collect();
    let is_altered = |name: &str| altered.iter().any(|a| a == name);
    let altered_regions = nodes
        .iter()
        .filter(|n| n.level == Level::Local && is_altered(&n.name))
        .count();
    let n = means.len() as f64;
    let (mut named_attr, mut right_attr) = (0usize, 0usize);
    let (mut regions_named, mut regions_right) = (0usize, 0usize);
    let mut recall_sum = 0.0;
    let mut agree: BTreeMap<String, usize> = BTreeMap::new();
    for m in means {
        let (attr, regions) = named(graph, m);
        if let Some(a) = &attr {
            named_attr += 1;
            right_attr += usize::from(is_altered(a));
        }
        let right = regions.iter().filter(|r| is_altered(r)).count();
        regions_named += regions.len();
        regions_right += right;
        if altered_regions > 0 {
            recall_sum += right as f64 / altered_regions.min(3) as f64;
        }
        for (node, &q) in nodes.iter().zip(m).skip(1) {
            let hit = (q >= 0.5) == is_altered(&node.name);
            *agree.entry(node.name.clone()).or_default() += usize::from(hit);
        }
    }
    MethodExplanations {
        method: method.to_string(),
        altered,
        units: means.len(),
        attribute_named: named_attr as f64 / n,
        attribute_correct: right_attr as f64 / n,
        region_precision: (regions_named > 0).then(|| regions_right as f64 / regions_named as f64),
        region_recall: (altered_regions > 0).then(|| recall_sum / n),
        node_agreement: agree.into_iter().map(|(k, v)| (k, v as f64 / n)).collect(),
    }
}

/// `dfwatch eval` as the command line gives it.
#[derive(Debug, Clone)]
pub struct EvalArgs {
    pub list: PathBuf,
    pub model: PathBuf,
    pub frames: usize,
    pub config: crate::config::Config,
    /// The JSON report (standard output when `None`).
    pub out: Option<PathBuf>,
    /// The HTML page (default: the report's path with `.html`).
    pub html: Option<PathBuf>,
    /// The cache directory (default: the report's path with `.cache`; none without `--out`).
    pub cache: Option<PathBuf>,
    pub no_cache: bool,
    pub bootstrap: Bootstrap,
}

/// Runs `dfwatch eval`: reads the LIST, scores every file (with a progress bar), writes the
/// JSON report and the page, and prints a summary on standard error.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if let (Some(o), Some(h)) = (&args.out, &args.html) {
        anyhow::ensure!(
            o != h,
            "--out and --html name the same file {}",
            o.display()
        );
    }
    if let Some(o) = &args.out {
        anyhow::ensure!(
            o.extension().is_none_or(|e| e != "html"),
            "--out {} is the JSON report; the page goes beside it (or to --html)",
            o.display()
        );
    }
    let rows = read_list(&args.list)?;
    let mut analyzer = Analyzer::new(&args.model, &args.config)?;
    let cache = if args.no_cache {
        None
    } else {
        args.cache
            .clone()
            .or_else(|| args.out.as_ref().map(|o| o.with_extension("cache")))
    };
    let opts = EvalOptions {
        frames: args.frames,
        bootstrap: args.bootstrap,
        cache,
    };
    let bar = crate::progress::bar(rows.len() as u64, "eval");
    let report = eval(
        &args.list,
        &rows,
        &mut analyzer,
        &opts,
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
        },
    );
    bar.finish_and_clear();
    let report = report?;
    let json = serde_json::to_string_pretty(&report)? + "\n";
    match &args.out {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{json}"),
    }
    let html = args
        .html
        .clone()
        .or_else(|| args.out.as_ref().map(|o| o.with_extension("html")));
    if let Some(h) = &html {
        std::fs::write(h, super::eval_html::render(&report))
            .with_context(|| format!("writing {}", h.display()))?;
    }
    let show = |e: &Option<Estimate>| {
        e.map(|e| format!("{:.4} [{:.4}, {:.4}]", e.value, e.low, e.high))
            .unwrap_or_else(|| "- (needs real and fake)".into())
    };
    eprintln!(
        "{} files, {} videos ({} real, {} fake; {} without a face, {} failed, {} cached)\n\
         video-level AUC {}  EER {}\nframe-level AUC {}{}{}",
        report.counts.files,
        report.counts.units,
        report.video_level.real,
        report.video_level.fake,
        report.counts.no_face,
        report.counts.failed,
        report.counts.cached,
        show(&report.video_level.auc),
        show(&report.video_level.eer),
        show(&report.frame_level.auc),
        args.out
            .as_ref()
            .map(|p| format!("\nreport: {}", p.display()))
            .unwrap_or_default(),
        html.map(|p| format!("\npage: {}", p.display()))
            .unwrap_or_default(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_private_and_never_written_through_a_planted_link() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        prepare_cache_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let scores = FileScores {
            frames: vec![0.5],
            frames_sampled: 1,
            marginals: None,
        };
        // A symlink planted where the entry goes: the rename replaces the link, and the
        // victim it pointed at is untouched.
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("k.json")).unwrap();
        cache_write(&dir, "k", &scores).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let entry = dir.join("k.json");
        assert!(
            !std::fs::symlink_metadata(&entry)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(cache_read(&dir, "k", 10).is_some());
        // A directory others may write into is refused: its entries could be theirs.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_cache_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("writable by others"), "{e}");
        let link = d.path().join("cache-link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = prepare_cache_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    fn rows(text: &str) -> anyhow::Result<Vec<Row>> {
        parse_list(text.as_bytes(), Path::new("/data"))
    }

    #[test]
    fn a_list_names_each_problem_by_line() {
        let ok = rows(
            "path,label,method,video_id\na.mp4,real,,\nb.mp4,fake,Deepfakes,v2\nc.png,FAKE,,\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].file, Path::new("/data/a.mp4"));
        assert_eq!(ok[1].method.as_deref(), Some("Deepfakes"));
        assert_eq!(ok[2].kind, Kind::Crop);
        assert!(ok[2].fake);
        for (text, want) in [
            ("file,label\na,real\n", "unknown column"),
            ("path\na\n", "no \"label\" column"),
            ("path,label\na.mp4,maybe\n", "line 2: label \"maybe\""),
            ("path,label\na.mp4,1\n", "labels are words"),
            (
                "path,label\na.mp4,real\na.mp4,fake\n",
                "line 3: \"a.mp4\" is already listed on line 2",
            ),
            ("path,label\nrtsp://x/y,real\n", "is a URL"),
            (
                "path,label,method\na.mp4,real,FaceSwap\n",
                "a real file has a method",
            ),
            (
                "path,label,video_id\na.png,real,v\nb.png,fake,v\n",
                "line 3: video_id \"v\" has a different label",
            ),
            ("path,label\n", "no rows"),
            ("path,label\na.mp4,real,extra\n", "line 2"),
        ] {
            let e = format!("{:#}", rows(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn ffpp_methods_alter_what_the_spec_says() {
        let df = altered_by("Deepfakes").unwrap();
        assert!(df.contains(&"identity") && !df.contains(&"expression") && df.len() == 8);
        assert_eq!(altered_by("face_swap"), altered_by("FaceSwap"));
        let f2f = altered_by("Face2Face").unwrap();
        assert_eq!(f2f, altered_by("NeuralTextures").unwrap());
        assert!(f2f.contains(&"mouth") && !f2f.contains(&"eye"));
        assert_eq!(altered_by("FaceShifter"), None);
    }

    #[test]
    fn explanations_are_scored_against_the_truth() {
        let g = crate::score::LabelGraph::ffpp();
        // fake, expression, identity, physical, eye, eyebrow, lip, mouth, nose, skin
        let swap_like = vec![0.99, 0.1, 0.9, 0.6, 0.8, 0.2, 0.7, 0.9, 0.3, 0.1];
        let r = explain_against(
            &g,
            "Deepfakes",
            altered_by("Deepfakes").unwrap(),
            &[swap_like],
        );
        assert_eq!(r.attribute_named, 1.0);
        assert_eq!(r.attribute_correct, 1.0);
        // Named regions: mouth, eye, lip (top three at q >= 0.5), all altered.
        assert_eq!(r.region_precision, Some(1.0));
        assert_eq!(r.region_recall, Some(1.0));
        assert_eq!(r.node_agreement["expression"], 1.0);
        assert_eq!(r.node_agreement["eyebrow"], 0.0);
        let r = explain_against(
            &g,
            "Face2Face",
            altered_by("Face2Face").unwrap(),
            &[vec![0.99, 0.1, 0.9, 0.6, 0.8, 0.2, 0.7, 0.9, 0.3, 0.1]],
        );
        assert_eq!(
            r.attribute_correct, 0.0,
            "identity is not what Face2Face alters"
        );
        assert_eq!(r.region_precision, Some(2.0 / 3.0));
        assert_eq!(r.region_recall, Some(1.0));
    }
}

//! `dfwatch bench encoder`: the CPU image encoder (ViT-B/32 through ONNX Runtime) beside
//! onnxruntime's own Python API on the same ONNX file in the same run, and the int8 model
//! beside fp32 with its accuracy cost.
//!
//! The full-size synthetic bundle is made from its seed on first use
//! (`tools/model.py synth --arch vit-b-32`), as is its int8 copy (`tools/model.py quantize`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use dfwatch::encode::CpuEncoder;
use dfwatch::model::ModelBundle;
use dfwatch::onnx::{self, OnnxConfig};
use dfwatch::score::Scorer;

/// The accuracy an int8 encoder must keep to be worth enabling: no node logit more than this
/// off fp32 over the check crops, and q0 ordering the crops as fp32 does this often.
const INT8_MAX_LOGIT_ERROR: f64 = 0.1;
const INT8_MIN_RANK_AGREEMENT: f64 = 0.995;

/// `dfwatch bench encoder`: ViT-B/32 faces/s through dfwatch's CPU encoder beside
/// onnxruntime's Python API on the same ONNX; int8 vs fp32.
#[derive(clap::Parser)]
struct Args {
    /// Model bundle (the full-size synthetic one is made from its seed on first use).
    #[arg(long, default_value = "var/models/vitb32-synth")]
    model: PathBuf,
    /// Intra-op threads, both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds measured per case.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Batch sizes, comma-separated.
    #[arg(long = "batch", value_delimiter = ',', default_values_t = [1usize, 8])]
    batches: Vec<usize>,
    /// Crops of the check set (at least 2).
    #[arg(long, default_value_t = 100)]
    crops: usize,
    /// The Python with onnxruntime (tools/setup.sh's venv).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Let ONNX Runtime's idle pool threads spin (its Python API's default).
    #[arg(long)]
    spin: bool,
    /// Turns each side takes (at least 1): the baseline, then dfwatch, this many times.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let a: Args = super::parse_args("encoder", args);
    if a.batches.contains(&0) || a.crops < 2 || a.rounds == 0 {
        bail!("--batch values must be above 0, --crops at least 2 and --rounds at least 1");
    }
    Ok(a)
}

fn python(a: &Args, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&a.python)
        .arg("tools/model.py")
        .args(args)
        .output()
        .with_context(|| format!("running {} (run ./tools/setup.sh)", a.python.display()))?;
    if !out.status.success() {
        bail!(
            "tools/model.py {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deterministic natural-looking crops (smooth colour fields with an edge and mild noise).
fn crops(n: usize, size: usize) -> Vec<Vec<u8>> {
    let mut seed = 99u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let waves: Vec<[f64; 5]> = (0..4)
                .map(|_| [rnd() * 4.0, rnd() * 4.0, rnd() * 6.3, rnd() * 60.0, rnd()])
                .collect();
            let (cx, cy, r) = (0.3 + rnd() * 0.4, 0.3 + rnd() * 0.4, 0.15 + rnd() * 0.2);
            let tint = [
                rnd() * 120.0 - 60.0,
                rnd() * 120.0 - 60.0,
                rnd() * 120.0 - 60.0,
            ];
            let mut img = vec![0u8; size * size * 3];
            for y in 0..size {
                for x in 0..size {
                    let (u, v) = (x as f64 / size as f64, y as f64 / size as f64);
                    let disk = (u - cx).powi(2) + (v - cy).powi(2) < r * r;
                    for c in 0..3 {
                        let mut val = 128.0;
                        for w in &waves {
                            val += w[3]
                                * (std::f64::consts::TAU * (w[0] * u + w[1] * v)
                                    + w[2]
                                    + c as f64 * w[4])
                                    .sin();
                        }
                        if disk {
                            val += tint[c];
                        }
                        img[(y * size + x) * 3 + c] = val.clamp(0.0, 255.0) as u8;
                    }
                }
            }
            img
        })
        .collect()
}

fn throughput(
    enc: &mut CpuEncoder,
    batch: usize,
    pixels: &[f32],
    secs: f64,
) -> anyhow::Result<f64> {
    let input = &pixels[..batch * enc.crop_len()];
    for _ in 0..2 {
        enc.encode(input, batch)?;
    }
    let t0 = Instant::now();
    let mut faces = 0;
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        enc.encode(input, batch)?;
        faces += batch;
    }
    Ok(faces as f64 / t0.elapsed().as_secs_f64())
}

/// One round at one batch size: the baseline's faces/s (if it ran), dfwatch fp32's, int8's.
type Round = (Option<f64>, f64, f64);

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Fraction of pairs ordered the same way (Kendall's concordance, ties counted as agreeing).
fn rank_agreement(a: &[f64], b: &[f64]) -> f64 {
    let mut agree = 0usize;
    let mut total = 0usize;
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            total += 1;
            if (a[i] - a[j]) * (b[i] - b[j]) >= 0.0 {
                agree += 1;
            }
        }
    }
    agree as f64 / total.max(1) as f64
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let a = parse(args)?;
    if !a.model.join("manifest.toml").exists() {
        eprintln!(
            "making the full-size synthetic bundle {} ...",
            a.model.display()
        );
        python(
            &a,
            &[
                "synth",
                "--arch",
                "vit-b-32",
                "--seed",
                "1",
                "--out",
                &a.model.to_string_lossy(),
            ],
        )?;
    }
    let bundle = ModelBundle::load(&a.model)?;
    let int8_path = a.model.join("image_encoder.int8.onnx");
    if !int8_path.exists() {
        eprintln!("quantising to {} ...", int8_path.display());
        python(
            &a,
            &[
                "quantize",
                &bundle.onnx_path.to_string_lossy(),
                &int8_path.to_string_lossy(),
            ],
        )?;
    }
    let info = onnx::init(&OnnxConfig {
        threads: Some(a.threads),
        spin: a.spin,
        ..OnnxConfig::default()
    })?;
    let mut fp32 = CpuEncoder::new(&bundle)?;
    let mut int8 = CpuEncoder::from_onnx(&bundle, Path::new(&int8_path))?;
    let size = fp32.input_size();
    let images = crops(a.crops, size);
    let len = fp32.crop_len();
    let mut pixels = vec![0.0f32; len * a.crops];
    for (img, out) in images.iter().zip(pixels.chunks_exact_mut(len)) {
        fp32.normalise_into(img, out);
    }
    let max_batch = a.batches.iter().copied().max().unwrap_or(1).min(a.crops);

    // Baseline: onnxruntime's Python API, same ONNX, same thread count (or 1 if faster).
    let batch_list: Vec<String> = a.batches.iter().map(|b| b.to_string()).collect();
    let mut py_args = vec![
        "ortbench".to_string(),
        bundle.onnx_path.to_string_lossy().into_owned(),
        "--threads".into(),
        a.threads.to_string(),
        "--seconds".into(),
        a.seconds.to_string(),
        "--image-size".into(),
        size.to_string(),
        "--batch".into(),
    ];
    py_args.extend(batch_list);
    let py_refs: Vec<&str> = py_args.iter().map(String::as_str).collect();

    println!(
        "bench encoder: {} ({} x {}, {} layers), ONNX Runtime {} with {} threads; {} rounds \
         (the baseline and dfwatch take turns; medians, and the median of each round's ratio)",
        bundle.manifest.model.name,
        size,
        size,
        bundle.architecture().layers,
        info.library,
        info.threads,
        a.rounds
    );
    // Per batch size: each round's (baseline, fp32, int8) faces/s. This machine's speed
    // drifts between runs, so the two sides take turns rather than run one after the other.
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); a.batches.len()];
    for _ in 0..a.rounds {
        let baseline_out = python(&a, &py_refs)?;
        let baseline: Vec<serde_json::Value> = baseline_out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        for (i, &b) in a.batches.iter().enumerate() {
            let base = baseline
                .iter()
                .find(|v| v["batch"] == b)
                .and_then(|v| v["faces_per_s"].as_f64());
            let b = b.min(max_batch);
            let ours = throughput(&mut fp32, b, &pixels, a.seconds)?;
            let q = throughput(&mut int8, b, &pixels, a.seconds)?;
            rounds[i].push((base, ours, q));
        }
    }
    println!(
        "{:<8} {:>16} {:>22} {:>8} {:>16} {:>10}",
        "batch", "dfwatch fp32/s", "onnxruntime python/s", "ratio", "dfwatch int8/s", "int8/fp32"
    );
    for (&b, runs) in a.batches.iter().zip(&rounds) {
        let pick = |f: &dyn Fn(&Round) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        let ours = pick(&|r| Some(r.1)).unwrap_or(f64::NAN);
        let base = pick(&|r| r.0);
        let ratio = pick(&|r| r.0.map(|v| r.1 / v));
        let q = pick(&|r| Some(r.2)).unwrap_or(f64::NAN);
        let speedup = pick(&|r| Some(r.2 / r.1)).unwrap_or(f64::NAN);
        println!(
            "{:<8} {:>16.1} {:>22} {:>8} {:>16.1} {:>10.2}",
            b.min(max_batch),
            ours,
            base.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
            ratio.map(|v| format!("{v:.3}")).unwrap_or("-".into()),
            q,
            speedup
        );
    }

    // Accuracy of int8 on the crops: largest logit error and q0 rank agreement.
    let dim = bundle.architecture().embed_dim as usize;
    let scorer = Scorer::new(bundle.graph.clone(), &bundle.text_embeddings, dim)?;
    let (mut q_fp, mut q_i8, mut worst) = (vec![], vec![], 0.0f64);
    for chunk in pixels.chunks(len * max_batch) {
        let n = chunk.len() / len;
        let ef = fp32.encode(chunk, n)?;
        let ei = int8.encode(chunk, n)?;
        for (f, i) in ef.chunks_exact(dim).zip(ei.chunks_exact(dim)) {
            let (sf, si) = (scorer.score(f)?, scorer.score(i)?);
            for (x, y) in sf.logits.iter().zip(&si.logits) {
                worst = worst.max((x - y).abs());
            }
            q_fp.push(sf.logit_q0);
            q_i8.push(si.logit_q0);
        }
    }
    let spread = |v: &[f64]| {
        let q: Vec<f64> = v.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
        let lo = q.iter().copied().fold(1.0, f64::min);
        let hi = q.iter().copied().fold(0.0, f64::max);
        (lo, hi)
    };
    let (lo, hi) = spread(&q_fp);
    let agreement = rank_agreement(&q_fp, &q_i8);
    println!(
        "int8 vs fp32 over {} crops (fp32 q0 from {lo:.3} to {hi:.3}): largest logit error \
         {worst:.4}, q0 rank agreement {agreement:.4}",
        q_fp.len(),
    );
    let passed = worst <= INT8_MAX_LOGIT_ERROR && agreement >= INT8_MIN_RANK_AGREEMENT;
    println!(
        "int8 accuracy gate (largest logit error <= {INT8_MAX_LOGIT_ERROR}, q0 rank agreement \
         >= {INT8_MIN_RANK_AGREEMENT}, on this bundle and these crops only): {}; the daemon \
         runs the fp32 encoder either way (int8 is not wired into it)",
        if passed { "passed" } else { "FAILED" }
    );
    println!("targets: dfwatch >= 0.95x onnxruntime python; int8 >= 2x fp32 faces/s");
    Ok(())
}

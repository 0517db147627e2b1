//! The committed tiny fixture (tests/fixtures/tiny, made by `tools/model.py fixture`): the
//! Rust pipeline (bundle loader, ONNX Runtime encoder, scorer) against the float64 numpy
//! reference.

use std::path::Path;

use dfwatch::encode::{CpuEncoder, FaceInput};
use dfwatch::model::ModelBundle;
use dfwatch::offline::score_images::load_crop;
use dfwatch::onnx::{self, OnnxConfig};
use dfwatch::score::{FaceScore, Scorer};
use serde::Deserialize;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny");

#[derive(Deserialize)]
struct Expected {
    crops: Vec<ExpectedCrop>,
}

#[derive(Deserialize)]
struct ExpectedCrop {
    crop: String,
    embedding: Vec<f64>,
    logits: Vec<f64>,
    log_z: f64,
    logit_q0: f64,
    q0: f64,
    marginals: Vec<f64>,
}

fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/expected.json")).unwrap()).unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn compare(got: &FaceScore, want: &ExpectedCrop, tol: f64) -> f64 {
    let worst = max_diff(&got.logits, &want.logits)
        .max(max_diff(&got.marginals, &want.marginals))
        .max((got.log_z - want.log_z).abs())
        .max((got.logit_q0 - want.logit_q0).abs())
        .max((got.q0 - want.q0).abs());
    assert!(
        worst <= tol,
        "{}: differs by {worst:e} (tolerance {tol:e})",
        want.crop
    );
    worst
}

fn bundle_and_scorer() -> (ModelBundle, Scorer) {
    let b = ModelBundle::load(&Path::new(DIR).join("bundle")).unwrap();
    let s = Scorer::new(b.graph.clone(), &b.text_embeddings, 64).unwrap();
    (b, s)
}

#[test]
fn scores_of_the_reference_embeddings_match_within_1e_5() {
    let (_, scorer) = bundle_and_scorer();
    let exp = expected();
    assert_eq!(exp.crops.len(), 4);
    for c in &exp.crops {
        let e: Vec<f32> = c.embedding.iter().map(|&v| v as f32).collect();
        compare(&scorer.score(&e).unwrap(), c, 1e-5);
    }
    // The fixture spans both verdicts, so a sign error would show.
    assert!(exp.crops.iter().any(|c| c.q0 < 0.5) && exp.crops.iter().any(|c| c.q0 > 0.5));
}

#[test]
fn onnx_runtime_embeddings_and_scores_match_the_reference() {
    let (bundle, scorer) = bundle_and_scorer();
    onnx::init(&OnnxConfig::default()).expect("ONNX Runtime (run ./tools/setup.sh)");
    let mut enc = CpuEncoder::new(&bundle).unwrap();
    let exp = expected();
    // All four crops in one batch, then one by one: batching must not change the result.
    let mut batch = Vec::new();
    let mut one = vec![0.0f32; enc.crop_len()];
    let mut singles = Vec::new();
    for c in &exp.crops {
        let rgb = load_crop(&Path::new(DIR).join(&c.crop), 224).unwrap();
        enc.normalise_into(&rgb, &mut one);
        batch.extend_from_slice(&one);
        singles.push(enc.encode(&one, 1).unwrap());
    }
    let all = enc.encode(&batch, 4).unwrap();
    for (i, c) in exp.crops.iter().enumerate() {
        let e = &all[i * 64..(i + 1) * 64];
        let e64: Vec<f64> = e.iter().map(|&v| f64::from(v)).collect();
        let d = max_diff(&e64, &c.embedding);
        assert!(d < 1e-4, "{}: embedding differs by {d:e}", c.crop);
        let s64: Vec<f64> = singles[i].iter().map(|&v| f64::from(v)).collect();
        assert!(max_diff(&s64, &e64) < 1e-5, "batch of 1 vs 4 differ");
        compare(&scorer.score(e).unwrap(), c, 1e-5);
    }
    assert!(matches!(
        enc.encode(&batch[..10], 1),
        Err(dfwatch::encode::EncodeError::BatchShape { .. })
    ));
}

#[test]
fn the_encoder_thread_batches_by_size_and_deadline_and_loses_nothing() {
    use dfwatch::channel::{FullPolicy, bounded};
    use dfwatch::encode::{EncodeJob, EncoderConfig, run_encoder};
    use std::num::NonZeroUsize;
    use std::time::{Duration, Instant};

    let (bundle, _) = bundle_and_scorer();
    onnx::init(&OnnxConfig::default()).expect("ONNX Runtime (run ./tools/setup.sh)");
    let enc = CpuEncoder::new(&bundle).unwrap();
    let exp = expected();
    let mut crops = Vec::new();
    for c in &exp.crops {
        let rgb = load_crop(&Path::new(DIR).join(&c.crop), 224).unwrap();
        let mut px = vec![0.0f32; enc.crop_len()];
        enc.normalise_into(&rgb, &mut px);
        crops.push(px);
    }
    let cap = NonZeroUsize::new(16).unwrap();
    let (jobs_tx, jobs_rx) = bounded("jobs", cap, FullPolicy::Block);
    let (out_tx, out_rx) = bounded("embedded", cap, FullPolicy::Block);
    let cfg = EncoderConfig {
        max_batch: NonZeroUsize::new(4).unwrap(),
        max_wait: Duration::from_millis(100),
        ..EncoderConfig::default()
    };
    let worker = std::thread::spawn(move || run_encoder(enc, &cfg, jobs_rx, out_tx));
    // Three crops: no batch fills, so the deadline sends them together.
    let t0 = Instant::now();
    for (i, px) in crops.iter().take(3).enumerate() {
        jobs_tx
            .send(EncodeJob {
                input: FaceInput::Pixels(px.clone()),
                meta: i,
            })
            .unwrap();
    }
    let first: Vec<_> = (0..3)
        .map(|_| out_rx.recv_timeout(Duration::from_secs(10)).unwrap())
        .collect();
    assert!(t0.elapsed() >= Duration::from_millis(100));
    assert!(first.iter().all(|e| e.batch_size == 3));
    // Six more, then close: one full batch of 4, then the rest at shutdown.
    for i in 3..9 {
        jobs_tx
            .send(EncodeJob {
                input: FaceInput::Pixels(crops[i % 4].clone()),
                meta: i,
            })
            .unwrap();
    }
    drop(jobs_tx);
    let rest: Vec<_> = std::iter::from_fn(|| out_rx.recv()).collect();
    assert_eq!(worker.join().unwrap(), 0, "no batch failed");
    let all: Vec<_> = first.into_iter().chain(rest).collect();
    assert_eq!(
        all.iter().map(|e| e.meta).collect::<Vec<_>>(),
        (0..9).collect::<Vec<_>>()
    );
    assert_eq!(
        all.iter().map(|e| e.batch_size).collect::<Vec<_>>(),
        vec![3, 3, 3, 4, 4, 4, 4, 2, 2]
    );
    for e in &all {
        let want = &exp.crops[e.meta % 4].embedding;
        let got: Vec<f64> = e.embedding.iter().map(|&v| f64::from(v)).collect();
        assert!(max_diff(&got, want) < 1e-4);
    }
}

/// A track's end travels through the encode queue behind its faces: the encoder sends the
/// batch in hand before it, so the end can never overtake its track's last embedding (it
/// used to travel on a side channel that raced the embeddings).
#[test]
fn a_track_end_leaves_the_encoder_after_its_faces_and_before_later_ones() {
    use dfwatch::channel::{FullPolicy, bounded, bounded_keeping};
    use dfwatch::encode::{EncodeJob, Encoded, EncoderConfig, Queued, run_encoder_until};
    use std::num::NonZeroUsize;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    let (bundle, _) = bundle_and_scorer();
    onnx::init(&OnnxConfig::default()).expect("ONNX Runtime (run ./tools/setup.sh)");
    let enc = CpuEncoder::new(&bundle).unwrap();
    let rgb = load_crop(&Path::new(DIR).join(&expected().crops[0].crop), 224).unwrap();
    let mut px = vec![0.0f32; enc.crop_len()];
    enc.normalise_into(&rgb, &mut px);
    let cap = NonZeroUsize::new(16).unwrap();
    let (jobs_tx, jobs_rx) =
        bounded_keeping("encode", cap, FullPolicy::DropOldest, Queued::must_keep);
    let (out_tx, out_rx) = bounded("embedded", cap, FullPolicy::Block);
    // A long deadline: without the end in the queue, the two faces would wait for it.
    let cfg = EncoderConfig {
        max_batch: NonZeroUsize::new(8).unwrap(),
        max_wait: Duration::from_secs(5),
        ..EncoderConfig::default()
    };
    let face = |track: &'static str| {
        Queued::Face(EncodeJob {
            input: FaceInput::Pixels(px.clone()),
            meta: track,
        })
    };
    let t0 = Instant::now();
    for item in [face("a"), face("a"), Queued::Pass("end of a"), face("b")] {
        jobs_tx.send(item).unwrap();
    }
    let worker = std::thread::spawn(move || {
        run_encoder_until(
            enc,
            &cfg,
            jobs_rx,
            out_tx,
            &AtomicBool::new(false),
            &dfwatch::fault::Restarts::default(),
            &mut |_, _| {},
        )
    });
    let first: Vec<String> = (0..3)
        .map(
            |_| match out_rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                Encoded::Face(e) => format!("{} (batch {})", e.meta, e.batch_size),
                Encoded::Pass(p) => p.to_string(),
            },
        )
        .collect();
    assert_eq!(first, ["a (batch 2)", "a (batch 2)", "end of a"]);
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the end flushed the batch in hand instead of waiting for its deadline"
    );
    drop(jobs_tx);
    let rest: Vec<_> = std::iter::from_fn(|| out_rx.recv()).collect();
    assert!(matches!(&rest[..], [Encoded::Face(e)] if e.meta == "b"));
    assert_eq!(worker.join().unwrap(), 0);
}

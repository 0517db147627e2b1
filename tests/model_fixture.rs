//! The committed tiny fixture (tests/fixtures/tiny, made by `tools/model.py fixture`): the
//! Rust pipeline (bundle loader, ONNX Runtime encoder, scorer) against the float64 numpy
//! reference.

use std::path::Path;

use dfwatch::app::score_images::load_crop;
use dfwatch::encode::CpuEncoder;
use dfwatch::model::ModelBundle;
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

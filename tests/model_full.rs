//! Full-size synthetic ViT-B/32 against the float64 numpy reference, within 1e-3 on 4 crops
//! whose q0 lie between 0.05 and 0.95. The bundle (350 MB) is made from its seed, never
//! committed; .ci/run makes it and runs this test with `--ignored`:
//!
//! ```sh
//! .venv/bin/python tools/model.py synth --arch vit-b-32 --seed 1 --out var/models/vitb32-synth
//! .venv/bin/python tools/model.py checkset --model var/models/vitb32-synth --out var/models/vitb32-check
//! cargo test --release --test model_full -- --ignored
//! ```

use std::path::PathBuf;

use dfwatch::encode::CpuEncoder;
use dfwatch::model::ModelBundle;
use dfwatch::offline::score_images::load_crop;
use dfwatch::onnx::{self, OnnxConfig};
use dfwatch::score::Scorer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    crops: Vec<Crop>,
}

#[derive(Deserialize)]
struct Crop {
    crop: String,
    embedding: Vec<f64>,
    logits: Vec<f64>,
    log_z: f64,
    logit_q0: f64,
    q0: f64,
    marginals: Vec<f64>,
}

fn dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(default))
}

#[test]
#[ignore = "needs the full-size synthetic bundle made from its seed (see the file's doc)"]
fn full_size_vit_b_32_matches_the_numpy_reference_within_1e_3() {
    let bundle_dir = dir("DFWATCH_FULL_BUNDLE", "var/models/vitb32-synth");
    let check = dir("DFWATCH_FULL_CHECKSET", "var/models/vitb32-check");
    let bundle = ModelBundle::load(&bundle_dir).unwrap();
    assert_eq!(bundle.architecture().width, 768);
    assert_eq!(bundle.architecture().layers, 12);
    let exp: Expected =
        serde_json::from_str(&std::fs::read_to_string(check.join("expected.json")).unwrap())
            .unwrap();
    assert_eq!(exp.crops.len(), 4);
    onnx::init(&OnnxConfig::default()).unwrap();
    let mut enc = CpuEncoder::new(&bundle).unwrap();
    let scorer = Scorer::new(bundle.graph.clone(), &bundle.text_embeddings, 512).unwrap();
    let mut px = vec![0.0f32; enc.crop_len()];
    let mut worst = 0.0f64;
    for c in &exp.crops {
        assert!((0.05..=0.95).contains(&c.q0), "{}: q0 {}", c.crop, c.q0);
        let rgb = load_crop(&check.join(&c.crop), 224).unwrap();
        enc.normalise_into(&rgb, &mut px);
        let e = enc.encode(&px, 1).unwrap();
        let d = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f64, f64::max)
        };
        let e64: Vec<f64> = e.iter().map(|&v| f64::from(v)).collect();
        let s = scorer.score(&e).unwrap();
        let diffs = [
            d(&e64, &c.embedding),
            d(&s.logits, &c.logits),
            d(&s.marginals, &c.marginals),
            (s.log_z - c.log_z).abs(),
            (s.logit_q0 - c.logit_q0).abs(),
        ];
        let w = diffs.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "{}: q0 {:.4} (reference {:.4}), largest difference {w:.2e}",
            c.crop, s.q0, c.q0
        );
        assert!(w <= 1e-3, "{}: {diffs:?}", c.crop);
        worst = worst.max(w);
    }
    eprintln!("largest difference over the 4 crops: {worst:.2e}");
}

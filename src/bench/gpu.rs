//! `dfwatch bench gpu`: the GPU backend's parts and the daemon's GPU path under load, on the
//! device `--device` (runs only where a GPU exists; tools/gpu-check.sh runs it beside the
//! PyTorch baselines of tools/torch_baseline.py).
//!
//! - crop: faces/s of the fused crop kernel (1080p RGB frame, 256 faces a launch, straight
//!   into the engine's input), beside the device's memory-bandwidth bound for the bytes a face
//!   moves (its fp16 output written, its source pixels read once);
//! - encoder: faces/s at each bucket through its CUDA graph, and latency at batch 1 with and
//!   without the graph;
//! - peak device memory (driver's used bytes after everything ran);
//! - streams: N simulated 1080p30 streams with K = 1 and K = 4 faces through the daemon's GPU
//!   encoder (upload, crop, encode; batches of `[encoder] max_batch`): faces/s and frames/s
//!   sustained, the upload share of the time, and the largest N at the default scoring cadence
//!   (each face scored every `[track] score_every`).

#[cfg(feature = "cuda")]
use std::time::Instant;

/// `dfwatch bench gpu`.
#[derive(clap::Parser)]
struct Args {
    /// Model bundle (the full-size synthetic ViT-B/32 by default).
    #[arg(long, default_value = "var/models/vitb32-synth")]
    model: std::path::PathBuf,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let args: Args = super::parse_args("gpu", args);
    #[cfg(feature = "cuda")]
    {
        measure(&args)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = args;
        anyhow::bail!("{}", dfwatch::gpu::GpuError::FeatureDisabled)
    }
}

#[cfg(feature = "cuda")]
fn measure(args: &Args) -> anyhow::Result<()> {
    use std::sync::Arc;

    use anyhow::Context;
    use dfwatch::crop::align::Affine;
    use dfwatch::encode::{BatchEncoder, FaceInput};
    use dfwatch::gpu::backend::{DeviceEncoder, FaceDevice, Tower};
    use dfwatch::gpu::device::CudaFaceDevice;
    use dfwatch::gpu::vit::BUCKETS;
    use dfwatch::model::ModelBundle;

    dfwatch::gpu::check_backend(&dfwatch::gpu::GpuConfig {
        device: u32::try_from(args.device)?,
    })?;
    let bundle = ModelBundle::load(&args.model)
        .with_context(|| format!("model bundle {}", args.model.display()))?;
    let (tower, src) = Tower::load(&bundle)?;
    let mut dev = CudaFaceDevice::from_source(&src, &tower, args.device)?;
    let shape = *dev.shape();
    let size = shape.image_size;
    let seconds = args.seconds.max(0.1);
    let mut report = serde_json::Map::new();

    // Frames: 1080p RGB with texture, one per simulated stream.
    let frame = |seed: u64| -> Arc<dfwatch::types::Frame> {
        let (w, h) = (1920u32, 1080u32);
        let data: Vec<u8> = (0..(w * h) as usize)
            .flat_map(|p| {
                let (x, y) = ((p % w as usize) as u64, (p / w as usize) as u64);
                [
                    (x + seed) as u8,
                    (y * 3 + seed) as u8,
                    ((x ^ y) + seed) as u8,
                ]
            })
            .collect();
        Arc::new(
            dfwatch::types::Frame::packed_rgb(
                dfwatch::types::StreamId::new("bench").expect("literal id"),
                seed,
                None,
                Instant::now(),
                (w, h),
                data.into(),
            )
            .expect("a well-formed frame"),
        )
    };
    // A face of about 200 px somewhere in the frame: the fused crop's map.
    let face_map = |k: usize| -> Affine {
        let s = 200.0 / size as f64;
        let a = 0.05 * (k % 7) as f64 - 0.15;
        let (c, si) = (a.cos() * s, a.sin() * s);
        Affine([
            [c, -si, 100.0 + 150.0 * (k % 10) as f64],
            [si, c, 100.0 + 120.0 * (k / 10 % 7) as f64],
        ])
    };

    // 1. The crop kernel: 256 faces of one frame a launch, the frame uploaded once; then the
    //    upload of a 1080p frame alone.
    let f0 = frame(1);
    let maps: Vec<Affine> = (0..256).map(face_map).collect();
    dev.begin(256)?;
    let up = dev.upload(&f0, &maps)?;
    dev.launch(&up, 256, 0)?;
    dev.engine.ops.stream.synchronize()?;
    let timed = |dev: &mut CudaFaceDevice,
                 f: &mut dyn FnMut(&mut CudaFaceDevice) -> anyhow::Result<()>|
     -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed().as_secs_f64() < seconds || n < 3 {
            for _ in 0..16 {
                f(dev)?;
            }
            dev.engine.ops.stream.synchronize()?;
            n += 16;
        }
        Ok(t.elapsed().as_secs_f64() / n as f64)
    };
    let crop_only = timed(&mut dev, &mut |d| {
        d.launch(&up, 256, 0)?;
        Ok(())
    })?;
    let upload = timed(&mut dev, &mut |d| {
        d.upload(&f0, &maps[..1])?;
        Ok(())
    })?;
    let crop_fps = 256.0 / crop_only;
    let bytes_per_face = (3 * size * size * 2 + 3 * size * size) as f64;
    let bandwidth = dev_bandwidth(&dev).unwrap_or(0.0);
    let bound = if bandwidth > 0.0 {
        bandwidth / bytes_per_face
    } else {
        f64::NAN
    };
    println!(
        "crop: {crop_fps:.0} faces/s ({:.1} us per 256-face launch; a 1080p frame's upload \
         {:.2} ms); \
         memory-bandwidth bound {bound:.0} faces/s ({:.0}% of it); target >= 1,000,000 or 50%",
        crop_only * 1e6,
        upload * 1e3,
        100.0 * crop_fps / bound
    );
    report.insert(
        "crop".into(),
        serde_json::json!({
            "faces_per_s": crop_fps, "launch_us": crop_only * 1e6, "upload_1080p_ms": upload * 1e3,
            "bandwidth_bytes_per_s": bandwidth, "bound_faces_per_s": bound,
        }),
    );

    // 2. The encoder per bucket through its graph, and batch 1 eager vs graph.
    let mut buckets = Vec::new();
    for &b in BUCKETS {
        let plan = dev.engine.bucket(b)?.clone();
        let iters = 10;
        let per = dev.engine.run_timed(&plan, true, iters)?;
        println!(
            "encoder bucket {b:>3}: {:.0} faces/s ({:.3} ms a batch, graph)",
            b as f64 / per,
            per * 1e3
        );
        buckets.push(
            serde_json::json!({ "batch": b, "faces_per_s": b as f64 / per, "ms": per * 1e3 }),
        );
    }
    let p1 = dev.engine.bucket(1)?.clone();
    let eager = dev.engine.run_timed(&p1, false, 50)?;
    let graph = dev.engine.run_timed(&p1, true, 50)?;
    println!(
        "latency at batch 1: {:.3} ms eager, {:.3} ms with the CUDA graph",
        eager * 1e3,
        graph * 1e3
    );
    report.insert("encoder".into(), serde_json::json!(buckets));
    report.insert(
        "batch1_ms".into(),
        serde_json::json!({ "eager": eager * 1e3, "graph": graph * 1e3 }),
    );

    // 3. Simulated streams through the daemon's GPU encoder (upload, crop, encode).
    let score_every = dfwatch::track::TrackConfig::default()
        .score_every
        .as_secs_f64();
    let max_batch = dfwatch::encode::EncoderConfig::default().max_batch.get();
    let frames: Vec<_> = (0..16).map(|i| frame(10 + i)).collect();
    drop(dev);
    let mut first = Some(src);
    let ordinal = args.device;
    let make = move || {
        let s = match first.take() {
            Some(s) => s,
            None => tower.reread()?,
        };
        let mut d = CudaFaceDevice::from_source(&s, &tower, ordinal)?;
        d.warm(max_batch)?;
        Ok(d)
    };
    let mut enc = DeviceEncoder::spawn("gpu-bench", Box::new(make))?;

    // The daemon's GPU path against its CPU twin (the crop of crate::crop::warp and the
    // engine's fp16 emulation): 4 faces of 2 frames, each crop straight into the batch.
    let check: Vec<FaceInput> = (0..4)
        .map(|i| FaceInput::Aligned {
            frame: frames[i / 2].clone(),
            inverse: face_map(3 * i),
        })
        .collect();
    let refs: Vec<&FaceInput> = check.iter().collect();
    let on_gpu = enc.encode_inputs(&refs)?;
    let on_cpu = dfwatch::gpu::backend::twin_encoder(&bundle)?.encode_inputs(&refs)?;
    let d = shape.embed_dim;
    let mut worst_cos = 1.0f64;
    for (g, c) in on_gpu.chunks_exact(d).zip(on_cpu.chunks_exact(d)) {
        worst_cos = worst_cos.min(dfwatch::score::math::cosine(g, c));
    }
    println!(
        "GPU path vs its CPU twin (4 faces of 2 frames): lowest embedding cosine {worst_cos:.6}"
    );
    report.insert("twin_cosine_min".into(), serde_json::json!(worst_cos));

    let mut streams = Vec::new();
    for k in [1usize, 4] {
        // Batches of max_batch faces, K consecutive faces per frame, frames rotating.
        let mut inputs = Vec::new();
        let mut fi = 0;
        while inputs.len() < 64 * max_batch {
            for j in 0..k {
                inputs.push(FaceInput::Aligned {
                    frame: frames[fi % frames.len()].clone(),
                    inverse: face_map(j),
                });
            }
            fi += 1;
        }
        let t = Instant::now();
        let (mut faces, mut batches) = (0usize, 0usize);
        while t.elapsed().as_secs_f64() < seconds || batches < 3 {
            let start = (batches * max_batch) % inputs.len();
            let batch: Vec<&FaceInput> = inputs[start..start + max_batch].iter().collect();
            enc.encode_inputs(&batch)?;
            faces += max_batch;
            batches += 1;
        }
        let s = t.elapsed().as_secs_f64();
        let faces_s = faces as f64 / s;
        let frames_s = faces_s / k as f64;
        // Each stream has one frame with K due faces every score_every.
        let n_max = (frames_s * score_every).floor();
        let upload_share = (frames_s * upload).min(1.0);
        println!(
            "streams, K = {k}: {faces_s:.0} faces/s, {frames_s:.0} frames/s through upload + crop \
             + encode (batches of {max_batch}); upload {:.0}% of the time; largest N at one \
             scoring every {score_every}s per face: {n_max}",
            100.0 * upload_share
        );
        streams.push(serde_json::json!({
            "k": k, "faces_per_s": faces_s, "frames_per_s": frames_s,
            "upload_share": upload_share, "max_streams": n_max,
        }));
    }
    report.insert("streams".into(), serde_json::json!(streams));
    let stats = enc.stats()?;
    if let Some(used) = stats.used_bytes {
        println!(
            "device memory in use (all processes, as the driver reports): {:.0} MiB",
            used as f64 / (1 << 20) as f64
        );
        report.insert("device_used_bytes".into(), serde_json::json!(used));
    }
    report.insert("frame_uploads".into(), serde_json::json!(stats.uploads));
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    // The fp16 engine against its own emulation stays far above this; a wrong slot, a wrong
    // map or a crop written past its face would not.
    anyhow::ensure!(
        worst_cos >= 0.999,
        "the GPU path parts from its CPU twin: lowest cosine {worst_cos:.6} < 0.999"
    );
    Ok(())
}

/// Peak memory bandwidth in bytes/s from the device's memory clock and bus width.
#[cfg(feature = "cuda")]
fn dev_bandwidth(dev: &dfwatch::gpu::device::CudaFaceDevice) -> Option<f64> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let ctx = &dev.engine.ops.ctx;
    let clock_khz = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
        .ok()?;
    let bus_bits = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
        .ok()?;
    Some(2.0 * f64::from(clock_khz) * 1e3 * f64::from(bus_bits) / 8.0)
}

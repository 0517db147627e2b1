//! `dfwatch gpu-check`: what only a GPU can confirm about the native engine, in one report.
//!
//! 1. Every kernel (and each GEMM layout) against its CPU twin ([`CpuOps`] in fp16 emulation)
//!    on random inputs; the first failing operation is named.
//! 2. The crop kernel against the CPU fused crop on a synthetic frame (>= 99.9% of values
//!    within 1/255).
//! 3. The engine (CUDA graph) against the engine on [`CpuOps`] (fp16 emulation) on seeded crops:
//!    every logit and log Z within 0.02, q0 within 0.01; on failure, the first block where the
//!    residual streams part.
//! 4. Speed: faces/s per bucket eager and through the graph, batch-1 latency both ways, peak
//!    device memory, the achieved fraction of the GPU's fp16 peak and per-operation times.
//!
//! It writes `report.json`, and `inputs.f32` / `embeddings.f32` / `reference.f32` (raw
//! little-endian f32: the crops, the GPU engine's and the CPU twin's embeddings) that
//! tools/torch_baseline.py compares with the PyTorch tower.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use super::cpu::{CpuEngine, CpuOps, Precision};
use super::cuda::{CudaEngine, CudaOps};
use super::ops::{Buf, GemmSpec, Ops, WeightLayout, gemm_spec};
use super::{Act, BUCKETS, EngineError, Plan, VitShape, forward};
use crate::model::ModelBundle;
use crate::score::Scorer;

/// What to check.
pub struct CheckArgs<'a> {
    pub model: &'a Path,
    pub out: &'a Path,
    /// Crops compared end to end.
    pub crops: usize,
    pub seed: u64,
    /// Timed forwards per bucket and mode.
    pub iters: usize,
}

fn io(e: std::io::Error) -> EngineError {
    EngineError::Device(format!("writing the report: {e}"))
}

fn write_f32(path: &Path, v: &[f32]) -> Result<(), EngineError> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(io)
}

/// Dense fp16 tensor-core peak (FLOP/s) of the GPUs this project meets, for the achieved
/// fraction; `None` for others.
fn fp16_peak(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    [
        ("H200", 989.4e12),
        ("H100", 989.4e12),
        ("A100", 312e12),
        ("L40S", 362e12),
        ("L4", 121e12),
        ("A10", 125e12),
    ]
    .iter()
    .find(|(k, _)| n.contains(k))
    .map(|(_, v)| *v)
}

fn random(rng: &mut fastrand::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()
}

/// Both implementations, on one plan's buffers.
struct Pair {
    cpu: CpuOps,
    gpu: CudaOps,
}

impl Pair {
    fn write(&mut self, b: Buf, v: &[f32]) -> Result<(), EngineError> {
        self.cpu.write(b, v)?;
        let stored: Vec<f32> = v.iter().map(|&x| self.cpu.store_to(b.act, x)).collect();
        self.gpu.write(b, &stored)
    }

    /// Uploads to both sides; both number their weights in upload order, so one handle
    /// serves both.
    fn upload(&mut self, v: &[f32]) -> Result<usize, EngineError> {
        let (c, g) = (self.cpu.upload("w", v)?, self.gpu.upload("w", v)?);
        if c != g {
            return Err(EngineError::Layout(format!(
                "weight handles part: cpu {c}, gpu {g}"
            )));
        }
        Ok(c)
    }

    /// Runs one operation on the CPU twin, then on the device.
    fn both(
        &mut self,
        op: impl Fn(&mut dyn Ops<Weight = usize>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        op(&mut self.cpu)?;
        op(&mut self.gpu)
    }

    /// Largest error of `b`'s first `n` values, scaled by `atol + rtol * |cpu|`; <= 1 passes.
    fn compare(&self, b: Buf, n: usize, atol: f32, rtol: f32) -> Result<(f32, f32), EngineError> {
        let (c, g) = (self.cpu.read(b, n)?, self.gpu.download(b, n)?);
        let mut worst = (0.0f32, 0.0f32);
        for (x, y) in c.iter().zip(&g) {
            let d = (x - y).abs();
            let r = if d.is_nan() {
                f32::INFINITY
            } else {
                d / (atol + rtol * x.abs())
            };
            if r > worst.0 {
                worst = (r, d);
            }
        }
        Ok(worst)
    }
}

/// Every kernel and GEMM layout against its twin; returns one entry per operation.
fn kernels(shape: &VitShape, seed: u64) -> Result<Vec<Value>, EngineError> {
    let batch = 2;
    let plan = Plan::new(shape, batch)?;
    let mut p = Pair {
        cpu: CpuOps::new(Precision::F16, plan.len),
        gpu: CudaOps::new(0)?,
    };
    let arena = p
        .gpu
        .stream
        .alloc_zeros::<u8>(plan.bytes())
        .map_err(|e| EngineError::Device(format!("{e:?}")))?;
    let base = {
        use cudarc::driver::DevicePtr;
        let (ptr, _sync) = arena.device_ptr(&p.gpu.stream);
        ptr
    };
    p.gpu.set_arena(base, plan.len);
    let mut rng = fastrand::Rng::with_seed(seed);
    let b = |a: Act| plan.buf(a);
    let (w, t, m) = (shape.width, shape.tokens(), shape.mlp_width);
    let rows = batch * t;
    let mut out = Vec::new();
    let mut record = |name: &str, worst: (f32, f32)| {
        out.push(
            json!({"op": name, "largest_error": worst.1, "error_over_tolerance": worst.0,
                        "pass": worst.0 <= 1.0}),
        );
    };
    let ew = (2e-3f32, 2e-3f32); // one or two fp16 steps
    let crops = random(&mut rng, shape.len(Act::Crops, batch), 2.0);
    p.write(b(Act::Crops), &crops)?;
    p.both(|o| {
        o.patchify(
            b(Act::Crops),
            b(Act::Patches),
            batch,
            shape.image_size,
            shape.patch,
        )
    })?;
    record(
        "patchify",
        p.compare(b(Act::Patches), shape.len(Act::Patches, batch), 0.0, 1e-6)?,
    );

    // Every GEMM layout the forward uses: (name, rows, inputs, outputs, weight layout, a, c).
    let pq = shape.patches() * batch;
    let pp = 3 * shape.patch * shape.patch;
    let gemms = [
        (
            "gemm conv1 (weight [out, in])",
            pq,
            pp,
            w,
            WeightLayout::OutIn,
            Act::Patches,
            Act::Projected,
        ),
        (
            "gemm in_proj",
            rows,
            w,
            3 * w,
            WeightLayout::OutIn,
            Act::Normed,
            Act::Qkv,
        ),
        (
            "gemm c_fc",
            rows,
            w,
            m,
            WeightLayout::OutIn,
            Act::Normed,
            Act::Hidden,
        ),
        (
            "gemm c_proj",
            rows,
            m,
            w,
            WeightLayout::OutIn,
            Act::Hidden,
            Act::Branch,
        ),
        (
            "gemm proj (weight [in, out], fp32 out)",
            batch,
            w,
            shape.embed_dim,
            WeightLayout::InOut,
            Act::Class,
            Act::Embedding,
        ),
    ];
    for (name, r, inputs, outputs, layout, a, c) in gemms {
        let spec = gemm_spec(r, inputs, outputs, layout);
        p.write(b(a), &random(&mut rng, b(a).len, 1.0))?;
        let scale = 1.0 / (inputs as f32).sqrt();
        let wt = p.upload(&random(&mut rng, inputs * outputs, scale))?;
        p.both(|o| o.gemm(&spec, wt, b(a), b(c)))?;
        // Outputs are O(1); accumulation order differs between the two.
        record(name, p.compare(b(c), spec.m * spec.n, 4e-3, 4e-3)?);
    }

    let (class, pos) = (
        p.upload(&random(&mut rng, w, 1.0))?,
        p.upload(&random(&mut rng, t * w, 1.0))?,
    );
    let proj = random(&mut rng, shape.len(Act::Projected, batch), 1.0);
    p.write(b(Act::Projected), &proj)?;
    p.both(|o| {
        o.embed_tokens(
            b(Act::Projected),
            class,
            pos,
            b(Act::Stream),
            batch,
            shape.patches(),
            w,
        )
    })?;
    record(
        "embed_tokens",
        p.compare(b(Act::Stream), rows * w, 1e-6, 1e-6)?,
    );

    let (g, be) = (
        p.upload(&random(&mut rng, w, 1.5))?,
        p.upload(&random(&mut rng, w, 0.5))?,
    );
    p.both(|o| o.add_layernorm(b(Act::Stream), None, None, b(Act::Stream), g, be, rows, w))?;
    record(
        "layernorm_f32 (ln_pre, in place)",
        p.compare(b(Act::Stream), rows * w, 1e-4, 1e-4)?,
    );

    let branch = random(&mut rng, rows * w, 1.0);
    p.write(b(Act::Branch), &branch)?;
    p.both(|o| {
        o.add_layernorm(
            b(Act::Stream),
            Some(b(Act::Branch)),
            Some(b(Act::Stream)),
            b(Act::Normed),
            g,
            be,
            rows,
            w,
        )
    })?;
    let sum = p.compare(b(Act::Stream), rows * w, 1e-5, 1e-5)?;
    let norm = p.compare(b(Act::Normed), rows * w, ew.0, ew.1)?;
    record("add_layernorm (residual sum)", sum);
    record("add_layernorm (fp16 norm)", norm);

    let bias = p.upload(&random(&mut rng, 3 * w, 1.0))?;
    let qkv = random(&mut rng, rows * 3 * w, 1.0);
    p.write(b(Act::Qkv), &qkv)?;
    p.both(|o| o.add_bias(b(Act::Qkv), bias, rows, 3 * w))?;
    record(
        "add_bias",
        p.compare(b(Act::Qkv), rows * 3 * w, ew.0, ew.1)?,
    );
    p.both(|o| o.attention(b(Act::Qkv), b(Act::Heads), batch, t, w, shape.heads))?;
    record("attention", p.compare(b(Act::Heads), rows * w, ew.0, ew.1)?);

    let fc = p.upload(&random(&mut rng, m, 1.0))?;
    let hidden = random(&mut rng, rows * m, 3.0);
    p.write(b(Act::Hidden), &hidden)?;
    p.both(|o| o.bias_quick_gelu(b(Act::Hidden), fc, rows, m))?;
    record(
        "bias_quick_gelu",
        p.compare(b(Act::Hidden), rows * m, ew.0, ew.1)?,
    );

    // Fresh input: the Normed of the LayerNorm check may differ by an fp16 step per side.
    let normed = random(&mut rng, rows * w, 1.0);
    p.write(b(Act::Normed), &normed)?;
    p.both(|o| o.take_rows(b(Act::Normed), b(Act::Class), batch, t, w))?;
    record("take_rows", p.compare(b(Act::Class), batch * w, 0.0, 1e-6)?);
    drop(arena);
    Ok(out)
}

/// Seeded crops: smooth colour fields plus noise, normalised like CLIP's input, so that
/// activations look like a face crop's rather than white noise.
fn seeded_crops(shape: &VitShape, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let s = shape.image_size;
    let mut out = Vec::with_capacity(n * shape.crop_len());
    for _ in 0..n {
        let waves: Vec<[f32; 4]> = (0..4)
            .map(|_| {
                [
                    rng.f32() * 6.0,
                    rng.f32() * 6.0,
                    rng.f32() * 6.3,
                    rng.f32() * 0.8,
                ]
            })
            .collect();
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let (u, v) = (x as f32 / s as f32, y as f32 / s as f32);
                    let mut val = 0.0;
                    for (k, wv) in waves.iter().enumerate() {
                        val += wv[3]
                            * (wv[0] * u + wv[1] * v + wv[2] + c as f32 * (k as f32 + 1.0)).sin();
                    }
                    out.push(val + (rng.f32() - 0.5) * 0.2);
                }
            }
        }
    }
    out
}

/// A forward whose every operation waits for the device, timing each kind.
struct Profiled<'a> {
    ops: &'a mut CudaOps,
    times: BTreeMap<&'static str, (f64, usize)>,
}

impl Profiled<'_> {
    fn time<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut CudaOps) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let t = Instant::now();
        let r = f(self.ops)?;
        self.ops
            .stream
            .synchronize()
            .map_err(|e| EngineError::Device(format!("{e:?}")))?;
        let e = self.times.entry(name).or_default();
        e.0 += t.elapsed().as_secs_f64();
        e.1 += 1;
        Ok(r)
    }
}

impl Ops for Profiled<'_> {
    type Weight = usize;
    fn upload(&mut self, n: &str, v: &[f32]) -> Result<usize, EngineError> {
        self.ops.upload(n, v)
    }
    fn weight_len(&self, w: usize) -> usize {
        self.ops.weight_len(w)
    }
    fn patchify(
        &mut self,
        c: Buf,
        o: Buf,
        b: usize,
        s: usize,
        p: usize,
    ) -> Result<(), EngineError> {
        self.time("patchify", |x| x.patchify(c, o, b, s, p))
    }
    fn gemm(&mut self, s: &GemmSpec, w: usize, a: Buf, c: Buf) -> Result<(), EngineError> {
        let name = match (a.act, c.act) {
            (_, Act::Qkv) => "gemm in_proj",
            (_, Act::Projected) => "gemm conv1",
            (_, Act::Hidden) => "gemm c_fc",
            (Act::Hidden, _) => "gemm c_proj",
            (_, Act::Embedding) => "gemm proj",
            _ => "gemm out_proj",
        };
        self.time(name, |x| x.gemm(s, w, a, c))
    }
    fn embed_tokens(
        &mut self,
        p: Buf,
        c: usize,
        pos: usize,
        o: Buf,
        b: usize,
        n: usize,
        w: usize,
    ) -> Result<(), EngineError> {
        self.time("embed_tokens", |x| x.embed_tokens(p, c, pos, o, b, n, w))
    }
    fn add_layernorm(
        &mut self,
        x: Buf,
        r: Option<Buf>,
        s: Option<Buf>,
        n: Buf,
        g: usize,
        b: usize,
        rows: usize,
        w: usize,
    ) -> Result<(), EngineError> {
        self.time("add_layernorm", |o| {
            o.add_layernorm(x, r, s, n, g, b, rows, w)
        })
    }
    fn add_bias(&mut self, x: Buf, b: usize, r: usize, c: usize) -> Result<(), EngineError> {
        self.time("add_bias", |o| o.add_bias(x, b, r, c))
    }
    fn bias_quick_gelu(&mut self, x: Buf, b: usize, r: usize, c: usize) -> Result<(), EngineError> {
        self.time("bias_quick_gelu", |o| o.bias_quick_gelu(x, b, r, c))
    }
    fn attention(
        &mut self,
        q: Buf,
        o: Buf,
        b: usize,
        t: usize,
        w: usize,
        h: usize,
    ) -> Result<(), EngineError> {
        self.time("attention", |x| x.attention(q, o, b, t, w, h))
    }
    fn take_rows(
        &mut self,
        s: Buf,
        d: Buf,
        c: usize,
        st: usize,
        w: usize,
    ) -> Result<(), EngineError> {
        self.time("take_rows", |x| x.take_rows(s, d, c, st, w))
    }
}

/// The largest value, infinite when any is NaN (a NaN must fail a check, not vanish in a max).
fn largest(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(
        0.0,
        |m, x| if x.is_nan() { f64::INFINITY } else { m.max(x) },
    )
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    largest(a.iter().zip(b).map(|(x, y)| (x - y).abs()))
}

/// Runs every check; writes `report.json` and the raw embeddings under `args.out`. The report
/// is returned whether or not a check failed (`pass` says).
pub fn run(args: &CheckArgs<'_>) -> Result<Value, EngineError> {
    std::fs::create_dir_all(args.out).map_err(io)?;
    let bundle = ModelBundle::load(args.model).map_err(|e| EngineError::Bundle(e.to_string()))?;
    let shape = VitShape::new(bundle.architecture())?;
    let mut report = serde_json::Map::new();
    let info = crate::gpu::probe();
    report.insert("devices".into(), json!(info.devices));
    let device = info
        .devices
        .first()
        .map(|d| d.name.clone())
        .unwrap_or_default();

    // 1. Kernels against their twins.
    let t = Instant::now();
    let ks = kernels(&shape, args.seed)?;
    let first_failing = ks
        .iter()
        .find(|k| k["pass"] == json!(false))
        .map(|k| k["op"].clone());
    report.insert(
        "kernels".into(),
        json!({"ops": ks, "first_failing": first_failing,
        "pass": first_failing.is_none(), "seconds": t.elapsed().as_secs_f64()}),
    );

    // 2. The crop kernel.
    let frame = synthetic_frame(1280, 720, args.seed);
    let crop = match crate::gpu::crop::check_crop_image(&frame) {
        Ok((n, within, worst)) => json!({"values": n, "within_1_255": within,
            "largest_difference_255": worst, "pass": within >= 0.999}),
        Err(e) => json!({"error": e.to_string(), "pass": false}),
    };
    report.insert("crop".into(), crop);

    // 3. The engine against its CPU twin.
    let n = args.crops.max(1);
    let crops = seeded_crops(&shape, n, args.seed);
    let mut gpu = CudaEngine::new(&bundle, 0)?;
    let mut cpu = CpuEngine::new(&bundle, Precision::F16)?;
    let d = shape.embed_dim;
    let eager = gpu.encode(&crops, n, false)?;
    // The first graph call captures (and returns the eager pass's result); the graph itself
    // is checked on a replay after a fresh upload, with the output poisoned first.
    gpu.encode(&crops, n, true)?;
    let plan = gpu.upload(&crops, n)?;
    let out = plan.buf(Act::Embedding);
    gpu.ops.write(out, &vec![f32::NAN; out.len])?;
    let replayed = gpu.captured(plan.batch);
    gpu.run(&plan, true)?;
    let eg = gpu.ops.download(out, n * d)?;
    let ec = cpu.encode(&crops, n)?;
    let scorer = Scorer::new(bundle.graph.clone(), &bundle.text_embeddings, d)
        .map_err(|e| EngineError::Bundle(e.to_string()))?;
    let mut per = Vec::new();
    let mut pass = true;
    for i in 0..n {
        let (g, c) = (&eg[i * d..(i + 1) * d], &ec[i * d..(i + 1) * d]);
        let (sg, sc) = (
            scorer
                .score(g)
                .map_err(|e| EngineError::Bundle(e.to_string()))?,
            scorer
                .score(c)
                .map_err(|e| EngineError::Bundle(e.to_string()))?,
        );
        let logit = max_abs(&sg.logits, &sc.logits);
        let (dz, dq) = ((sg.log_z - sc.log_z).abs(), (sg.q0 - sc.q0).abs());
        let ok = logit <= 0.02 && dz <= 0.02 && dq <= 0.01;
        pass &= ok;
        per.push(
            json!({"crop": i, "q0_gpu": sg.q0, "q0_cpu": sc.q0, "logit_error": logit,
                        "log_z_error": dz, "pass": ok}),
        );
    }
    let graph_vs_eager = largest(eg.iter().zip(&eager).map(|(a, b)| f64::from((a - b).abs())));
    let graph_ok = replayed && graph_vs_eager <= 1e-3;
    pass &= graph_ok;
    let mut parted = Value::Null;
    if !pass {
        let (_, lg) = gpu.encode_with_layers(&crops, n)?;
        let (_, lc) = cpu.encode_with_layers(&crops, n, true)?;
        for (layer, (a, b)) in lg.iter().zip(&lc).enumerate() {
            let scale = largest(b.iter().map(|v| f64::from(v.abs()))).max(1e-6);
            let e = largest(a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs()))) / scale;
            if e > 1e-2 {
                parted = json!({"block": layer, "relative_error": e});
                break;
            }
        }
    }
    write_f32(&args.out.join("inputs.f32"), &crops)?;
    write_f32(&args.out.join("embeddings.f32"), &eg)?;
    write_f32(&args.out.join("reference.f32"), &ec)?;
    report.insert(
        "engine".into(),
        json!({"crops": per, "pass": pass, "graph_replayed": replayed,
        "graph_vs_eager_largest_difference": graph_vs_eager, "graph_pass": graph_ok,
        "first_block_that_parts": parted}),
    );

    // 4. Speed.
    let flops = shape.flops_per_face();
    let peak = fp16_peak(&device);
    let mut buckets = Vec::new();
    let before = gpu.device_used_bytes()?;
    for &bucket in BUCKETS {
        let plan = gpu.bucket(bucket)?.clone();
        let px = seeded_crops(&shape, bucket.min(8), args.seed + 1);
        let mut full = Vec::with_capacity(bucket * shape.crop_len());
        while full.len() < bucket * shape.crop_len() {
            full.extend_from_slice(&px);
        }
        full.truncate(bucket * shape.crop_len());
        gpu.upload(&full, bucket)?;
        let iters = if bucket >= 128 {
            args.iters.max(4) / 2
        } else {
            args.iters.max(4)
        };
        let e = gpu.run_timed(&plan, false, iters)?;
        let g = gpu.run_timed(&plan, true, iters)?;
        let fps = bucket as f64 / g;
        buckets.push(
            json!({"batch": bucket, "eager_ms": e * 1e3, "graph_ms": g * 1e3,
            "faces_per_s_eager": bucket as f64 / e, "faces_per_s_graph": fps,
            "tflops_graph": fps * flops / 1e12,
            "fraction_of_fp16_peak": peak.map(|p| fps * flops / p),
            "arena_mib": plan.bytes() as f64 / (1 << 20) as f64}),
        );
    }
    let after = gpu.device_used_bytes()?;
    let plan = gpu.bucket(256)?.clone();
    let (ops, weights) = gpu.parts();
    let mut prof = Profiled {
        ops,
        times: BTreeMap::new(),
    };
    forward(&mut prof, weights, &shape, &plan, plan.batch, None)?;
    let total: f64 = prof.times.values().map(|v| v.0).sum();
    let per_op: Vec<Value> = prof
        .times
        .iter()
        .map(|(k, (s, c))| {
            json!({"op": k, "calls": c,
        "ms": s * 1e3, "share": s / total})
        })
        .collect();
    report.insert(
        "speed".into(),
        json!({"device": device, "flops_per_face": flops,
        "fp16_peak_flops": peak, "buckets": buckets,
        "device_memory_used_bytes": after, "device_memory_before_timing_bytes": before,
        "weights_bytes": gpu.ops.weight_bytes, "arena_bytes": gpu.arena_bytes(),
        "per_op_batch_256_synchronised": per_op}),
    );
    let all = report["kernels"]["pass"] == json!(true)
        && report["crop"]["pass"] == json!(true)
        && report["engine"]["pass"] == json!(true);
    report.insert("pass".into(), json!(all));
    let v = Value::Object(report);
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_vec_pretty(&v).unwrap_or_default(),
    )
    .map_err(io)?;
    Ok(v)
}

/// A 1280x720 RGB frame with gradients and edges, for the crop check.
fn synthetic_frame(w: u32, h: u32, seed: u64) -> image::RgbImage {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (a, b) = (rng.f32() * 0.05, rng.f32() * 0.05);
    image::RgbImage::from_fn(w, h, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let r = 128.0 + 100.0 * (xf * a).sin();
        let g = 128.0 + 100.0 * (yf * b).cos();
        let bl = if (x / 40 + y / 40) % 2 == 0 {
            40.0
        } else {
            220.0
        };
        image::Rgb([r as u8, g as u8, bl as u8])
    })
}

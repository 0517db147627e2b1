use std::path::Path;

use super::cpu::{CpuEngine, CpuOps, Precision};
use super::*;
use crate::model::ModelBundle;

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny");

fn vit_b_32() -> VitShape {
    VitShape {
        image_size: 224,
        patch: 32,
        width: 768,
        layers: 12,
        heads: 12,
        mlp_width: 3072,
        embed_dim: 512,
    }
}

#[test]
fn every_bucket_plan_keeps_live_buffers_apart_and_shares_the_rest() {
    let shape = vit_b_32();
    for &batch in BUCKETS {
        let plan = Plan::new(&shape, batch).unwrap();
        let bufs: Vec<Buf> = plan.bufs().collect();
        assert_eq!(bufs.len(), Act::ALL.len());
        for (i, a) in bufs.iter().enumerate() {
            assert_eq!(a.len, shape.len(a.act, batch));
            assert!(a.end() <= plan.len);
            assert_eq!(a.offset % plan::ALIGN, 0);
            for b in &bufs[i + 1..] {
                if plan.conflict(a.act, b.act) {
                    assert!(
                        !a.overlaps(b),
                        "batch {batch}: {a:?} and {b:?} are live together"
                    );
                }
            }
        }
        // The residual stream lives through the whole forward; the input only at its start.
        assert!(plan.conflict(Act::Stream, Act::Hidden));
        assert!(plan.conflict(Act::Qkv, Act::Heads));
        assert!(!plan.conflict(Act::Crops, Act::Hidden));
        assert!(!plan.conflict(Act::Qkv, Act::Hidden));
        assert!(plan.len < plan.unshared_len());
        eprintln!(
            "bucket {batch:>3}: arena {:.1} MiB (unshared {:.1} MiB), {} operations",
            plan.bytes() as f64 / (1 << 20) as f64,
            (plan.unshared_len() * 2) as f64 / (1 << 20) as f64,
            plan.ops
        );
    }
}

#[test]
fn vit_b_32_costs_the_8_8_gflops_sjedd_states() {
    let g = vit_b_32().flops_per_face() / 1e9;
    assert!((8.7..8.9).contains(&g), "{g}");
}

/// The `cuda` build on a machine without the driver: a clear error, no panic.
#[cfg(feature = "cuda")]
#[test]
fn cuda_ops_without_a_driver_say_what_is_missing() {
    match super::cuda::CudaOps::new(0) {
        Ok(_) => eprintln!("a CUDA device is present: nothing to check here"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("libcuda") || e.contains("device"), "{e}");
        }
    }
}

#[test]
fn unsupported_shapes_are_refused_with_the_reason() {
    let mut s = vit_b_32();
    s.heads = 8; // heads of 96
    let a = |s: VitShape| Architecture {
        name: "x".into(),
        image_size: s.image_size as u32,
        patch_size: s.patch as u32,
        width: s.width as u32,
        layers: s.layers as u32,
        heads: s.heads as u32,
        mlp_width: s.mlp_width as u32,
        embed_dim: s.embed_dim as u32,
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    let e = VitShape::new(&a(s)).unwrap_err().to_string();
    assert!(e.contains("heads of at most 64"), "{e}");
    let mut s = vit_b_32();
    s.patch = 16; // 197 tokens
    let e = VitShape::new(&a(s)).unwrap_err().to_string();
    assert!(e.contains("197 tokens"), "{e}");
    let mut s = vit_b_32();
    s.patch = 30;
    let e = VitShape::new(&a(s)).unwrap_err().to_string();
    assert!(e.contains("not a multiple"), "{e}");
}

/// A source whose one tensor has the wrong shape.
struct Wrong;
impl TensorSource for Wrong {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError> {
        if name.ends_with("resblocks.1.mlp.c_fc.weight") {
            return Err(EngineError::Bundle(format!(
                "{name}: shape [1], the architecture needs {shape:?}"
            )));
        }
        Ok(vec![0.0; shape.iter().product()])
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let e = CpuEngine::from_source(&Wrong, vit_b_32(), Precision::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("visual.transformer.resblocks.1.mlp.c_fc.weight") && e.contains("3072, 768"),
        "{e}"
    );
}

#[test]
fn a_planning_mistake_is_an_error_on_the_cpu() {
    let mut ops = CpuOps::new(Precision::F32, 1024);
    let a = Buf {
        act: Act::Normed,
        offset: 0,
        len: 512,
    };
    let c = Buf {
        act: Act::Qkv,
        offset: 256,
        len: 512,
    };
    let w = ops.upload("w", &[0.0; 64]).unwrap();
    let e = ops
        .gemm(&gemm_spec(8, 8, 8, WeightLayout::OutIn), w, a, c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlap"), "{e}");
}

fn tiny_crops(n: usize) -> (ModelBundle, Vec<f32>) {
    let bundle = ModelBundle::load(&Path::new(TINY).join("bundle")).unwrap();
    let a = bundle.architecture().clone();
    let size = a.image_size as usize;
    let mut px = Vec::new();
    for i in 0..n {
        let img = image::open(Path::new(TINY).join(format!("crop{i}.png")))
            .unwrap()
            .to_rgb8();
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let v = f32::from(img.get_pixel(x as u32, y as u32)[c]) / 255.0;
                    px.push((v - a.mean[c]) / a.std[c]);
                }
            }
        }
    }
    (bundle, px)
}

#[derive(serde::Deserialize)]
struct Expected {
    crops: Vec<ExpectedCrop>,
}
#[derive(serde::Deserialize)]
struct ExpectedCrop {
    embedding: Vec<f64>,
}

/// The model code in fp32 against the float64 numpy reference of tools/model.py (the ONNX
/// Runtime comparison is tests/engine.rs).
#[test]
fn fp32_engine_matches_the_numpy_reference_on_the_tiny_bundle() {
    let (bundle, px) = tiny_crops(4);
    let exp: Expected = serde_json::from_str(
        &std::fs::read_to_string(Path::new(TINY).join("expected.json")).unwrap(),
    )
    .unwrap();
    let mut eng = CpuEngine::new(&bundle, Precision::F32).unwrap();
    let e = eng.encode(&px, 4).unwrap();
    let d = eng.shape().embed_dim;
    for (i, c) in exp.crops.iter().enumerate() {
        let worst = e[i * d..(i + 1) * d]
            .iter()
            .zip(&c.embedding)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-4, "crop {i}: largest difference {worst}");
    }
    // One crop at a time gives the same embeddings as the batch.
    let one = eng.encode(&px[..eng.shape().crop_len()], 1).unwrap();
    for (a, b) in one.iter().zip(&e[..d]) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn fp16_emulation_rounds_what_the_gpu_stores_in_fp16_and_keeps_the_stream_in_fp32() {
    let is_f16 = |v: f32| v == half::f16::from_f32(v).to_f32();
    let mut ops = CpuOps::new(Precision::F16, 4096);
    let third = ops.upload("bias", &[1.0 / 3.0; 8]).unwrap();
    assert!(!is_f16(1.0 / 3.0));
    let one = ops.upload("one", &[1.0; 8]).unwrap();
    let zero = ops.upload("zero", &[0.0; 8]).unwrap();
    let qkv = Buf {
        act: Act::Qkv,
        offset: 0,
        len: 16,
    };
    let stream = Buf {
        act: Act::Stream,
        offset: 128,
        len: 16,
    };
    let normed = Buf {
        act: Act::Normed,
        offset: 256,
        len: 16,
    };
    ops.write(
        stream,
        &[
            0.1, 0.7, 1e-3, 5.0, -2.2, 0.3, 0.9, 1.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
        ],
    )
    .unwrap();
    ops.add_bias(qkv, third, 2, 8).unwrap();
    assert!(
        ops.read(qkv, 16)
            .unwrap()
            .iter()
            .all(|v| is_f16(*v) && *v != 0.0)
    );
    ops.add_layernorm(stream, Some(qkv), Some(stream), normed, one, zero, 2, 8)
        .unwrap();
    let s = ops.read(stream, 16).unwrap();
    assert!(
        s.iter().any(|v| !is_f16(*v)),
        "the fp32 stream was rounded: {s:?}"
    );
    assert!(ops.read(normed, 16).unwrap().iter().all(|v| is_f16(*v)));

    let (bundle, px) = tiny_crops(1);
    let mut eng = CpuEngine::new(&bundle, Precision::F16).unwrap();
    let (e, layers) = eng.encode_with_layers(&px, 1, true).unwrap();
    assert_eq!(layers.len(), 2);
    let mut f32_eng = CpuEngine::new(&bundle, Precision::F32).unwrap();
    let r = f32_eng.encode(&px, 1).unwrap();
    let diff = e
        .iter()
        .zip(&r)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Different (fp16 storage) but close.
    assert!(diff > 0.0 && diff < 0.05, "fp16 vs fp32: {diff}");
}

//! The reference semantics of every operation of the native engine, in plain Rust: the CPU twin
//! of each kernel of `kernels/vit.cu` and of the cuBLASLt GEMMs.
//!
//! [`Precision::F16`] emulates the GPU's numbers: every value the device stores in fp16
//! (weights, crops and each operation's output but the fp32 residual stream and embeddings, see
//! [`super::Act::dtype`]) is rounded to IEEE fp16; arithmetic inside an operation is fp32, as in
//! the kernels. [`Precision::F32`] keeps everything in fp32 (the check of the model code itself
//! against ONNX Runtime). Operations check their buffers: a read and a write range that overlap
//! where the kernel needs them apart, or a GEMM operand longer than its buffer, is an error, so
//! a planning or layout mistake shows here rather than as wrong numbers on a GPU.

use half::f16;

use std::collections::HashMap;

use super::ops::{Buf, GemmSpec, Ops};
use super::{Act, Dtype, EngineError, LN_EPS, Plan, TensorSource, VitShape, VitWeights, forward};
use crate::model::ModelBundle;

/// How values are stored between operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// fp16 storage, fp32 arithmetic (the GPU engine).
    F16,
}

/// The CPU implementation of [`Ops`] over one arena.
pub struct CpuOps {
    pub precision: Precision,
    arena: Vec<f32>,
    weights: Vec<Vec<f32>>,
}

fn disjoint(what: &str, a: Buf, b: Buf) -> Result<(), EngineError> {
    if a.overlaps(&b) {
        return Err(EngineError::Layout(format!(
            "{what}: {:?} [{}, {}) and {:?} [{}, {}) overlap",
            a.act,
            a.offset,
            a.end(),
            b.act,
            b.offset,
            b.end()
        )));
    }
    Ok(())
}

fn need(what: &str, b: Buf, values: usize) -> Result<(), EngineError> {
    if values > b.len {
        return Err(EngineError::Layout(format!(
            "{what}: needs {values} values of {:?}, it holds {}",
            b.act, b.len
        )));
    }
    Ok(())
}

impl CpuOps {
    /// An engine's ops with an arena of `arena_len` values.
    pub fn new(precision: Precision, arena_len: usize) -> Self {
        CpuOps {
            precision,
            arena: vec![0.0; arena_len],
            weights: Vec::new(),
        }
    }

    /// Grows the arena to at least `len` values.
    pub fn reserve_arena(&mut self, len: usize) {
        if self.arena.len() < len {
            self.arena.resize(len, 0.0);
        }
    }

    /// Rounds as the device stores activation `act`.
    #[inline]
    pub fn store_to(&self, act: Act, v: f32) -> f32 {
        match act.dtype() {
            Dtype::F16 => self.store(v),
            Dtype::F32 => v,
        }
    }

    /// Rounds as the device stores an fp16 value (in [`Precision::F16`]).
    #[inline]
    pub fn store(&self, v: f32) -> f32 {
        match self.precision {
            Precision::F32 => v,
            Precision::F16 => f16::from_f32(v).to_f32(),
        }
    }

    fn round_range(&mut self, b: Buf, n: usize) {
        if self.precision == Precision::F16 && b.act.dtype() == Dtype::F16 {
            for v in &mut self.arena[b.offset..b.offset + n] {
                *v = f16::from_f32(*v).to_f32();
            }
        }
    }

    /// Writes values into a buffer (the upload of crops), rounded as stored.
    pub fn write(&mut self, b: Buf, values: &[f32]) -> Result<(), EngineError> {
        need("write", b, values.len())?;
        for (i, &s) in values.iter().enumerate() {
            self.arena[b.offset + i] = self.store_to(b.act, s);
        }
        Ok(())
    }

    /// The first `n` values of a buffer.
    pub fn read(&self, b: Buf, n: usize) -> Result<Vec<f32>, EngineError> {
        need("read", b, n)?;
        Ok(self.arena[b.offset..b.offset + n].to_vec())
    }

    /// `x[r, c] = f(x[r, c] + bias[c])`, in place (the two bias kernels).
    fn map_with_bias(
        &mut self,
        what: &str,
        x: Buf,
        bias: usize,
        rows: usize,
        cols: usize,
        f: impl Fn(f32) -> f32,
    ) -> Result<(), EngineError> {
        need(what, x, rows * cols)?;
        for i in 0..rows * cols {
            let y = self.arena[x.offset + i] + self.weights[bias][i % cols];
            self.arena[x.offset + i] = self.store_to(x.act, f(y));
        }
        Ok(())
    }

    fn w(&self, w: usize) -> &[f32] {
        &self.weights[w]
    }
}

impl Ops for CpuOps {
    type Weight = usize;

    fn upload(&mut self, _name: &str, values: &[f32]) -> Result<usize, EngineError> {
        let v = values.iter().map(|&x| self.store(x)).collect();
        self.weights.push(v);
        Ok(self.weights.len() - 1)
    }

    fn weight_len(&self, w: usize) -> usize {
        self.weights[w].len()
    }

    fn patchify(
        &mut self,
        crops: Buf,
        out: Buf,
        batch: usize,
        size: usize,
        patch: usize,
    ) -> Result<(), EngineError> {
        disjoint("patchify", crops, out)?;
        let grid = size / patch;
        let per_patch = 3 * patch * patch;
        let total = batch * grid * grid * per_patch;
        need("patchify", crops, batch * 3 * size * size)?;
        need("patchify", out, total)?;
        for i in 0..total {
            let k = i % per_patch;
            let row = i / per_patch;
            let p = row % (grid * grid);
            let b = row / (grid * grid);
            let (c, r) = (k / (patch * patch), k % (patch * patch));
            let y = (p / grid) * patch + r / patch;
            let x = (p % grid) * patch + r % patch;
            self.arena[out.offset + i] =
                self.arena[crops.offset + ((b * 3 + c) * size + y) * size + x];
        }
        Ok(())
    }

    fn gemm(&mut self, spec: &GemmSpec, w: usize, a: Buf, c: Buf) -> Result<(), EngineError> {
        disjoint("gemm", a, c)?;
        if spec.m == 0 || spec.n == 0 {
            return Ok(());
        }
        spec.check(self.weights[w].len(), a.len, c.len)?;
        let (rsa, csa) = if spec.transa {
            (spec.lda, 1)
        } else {
            (1, spec.lda)
        };
        let (rsb, csb) = if spec.transb {
            (spec.ldb, 1)
        } else {
            (1, spec.ldb)
        };
        let wa = self.weights[w].as_ptr();
        let base = self.arena.as_mut_ptr();
        // SAFETY: `check` proved that every index the strides reach lies inside the weight and
        // the two buffers, the buffers lie inside the arena (plans are made for its length, and
        // `reserve_arena` grows it), and `a` and `c` do not overlap.
        unsafe {
            assert!(c.end() <= self.arena.len() && a.end() <= self.arena.len());
            matrixmultiply::sgemm(
                spec.m,
                spec.k,
                spec.n,
                1.0,
                wa,
                rsa as isize,
                csa as isize,
                base.add(a.offset),
                rsb as isize,
                csb as isize,
                0.0,
                base.add(c.offset),
                1,
                spec.ldc as isize,
            );
        }
        self.round_range(c, spec.ldc * (spec.n - 1) + spec.m);
        Ok(())
    }

    fn embed_tokens(
        &mut self,
        patches: Buf,
        class: usize,
        positional: usize,
        out: Buf,
        batch: usize,
        n_patches: usize,
        width: usize,
    ) -> Result<(), EngineError> {
        disjoint("embed_tokens", patches, out)?;
        let tokens = n_patches + 1;
        need("embed_tokens", patches, batch * n_patches * width)?;
        need("embed_tokens", out, batch * tokens * width)?;
        for b in 0..batch {
            for t in 0..tokens {
                for w in 0..width {
                    let v = if t == 0 {
                        self.w(class)[w]
                    } else {
                        self.arena[patches.offset + (b * n_patches + t - 1) * width + w]
                    };
                    let s = self.store_to(out.act, v + self.w(positional)[t * width + w]);
                    self.arena[out.offset + (b * tokens + t) * width + w] = s;
                }
            }
        }
        Ok(())
    }

    fn add_layernorm(
        &mut self,
        x: Buf,
        residual: Option<Buf>,
        sum_out: Option<Buf>,
        norm_out: Buf,
        gamma: usize,
        beta: usize,
        rows: usize,
        width: usize,
    ) -> Result<(), EngineError> {
        let n = rows * width;
        need("add_layernorm", x, n)?;
        need("add_layernorm", norm_out, n)?;
        if let Some(r) = residual {
            need("add_layernorm", r, n)?;
            disjoint("add_layernorm residual", r, norm_out)?;
        }
        if let Some(s) = sum_out {
            need("add_layernorm", s, n)?;
            if s != x {
                disjoint("add_layernorm sum", s, x)?;
            }
        }
        if norm_out != x {
            disjoint("add_layernorm norm", norm_out, x)?;
        }
        let mut row = vec![0.0f32; width];
        for r in 0..rows {
            let base = r * width;
            for (i, v) in row.iter_mut().enumerate() {
                *v = self.arena[x.offset + base + i];
                if let Some(res) = residual {
                    *v += self.arena[res.offset + base + i];
                }
            }
            let mean = row.iter().sum::<f32>() / width as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
            let rstd = 1.0 / (var + LN_EPS).sqrt();
            for (i, &v) in row.iter().enumerate() {
                if let Some(s) = sum_out {
                    self.arena[s.offset + base + i] = self.store_to(s.act, v);
                }
                let y = (v - mean) * rstd * self.weights[gamma][i] + self.weights[beta][i];
                self.arena[norm_out.offset + base + i] = self.store_to(norm_out.act, y);
            }
        }
        Ok(())
    }

    fn add_bias(
        &mut self,
        x: Buf,
        bias: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), EngineError> {
        self.map_with_bias("add_bias", x, bias, rows, cols, |y| y)
    }

    fn bias_quick_gelu(
        &mut self,
        x: Buf,
        bias: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), EngineError> {
        self.map_with_bias("bias_quick_gelu", x, bias, rows, cols, |y| {
            y / (1.0 + (-1.702 * y).exp())
        })
    }

    fn attention(
        &mut self,
        qkv: Buf,
        out: Buf,
        batch: usize,
        tokens: usize,
        width: usize,
        heads: usize,
    ) -> Result<(), EngineError> {
        disjoint("attention", qkv, out)?;
        need("attention", qkv, batch * tokens * 3 * width)?;
        need("attention", out, batch * tokens * width)?;
        let hd = width / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let stride = 3 * width;
        let mut s = vec![0.0f32; tokens * tokens];
        for b in 0..batch {
            let row0 = b * tokens;
            for h in 0..heads {
                let at = |t: usize, part: usize, d: usize| {
                    qkv.offset + (row0 + t) * stride + part * width + h * hd + d
                };
                for a in 0..tokens {
                    for c in 0..tokens {
                        let mut acc = 0.0f32;
                        for d in 0..hd {
                            acc += self.arena[at(a, 0, d)] * self.arena[at(c, 1, d)];
                        }
                        s[a * tokens + c] = acc * scale;
                    }
                }
                for a in 0..tokens {
                    let r = &mut s[a * tokens..(a + 1) * tokens];
                    let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0f32;
                    for v in r.iter_mut() {
                        *v = (*v - m).exp();
                        sum += *v;
                    }
                    let inv = 1.0 / sum;
                    for v in r.iter_mut() {
                        *v *= inv;
                    }
                }
                for a in 0..tokens {
                    for d in 0..hd {
                        let mut acc = 0.0f32;
                        for c in 0..tokens {
                            acc += s[a * tokens + c] * self.arena[at(c, 2, d)];
                        }
                        let o = self.store_to(out.act, acc);
                        self.arena[out.offset + (row0 + a) * width + h * hd + d] = o;
                    }
                }
            }
        }
        Ok(())
    }

    fn take_rows(
        &mut self,
        src: Buf,
        dst: Buf,
        count: usize,
        stride: usize,
        width: usize,
    ) -> Result<(), EngineError> {
        disjoint("take_rows", src, dst)?;
        need("take_rows", dst, count * width)?;
        if count > 0 {
            need("take_rows", src, ((count - 1) * stride + 1) * width)?;
        }
        for i in 0..count {
            let (s, d) = (src.offset + i * stride * width, dst.offset + i * width);
            self.arena.copy_within(s..s + width, d);
        }
        Ok(())
    }
}

/// The native engine on the CPU: the reference the GPU engine is checked against, and the check
/// of the model code itself against ONNX Runtime.
pub struct CpuEngine {
    ops: CpuOps,
    weights: VitWeights<usize>,
    shape: VitShape,
    plans: HashMap<usize, Plan>,
}

impl CpuEngine {
    /// The engine for a bundle's image tower (its `image_encoder.safetensors`).
    pub fn new(bundle: &ModelBundle, precision: Precision) -> Result<Self, EngineError> {
        let shape = VitShape::new(bundle.architecture())?;
        Self::from_source(&super::read_tower(bundle)?, shape, precision)
    }

    /// The engine over any source of the checkpoint's tensors.
    pub fn from_source(
        src: &impl TensorSource,
        shape: VitShape,
        precision: Precision,
    ) -> Result<Self, EngineError> {
        let mut ops = CpuOps::new(precision, 0);
        let weights = VitWeights::load(&mut ops, src, &shape)?;
        Ok(CpuEngine {
            ops,
            weights,
            shape,
            plans: HashMap::new(),
        })
    }

    pub fn shape(&self) -> &VitShape {
        &self.shape
    }

    fn plan(&mut self, n: usize) -> Result<Plan, EngineError> {
        if let Some(p) = self.plans.get(&n) {
            return Ok(p.clone());
        }
        let p = Plan::new(&self.shape, n)?;
        self.plans.insert(n, p.clone());
        Ok(p)
    }

    /// Embeddings (`n x embed_dim`) of `n` normalised crops (`n x 3 x size x size`).
    pub fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<f32>, EngineError> {
        self.encode_with_layers(pixels, n, false).map(|(e, _)| e)
    }

    /// As [`Self::encode`], and with `layers`, the residual stream after every block
    /// (`n x tokens x width` each), for finding where two engines part.
    pub fn encode_with_layers(
        &mut self,
        pixels: &[f32],
        n: usize,
        layers: bool,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>), EngineError> {
        let want = n
            .checked_mul(self.shape.crop_len())
            .ok_or_else(|| EngineError::Layout("batch too large".into()))?;
        if pixels.len() != want || n == 0 {
            return Err(EngineError::Layout(format!(
                "{} pixel values for {n} crops of {}",
                pixels.len(),
                self.shape.crop_len()
            )));
        }
        let plan = self.plan(n)?;
        self.ops.reserve_arena(plan.len);
        self.ops.write(plan.buf(Act::Crops), pixels)?;
        let mut stream = Vec::new();
        let rows = n * self.shape.tokens() * self.shape.width;
        let mut hook = |ops: &mut CpuOps, _: usize, s: Buf, b: Buf| -> Result<(), EngineError> {
            let (x, y) = (ops.read(s, rows)?, ops.read(b, rows)?);
            stream.push(x.iter().zip(&y).map(|(a, b)| a + b).collect());
            Ok(())
        };
        let hook: Option<&mut super::LayerHook<'_, CpuOps>> =
            if layers { Some(&mut hook) } else { None };
        forward(&mut self.ops, &self.weights, &self.shape, &plan, n, hook)?;
        let e = self
            .ops
            .read(plan.buf(Act::Embedding), n * self.shape.embed_dim)?;
        Ok((e, stream))
    }
}

//! The native ViT-B/32 image tower: OpenAI CLIP's `VisionTransformer.forward`, written once over
//! the [`Ops`] interface, with the device as a parameter.
//!
//! - [`ops`]: the operations (one kernel of `kernels/vit.cu` or one GEMM each) and
//!   [`ops::gemm_spec`], the single place every GEMM's shape, transposes and leading dimensions
//!   come from.
//! - [`cpu::CpuOps`]: each kernel's reference semantics in plain Rust, in fp32 or with the GPU's
//!   fp16 storage rounding emulated. The engine on `CpuOps` is checked against ONNX Runtime in
//!   CI, so nearly all of the GPU engine is verified without a GPU.
//! - [`plan`]: one arena per batch bucket, planned once from a recorded forward (buffers whose
//!   live ranges never meet share memory).
//! - `cuda::CudaOps` (feature `cuda`): the NVRTC kernels and cuBLASLt, each bucket's forward
//!   captured as one CUDA graph.
//!
//! [`VitWeights`] mirrors the checkpoint's names (`visual.transformer.resblocks.{i}.attn...`) and
//! is read from the bundle's `image_encoder.safetensors`, every shape checked against the
//! manifest's architecture.

#[cfg(feature = "cuda")]
pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ops;
pub mod plan;
#[cfg(test)]
mod tests;

use std::path::Path;

use crate::model::safetensors::SafeTensors;
use crate::model::{Architecture, ModelBundle};

pub use ops::{Buf, GemmSpec, Ops, WeightLayout, gemm_spec};
pub use plan::Plan;

/// LayerNorm epsilon of OpenAI CLIP.
pub const LN_EPS: f32 = 1e-5;
/// The batch sizes the GPU engine plans and captures; a batch runs in the smallest that holds
/// it.
pub const BUCKETS: &[usize] = &[1, 8, 32, 128, 256];
/// Largest head dimension and token count `kernels/vit.cu`'s attention kernel handles.
pub const ATTENTION_HEAD_DIM: usize = 64;
pub const ATTENTION_MAX_TOKENS: usize = 64;
/// Largest image tower file read (fp32 ViT-B/32 is 352 MB).
pub(crate) const MAX_SAFETENSORS_BYTES: u64 = 2 << 30;

/// Why the engine cannot be built or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model bundle: {0}")]
    Bundle(String),
    #[error("architecture not supported by the native engine: {0}")]
    Unsupported(String),
    #[error("buffer layout: {0}")]
    Layout(String),
    #[error("device: {0}")]
    Device(String),
}

/// A frame the GPU crop cannot read (its format, its planes).
impl From<crate::crop::CropError> for EngineError {
    fn from(e: crate::crop::CropError) -> Self {
        EngineError::Layout(format!("the GPU crop: {e}"))
    }
}

/// The activations of one forward, by role. Each gets one planned range of the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Act {
    /// `[batch, 3, size, size]` normalised crops (the input).
    Crops,
    /// `[batch * patches, 3 * patch^2]`.
    Patches,
    /// `[batch * patches, width]`: the patch projection.
    Projected,
    /// `[batch * tokens, width]`: the residual stream (fp32).
    Stream,
    /// `[batch * tokens, width]`: a LayerNorm's output.
    Normed,
    /// `[batch * tokens, 3 * width]`.
    Qkv,
    /// `[batch * tokens, width]`: attention's output before `out_proj`.
    Heads,
    /// `[batch * tokens, width]`: a block's branch (`out_proj` or `c_proj` output).
    Branch,
    /// `[batch * tokens, mlp_width]`.
    Hidden,
    /// `[batch, width]`: the class tokens after `ln_post`.
    Class,
    /// `[batch, embed_dim]`: the output (fp32).
    Embedding,
}

/// How an activation is stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F16,
    F32,
}

impl Dtype {
    /// Size in 2-byte arena slots.
    pub fn slots(self) -> usize {
        match self {
            Dtype::F16 => 1,
            Dtype::F32 => 2,
        }
    }
}

impl Act {
    /// The residual stream and the output are fp32; everything a GEMM reads is fp16. Keeping
    /// the stream in fp32 halves the fp16 error of the full-size model's logits (largest 0.020
    /// -> 0.011 on the check crops) for one extra read and write of it per LayerNorm.
    pub fn dtype(self) -> Dtype {
        match self {
            Act::Stream | Act::Embedding => Dtype::F32,
            _ => Dtype::F16,
        }
    }

    pub const ALL: [Act; 11] = [
        Act::Crops,
        Act::Patches,
        Act::Projected,
        Act::Stream,
        Act::Normed,
        Act::Qkv,
        Act::Heads,
        Act::Branch,
        Act::Hidden,
        Act::Class,
        Act::Embedding,
    ];
}

/// The tower's shape, checked for what the engine (and its attention kernel) supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VitShape {
    pub image_size: usize,
    pub patch: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_width: usize,
    pub embed_dim: usize,
}

impl VitShape {
    pub fn new(a: &Architecture) -> Result<Self, EngineError> {
        let s = VitShape {
            image_size: a.image_size as usize,
            patch: a.patch_size as usize,
            width: a.width as usize,
            layers: a.layers as usize,
            heads: a.heads as usize,
            mlp_width: a.mlp_width as usize,
            embed_dim: a.embed_dim as usize,
        };
        let bad = |m: String| Err(EngineError::Unsupported(m));
        if s.patch == 0 || !s.image_size.is_multiple_of(s.patch) {
            return bad(format!(
                "image_size {} is not a multiple of patch_size {}",
                s.image_size, s.patch
            ));
        }
        if s.heads == 0
            || !s.width.is_multiple_of(s.heads)
            || s.width / s.heads > ATTENTION_HEAD_DIM
        {
            return bad(format!(
                "width {} / heads {}: the attention kernel needs heads of at most \
                 {ATTENTION_HEAD_DIM} values",
                s.width, s.heads
            ));
        }
        if s.tokens() > ATTENTION_MAX_TOKENS {
            return bad(format!(
                "{} tokens: the attention kernel handles at most {ATTENTION_MAX_TOKENS}",
                s.tokens()
            ));
        }
        if s.width == 0 || s.mlp_width == 0 || s.embed_dim == 0 {
            return bad("a zero width".into());
        }
        Ok(s)
    }

    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }
    pub fn patches(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn tokens(&self) -> usize {
        self.patches() + 1
    }
    pub fn crop_len(&self) -> usize {
        3 * self.image_size * self.image_size
    }

    /// FLOPs of one face's forward: the GEMMs and attention's two products (the element-wise
    /// kernels are not counted).
    pub fn flops_per_face(&self) -> f64 {
        let (t, w, m) = (
            self.tokens() as f64,
            self.width as f64,
            self.mlp_width as f64,
        );
        let patch = 2.0 * self.patches() as f64 * (3 * self.patch * self.patch) as f64 * w;
        let layer =
            2.0 * t * w * 3.0 * w + 2.0 * 2.0 * t * t * w + 2.0 * t * w * w + 2.0 * 2.0 * t * w * m;
        patch + self.layers as f64 * layer + 2.0 * w * self.embed_dim as f64
    }

    /// Values of activation `act` at this batch size.
    pub fn len(&self, act: Act, batch: usize) -> usize {
        let rows = batch * self.tokens();
        match act {
            Act::Crops => batch * self.crop_len(),
            Act::Patches => batch * self.patches() * 3 * self.patch * self.patch,
            Act::Projected => batch * self.patches() * self.width,
            Act::Stream | Act::Normed | Act::Heads | Act::Branch => rows * self.width,
            Act::Qkv => rows * 3 * self.width,
            Act::Hidden => rows * self.mlp_width,
            Act::Class => batch * self.width,
            Act::Embedding => batch * self.embed_dim,
        }
    }
}

/// One `ln_*` of the checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct LayerNorm<W> {
    pub weight: W,
    pub bias: W,
}

/// One `nn.Linear` of the checkpoint (`weight [out, in]`).
#[derive(Debug, Clone, Copy)]
pub struct Linear<W> {
    pub weight: W,
    pub bias: W,
}

/// `visual.transformer.resblocks.{i}.attn`.
#[derive(Debug, Clone, Copy)]
pub struct Attention<W> {
    pub in_proj_weight: W,
    pub in_proj_bias: W,
    pub out_proj: Linear<W>,
}

/// `visual.transformer.resblocks.{i}.mlp`.
#[derive(Debug, Clone, Copy)]
pub struct Mlp<W> {
    pub c_fc: Linear<W>,
    pub c_proj: Linear<W>,
}

/// `visual.transformer.resblocks.{i}`.
#[derive(Debug, Clone, Copy)]
pub struct ResBlock<W> {
    pub ln_1: LayerNorm<W>,
    pub attn: Attention<W>,
    pub ln_2: LayerNorm<W>,
    pub mlp: Mlp<W>,
}

/// The `visual.*` weights, uploaded to one device.
#[derive(Debug, Clone)]
pub struct VitWeights<W> {
    pub conv1: W,
    pub class_embedding: W,
    pub positional_embedding: W,
    pub ln_pre: LayerNorm<W>,
    pub resblocks: Vec<ResBlock<W>>,
    pub ln_post: LayerNorm<W>,
    pub proj: W,
}

/// Where the checkpoint's tensors come from.
pub trait TensorSource {
    /// The values of `name`, checked to have exactly `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError>;
}

impl TensorSource for SafeTensors {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError> {
        let (got, values) = self.f32(name).map_err(EngineError::Bundle)?;
        if got != shape {
            return Err(EngineError::Bundle(format!(
                "{name}: shape {got:?}, the architecture needs {shape:?}"
            )));
        }
        Ok(values)
    }
}

/// Reads `image_encoder.safetensors` of a bundle (capped, links refused).
pub fn read_tower(bundle: &ModelBundle) -> Result<SafeTensors, EngineError> {
    let path = bundle.safetensors_path.as_deref().ok_or_else(|| {
        EngineError::Bundle(format!(
            "{}: the manifest names no image_encoder_safetensors (the native engine needs it)",
            bundle.dir.display()
        ))
    })?;
    read_tower_file(path)
}

fn read_tower_file(path: &Path) -> Result<SafeTensors, EngineError> {
    let bytes = crate::model::read_bundle_file(path, MAX_SAFETENSORS_BYTES)
        .map_err(|e| EngineError::Bundle(format!("{}: {e}", path.display())))?;
    SafeTensors::parse(bytes).map_err(|e| EngineError::Bundle(format!("{}: {e}", path.display())))
}

/// Uploads tensors by their checkpoint names, each shape checked.
struct Loader<'a, O, S> {
    ops: &'a mut O,
    src: &'a S,
}

impl<O: Ops, S: TensorSource> Loader<'_, O, S> {
    fn tensor(&mut self, name: &str, dims: &[usize]) -> Result<O::Weight, EngineError> {
        let full = format!("visual.{name}");
        let v = self.src.tensor(&full, dims)?;
        self.ops.upload(&full, &v)
    }

    fn ln(&mut self, prefix: &str, width: usize) -> Result<LayerNorm<O::Weight>, EngineError> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{prefix}.weight"), &[width])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[width])?,
        })
    }

    fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
    ) -> Result<Linear<O::Weight>, EngineError> {
        Ok(Linear {
            weight: self.tensor(&format!("{prefix}.weight"), &[out, inp])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[out])?,
        })
    }
}

impl<W: Copy> VitWeights<W> {
    /// Uploads every `visual.*` tensor through `ops`, each shape checked against `shape`.
    pub fn load<O: Ops<Weight = W>>(
        ops: &mut O,
        src: &impl TensorSource,
        shape: &VitShape,
    ) -> Result<Self, EngineError> {
        let (w, p, m) = (shape.width, shape.patch, shape.mlp_width);
        let mut l = Loader { ops, src };
        let conv1 = l.tensor("conv1.weight", &[w, 3, p, p])?;
        let class_embedding = l.tensor("class_embedding", &[w])?;
        let positional_embedding = l.tensor("positional_embedding", &[shape.tokens(), w])?;
        let ln_pre = l.ln("ln_pre", w)?;
        let mut resblocks = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let b = format!("transformer.resblocks.{i}");
            resblocks.push(ResBlock {
                ln_1: l.ln(&format!("{b}.ln_1"), w)?,
                attn: Attention {
                    in_proj_weight: l.tensor(&format!("{b}.attn.in_proj_weight"), &[3 * w, w])?,
                    in_proj_bias: l.tensor(&format!("{b}.attn.in_proj_bias"), &[3 * w])?,
                    out_proj: l.linear(&format!("{b}.attn.out_proj"), w, w)?,
                },
                ln_2: l.ln(&format!("{b}.ln_2"), w)?,
                mlp: Mlp {
                    c_fc: l.linear(&format!("{b}.mlp.c_fc"), m, w)?,
                    c_proj: l.linear(&format!("{b}.mlp.c_proj"), w, m)?,
                },
            });
        }
        let ln_post = l.ln("ln_post", w)?;
        let proj = l.tensor("proj", &[w, shape.embed_dim])?;
        Ok(VitWeights {
            conv1,
            class_embedding,
            positional_embedding,
            ln_pre,
            resblocks,
            ln_post,
            proj,
        })
    }
}

/// Called after each residual block with the block's index and the residual stream (after the
/// block's MLP branch is added), for the layer-by-layer comparison.
pub type LayerHook<'a, O> = dyn FnMut(&mut O, usize, Buf, Buf) -> Result<(), EngineError> + 'a;

/// `VisionTransformer.forward` for `batch` crops already in `plan`'s [`Act::Crops`]; the
/// embeddings end in [`Act::Embedding`]. With `hook`, after block `i` the stream is
/// `Stream + Branch` (the add is fused into the next LayerNorm), passed as the two buffers.
pub fn forward<O: Ops>(
    ops: &mut O,
    weights: &VitWeights<O::Weight>,
    shape: &VitShape,
    plan: &Plan,
    batch: usize,
    mut hook: Option<&mut LayerHook<'_, O>>,
) -> Result<(), EngineError> {
    if batch == 0 || batch > plan.batch {
        return Err(EngineError::Layout(format!(
            "batch {batch} does not fit the plan for {}",
            plan.batch
        )));
    }
    let b = |a: Act| plan.buf(a);
    let (w, t) = (shape.width, shape.tokens());
    let rows = batch * t;
    ops.patchify(
        b(Act::Crops),
        b(Act::Patches),
        batch,
        shape.image_size,
        shape.patch,
    )?;
    let conv = gemm_spec(
        batch * shape.patches(),
        3 * shape.patch * shape.patch,
        w,
        WeightLayout::OutIn,
    );
    ops.gemm(&conv, weights.conv1, b(Act::Patches), b(Act::Projected))?;
    ops.embed_tokens(
        b(Act::Projected),
        weights.class_embedding,
        weights.positional_embedding,
        b(Act::Stream),
        batch,
        shape.patches(),
        w,
    )?;
    let stream = b(Act::Stream);
    ops.add_layernorm(
        stream,
        None,
        None,
        stream,
        weights.ln_pre.weight,
        weights.ln_pre.bias,
        rows,
        w,
    )?;
    let linear = |inputs, outputs| gemm_spec(rows, inputs, outputs, WeightLayout::OutIn);
    for (i, blk) in weights.resblocks.iter().enumerate() {
        // The previous block's MLP branch joins the stream in this LayerNorm.
        let pending = (i > 0).then(|| b(Act::Branch));
        ops.add_layernorm(
            stream,
            pending,
            pending.map(|_| stream),
            b(Act::Normed),
            blk.ln_1.weight,
            blk.ln_1.bias,
            rows,
            w,
        )?;
        ops.gemm(
            &linear(w, 3 * w),
            blk.attn.in_proj_weight,
            b(Act::Normed),
            b(Act::Qkv),
        )?;
        ops.add_bias(b(Act::Qkv), blk.attn.in_proj_bias, rows, 3 * w)?;
        ops.attention(b(Act::Qkv), b(Act::Heads), batch, t, w, shape.heads)?;
        ops.gemm(
            &linear(w, w),
            blk.attn.out_proj.weight,
            b(Act::Heads),
            b(Act::Branch),
        )?;
        ops.add_bias(b(Act::Branch), blk.attn.out_proj.bias, rows, w)?;
        ops.add_layernorm(
            stream,
            Some(b(Act::Branch)),
            Some(stream),
            b(Act::Normed),
            blk.ln_2.weight,
            blk.ln_2.bias,
            rows,
            w,
        )?;
        ops.gemm(
            &linear(w, shape.mlp_width),
            blk.mlp.c_fc.weight,
            b(Act::Normed),
            b(Act::Hidden),
        )?;
        ops.bias_quick_gelu(b(Act::Hidden), blk.mlp.c_fc.bias, rows, shape.mlp_width)?;
        ops.gemm(
            &linear(shape.mlp_width, w),
            blk.mlp.c_proj.weight,
            b(Act::Hidden),
            b(Act::Branch),
        )?;
        ops.add_bias(b(Act::Branch), blk.mlp.c_proj.bias, rows, w)?;
        if let Some(h) = hook.as_mut() {
            h(ops, i, stream, b(Act::Branch))?;
        }
    }
    let pending = (!weights.resblocks.is_empty()).then(|| b(Act::Branch));
    // ln_post is per row, so normalising every token and keeping the class rows equals
    // OpenAI CLIP's ln_post(x[:, 0, :]).
    ops.add_layernorm(
        stream,
        pending,
        None,
        b(Act::Normed),
        weights.ln_post.weight,
        weights.ln_post.bias,
        rows,
        w,
    )?;
    ops.take_rows(b(Act::Normed), b(Act::Class), batch, t, w)?;
    ops.gemm(
        &gemm_spec(batch, w, shape.embed_dim, WeightLayout::InOut),
        weights.proj,
        b(Act::Class),
        b(Act::Embedding),
    )?;
    Ok(())
}

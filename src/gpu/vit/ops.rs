//! The small set of operations the ViT-B/32 forward is written over, and the one function that
//! lays out every GEMM for both implementations.
//!
//! Each operation is one kernel of `kernels/vit.cu` (or one cuBLASLt call); [`super::cpu::CpuOps`]
//! gives each its reference semantics on the CPU and `CudaOps` launches it. Activations are
//! [`Buf`]s: ranges of one arena planned per batch size ([`super::plan`]); weights are handles
//! returned by [`Ops::upload`].

use super::{Act, EngineError};

/// A planned activation buffer: `len` values of the activation's [`super::Dtype`] at `offset`
/// 2-byte slots into the arena of one batch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub act: Act,
    pub offset: usize,
    pub len: usize,
}

impl Buf {
    /// Slots the buffer spans.
    pub fn slots(&self) -> usize {
        self.len * self.act.dtype().slots()
    }

    /// One past the last slot.
    pub fn end(&self) -> usize {
        self.offset + self.slots()
    }

    /// Whether two buffers share any value.
    pub fn overlaps(&self, other: &Buf) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// How a weight matrix is stored (row-major, as in the checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in]`: a `Linear` weight (and conv1 flattened), applied as `x W^T`.
    OutIn,
    /// `[in, out]`: `visual.proj`, applied as `x P`.
    InOut,
}

/// One GEMM in cuBLAS terms (column-major): `C[m, n] = op(A)[m, k] * op(B)[k, n]`, with A the
/// weight and B the activations. Both [`super::cpu::CpuOps`] and `CudaOps` read only this, so
/// a wrong transpose or leading dimension gives wrong numbers on the CPU too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub transa: bool,
    pub transb: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// The GEMM of row-major `Y[rows, outputs] = X[rows, inputs] * weight`. Row-major `Y` is
/// column-major `Y^T[outputs, rows] = W' X^T`: `X^T` is `X`'s memory read column-major with
/// leading dimension `inputs`; an `[out, in]` weight read column-major is `W^T`, so it is
/// transposed back (`transa`), while an `[in, out]` weight read column-major is already the
/// `[out, in]` operand.
pub fn gemm_spec(rows: usize, inputs: usize, outputs: usize, layout: WeightLayout) -> GemmSpec {
    GemmSpec {
        m: outputs,
        n: rows,
        k: inputs,
        transa: layout == WeightLayout::OutIn,
        transb: false,
        lda: match layout {
            WeightLayout::OutIn => inputs,
            WeightLayout::InOut => outputs,
        },
        ldb: inputs,
        ldc: outputs,
    }
}

/// Values a column-major operand of `rows x cols` (as stored) spans with leading dimension
/// `ld`, or an error when `ld` is too small for it.
fn span(what: &str, rows: usize, cols: usize, ld: usize) -> Result<usize, EngineError> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    if ld < rows {
        return Err(EngineError::Layout(format!(
            "{what}: leading dimension {ld} < {rows} stored rows"
        )));
    }
    ld.checked_mul(cols - 1)
        .and_then(|v| v.checked_add(rows))
        .ok_or_else(|| EngineError::Layout(format!("{what}: size overflows")))
}

impl GemmSpec {
    /// Stored (rows, cols) of A, B and C.
    pub fn stored(&self) -> [(usize, usize); 3] {
        [
            if self.transa {
                (self.k, self.m)
            } else {
                (self.m, self.k)
            },
            if self.transb {
                (self.n, self.k)
            } else {
                (self.k, self.n)
            },
            (self.m, self.n),
        ]
    }

    /// Checks the leading dimensions and that A, B and C fit in buffers of these lengths.
    pub fn check(&self, a_len: usize, b_len: usize, c_len: usize) -> Result<(), EngineError> {
        let [a, b, c] = self.stored();
        for (what, (r, cl), ld, have) in [
            ("A", a, self.lda, a_len),
            ("B", b, self.ldb, b_len),
            ("C", c, self.ldc, c_len),
        ] {
            let need = span(what, r, cl, ld)?;
            if need > have {
                return Err(EngineError::Layout(format!(
                    "GEMM {self:?}: operand {what} spans {need} values, its buffer holds {have}"
                )));
            }
        }
        Ok(())
    }
}

/// The operations of the forward. Every call is one kernel launch (or GEMM) on the device;
/// `CpuOps` runs it at once.
pub trait Ops {
    /// A weight uploaded once.
    type Weight: Copy;

    /// Uploads a weight (f32 values; the device may store them in fp16).
    fn upload(&mut self, name: &str, values: &[f32]) -> Result<Self::Weight, EngineError>;

    /// Length in values of an uploaded weight.
    fn weight_len(&self, w: Self::Weight) -> usize;

    /// `crops [batch, 3, size, size]` -> `out [batch * (size/patch)^2, 3 * patch * patch]`, in
    /// the order of conv1's weight flattened.
    fn patchify(
        &mut self,
        crops: Buf,
        out: Buf,
        batch: usize,
        size: usize,
        patch: usize,
    ) -> Result<(), EngineError>;

    /// `c = op(w) * op(a)` as laid out by `spec` (fp16 in, fp32 accumulate, fp16 out on the GPU).
    fn gemm(&mut self, spec: &GemmSpec, w: Self::Weight, a: Buf, c: Buf)
    -> Result<(), EngineError>;

    /// `out[b, t] = (t == 0 ? class : patches[b, t - 1]) + positional[t]`.
    #[allow(clippy::too_many_arguments)]
    fn embed_tokens(
        &mut self,
        patches: Buf,
        class: Self::Weight,
        positional: Self::Weight,
        out: Buf,
        batch: usize,
        n_patches: usize,
        width: usize,
    ) -> Result<(), EngineError>;

    /// Per row: `sum = x + residual` (stored to `sum_out` when given; `x` alone without a
    /// residual), `norm_out = LayerNorm(sum) * gamma + beta` with fp32 statistics. `x` and
    /// `sum_out` are fp32 (the stream), `residual` fp16; `norm_out` is fp16, or fp32 when it is
    /// `x` itself (`ln_pre`, in place).
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm(
        &mut self,
        x: Buf,
        residual: Option<Buf>,
        sum_out: Option<Buf>,
        norm_out: Buf,
        gamma: Self::Weight,
        beta: Self::Weight,
        rows: usize,
        width: usize,
    ) -> Result<(), EngineError>;

    /// `x[r, c] += bias[c]`, in place.
    fn add_bias(
        &mut self,
        x: Buf,
        bias: Self::Weight,
        rows: usize,
        cols: usize,
    ) -> Result<(), EngineError>;

    /// `x = QuickGELU(x + bias)`, in place.
    fn bias_quick_gelu(
        &mut self,
        x: Buf,
        bias: Self::Weight,
        rows: usize,
        cols: usize,
    ) -> Result<(), EngineError>;

    /// Multi-head self-attention: `qkv [batch * tokens, 3 * width]` (q, k, v side by side) ->
    /// `out [batch * tokens, width]`, scale `1/sqrt(head_dim)`.
    fn attention(
        &mut self,
        qkv: Buf,
        out: Buf,
        batch: usize,
        tokens: usize,
        width: usize,
        heads: usize,
    ) -> Result<(), EngineError>;

    /// `dst[i] = src[i * stride]` for `count` rows of `width` values (the class tokens).
    fn take_rows(
        &mut self,
        src: Buf,
        dst: Buf,
        count: usize,
        stride: usize,
        width: usize,
    ) -> Result<(), EngineError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_gemm_reads_the_weight_transposed_and_proj_as_stored() {
        let s = gemm_spec(100, 768, 2304, WeightLayout::OutIn);
        assert_eq!(
            (s.m, s.n, s.k, s.transa, s.transb),
            (2304, 100, 768, true, false)
        );
        assert_eq!((s.lda, s.ldb, s.ldc), (768, 768, 2304));
        s.check(2304 * 768, 100 * 768, 100 * 2304).unwrap();
        let p = gemm_spec(2, 768, 512, WeightLayout::InOut);
        assert_eq!((p.transa, p.lda), (false, 512));
        p.check(768 * 512, 2 * 768, 2 * 512).unwrap();
    }

    #[test]
    fn a_buffer_too_short_or_a_leading_dimension_too_small_is_named() {
        let s = gemm_spec(10, 64, 128, WeightLayout::OutIn);
        let e = s.check(64 * 128, 10 * 64 - 1, 10 * 128).unwrap_err();
        assert!(e.to_string().contains("operand B"), "{e}");
        let bad = GemmSpec { lda: 63, ..s };
        let e = bad.check(64 * 128, 10 * 64, 10 * 128).unwrap_err();
        assert!(e.to_string().contains("leading dimension 63"), "{e}");
    }
}

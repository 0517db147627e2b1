//! The native engine on a CUDA device: the kernels of `kernels/vit.cu` (NVRTC) and cuBLASLt
//! GEMMs (fp16 in, fp32 accumulate; fp16 out, fp32 for the embeddings), one arena shared by the
//! batch buckets (one forward runs at a time, on one stream), each bucket's forward captured as
//! one CUDA graph on first use.
//!
//! Every operation reads its layout from the same [`Buf`]s and [`GemmSpec`]s as
//! [`super::cpu::CpuOps`], which CI checks against ONNX Runtime; what only a GPU can confirm
//! (that each kernel matches its twin, graph capture, speed) is `dfwatch gpu-check`, run by
//! tools/gpu-check.sh.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg, result as drv, sys as dsys,
};
use half::f16;

use super::ops::{Buf, GemmSpec, Ops};
use super::{Act, BUCKETS, Dtype, EngineError, LN_EPS, Plan, VitShape, VitWeights, forward};
use crate::model::ModelBundle;

/// Launches kernel `$f` on the ops' stream with the arguments in order.
macro_rules! launch {
    ($ops:expr, $f:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let mut b = $ops.stream.launch_builder($f);
        $( b.arg($arg); )*
        // SAFETY: every caller passes the kernel's parameters in order with the C types of
        // kernels/vit.cu (pointers as u64 device addresses inside the arena or a weight, int
        // as i32, long long as i64, float as f32), and sized its grid to the buffers it checked.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(dev)
    }};
}

fn dev(e: impl std::fmt::Debug) -> EngineError {
    EngineError::Device(format!("{e:?}"))
}

fn int(v: usize, what: &str) -> Result<i32, EngineError> {
    i32::try_from(v).map_err(|_| EngineError::Layout(format!("{what} {v} exceeds a kernel int")))
}

fn blocks(n: usize, per: usize) -> Result<u32, EngineError> {
    u32::try_from(n.div_ceil(per)).map_err(|_| EngineError::Layout(format!("grid of {n}")))
}

/// The kernels that share a parameter list.
#[derive(Clone, Copy)]
enum Kernel {
    AddBias,
    BiasQuickGelu,
}

struct Kernels {
    patchify: CudaFunction,
    embed_tokens: CudaFunction,
    add_layernorm: CudaFunction,
    layernorm_f32: CudaFunction,
    add_bias: CudaFunction,
    bias_quick_gelu: CudaFunction,
    attention: CudaFunction,
    take_rows: CudaFunction,
}

/// A cuBLASLt handle, destroyed on drop.
struct LtHandle(ltsys::cublasLtHandle_t);

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}

/// One GEMM's descriptors and the algorithm cuBLASLt's heuristic chose, made once per shape.
struct LtGemm {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    c: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: each non-null handle was created once by `make_gemm` and is owned here alone.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// [`Ops`] on one CUDA device.
pub struct CudaOps {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// `crop_rgb_fp16` and `crop_nv12_fp16` of kernels/crop.cu, for the daemon's GPU crop
    /// into the batch.
    pub crop_rgb: CudaFunction,
    pub crop_nv12: CudaFunction,
    k: Kernels,
    lt: LtHandle,
    workspace: CudaSlice<u8>,
    weights: Vec<(CudaSlice<f16>, u64, usize)>,
    /// Base pointer and length in slots of the arena the next operations use.
    arena: (u64, usize),
    gemms: HashMap<(GemmSpec, Dtype), LtGemm>,
    /// Bytes of weights uploaded.
    pub weight_bytes: usize,
}

const WORKSPACE_BYTES: usize = 32 << 20;

impl CudaOps {
    /// Creates a context on device `ordinal`, compiles the kernels for it and loads them.
    pub fn new(ordinal: usize) -> Result<Self, EngineError> {
        // SAFETY: these only try to dlopen each library.
        unsafe {
            if !cudarc::driver::sys::is_culib_present() {
                return Err(EngineError::Device(
                    "libcuda.so (the NVIDIA driver) not found".into(),
                ));
            }
            if !cudarc::cublaslt::sys::is_culib_present() {
                return Err(EngineError::Device(
                    "libcublasLt.so not found (set LD_LIBRARY_PATH to CUDA 13's lib64)".into(),
                ));
            }
        }
        let ctx = CudaContext::new(ordinal).map_err(dev)?;
        // One stream does all the work: no cross-stream events are needed, and events would be
        // recorded inside graph captures.
        // SAFETY: called before any allocation on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev)?;
        let arch = crate::gpu::arch_for(ctx.compute_capability().ok());
        let compiled =
            crate::gpu::compile_kernels(arch).map_err(|e| EngineError::Device(e.to_string()))?;
        let load = |file: &str| {
            let ptx = compiled
                .iter()
                .find(|(n, _)| *n == file)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| EngineError::Device(format!("{file} missing")))?;
            ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(dev)
        };
        let module = load("vit.cu")?;
        let crop_module = load("crop.cu")?;
        let crop_rgb = crop_module.load_function("crop_rgb_fp16").map_err(dev)?;
        let crop_nv12 = crop_module.load_function("crop_nv12_fp16").map_err(dev)?;
        let f = |n: &str| module.load_function(n).map_err(dev);
        let k = Kernels {
            patchify: f("patchify")?,
            embed_tokens: f("embed_tokens")?,
            add_layernorm: f("add_layernorm")?,
            layernorm_f32: f("layernorm_f32")?,
            add_bias: f("add_bias")?,
            bias_quick_gelu: f("bias_quick_gelu")?,
            attention: f("attention")?,
            take_rows: f("take_rows")?,
        };
        let lt = LtHandle(lt::create_handle().map_err(dev)?);
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(dev)?;
        Ok(CudaOps {
            ctx,
            stream,
            crop_rgb,
            crop_nv12,
            k,
            lt,
            workspace,
            weights: Vec::new(),
            arena: (0, 0),
            gemms: HashMap::new(),
            weight_bytes: 0,
        })
    }

    /// Points the operations at an arena (`slots` 2-byte slots at `base`).
    pub fn set_arena(&mut self, base: u64, slots: usize) {
        self.arena = (base, slots);
    }

    /// The device address of a planned buffer.
    pub fn ptr(&self, b: Buf) -> Result<u64, EngineError> {
        if b.end() > self.arena.1 || self.arena.0 == 0 {
            return Err(EngineError::Layout(format!(
                "{:?} ends at slot {}, the arena holds {}",
                b.act,
                b.end(),
                self.arena.1
            )));
        }
        Ok(self.arena.0 + 2 * b.offset as u64)
    }

    fn wptr(&self, w: usize) -> u64 {
        self.weights[w].1
    }

    fn gemm_plan(&mut self, spec: &GemmSpec, out: Dtype) -> Result<&LtGemm, EngineError> {
        let key = (*spec, out);
        if !self.gemms.contains_key(&key) {
            let g = self.make_gemm(spec, out)?;
            self.gemms.insert(key, g);
        }
        Ok(&self.gemms[&key])
    }

    fn make_gemm(&self, spec: &GemmSpec, out: Dtype) -> Result<LtGemm, EngineError> {
        use ltsys::cudaDataType_t::{CUDA_R_16F, CUDA_R_32F};
        let [(ar, ac), (br, bc), (cr, cc)] = spec.stored();
        let c_type = match out {
            Dtype::F16 => CUDA_R_16F,
            Dtype::F32 => CUDA_R_32F,
        };
        // Owned from the first handle on, so that an error part-way destroys what was made.
        let mut g = LtGemm {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: plain C struct, filled by the heuristic below before use.
            algo: unsafe { std::mem::zeroed() },
        };
        g.desc = lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(dev)?;
        let layout = |t, r: usize, c: usize, ld: usize| {
            lt::create_matrix_layout(t, r as u64, c as u64, ld as i64).map_err(dev)
        };
        g.a = layout(CUDA_R_16F, ar, ac, spec.lda)?;
        g.b = layout(CUDA_R_16F, br, bc, spec.ldb)?;
        g.c = layout(c_type, cr, cc, spec.ldc)?;
        for (attr, t) in [
            (
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                spec.transa,
            ),
            (
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                spec.transb,
            ),
        ] {
            let op = i32::from(t);
            // SAFETY: the attribute is a cublasOperation_t (an int); the pointer is valid for
            // its size during the call.
            unsafe {
                lt::set_matmul_desc_attribute(
                    g.desc,
                    attr,
                    (&op) as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(dev)?;
        }
        let pref = lt::create_matmul_pref().map_err(dev)?;
        let ws = WORKSPACE_BYTES;
        // SAFETY: valid handles; the workspace size attribute is a size_t.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .and_then(|_| {
                lt::get_matmul_algo_heuristic(self.lt.0, g.desc, g.a, g.b, g.c, g.c, pref)
            })
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let heuristic = heuristic.map_err(|e| {
            EngineError::Device(format!("cuBLASLt has no algorithm for {spec:?}: {e:?}"))
        })?;
        // Not `LtGemm { algo, ..g }`: the handles are Copy, so that would copy them out of a
        // `g` whose drop then destroys them.
        g.algo = heuristic.algo;
        Ok(g)
    }

    /// Copies `values` into a planned buffer, in the buffer's dtype.
    pub fn write(&self, b: Buf, values: &[f32]) -> Result<(), EngineError> {
        if values.len() > b.len {
            return Err(EngineError::Layout(format!(
                "{} values into {:?} of {}",
                values.len(),
                b.act,
                b.len
            )));
        }
        let dst = self.ptr(b)?;
        let s = self.stream.cu_stream();
        // SAFETY: dst..dst + values lies in the arena (checked by ptr and len); the host
        // slices live until the synchronize.
        match b.act.dtype() {
            Dtype::F16 => {
                let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                unsafe { drv::memcpy_htod_async(dst, &h, s) }.map_err(dev)?;
                self.stream.synchronize().map_err(dev)
            }
            Dtype::F32 => {
                unsafe { drv::memcpy_htod_async(dst, values, s) }.map_err(dev)?;
                self.stream.synchronize().map_err(dev)
            }
        }
    }

    /// The first `n` values of a planned buffer, as f32.
    pub fn download(&self, b: Buf, n: usize) -> Result<Vec<f32>, EngineError> {
        if n > b.len {
            return Err(EngineError::Layout(format!("{n} values of {:?}", b.act)));
        }
        let src = self.ptr(b)?;
        let s = self.stream.cu_stream();
        // SAFETY: src..src + n values lies in the arena; the destination holds n values and
        // lives until the synchronize.
        match b.act.dtype() {
            Dtype::F32 => {
                let mut out = vec![0f32; n];
                unsafe { drv::memcpy_dtoh_async(&mut out, src, s) }.map_err(dev)?;
                self.stream.synchronize().map_err(dev)?;
                Ok(out)
            }
            Dtype::F16 => {
                let mut out = vec![f16::ZERO; n];
                unsafe { drv::memcpy_dtoh_async(&mut out, src, s) }.map_err(dev)?;
                self.stream.synchronize().map_err(dev)?;
                Ok(out.into_iter().map(f32::from).collect())
            }
        }
    }

    /// The two in-place bias kernels (same parameters: x, bias, cols, total).
    fn with_bias(
        &self,
        k: Kernel,
        x: Buf,
        bias: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), EngineError> {
        let total = rows * cols;
        self.check(&[(x, total)])?;
        self.check_weight(bias, cols)?;
        let (p, b) = (self.ptr(x)?, self.wptr(bias));
        let (c, t) = (int(cols, "cols")?, total as i64);
        let f = match k {
            Kernel::AddBias => &self.k.add_bias,
            Kernel::BiasQuickGelu => &self.k.bias_quick_gelu,
        };
        launch!(self, f, cfg1d(total)?; &p, &b, &c, &t)
    }

    /// A weight handle holds at least `n` values (a kernel reads that many).
    fn check_weight(&self, w: usize, n: usize) -> Result<(), EngineError> {
        match self.weights.get(w) {
            Some(x) if x.2 >= n => Ok(()),
            Some(x) => Err(EngineError::Layout(format!(
                "weight {w} holds {} values, the kernel reads {n}",
                x.2
            ))),
            None => Err(EngineError::Layout(format!("no weight {w}"))),
        }
    }

    fn check(&self, bufs: &[(Buf, usize)]) -> Result<(), EngineError> {
        for (b, n) in bufs {
            if *n > b.len {
                return Err(EngineError::Layout(format!(
                    "needs {n} values of {:?}, it holds {}",
                    b.act, b.len
                )));
            }
            self.ptr(*b)?;
        }
        Ok(())
    }
}

fn cfg1d(n: usize) -> Result<LaunchConfig, EngineError> {
    Ok(LaunchConfig {
        grid_dim: (blocks(n, 256)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Ops for CudaOps {
    type Weight = usize;

    fn upload(&mut self, _name: &str, values: &[f32]) -> Result<usize, EngineError> {
        let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        let d = self.stream.clone_htod(&h).map_err(dev)?;
        let p = {
            let (p, _sync) = d.device_ptr(&self.stream);
            p
        };
        self.weight_bytes += 2 * h.len();
        self.weights.push((d, p, h.len()));
        Ok(self.weights.len() - 1)
    }

    fn weight_len(&self, w: usize) -> usize {
        self.weights[w].2
    }

    fn patchify(
        &mut self,
        crops: Buf,
        out: Buf,
        batch: usize,
        size: usize,
        patch: usize,
    ) -> Result<(), EngineError> {
        let grid = size / patch;
        let total = batch * grid * grid * 3 * patch * patch;
        self.check(&[(crops, batch * 3 * size * size), (out, total)])?;
        let (c, o) = (self.ptr(crops)?, self.ptr(out)?);
        let (b, s, p) = (
            int(batch, "batch")?,
            int(size, "size")?,
            int(patch, "patch")?,
        );
        launch!(self, &self.k.patchify, cfg1d(total)?; &c, &b, &s, &p, &o)
    }

    fn gemm(&mut self, spec: &GemmSpec, w: usize, a: Buf, c: Buf) -> Result<(), EngineError> {
        spec.check(self.weight_len(w), a.len, c.len)?;
        if a.act.dtype() != Dtype::F16 {
            return Err(EngineError::Layout(format!(
                "GEMM input {:?} is not fp16",
                a.act
            )));
        }
        let (pa, pb, pc) = (self.wptr(w), self.ptr(a)?, self.ptr(c)?);
        let (h, ws, ws_len) = {
            let (p, _sync) = self.workspace.device_ptr(&self.stream);
            (self.lt.0, p, WORKSPACE_BYTES)
        };
        let stream = self.stream.cu_stream();
        let g = self.gemm_plan(spec, c.act.dtype())?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the layouts were made from `spec`, which `check` proved fits the weight and
        // both buffers; pointers are device addresses of live allocations; alpha and beta are
        // f32 as the scale type says; the workspace is WORKSPACE_BYTES long.
        unsafe {
            lt::matmul(
                h,
                g.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                pa as *const c_void,
                g.a,
                pb as *const c_void,
                g.b,
                pc as *const c_void,
                g.c,
                pc as *mut c_void,
                g.c,
                &g.algo,
                ws as *mut c_void,
                ws_len,
                stream as ltsys::cudaStream_t,
            )
        }
        .map_err(dev)
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
        let total = batch * (n_patches + 1) * width;
        self.check(&[(patches, batch * n_patches * width), (out, total)])?;
        self.check_weight(class, width)?;
        self.check_weight(positional, (n_patches + 1) * width)?;
        let (p, o) = (self.ptr(patches)?, self.ptr(out)?);
        let (c, pos) = (self.wptr(class), self.wptr(positional));
        let (b, n, w) = (
            int(batch, "batch")?,
            int(n_patches, "patches")?,
            int(width, "width")?,
        );
        launch!(self, &self.k.embed_tokens, cfg1d(total)?; &p, &c, &pos, &b, &n, &w, &o)
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
        self.check(&[(x, n), (norm_out, n)])?;
        self.check_weight(gamma, width)?;
        self.check_weight(beta, width)?;
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "rows")? as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: ((width + 32) * 4) as u32,
        };
        let (px, pn) = (self.ptr(x)?, self.ptr(norm_out)?);
        let (g, bt) = (self.wptr(gamma), self.wptr(beta));
        let w = int(width, "width")?;
        let eps = LN_EPS;
        if x.act.dtype() != Dtype::F32 {
            return Err(EngineError::Layout(format!(
                "LayerNorm input {:?} is not fp32",
                x.act
            )));
        }
        if norm_out.act.dtype() == Dtype::F32 {
            if residual.is_some() || sum_out.is_some() {
                return Err(EngineError::Layout(
                    "an fp32 LayerNorm output takes no residual".into(),
                ));
            }
            return launch!(self, &self.k.layernorm_f32, cfg; &px, &pn, &g, &bt, &w, &eps);
        }
        let pr = match residual {
            Some(r) => {
                self.check(&[(r, n)])?;
                self.ptr(r)?
            }
            None => 0u64,
        };
        let ps = match sum_out {
            Some(s) => {
                self.check(&[(s, n)])?;
                self.ptr(s)?
            }
            None => 0u64,
        };
        launch!(self, &self.k.add_layernorm, cfg; &px, &pr, &ps, &pn, &g, &bt, &w, &eps)
    }

    fn add_bias(
        &mut self,
        x: Buf,
        bias: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), EngineError> {
        self.with_bias(Kernel::AddBias, x, bias, rows, cols)
    }

    fn bias_quick_gelu(
        &mut self,
        x: Buf,
        bias: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), EngineError> {
        self.with_bias(Kernel::BiasQuickGelu, x, bias, rows, cols)
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
        self.check(&[
            (qkv, batch * tokens * 3 * width),
            (out, batch * tokens * width),
        ])?;
        let hd = width / heads;
        if tokens > super::ATTENTION_MAX_TOKENS || hd > super::ATTENTION_HEAD_DIM {
            return Err(EngineError::Unsupported(format!(
                "attention over {tokens} tokens with heads of {hd}"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (int(heads, "heads")? as u32, int(batch, "batch")? as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (q, o) = (self.ptr(qkv)?, self.ptr(out)?);
        let (t, w, h) = (
            int(tokens, "tokens")?,
            int(width, "width")?,
            int(hd, "head")?,
        );
        let scale = 1.0 / (hd as f32).sqrt();
        launch!(self, &self.k.attention, cfg; &q, &t, &w, &h, &scale, &o)
    }

    fn take_rows(
        &mut self,
        src: Buf,
        dst: Buf,
        count: usize,
        stride: usize,
        width: usize,
    ) -> Result<(), EngineError> {
        self.check(&[(dst, count * width)])?;
        if count > 0 {
            self.check(&[(src, ((count - 1) * stride + 1) * width)])?;
        }
        let (s, d) = (self.ptr(src)?, self.ptr(dst)?);
        let (c, st, w) = (
            int(count, "count")?,
            int(stride, "stride")?,
            int(width, "width")?,
        );
        launch!(self, &self.k.take_rows, cfg1d(count * width)?; &s, &c, &st, &w, &d)
    }
}

/// The native engine on a GPU: weights uploaded once, one arena for every bucket, a CUDA graph
/// per bucket.
pub struct CudaEngine {
    // Fields drop in order: the graphs before the memory and the module they refer to.
    graphs: HashMap<usize, CudaGraph>,
    arena: CudaSlice<u8>,
    pub ops: CudaOps,
    weights: VitWeights<usize>,
    shape: VitShape,
    plans: Vec<Plan>,
}

impl CudaEngine {
    /// Loads a bundle's image tower onto device `ordinal` and plans every bucket.
    pub fn new(bundle: &ModelBundle, ordinal: usize) -> Result<Self, EngineError> {
        let shape = VitShape::new(bundle.architecture())?;
        Self::from_source(&super::read_tower(bundle)?, shape, ordinal)
    }

    /// The engine over any source of the checkpoint's tensors, on device `ordinal`.
    pub fn from_source(
        src: &impl super::TensorSource,
        shape: VitShape,
        ordinal: usize,
    ) -> Result<Self, EngineError> {
        let mut ops = CudaOps::new(ordinal)?;
        let weights = VitWeights::load(&mut ops, src, &shape)?;
        let plans = BUCKETS
            .iter()
            .map(|&b| Plan::new(&shape, b))
            .collect::<Result<Vec<_>, _>>()?;
        let slots = plans.iter().map(|p| p.len).max().unwrap_or(0);
        let arena = ops.stream.alloc_zeros::<u8>(2 * slots).map_err(dev)?;
        let base = {
            let (p, _sync) = arena.device_ptr(&ops.stream);
            p
        };
        ops.set_arena(base, slots);
        Ok(CudaEngine {
            ops,
            weights,
            shape,
            plans,
            arena,
            graphs: HashMap::new(),
        })
    }

    pub fn shape(&self) -> &VitShape {
        &self.shape
    }

    /// The ops and the weight handles, for running a forward through a wrapper of the ops.
    pub fn parts(&mut self) -> (&mut CudaOps, &VitWeights<usize>) {
        (&mut self.ops, &self.weights)
    }

    /// Bytes of the shared arena.
    pub fn arena_bytes(&self) -> usize {
        self.arena.len()
    }

    /// The plan of the smallest bucket that holds `n` crops.
    pub fn bucket(&self, n: usize) -> Result<&Plan, EngineError> {
        self.plans.iter().find(|p| p.batch >= n).ok_or_else(|| {
            EngineError::Layout(format!(
                "{n} crops: the largest bucket holds {}",
                BUCKETS.last().copied().unwrap_or(0)
            ))
        })
    }

    /// Uploads `n` normalised crops into the bucket's input.
    pub fn upload(&mut self, pixels: &[f32], n: usize) -> Result<Plan, EngineError> {
        if n == 0 || pixels.len() != n * self.shape.crop_len() {
            return Err(EngineError::Layout(format!(
                "{} pixel values for {n} crops of {}",
                pixels.len(),
                self.shape.crop_len()
            )));
        }
        let plan = self.bucket(n)?.clone();
        self.ops.write(plan.buf(Act::Crops), pixels)?;
        Ok(plan)
    }

    fn eager(&mut self, plan: &Plan) -> Result<(), EngineError> {
        forward(
            &mut self.ops,
            &self.weights,
            &self.shape,
            plan,
            plan.batch,
            None,
        )
    }

    /// Runs the bucket's forward: eagerly, or through its CUDA graph. The first graph call of a
    /// bucket runs eagerly (leaving the outputs in the arena) and then captures the graph
    /// without launching it: the eager pass has overwritten the input (the crops share memory
    /// with later activations), so a launch right after would compute from garbage.
    pub fn run(&mut self, plan: &Plan, graph: bool) -> Result<(), EngineError> {
        if !graph {
            return self.eager(plan);
        }
        if let Some(g) = self.graphs.get(&plan.batch) {
            return g.launch().map_err(dev);
        }
        // Descriptors and algorithms are chosen outside the capture, by this eager pass.
        self.eager(plan)?;
        self.ops.stream.synchronize().map_err(dev)?;
        self.ops
            .stream
            .begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(dev)?;
        let recorded = self.eager(plan);
        let captured = self
            .ops
            .stream
            .end_capture(dsys::CUgraphInstantiate_flags(0));
        // The forward's own error is the cause; a capture error follows from it.
        recorded?;
        let g = captured
            .map_err(dev)?
            .ok_or_else(|| EngineError::Device("the capture made no graph".into()))?;
        g.upload().map_err(dev)?;
        self.graphs.insert(plan.batch, g);
        Ok(())
    }

    /// Whether the bucket's graph is captured (its next graph run replays it).
    pub fn captured(&self, batch: usize) -> bool {
        self.graphs.contains_key(&batch)
    }

    /// Embeddings of `n` crops.
    pub fn encode(
        &mut self,
        pixels: &[f32],
        n: usize,
        graph: bool,
    ) -> Result<Vec<f32>, EngineError> {
        let plan = self.upload(pixels, n)?;
        self.run(&plan, graph)?;
        self.ops
            .download(plan.buf(Act::Embedding), n * self.shape.embed_dim)
    }

    /// Eager forward of `n` crops returning the residual stream after every block, like
    /// [`super::cpu::CpuEngine::encode_with_layers`].
    pub fn encode_with_layers(
        &mut self,
        pixels: &[f32],
        n: usize,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>), EngineError> {
        let plan = self.upload(pixels, n)?;
        let rows = plan.batch * self.shape.tokens() * self.shape.width;
        let keep = n * self.shape.tokens() * self.shape.width;
        let mut layers = Vec::new();
        let mut hook = |ops: &mut CudaOps, _: usize, s: Buf, b: Buf| -> Result<(), EngineError> {
            let (x, y) = (ops.download(s, rows)?, ops.download(b, rows)?);
            layers.push(x.iter().zip(&y).take(keep).map(|(a, b)| a + b).collect());
            Ok(())
        };
        forward(
            &mut self.ops,
            &self.weights,
            &self.shape,
            &plan,
            plan.batch,
            Some(&mut hook),
        )?;
        let e = self
            .ops
            .download(plan.buf(Act::Embedding), n * self.shape.embed_dim)?;
        Ok((e, layers))
    }

    /// Runs one bucket's forward `iters` times and waits; for timing.
    pub fn run_timed(
        &mut self,
        plan: &Plan,
        graph: bool,
        iters: usize,
    ) -> Result<f64, EngineError> {
        self.run(plan, graph)?;
        self.ops.stream.synchronize().map_err(dev)?;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            self.run(plan, graph)?;
        }
        self.ops.stream.synchronize().map_err(dev)?;
        Ok(t.elapsed().as_secs_f64() / iters as f64)
    }

    /// Device memory in use as the driver reports it (total - free).
    pub fn device_used_bytes(&self) -> Result<usize, EngineError> {
        let (free, total) = self.ops.ctx.mem_get_info().map_err(dev)?;
        Ok(total - free)
    }
}

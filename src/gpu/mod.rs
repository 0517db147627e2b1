//! GPU path (feature `cuda`, cudarc with every CUDA library loaded at run time): the fused
//! crop kernels, the native ViT-B/32 engine ([`vit`]), and the daemon's GPU backend
//! ([`backend`]: `model.backend = "cuda"`, the device chosen by `[gpu]`).
//!
//! [`probe`] is what `dfwatch gpu-info` prints (each CUDA library present or not, the devices
//! and their compute capability); [`compile_kernels`] compiles `kernels/*.cu` with NVRTC, which
//! CI runs on a machine without a GPU. [`vit`] and [`backend`] have CPU twins that are always
//! built (and run in CI); their device sides need `cuda`. [`check_backend`] is the start-up
//! check `validate` and the daemon share: a missing feature, driver, library, header or device
//! is named.

use std::path::PathBuf;

use serde::Serialize;

pub mod backend;
#[cfg(feature = "cuda")]
pub mod crop;
#[cfg(feature = "cuda")]
pub mod device;
pub mod face;
pub mod vit;

/// The CUDA C++ kernels, compiled at run time by NVRTC (no CUDA toolkit needed to build).
pub const KERNELS: &[(&str, &str)] = &[
    ("crop.cu", include_str!("../../kernels/crop.cu")),
    ("vit.cu", include_str!("../../kernels/vit.cu")),
];

/// Why the GPU path cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error(
        "the GPU path is not available: dfwatch was built without the `cuda` feature (build \
         with `--features cuda`, or use model.backend = \"cpu\")"
    )]
    FeatureDisabled,
    #[error("CUDA library {0} not found (searched the loader path; set LD_LIBRARY_PATH)")]
    MissingLibrary(&'static str),
    #[error(
        "no CUDA headers found (cuda_fp16.h); looked in: {0}. Set DFWATCH_CUDA_INCLUDE or \
         CUDA_PATH, or run ./tools/setup.sh (nvidia-cuda-runtime wheel)"
    )]
    NoHeaders(String),
    #[error("NVRTC could not compile {kernel}: {log}")]
    Compile { kernel: String, log: String },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("gpu.device = {ordinal}, but this machine has {count} CUDA device(s)")]
    NoDevice { ordinal: usize, count: usize },
}

/// `[gpu]`: the device of `model.backend = "cuda"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// CUDA device ordinal (as `nvidia-smi` lists them, unless CUDA_VISIBLE_DEVICES reorders).
    /// Range 0 to 63.
    pub device: u32,
}

impl GpuConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<crate::validation::ConfigError>) {
        crate::validation::Checker::new(path, errors).count(
            "device",
            u64::from(self.device),
            0..=63,
        );
    }
}

/// Reports whether the GPU backend can be used in this build (the machine is
/// [`check_backend`]'s).
pub fn availability() -> Result<(), GpuError> {
    if cfg!(feature = "cuda") {
        Ok(())
    } else {
        Err(GpuError::FeatureDisabled)
    }
}

/// What `model.backend = "cuda"` needs of this build and machine, checked without loading a
/// model: the feature, the driver, NVRTC, cuBLASLt, the CUDA headers NVRTC compiles with, and
/// the device `[gpu] device`. `Ok` says which device it found.
pub fn check_backend(gpu: &GpuConfig) -> Result<String, GpuError> {
    availability()?;
    #[cfg(feature = "cuda")]
    {
        for (name, present) in cuda::libraries() {
            if !present && name != "libcublas" {
                return Err(GpuError::MissingLibrary(name));
            }
        }
        let include = find_include_dir()?;
        let ordinal = gpu.device as usize;
        let d = cuda::device(ordinal)?;
        Ok(format!(
            "device {ordinal}: {} (compute capability {}.{}); CUDA headers in {}",
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            include.display()
        ))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = gpu;
        Err(GpuError::FeatureDisabled)
    }
}

/// One CUDA device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
}

/// What this build and machine offer for the GPU path.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    pub feature_cuda: bool,
    /// Library name -> loadable.
    pub libraries: Vec<(&'static str, bool)>,
    pub devices: Vec<DeviceInfo>,
    /// Why no device could be listed, if none was.
    pub device_error: Option<String>,
    pub include_dir: Option<PathBuf>,
    /// The engine itself.
    pub engine: String,
}

/// Directories that may hold `cuda_fp16.h`, in the order they are tried: `$DFWATCH_CUDA_INCLUDE`,
/// `$CUDA_PATH/include`, `/usr/local/cuda/include`, the `nvidia-cuda-runtime` wheel in
/// `.venv` (what tools/setup.sh installs for CI).
pub fn include_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("DFWATCH_CUDA_INCLUDE") {
        out.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("CUDA_PATH") {
        out.push(PathBuf::from(p).join("include"));
    }
    out.push(PathBuf::from("/usr/local/cuda/include"));
    if let Ok(dir) = std::fs::read_dir(".venv/lib") {
        for py in dir.flatten() {
            out.push(py.path().join("site-packages/nvidia/cu13/include"));
        }
    }
    out
}

/// The first candidate directory that has `cuda_fp16.h`.
pub fn find_include_dir() -> Result<PathBuf, GpuError> {
    let c = include_candidates();
    c.iter()
        .find(|d| d.join("cuda_fp16.h").is_file())
        .cloned()
        .ok_or_else(|| {
            GpuError::NoHeaders(
                c.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use std::path::Path;

    /// Each library on its own: cudarc panics when a library it needs is missing, so nothing
    /// is called before its `is_culib_present` said yes.
    pub fn libraries() -> Vec<(&'static str, bool)> {
        // SAFETY: these only try to dlopen the library by its candidate names.
        unsafe {
            vec![
                ("libcuda (driver)", cudarc::driver::sys::is_culib_present()),
                ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
                ("libcublas", cudarc::cublas::sys::is_culib_present()),
                ("libcublasLt", cudarc::cublaslt::sys::is_culib_present()),
            ]
        }
    }

    /// CUDA devices the driver lists (the driver checked first).
    fn device_count() -> Result<usize, GpuError> {
        // SAFETY: see libraries().
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::MissingLibrary("libcuda.so (NVIDIA driver)"));
        }
        let n = cudarc::driver::CudaContext::device_count()
            .map_err(|e| GpuError::Driver(format!("{e:?}")))?;
        Ok(n.max(0) as usize)
    }

    /// Device `ordinal` alone (a context on it, none on the others).
    pub fn device(ordinal: usize) -> Result<DeviceInfo, GpuError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| GpuError::Driver(format!("device {ordinal}: {e:?}")))?;
        Ok(DeviceInfo {
            ordinal,
            name: ctx.name().unwrap_or_default(),
            compute_capability: ctx.compute_capability().unwrap_or((0, 0)),
        })
    }

    pub fn devices() -> Result<Vec<DeviceInfo>, GpuError> {
        (0..device_count()?).map(device).collect()
    }

    pub fn compile(
        include: &Path,
        arch: &'static str,
    ) -> Result<Vec<(&'static str, String)>, GpuError> {
        // SAFETY: see libraries().
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::MissingLibrary("libnvrtc.so.13"));
        }
        KERNELS
            .iter()
            .map(|(name, src)| {
                let opts = cudarc::nvrtc::CompileOptions {
                    include_paths: vec![include.display().to_string()],
                    arch: Some(arch),
                    name: Some((*name).to_string()),
                    options: vec!["--std=c++17".into()],
                    ..Default::default()
                };
                cudarc::nvrtc::compile_ptx_with_opts(src, opts)
                    .map(|ptx| (*name, ptx.to_src()))
                    .map_err(|e| GpuError::Compile {
                        kernel: (*name).to_string(),
                        log: format!("{e:?}"),
                    })
            })
            .collect()
    }
}

/// Compiles every kernel with NVRTC for `arch` (e.g. `compute_90`, `sm_90`); returns each
/// kernel's PTX.
pub fn compile_kernels(arch: &'static str) -> Result<Vec<(&'static str, String)>, GpuError> {
    #[cfg(feature = "cuda")]
    {
        let include = find_include_dir()?;
        cuda::compile(&include, arch)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = arch;
        Err(GpuError::FeatureDisabled)
    }
}

/// What `dfwatch gpu-info` reports.
pub fn probe() -> GpuInfo {
    #[cfg(feature = "cuda")]
    let (libraries, devices) = (cuda::libraries(), cuda::devices());
    #[cfg(not(feature = "cuda"))]
    let (libraries, devices) = (
        Vec::new(),
        Err::<Vec<DeviceInfo>, _>(GpuError::FeatureDisabled),
    );
    let (devices, device_error) = match devices {
        Ok(d) => (d, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    GpuInfo {
        feature_cuda: cfg!(feature = "cuda"),
        libraries,
        devices,
        device_error,
        include_dir: find_include_dir().ok(),
        engine: match check_backend(&GpuConfig::default()) {
            Ok(line) => format!("model.backend = \"cuda\" can run: {line}"),
            Err(e) => format!("model.backend = \"cuda\" cannot run here: {e}"),
        },
    }
}

/// The `compute_XY` virtual architecture of a device (for NVRTC), or Hopper's when unknown.
pub fn arch_for(cc: Option<(i32, i32)>) -> &'static str {
    match cc {
        Some((10, _)) => "compute_100",
        Some((9, _)) => "compute_90",
        Some((8, 9)) => "compute_89",
        Some((8, 6)) => "compute_86",
        Some((8, _)) => "compute_80",
        Some((7, 5)) => "compute_75",
        _ => "compute_90",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_listed_and_names_its_entry_points() {
        let crop = KERNELS.iter().find(|(n, _)| *n == "crop.cu").unwrap().1;
        assert!(crop.contains("extern \"C\" __global__ void crop_rgb_fp16"));
        assert!(crop.contains("extern \"C\" __global__ void crop_nv12_fp16"));
    }

    /// Compiles every kernel with NVRTC when the library is there (CI sets
    /// DFWATCH_REQUIRE_NVRTC=1 with the nvidia-cuda-nvrtc wheel on LD_LIBRARY_PATH, so there it
    /// cannot be skipped).
    #[cfg(feature = "cuda")]
    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        let required = std::env::var_os("DFWATCH_REQUIRE_NVRTC").is_some();
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                !required,
                "DFWATCH_REQUIRE_NVRTC is set but libnvrtc cannot be loaded"
            );
            eprintln!("skipped: libnvrtc not on the loader path");
            return;
        }
        let ptx = compile_kernels("compute_90").unwrap_or_else(|e| panic!("{e}"));
        let crop = &ptx.iter().find(|(n, _)| *n == "crop.cu").unwrap().1;
        assert!(crop.contains(".entry crop_rgb_fp16"), "{crop}");
        assert!(crop.contains(".entry crop_nv12_fp16"));
        assert!(crop.contains(".target sm_90"));
        let vit = &ptx.iter().find(|(n, _)| *n == "vit.cu").unwrap().1;
        for entry in [
            "patchify",
            "embed_tokens",
            "add_layernorm",
            "layernorm_f32",
            "bias_quick_gelu",
            "add_bias",
            "attention",
            "take_rows",
        ] {
            assert!(
                vit.contains(&format!(".entry {entry}")),
                "{entry} missing from the PTX"
            );
        }
    }
}

//! GPU engine (cudarc + NVRTC): fused crop kernels and a native ViT-B/32 encoder.
//!
//! Not built yet: the GPU issue fills this module in. Until then every entry point says so
//! clearly instead of pretending.

/// Why the GPU path cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error("the GPU path is not available: dfwatch was built without the `cuda` feature")]
    FeatureDisabled,
    #[error("the GPU engine is not implemented yet in this version of dfwatch")]
    NotImplemented,
}

/// Reports whether a GPU engine can be used in this build.
pub fn availability() -> Result<(), GpuError> {
    if cfg!(feature = "cuda") {
        Err(GpuError::NotImplemented)
    } else {
        Err(GpuError::FeatureDisabled)
    }
}

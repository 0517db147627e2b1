//! ONNX Runtime's execution providers (`[onnx] providers`): which of TensorRT, CUDA and the CPU
//! the encoder and detector sessions use, in order of preference.
//!
//! A provider is usable when the loaded ONNX Runtime library was built with it
//! (`OrtGetAvailableProviders`); the CPU build from PyPI has only the CPU provider. The list
//! says where a fall-back is allowed: a provider missing from the library is skipped (and the
//! skip logged) only when a later entry remains, so `["cuda"]` on a CPU library is an error
//! naming what to install, and `["cuda", "cpu"]` runs on the CPU. The same check runs in
//! `dfwatch validate` (when the library can be loaded) and at start ([`resolve`]); a provider
//! the library lists but that fails when a session registers it (TensorRT's or CUDA's own
//! libraries missing) falls back the same way at session build.

use serde::{Deserialize, Serialize};

/// One execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// TensorRT through ONNX Runtime (fp16, engines cached on disk).
    Tensorrt,
    /// ONNX Runtime's CUDA provider.
    Cuda,
    Cpu,
}

impl Provider {
    /// The name ONNX Runtime lists it under.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Tensorrt => "TensorrtExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::Cpu => "CPUExecutionProvider",
        }
    }

    /// The name in the config.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }

    /// What to install when the loaded library lacks it.
    pub fn install_hint(self) -> &'static str {
        match self {
            Provider::Tensorrt => {
                "the GPU build of ONNX Runtime built with TensorRT (for example the \
                 onnxruntime-gpu wheel's libonnxruntime.so, or a Jetson/DeepStream image's) and \
                 TensorRT's libraries (libnvinfer) on the loader path; point onnx.library at it"
            }
            Provider::Cuda => {
                "the GPU build of ONNX Runtime (for example the onnxruntime-gpu wheel's \
                 libonnxruntime.so) with CUDA and cuDNN on the loader path; point onnx.library \
                 at it"
            }
            Provider::Cpu => "any ONNX Runtime library",
        }
    }
}

/// The default list: the CPU only.
pub fn default_providers() -> Vec<Provider> {
    vec![Provider::Cpu]
}

/// The configured list resolved against what a library offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPlan {
    /// Providers to register, in order.
    pub active: Vec<Provider>,
    /// Providers of the list the library lacks, skipped because a later entry allowed it.
    pub skipped: Vec<Provider>,
}

impl ProviderPlan {
    /// One line for the log and for `validate`.
    pub fn describe(&self, library_version: &str) -> String {
        let active: Vec<&str> = self.active.iter().map(|p| p.name()).collect();
        let mut s = format!(
            "ONNX Runtime {library_version}: sessions use {}",
            active.join(", then ")
        );
        for p in &self.skipped {
            s.push_str(&format!(
                "; {} is not in this library, so it is skipped (for {}: {})",
                p.name(),
                p.name(),
                p.install_hint()
            ));
        }
        s
    }
}

/// Checks the list's own shape (the part `validate` can check without a library).
pub fn check_list(list: &[Provider]) -> Result<(), String> {
    if list.is_empty() {
        return Err("the list is empty: name at least one provider (\"cpu\" for the CPU)".into());
    }
    for (i, p) in list.iter().enumerate() {
        if list[..i].contains(p) {
            return Err(format!("{} is listed twice", p.name()));
        }
    }
    if let Some(i) = list.iter().position(|p| *p == Provider::Cpu)
        && i + 1 != list.len()
    {
        return Err(
            "\"cpu\" must be the last entry: ONNX Runtime never falls back from the CPU, so the \
             entries after it would never be used"
                .into(),
        );
    }
    Ok(())
}

/// Resolves `list` against the providers a library offers (`available`: ONNX Runtime's
/// names). Errors name each missing provider and what to install.
pub fn resolve(list: &[Provider], available: &[String]) -> Result<ProviderPlan, String> {
    check_list(list)?;
    let has = |p: Provider| p == Provider::Cpu || available.iter().any(|a| a == p.ort_name());
    let mut plan = ProviderPlan {
        active: Vec::new(),
        skipped: Vec::new(),
    };
    for (i, &p) in list.iter().enumerate() {
        if has(p) {
            plan.active.push(p);
        } else if i + 1 < list.len() {
            plan.skipped.push(p);
        } else if plan.active.is_empty() {
            let missing: Vec<String> = list
                .iter()
                .map(|p| format!("{} ({})", p.name(), p.install_hint()))
                .collect();
            return Err(format!(
                "this ONNX Runtime library offers {} and none of {}; the list allows no \
                 fall-back (add \"cpu\" at the end to allow one). Install: {}",
                available.join(", "),
                list.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
                missing.join("; ")
            ));
        } else {
            plan.skipped.push(p);
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_library() -> Vec<String> {
        vec![
            "AzureExecutionProvider".into(),
            "CPUExecutionProvider".into(),
        ]
    }

    #[test]
    fn a_gpu_provider_missing_without_a_fall_back_is_an_error_naming_what_to_install() {
        let e = resolve(&[Provider::Cuda], &cpu_library()).unwrap_err();
        assert!(
            e.contains("onnxruntime-gpu") && e.contains("allows no fall-back"),
            "{e}"
        );
        let e = resolve(&[Provider::Tensorrt], &cpu_library()).unwrap_err();
        assert!(e.contains("libnvinfer"), "{e}");
        let e = resolve(&[Provider::Tensorrt, Provider::Cuda], &cpu_library()).unwrap_err();
        assert!(e.contains("tensorrt (") && e.contains("cuda ("), "{e}");
    }

    #[test]
    fn a_list_that_allows_it_falls_back_and_says_so() {
        let plan = resolve(&[Provider::Cuda, Provider::Cpu], &cpu_library()).unwrap();
        assert_eq!(plan.active, vec![Provider::Cpu]);
        assert_eq!(plan.skipped, vec![Provider::Cuda]);
        let d = plan.describe("1.31.1");
        assert!(
            d.contains("sessions use cpu") && d.contains("cuda is not in this library"),
            "{d}"
        );
        let mut gpu = cpu_library();
        gpu.push("CUDAExecutionProvider".into());
        let plan = resolve(&[Provider::Tensorrt, Provider::Cuda, Provider::Cpu], &gpu).unwrap();
        assert_eq!(plan.active, vec![Provider::Cuda, Provider::Cpu]);
        assert_eq!(plan.skipped, vec![Provider::Tensorrt]);
    }

    #[test]
    fn the_lists_own_shape_is_checked() {
        assert!(check_list(&[]).unwrap_err().contains("empty"));
        assert!(
            check_list(&[Provider::Cpu, Provider::Cpu])
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            check_list(&[Provider::Cpu, Provider::Cuda])
                .unwrap_err()
                .contains("last")
        );
        check_list(&[Provider::Tensorrt, Provider::Cuda, Provider::Cpu]).unwrap();
        assert_eq!(
            resolve(&default_providers(), &cpu_library())
                .unwrap()
                .active,
            vec![Provider::Cpu]
        );
    }
}

//! ONNX Runtime, shared by every model in the process (the CPU image encoder, the face
//! detector): loading the library, one global thread budget, building sessions.
//!
//! Owns the `[onnx]` config section ([`OnnxConfig`]); [`providers`] decides which execution
//! providers (TensorRT, CUDA, CPU) every session uses.
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`), so the build needs no ONNX
//! Runtime; `tools/setup.sh` installs the `onnxruntime` wheel into `.venv` and links its
//! `libonnxruntime.so` as `var/lib/libonnxruntime.so`. All sessions share one intra-op thread
//! pool of `onnx.threads` threads (ONNX Runtime's global pool), so two models never
//! oversubscribe the cores GStreamer also needs; spinning is off for the same reason.

pub mod providers;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

pub use ort::session::Session;
pub use providers::{Provider, ProviderPlan};

/// `[onnx]`: where ONNX Runtime is, how many threads it may use, which providers run models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxConfig {
    /// Path of `libonnxruntime.so`. Default: `$ORT_DYLIB_PATH`, then
    /// `var/lib/libonnxruntime.so` (made by tools/setup.sh) beside the working directory or
    /// the executable, then the Debian package's `/usr/lib/dfwatch/libonnxruntime.so.1.31.1`.
    pub library: Option<PathBuf>,
    /// Intra-op threads shared by every ONNX model in the process. Default: the number of
    /// cores. Range 1 to 256.
    pub threads: Option<usize>,
    /// Let idle pool threads spin for work: a few percent lower latency at batch 1, at the
    /// cost of CPU that decoders may need. Off by default; turn on for dedicated cores.
    pub spin: bool,
    /// Execution providers of the encoder and detector sessions, in order of preference:
    /// `"tensorrt"`, `"cuda"`, `"cpu"`. A provider the library lacks falls back to the next
    /// entry; without one it is an error. Default `["cpu"]`.
    pub providers: Vec<Provider>,
}

impl Default for OnnxConfig {
    fn default() -> Self {
        OnnxConfig {
            library: None,
            threads: None,
            spin: false,
            providers: providers::default_providers(),
        }
    }
}

impl OnnxConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<crate::validation::ConfigError>) {
        let mut c = crate::validation::Checker::new(path, errors);
        if let Some(t) = self.threads {
            c.count("threads", t as u64, 1..=256);
        }
        if let Err(e) = providers::check_list(&self.providers) {
            c.error("providers", e);
        }
    }

    fn thread_budget(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

/// Why ONNX Runtime or a session could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OnnxError {
    #[error(
        "ONNX Runtime library not found (looked at: {looked}). Run ./tools/setup.sh, or set \
         onnx.library or ORT_DYLIB_PATH to a libonnxruntime.so (e.g. from `pip install \
         onnxruntime==1.31.1`: site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1)"
    )]
    LibraryNotFound { looked: String },
    #[error("ONNX Runtime library {path}: {reason}")]
    Library { path: String, reason: String },
    #[error("ONNX Runtime set-up failed: {0}")]
    Init(String),
    #[error("{model}: {reason}")]
    Session { model: String, reason: String },
    /// `onnx.providers` cannot be met by the loaded library.
    #[error("{0}")]
    Providers(String),
}

/// The library in use and the thread budget, once initialised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OnnxRuntimeInfo {
    pub library: String,
    /// The library's version (from its build information).
    pub version: String,
    pub threads: usize,
    /// Every execution provider the library was built with (ONNX Runtime's names).
    pub available_providers: Vec<String>,
    /// The providers sessions register, in order.
    pub providers: Vec<Provider>,
}

struct Runtime {
    env: ort::environment::Environment,
    info: OnnxRuntimeInfo,
}

/// The execution providers the loaded library was built with (`OrtGetAvailableProviders`).
fn library_providers() -> Result<Vec<String>, OnnxError> {
    let api = ort::api();
    let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut n: std::ffi::c_int = 0;
    // SAFETY: the library is loaded (ort::init_from succeeded before this is called); both
    // out-pointers are valid; a non-null status is released once.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut n) };
    if !status.0.is_null() {
        unsafe { (api.ReleaseStatus)(status.0) };
        return Err(OnnxError::Init("OrtGetAvailableProviders failed".into()));
    }
    let mut out = Vec::new();
    if !list.is_null() {
        for i in 0..n.max(0) as usize {
            // SAFETY: the library returned `n` NUL-terminated strings.
            let name = unsafe { std::ffi::CStr::from_ptr(*list.add(i)) };
            out.push(name.to_string_lossy().into_owned());
        }
        // SAFETY: releases what GetAvailableProviders allocated, once.
        let st = unsafe { (api.ReleaseAvailableProviders)(list, n) };
        if !st.0.is_null() {
            unsafe { (api.ReleaseStatus)(st.0) };
        }
    }
    Ok(out)
}

/// The loaded library's version (`OrtGetApiBase()->GetVersionString()`, e.g. "1.31.1"); the
/// build information string when the symbol cannot be read.
fn library_version(path: &Path) -> String {
    // SAFETY: opens the library ort::init_from already loaded (the loader returns the same
    // handle and bumps its count); OrtGetApiBase takes nothing and returns a static table whose
    // GetVersionString returns a static NUL-terminated string, copied before the handle drops.
    let v = unsafe {
        libloading::Library::new(path).ok().and_then(|lib| {
            let base: libloading::Symbol<
                '_,
                unsafe extern "C" fn() -> *const ort::sys::OrtApiBase,
            > = lib.get(b"OrtGetApiBase").ok()?;
            let b = base();
            if b.is_null() {
                return None;
            }
            let s = ((*b).GetVersionString)();
            (!s.is_null()).then(|| std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
        })
    };
    v.unwrap_or_else(|| ort::info().trim().to_string())
}

static RUNTIME: OnceLock<Result<Runtime, OnnxError>> = OnceLock::new();

/// Where the Debian package installs ONNX Runtime.
pub const PACKAGED_LIBRARY: &str = "/usr/lib/dfwatch/libonnxruntime.so.1.31.1";

fn candidates(cfg: &OnnxConfig) -> Vec<PathBuf> {
    if let Some(p) = &cfg.library {
        return vec![p.clone()];
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return vec![PathBuf::from(p)];
    }
    let mut v = vec![PathBuf::from("var/lib/libonnxruntime.so")];
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/dfwatch -> repository root; /usr/bin/dfwatch -> /usr.
        for up in exe.ancestors().skip(1).take(3) {
            v.push(up.join("var/lib/libonnxruntime.so"));
            v.push(up.join("lib/libonnxruntime.so"));
        }
    }
    // The Debian package's copy.
    v.push(PathBuf::from(PACKAGED_LIBRARY));
    v
}

/// Loads ONNX Runtime and sets up the global thread pool. The first call decides; later calls
/// return its result (the library cannot be swapped within a process).
pub fn init(cfg: &OnnxConfig) -> Result<OnnxRuntimeInfo, OnnxError> {
    // ONNX Runtime's pool threads inherit the name of the thread that creates them: made on a
    // thread of their own, they show as `onnx-pool` in top, perf and `bench e2e`.
    let load_named = || {
        let cfg = cfg.clone();
        std::thread::Builder::new()
            .name("onnx-pool".into())
            .spawn(move || load(&cfg))
            .map_err(|e| OnnxError::Init(format!("cannot start a thread: {e}")))
            .and_then(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(OnnxError::Init("loading panicked".into())))
            })
    };
    match RUNTIME.get_or_init(load_named) {
        Ok(rt) => Ok(rt.info.clone()),
        Err(e) => Err(e.clone()),
    }
}

fn load(cfg: &OnnxConfig) -> Result<Runtime, OnnxError> {
    let list = candidates(cfg);
    let explicit = cfg.library.is_some() || std::env::var_os("ORT_DYLIB_PATH").is_some();
    let found = list.iter().find(|p| p.exists()).cloned();
    let path = match (found, explicit) {
        (Some(p), _) => p,
        (None, true) => {
            return Err(OnnxError::Library {
                path: list[0].display().to_string(),
                reason: "no such file".into(),
            });
        }
        (None, false) => {
            return Err(OnnxError::LibraryNotFound {
                looked: list
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    };
    let threads = cfg.thread_budget();
    let builder = ort::init_from(&path).map_err(|e| OnnxError::Library {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let pool = ort::environment::GlobalThreadPoolOptions::default()
        .with_intra_threads(threads)
        .and_then(|p| p.with_inter_threads(1))
        .and_then(|p| p.with_spin_control(cfg.spin))
        .map_err(|e| OnnxError::Init(e.to_string()))?;
    let env = builder
        .with_name("dfwatch")
        .with_global_thread_pool(pool)
        .build()
        .map_err(|e| OnnxError::Init(e.to_string()))?;
    let available = library_providers()?;
    let version = library_version(&path);
    let plan = providers::resolve(&cfg.providers, &available).map_err(OnnxError::Providers)?;
    tracing::info!(library = %path.display(), threads, "ONNX Runtime loaded.");
    if cfg.providers != providers::default_providers() {
        let line = plan.describe(&version);
        if plan.skipped.is_empty() {
            tracing::info!("{line}");
        } else {
            tracing::warn!("{line}");
        }
    }
    Ok(Runtime {
        env,
        info: OnnxRuntimeInfo {
            library: path.display().to_string(),
            version,
            threads,
            available_providers: available,
            providers: plan.active,
        },
    })
}

/// What `dfwatch validate` and the start found for `onnx.providers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderCheck {
    /// The default (CPU only): nothing to check.
    CpuOnly,
    /// The library offers what the list needs; the plan says what runs.
    Met(String),
    /// The library could not be loaded here, so the list could not be checked.
    NotChecked(String),
}

/// Checks `onnx.providers` against the library `cfg` names (loading it): the one check that
/// `validate` and `run` share. `Err` is the reason the daemon would refuse to start.
pub fn check_providers(cfg: &OnnxConfig) -> Result<ProviderCheck, String> {
    if cfg.providers == providers::default_providers() {
        return Ok(ProviderCheck::CpuOnly);
    }
    match init(cfg) {
        Ok(info) => {
            let plan = providers::resolve(&cfg.providers, &info.available_providers)?;
            Ok(ProviderCheck::Met(plan.describe(&info.version)))
        }
        Err(OnnxError::Providers(e)) => Err(e),
        Err(e) => Ok(ProviderCheck::NotChecked(e.to_string())),
    }
}

/// Where TensorRT engines for a model are cached: `$STATE_DIRECTORY/tensorrt` (else
/// `var/state/tensorrt`), one directory per model (SHA-256 of its ONNX), ONNX Runtime version
/// and TensorRT version; ONNX Runtime names each engine file by the GPU's architecture itself.
fn tensorrt_cache_dir(model_sha256: &str, ort_version: &str) -> PathBuf {
    let trt = tensorrt_version().unwrap_or_else(|| "unknown".into());
    crate::types::state_dir().join("tensorrt").join(format!(
        "{}-ort{ort_version}-trt{trt}",
        &model_sha256[..16.min(model_sha256.len())]
    ))
}

/// TensorRT's version from the file name of `libnvinfer.so.X.Y.Z` on the loader path.
fn tensorrt_version() -> Option<String> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/local/cuda/lib64",
            "/usr/local/tensorrt/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.iter().find_map(|d| {
        std::fs::read_dir(d).ok()?.flatten().find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let v = n.strip_prefix("libnvinfer.so.")?;
            (v.split('.').count() >= 2).then(|| v.to_string())
        })
    })
}

/// Builds a session for the model at `path` on the shared thread pool, with every graph
/// optimisation on. Call [`init`] first.
pub fn session(path: &Path) -> Result<Session, OnnxError> {
    let model = path.display().to_string();
    let sha = || crate::model::sha256_file(path).unwrap_or_default();
    build(&model, sha, |b| b.commit_from_file(path))
}

/// [`session`] for a model already in memory (read and checked by its caller); `name` is
/// what errors call it.
pub fn session_from_memory(name: &str, bytes: &[u8]) -> Result<Session, OnnxError> {
    let sha = || {
        use sha2::Digest;
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    build(name, sha, |b| b.commit_from_memory(bytes))
}

/// Registers the providers of the plan on `builder`, in order. One that fails to register
/// (its own libraries missing although the library was built with it) falls back to the next
/// when there is one, logged; the last failing is an error.
fn register_providers(
    builder: &mut ort::session::builder::SessionBuilder,
    info: &OnnxRuntimeInfo,
    model: &str,
    model_sha256: impl FnOnce() -> String,
) -> Result<Option<PathBuf>, OnnxError> {
    use ort::ep::ExecutionProvider;
    let mut trt_cache = None;
    let gpu: Vec<Provider> = info
        .providers
        .iter()
        .copied()
        .filter(|p| *p != Provider::Cpu)
        .collect();
    let mut sha = Some(model_sha256);
    for (i, p) in gpu.iter().enumerate() {
        let r = match p {
            Provider::Tensorrt => {
                let dir = tensorrt_cache_dir(
                    &(sha.take().map(|f| f()).unwrap_or_default()),
                    &info.version,
                );
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), "TensorRT engine cache: {e}");
                }
                let d = dir.display().to_string();
                trt_cache = Some(dir);
                ort::ep::TensorRT::default()
                    .with_fp16(true)
                    .with_engine_cache(true)
                    .with_engine_cache_path(&d)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&d)
                    .register(builder)
            }
            Provider::Cuda => ort::ep::CUDA::default().register(builder),
            Provider::Cpu => Ok(()),
        };
        if let Err(e) = r {
            let last = i + 1 == gpu.len() && !info.providers.contains(&Provider::Cpu);
            if last {
                return Err(OnnxError::Session {
                    model: model.to_string(),
                    reason: format!(
                        "execution provider {} failed to start ({e}); install {}",
                        p.name(),
                        p.install_hint()
                    ),
                });
            }
            tracing::warn!(%model, provider = p.name(), "execution provider failed to start ({e}); falling back to the next in onnx.providers");
            if *p == Provider::Tensorrt {
                trt_cache = None;
            }
        }
    }
    Ok(trt_cache)
}

fn build(
    model: &str,
    model_sha256: impl FnOnce() -> String,
    commit: impl FnOnce(&mut ort::session::builder::SessionBuilder) -> ort::Result<Session>,
) -> Result<Session, OnnxError> {
    let fail = |e: ort::Error| OnnxError::Session {
        model: model.to_string(),
        reason: e.to_string(),
    };
    let rt = match RUNTIME.get() {
        Some(Ok(rt)) => rt,
        Some(Err(e)) => return Err(e.clone()),
        None => {
            return Err(OnnxError::Init(
                "onnx::init was not called before building a session".into(),
            ));
        }
    };
    let mut builder = Session::builder(&rt.env)
        .map_err(fail)?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
        .map_err(|e| fail(e.into()))?
        .with_memory_pattern(true)
        .map_err(|e| fail(e.into()))?;
    let trt_cache = register_providers(&mut builder, &rt.info, model, model_sha256)?;
    let Some(dir) = trt_cache else {
        return commit(&mut builder).map_err(fail);
    };
    let cached = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".engine"))
        })
        .unwrap_or(false);
    if !cached {
        tracing::info!(%model, cache = %dir.display(), "TensorRT: building engines (first start with this model, ONNX Runtime and TensorRT; this takes minutes)...");
    }
    let t = std::time::Instant::now();
    let s = commit(&mut builder).map_err(fail)?;
    tracing::info!(%model, cache = %dir.display(), seconds = t.elapsed().as_secs_f64(), cached, "TensorRT: engines ready.");
    Ok(s)
}

/// What alerts and `/api/model` call the encoder's backend: `cpu-onnxruntime` when only the
/// CPU runs, else `onnxruntime-` and the active providers in order (`onnxruntime-cuda-cpu`).
pub fn backend_name() -> String {
    match runtime_info() {
        Some(i) if i.providers.iter().any(|p| *p != Provider::Cpu) => {
            let names: Vec<&str> = i.providers.iter().map(|p| p.name()).collect();
            format!("onnxruntime-{}", names.join("-"))
        }
        _ => "cpu-onnxruntime".into(),
    }
}

/// The runtime's information when [`init`] succeeded.
pub fn runtime_info() -> Option<OnnxRuntimeInfo> {
    match RUNTIME.get() {
        Some(Ok(rt)) => Some(rt.info.clone()),
        _ => None,
    }
}

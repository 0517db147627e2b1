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
    /// The providers sessions register, in order (empty when the list cannot be met).
    pub providers: Vec<Provider>,
    /// Why `onnx.providers` cannot be met by this library, if it cannot.
    pub providers_error: Option<String>,
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
    // A checkout's copy (tools/setup.sh), then one beside the executable's prefix
    // (/usr/bin/dfwatch -> /usr/lib).
    let mut v = crate::files::in_checkout("var/lib/libonnxruntime.so");
    v.extend(
        crate::files::in_checkout("lib/libonnxruntime.so")
            .into_iter()
            .skip(1),
    );
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
    tracing::info!(library = %path.display(), threads, "ONNX Runtime loaded.");
    // A list the library cannot meet fails every session build (and `validate`/`run` refuse
    // the config before that); the runtime itself stays usable.
    let (active, providers_error) = match providers::resolve(&cfg.providers, &available) {
        Ok(plan) => {
            if cfg.providers != providers::default_providers() {
                let line = plan.describe(&version);
                if plan.skipped.is_empty() {
                    tracing::info!("{line}");
                } else {
                    tracing::warn!("{line}");
                }
            }
            (plan.active, None)
        }
        Err(e) => (Vec::new(), Some(e)),
    };
    Ok(Runtime {
        env,
        info: OnnxRuntimeInfo {
            library: path.display().to_string(),
            version,
            threads,
            available_providers: available,
            providers: active,
            providers_error,
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
    /// Could not be checked in this process (another library was loaded for an earlier file).
    NotChecked(String),
}

/// Checks `onnx.providers` against the library `cfg` names (loading it): the one check that
/// `validate` and `run` share. `Err` is the reason the daemon would refuse to start: a list
/// the library cannot meet, or a library that cannot be loaded at all. A process loads one
/// library: a later config naming another one is reported as not checked.
pub fn check_providers(cfg: &OnnxConfig) -> Result<ProviderCheck, String> {
    if cfg.providers == providers::default_providers() {
        return Ok(ProviderCheck::CpuOnly);
    }
    let wanted = candidates(cfg).into_iter().find(|p| p.exists());
    match init(cfg) {
        Ok(info) => {
            if wanted.is_some_and(|w| w.display().to_string() != info.library) {
                return Ok(ProviderCheck::NotChecked(format!(
                    "this process already loaded {} for an earlier file; validate this file on \
                     its own",
                    info.library
                )));
            }
            let plan = providers::resolve(&cfg.providers, &info.available_providers)?;
            Ok(ProviderCheck::Met(plan.describe(&info.version)))
        }
        Err(e) => Err(format!(
            "the ONNX Runtime library cannot be loaded, so the providers cannot be checked or \
             run: {e}"
        )),
    }
}

/// Where TensorRT engines for a model are cached: `$STATE_DIRECTORY/tensorrt` (else
/// `var/state/tensorrt`), one directory per model (SHA-256 of its ONNX), ONNX Runtime version
/// and TensorRT version; ONNX Runtime names each engine file by the GPU's architecture itself.
fn tensorrt_cache_dir(model_sha256: &str, ort_version: &str) -> PathBuf {
    let trt = tensorrt_version().unwrap_or_else(|| "unknown".into());
    let clean = |v: &str| -> String {
        v.chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .take(32)
            .collect()
    };
    let model = if model_sha256.is_empty() {
        "unhashed"
    } else {
        &model_sha256[..16.min(model_sha256.len())]
    };
    crate::types::state_dir().join("tensorrt").join(format!(
        "{}-ort{}-trt{}",
        clean(model),
        clean(ort_version),
        clean(&trt)
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
    // The first directory (in loader order) that has one; the highest version there.
    dirs.iter().find_map(|d| {
        let mut found: Vec<Vec<u32>> = std::fs::read_dir(d)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let v = n.strip_prefix("libnvinfer.so.")?;
                let parts: Option<Vec<u32>> = v.split('.').map(|p| p.parse().ok()).collect();
                parts.filter(|p| p.len() >= 2)
            })
            .collect();
        found.sort();
        found.pop().map(|v| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(".")
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

/// Providers each session actually runs with, by model name (bounded: a handful of models).
static SESSION_PROVIDERS: std::sync::Mutex<Vec<(String, Vec<Provider>)>> =
    std::sync::Mutex::new(Vec::new());
const SESSION_PROVIDERS_CAP: usize = 64;

fn record_session(model: &str, used: Vec<Provider>) {
    let mut m = SESSION_PROVIDERS.lock().unwrap_or_else(|p| p.into_inner());
    m.retain(|(k, _)| k != model);
    if m.len() >= SESSION_PROVIDERS_CAP {
        m.remove(0);
    }
    m.push((model.to_string(), used));
}

/// What alerts and `/api/model` call the backend of the session built for `model`, and its
/// precision: `cpu-onnxruntime`/`fp32` on the CPU, else `onnxruntime-` and the providers the
/// session really runs with (`onnxruntime-cuda-cpu`), `fp16` when TensorRT is among them.
pub fn session_backend(model: &str) -> (String, &'static str) {
    let m = SESSION_PROVIDERS.lock().unwrap_or_else(|p| p.into_inner());
    let used = m.iter().find(|(k, _)| k == model).map(|(_, v)| v.clone());
    match used {
        Some(v) if v.iter().any(|p| *p != Provider::Cpu) => {
            let names: Vec<&str> = v.iter().map(|p| p.name()).collect();
            let precision = if v.contains(&Provider::Tensorrt) {
                "fp16"
            } else {
                "fp32"
            };
            (format!("onnxruntime-{}", names.join("-")), precision)
        }
        _ => ("cpu-onnxruntime".into(), "fp32"),
    }
}

/// Registers `providers` (GPU ones) on `builder`; the TensorRT cache directory when TensorRT
/// is among them.
fn register(
    builder: &mut ort::session::builder::SessionBuilder,
    providers: &[Provider],
    info: &OnnxRuntimeInfo,
    model_sha256: &str,
) -> Result<Option<PathBuf>, String> {
    use ort::ep::ExecutionProvider;
    let mut trt_cache = None;
    for p in providers {
        let r = match p {
            Provider::Tensorrt => {
                let dir = tensorrt_cache_dir(model_sha256, &info.version);
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
        r.map_err(|e| format!("{} failed to start: {e}", p.name()))?;
    }
    Ok(trt_cache)
}

/// Builds a session with the providers of `onnx.providers`: first all of them, then, when a
/// provider fails to register or the session fails to build with it (no GPU, a driver too
/// old, out of memory), without the first GPU provider, and so on; the CPU alone only when the
/// list ends with "cpu". Each fall-back is logged; what the session runs with is recorded for
/// [`session_backend`].
fn build(
    model: &str,
    model_sha256: impl FnOnce() -> String,
    commit: impl Fn(&mut ort::session::builder::SessionBuilder) -> ort::Result<Session>,
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
    if let Some(e) = &rt.info.providers_error {
        return Err(OnnxError::Providers(e.clone()));
    }
    let new_builder = || -> Result<ort::session::builder::SessionBuilder, OnnxError> {
        Session::builder(&rt.env)
            .map_err(fail)?
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
            .map_err(|e| fail(e.into()))?
            .with_memory_pattern(true)
            .map_err(|e| fail(e.into()))
    };
    let gpu: Vec<Provider> = rt
        .info
        .providers
        .iter()
        .copied()
        .filter(|p| *p != Provider::Cpu)
        .collect();
    let cpu_allowed = rt.info.providers.contains(&Provider::Cpu);
    if gpu.is_empty() {
        let s = commit(&mut new_builder()?).map_err(fail)?;
        record_session(model, vec![Provider::Cpu]);
        return Ok(s);
    }
    let sha = model_sha256();
    let mut failures = Vec::new();
    for k in 0..=gpu.len() {
        if k == gpu.len() && !cpu_allowed {
            break;
        }
        let attempt = &gpu[k..];
        let mut builder = new_builder()?;
        let trt_cache = match register(&mut builder, attempt, &rt.info, &sha) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%model, "{e}; trying the next entry of onnx.providers");
                failures.push(e);
                continue;
            }
        };
        if let Some(dir) = &trt_cache {
            let cached = std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().ends_with(".engine"))
                })
                .unwrap_or(false);
            if !cached {
                tracing::info!(%model, cache = %dir.display(), "TensorRT: no engine cached for this model, ONNX Runtime and TensorRT yet: engines are built at the first inference of each input shape (minutes) and cached");
            }
        }
        let t = std::time::Instant::now();
        match commit(&mut builder) {
            Ok(s) => {
                let mut used = attempt.to_vec();
                if cpu_allowed {
                    used.push(Provider::Cpu);
                }
                tracing::info!(%model, providers = ?used, seconds = t.elapsed().as_secs_f64(), "ONNX Runtime session ready.");
                record_session(model, used);
                return Ok(s);
            }
            Err(e) => {
                let name = attempt.first().map(|p| p.name()).unwrap_or("cpu");
                let msg = format!("the session failed to build with {name}: {e}");
                tracing::warn!(%model, "{msg}; trying the next entry of onnx.providers");
                failures.push(msg);
            }
        }
    }
    Err(OnnxError::Session {
        model: model.to_string(),
        reason: format!(
            "no entry of onnx.providers could run it ({}); install {}",
            failures.join("; "),
            gpu.iter()
                .map(|p| format!("for {}: {}", p.name(), p.install_hint()))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    })
}

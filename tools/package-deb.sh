#!/usr/bin/env bash
# Builds the Debian package target/debian/dfwatch_<version>-1_amd64.deb with cargo-deb (its
# metadata is [package.metadata.deb] in Cargo.toml). Needs what tools/setup.sh leaves (ONNX
# Runtime's wheel in .venv, the MTCNN weights and CLIP's vocabulary in var/).
#
#   ./tools/package-deb.sh              # release build (what to ship)
#   ./tools/package-deb.sh --profile dev  # the test build (CI: no second full compile)
#   ./tools/package-deb.sh --profile dev --deb-version 0.1.0-2   # (CI's upgrade check)
#
# Stages under target/package/ what is not a file of the checkout: the stripped binary, the
# man page and shell completions generated from the CLI, the systemd unit with the package's
# paths, ONNX Runtime's library (a real file, not the checkout's symlink) with its licence, the
# MTCNN weights, CLIP's BPE vocabulary.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
profile=release
DEB_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --deb-version) DEB_ARGS+=(--deb-version "$2"); shift 2 ;;
    *) echo "package-deb: unknown argument $1" >&2; exit 64 ;;
  esac
done
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")

command -v cargo-deb > /dev/null || cargo install cargo-deb --locked --version 3.8.0
cargo build --locked --profile "$profile" --bin dfwatch

stage=target/package
rm -rf "$stage"
mkdir -p "$stage/completions" "$stage/onnxruntime" "$stage/mtcnn"
strip -o "$stage/dfwatch" "target/$dir/dfwatch"
mkdir -p "$stage/man"
"$stage/dfwatch" man --dir "$stage/man"
gzip -9n "$stage"/man/*.1
"$stage/dfwatch" completions bash > "$stage/completions/dfwatch.bash"
"$stage/dfwatch" completions zsh > "$stage/completions/_dfwatch"
"$stage/dfwatch" completions fish > "$stage/completions/dfwatch.fish"
sed -e 's|/usr/local/bin/dfwatch|/usr/bin/dfwatch|g' \
    -e 's|^WorkingDirectory=/opt/dfwatch|WorkingDirectory=%S/dfwatch|' \
    -e 's|^Documentation=.*|Documentation=man:dfwatch(1) file:///usr/share/doc/dfwatch/README.md|' \
    -e 's|^# The install tree: .*|# The package: /usr/lib/dfwatch (ONNX Runtime), /usr/share/dfwatch (detector, tools).|' \
    systemd/dfwatch.service > "$stage/dfwatch.service"
if grep -n '/opt/dfwatch\|/usr/local' "$stage/dfwatch.service" | grep -v '^[0-9]*:#'; then
  echo "package-deb: the unit still names a checkout path" >&2
  exit 1
fi

ort=$(readlink -f var/lib/libonnxruntime.so)
ort_pkg=$(dirname "$(dirname "$ort")")   # site-packages/onnxruntime
cp "$ort" "$stage/libonnxruntime.so.1.31.1"
cp "$ort_pkg/LICENSE" "$ort_pkg/ThirdPartyNotices.txt" "$stage/onnxruntime/"
cp var/models/mtcnn/pnet.onnx var/models/mtcnn/rnet.onnx var/models/mtcnn/onet.onnx "$stage/mtcnn/"
cp var/clip/bpe_simple_vocab_16e6.txt.gz "$stage/"

rm -f target/debian/dfwatch_*.deb
cargo deb --no-build --no-strip --output target/debian/ "${DEB_ARGS[@]}"
ls -l target/debian/*.deb

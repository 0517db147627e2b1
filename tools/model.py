#!/usr/bin/env python3
"""dfwatch model bundles: make, inspect and run them (numpy and onnx only; no torch).

Subcommands
  import     bundle from an SJEDD .pth checkpoint, read with a restricted unpickler (no torch)
  synth      structure-true synthetic bundle from a seed (vit-b-32 or tiny), trained = false
  reference  float64 numpy forward pass + SJEDD scores for crops -> JSON (fixtures)
  fixture    the committed tiny fixture: bundle, crops, expected outputs (tests/fixtures/tiny)
  quantize   int8 (dynamic, per-channel) copy of a bundle's ONNX image encoder
  ortbench   onnxruntime's Python API on a bundle's ONNX: faces/s (baseline of bench encoder)

The bundle layout is documented in engines/SCHEMA.md. Reference: OpenAI CLIP ViT (visual
tower as used by SJEDD, see ../shared/SJEDD.md section 2); names follow its state dict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_DIVISOR = 10.0

ARCHS = {
    # OpenAI CLIP ViT-B/32 visual tower.
    "vit-b-32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12,
                     mlp_width=3072, embed_dim=512),
    # Every code path of vit-b-32 at a few MB.
    "tiny": dict(image_size=224, patch_size=32, width=64, layers=2, heads=2,
                 mlp_width=256, embed_dim=64),
}

FFPP = {
    "nodes": [("fake", "root"), ("expression", "global"), ("identity", "global"),
              ("physical inconsistency", "global"), ("eye", "local"), ("eyebrow", "local"),
              ("lip", "local"), ("mouth", "local"), ("nose", "local"), ("skin", "local")],
    "children": {"expression": ["lip", "mouth"],
                 "identity": ["eye", "eyebrow", "lip", "mouth", "nose", "skin"],
                 "physical inconsistency": ["eye", "lip", "mouth", "nose"]},
}
SIX = ["eye", "eyebrow", "lip", "mouth", "nose", "skin"]
FFSC = {
    "nodes": [("fake", "root"), ("age", "global"), ("expression", "global"),
              ("gender", "global"), ("identity", "global"), ("pose", "global")]
             + [(r, "local") for r in SIX],
    "children": {"age": ["eye", "skin"],
                 "expression": ["eye", "lip", "mouth", "nose", "skin"],
                 "gender": ["eye", "eyebrow", "lip", "mouth", "skin"],
                 "identity": SIX, "pose": SIX},
}
LABEL_SETS = {"ffpp": FFPP, "ffsc": FFSC}


def prompt(name: str, level: str) -> str:
    if level == "root":
        return "A photo of a fake face"
    return f"A photo of a face with the {level} attribute of {name} altered"


def graph_edges(labels: dict) -> list[tuple[str, str]]:
    edges = [("fake", n) for n, lvl in labels["nodes"] if lvl == "global"]
    for g, children in labels["children"].items():
        edges += [(g, c) for c in children]
    return edges


# ----------------------------------------------------------------------------- weights

def synth_weights(arch: dict, seed: int) -> dict[str, np.ndarray]:
    """Random visual tower with OpenAI CLIP's initialisation scales, plus small random
    LayerNorm and bias values so that every parameter matters in comparisons."""
    rng = np.random.default_rng(seed)
    w, L, p, out = arch["width"], arch["layers"], arch["patch_size"], arch["embed_dim"]
    mlp = arch["mlp_width"]
    tokens = (arch["image_size"] // p) ** 2 + 1
    scale = w ** -0.5
    attn_std = w ** -0.5
    proj_std = w ** -0.5 * (2 * L) ** -0.5
    fc_std = (2 * w) ** -0.5
    f32 = np.float32

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(f32)

    def ln(prefix, sd):
        sd[f"{prefix}.weight"] = (1.0 + rng.standard_normal(w) * 0.1).astype(f32)
        sd[f"{prefix}.bias"] = normal(w, 0.05)

    sd: dict[str, np.ndarray] = {}
    fan_in = 3 * p * p
    sd["visual.conv1.weight"] = rng.uniform(-fan_in ** -0.5, fan_in ** -0.5,
                                            (w, 3, p, p)).astype(f32)
    sd["visual.class_embedding"] = normal(w, scale)
    sd["visual.positional_embedding"] = normal((tokens, w), scale)
    ln("visual.ln_pre", sd)
    for i in range(L):
        b = f"visual.transformer.resblocks.{i}"
        ln(f"{b}.ln_1", sd)
        sd[f"{b}.attn.in_proj_weight"] = normal((3 * w, w), attn_std)
        sd[f"{b}.attn.in_proj_bias"] = normal(3 * w, 0.02)
        sd[f"{b}.attn.out_proj.weight"] = normal((w, w), proj_std)
        sd[f"{b}.attn.out_proj.bias"] = normal(w, 0.02)
        ln(f"{b}.ln_2", sd)
        sd[f"{b}.mlp.c_fc.weight"] = normal((mlp, w), fc_std)
        sd[f"{b}.mlp.c_fc.bias"] = normal(mlp, 0.02)
        sd[f"{b}.mlp.c_proj.weight"] = normal((w, mlp), proj_std)
        sd[f"{b}.mlp.c_proj.bias"] = normal(w, 0.02)
    ln("visual.ln_post", sd)
    sd["visual.proj"] = normal((w, out), scale)
    return sd


# ----------------------------------------------------------------------------- numpy forward

def layer_norm(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def resblock(x: np.ndarray, g: dict, b: str, heads: int, mask=None) -> np.ndarray:
    """One pre-LN residual block of OpenAI CLIP (attention with QuickGELU MLP), float64."""
    n, t, w = x.shape
    hd = w // heads
    h = layer_norm(x, g[f"{b}.ln_1.weight"], g[f"{b}.ln_1.bias"])
    qkv = h @ g[f"{b}.attn.in_proj_weight"].T + g[f"{b}.attn.in_proj_bias"]
    q, k, v = (a.reshape(n, t, heads, hd).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    a = (q / math.sqrt(hd)) @ k.transpose(0, 1, 3, 2)
    if mask is not None:
        a = a + mask
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(n, t, w)
    x = x + o @ g[f"{b}.attn.out_proj.weight"].T + g[f"{b}.attn.out_proj.bias"]
    h = layer_norm(x, g[f"{b}.ln_2.weight"], g[f"{b}.ln_2.bias"])
    h = h @ g[f"{b}.mlp.c_fc.weight"].T + g[f"{b}.mlp.c_fc.bias"]
    h = h * (1.0 / (1.0 + np.exp(-1.702 * h)))
    return x + h @ g[f"{b}.mlp.c_proj.weight"].T + g[f"{b}.mlp.c_proj.bias"]


def visual_forward(sd: dict, arch: dict, pixels: np.ndarray) -> np.ndarray:
    """OpenAI CLIP VisionTransformer.forward in float64. pixels: N x 3 x S x S, normalised."""
    g = {k: v.astype(np.float64) for k, v in sd.items()}
    x = pixels.astype(np.float64)
    n = x.shape[0]
    p, w, heads = arch["patch_size"], arch["width"], arch["heads"]
    s = arch["image_size"] // p
    # conv1: stride = kernel = p, no bias == a matmul over non-overlapping patches.
    patches = x.reshape(n, 3, s, p, s, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, s * s, 3 * p * p)
    x = patches @ g["visual.conv1.weight"].reshape(w, -1).T
    cls = np.broadcast_to(g["visual.class_embedding"], (n, 1, w))
    x = np.concatenate([cls, x], axis=1) + g["visual.positional_embedding"]
    x = layer_norm(x, g["visual.ln_pre.weight"], g["visual.ln_pre.bias"])
    for i in range(arch["layers"]):
        x = resblock(x, g, f"visual.transformer.resblocks.{i}", heads)
    x = layer_norm(x[:, 0, :], g["visual.ln_post.weight"], g["visual.ln_post.bias"])
    return x @ g["visual.proj"]


def legal_states(nodes, edges) -> list[int]:
    names = [n for n, _ in nodes]
    idx = {n: i for i, n in enumerate(names)}
    children = [0] * len(nodes)
    parents = [0] * len(nodes)
    for a, b in edges:
        children[idx[a]] |= 1 << idx[b]
        parents[idx[b]] |= 1 << idx[a]
    out = []
    for s in range(1 << len(nodes)):
        ok = True
        for j, (_, lvl) in enumerate(nodes):
            if not (s >> j) & 1:
                continue
            if lvl == "global" and not (s & 1 and s & children[j]):
                ok = False
            if lvl == "local" and not (s & parents[j]):
                ok = False
        if ok:
            out.append(s)
    return out


def sjedd_scores(emb: np.ndarray, text: np.ndarray, nodes, edges) -> dict:
    """Logits, log Z, logit(q0) and marginals for one embedding, brute force in float64."""
    f = (text.astype(np.float64) @ emb.astype(np.float64)) / LOGIT_DIVISOR
    states = legal_states(nodes, edges)
    n = len(nodes)
    bits = np.array([[(s >> j) & 1 for j in range(n)] for s in states], dtype=np.float64)
    sc = bits @ f

    def lse(v):
        m = v.max()
        return float(m + np.log(np.exp(v - m).sum()))

    log_z = lse(sc)
    logit = lse(sc[1:])
    marg = [float(np.exp(lse(sc[bits[:, j] == 1]) - log_z)) for j in range(n)]
    return {"logits": f.tolist(), "log_z": log_z, "logit_q0": logit,
            "q0": marg[0], "marginals": marg}


# ----------------------------------------------------------------------------- ONNX export

def export_onnx(sd: dict, arch: dict, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, p, heads = arch["width"], arch["patch_size"], arch["heads"]
    s = arch["image_size"] // p
    tokens = s * s + 1
    hd = w // heads
    inits, nodes = [], []
    counter = [0]

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        return name

    def node(op, inputs, **attrs):
        counter[0] += 1
        out = f"{op.lower()}_{counter[0]}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def linear(x, weight_key, bias_key):
        wt = init(weight_key + ".T", sd[weight_key].T.astype(np.float32))
        return node("Add", [node("MatMul", [x, wt]), init(bias_key, sd[bias_key])])

    def ln(x, prefix):
        return node("LayerNormalization", [x, init(prefix + ".weight", sd[prefix + ".weight"]),
                                           init(prefix + ".bias", sd[prefix + ".bias"])],
                    axis=-1, epsilon=1e-5)

    x = node("Conv", ["pixels", init("visual.conv1.weight", sd["visual.conv1.weight"])],
             kernel_shape=[p, p], strides=[p, p])
    x = node("Reshape", [x, init("shape_patches", np.array([0, w, s * s], np.int64))])
    x = node("Transpose", [x], perm=[0, 2, 1])
    batch = node("Slice", [node("Shape", ["pixels"]), init("i0", np.array([0], np.int64)),
                           init("i1", np.array([1], np.int64))])
    cls_shape = node("Concat", [batch, init("one_w", np.array([1, w], np.int64))], axis=0)
    cls = node("Expand", [init("visual.class_embedding",
                               sd["visual.class_embedding"].reshape(1, 1, w)), cls_shape])
    x = node("Concat", [cls, x], axis=1)
    x = node("Add", [x, init("visual.positional_embedding", sd["visual.positional_embedding"])])
    x = ln(x, "visual.ln_pre")
    heads_shape = init("shape_heads", np.array([0, tokens, heads, hd], np.int64))
    merge_shape = init("shape_merge", np.array([0, tokens, w], np.int64))
    scale = init("attn_scale", np.array(1.0 / math.sqrt(hd), np.float32))
    gelu_k = init("quick_gelu", np.array(1.702, np.float32))
    for i in range(arch["layers"]):
        b = f"visual.transformer.resblocks.{i}"
        h = ln(x, f"{b}.ln_1")
        qkv = linear(h, f"{b}.attn.in_proj_weight", f"{b}.attn.in_proj_bias")
        q, k, v = (f"q_{i}", f"k_{i}", f"v_{i}")
        nodes.append(helper.make_node("Split", [qkv, init(f"split_{i}", np.array([w, w, w], np.int64))],
                                      [q, k, v], axis=-1))
        q = node("Transpose", [node("Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])
        a = node("Softmax", [node("MatMul", [node("Mul", [q, scale]), k])], axis=-1)
        o = node("Reshape", [node("Transpose", [node("MatMul", [a, v])], perm=[0, 2, 1, 3]),
                             merge_shape])
        x = node("Add", [x, linear(o, f"{b}.attn.out_proj.weight", f"{b}.attn.out_proj.bias")])
        h = linear(ln(x, f"{b}.ln_2"), f"{b}.mlp.c_fc.weight", f"{b}.mlp.c_fc.bias")
        h = node("Mul", [h, node("Sigmoid", [node("Mul", [h, gelu_k])])])
        x = node("Add", [x, linear(h, f"{b}.mlp.c_proj.weight", f"{b}.mlp.c_proj.bias")])
    x = node("Gather", [x, init("cls_index", np.array(0, np.int64))], axis=1)
    x = ln(x, "visual.ln_post")
    nodes.append(helper.make_node("MatMul", [x, init("visual.proj", sd["visual.proj"])],
                                  ["embedding"]))
    graph = helper.make_graph(
        nodes, "sjedd_image_encoder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                       ["batch", 3, arch["image_size"], arch["image_size"]])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                       ["batch", arch["embed_dim"]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="dfwatch tools/model.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------- files

def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """The safetensors format: u64 little-endian header length, JSON header, raw data."""
    header: dict = {}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        data = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {name}: only F32 is supported, got {info['dtype']}")
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + a:base + b], dtype="<f4").reshape(info["shape"])
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def toml_str(s: str) -> str:
    return json.dumps(s)


def write_manifest(out: Path, *, name, version, source: dict, arch_name, arch, labels, trained,
                   files: dict[str, str]) -> None:
    lines = [
        "# dfwatch model bundle manifest; schema: engines/SCHEMA.md",
        f"schema_version = {SCHEMA_VERSION}",
        "",
        "[model]",
        f"name = {toml_str(name)}",
        f"version = {toml_str(version)}",
        f"trained = {'true' if trained else 'false'}",
        "",
        "[model.source]",
    ]
    for k, v in source.items():
        lines.append(f"{k} = {json.dumps(v)}")
    lines += ["", "[architecture]", f"name = {toml_str(arch_name)}"]
    for k in ("image_size", "patch_size", "width", "layers", "heads", "mlp_width", "embed_dim"):
        lines.append(f"{k} = {arch[k]}")
    lines.append(f"mean = [{', '.join(repr(v) for v in CLIP_MEAN)}]")
    lines.append(f"std = [{', '.join(repr(v) for v in CLIP_STD)}]")
    for n, lvl in labels["nodes"]:
        lines += ["", "[[labels]]", f"name = {toml_str(n)}", f"level = {toml_str(lvl)}",
                  f"prompt = {toml_str(prompt(n, lvl))}"]
    lines += ["", "[graph]", "edges = ["]
    lines += [f"  [{toml_str(a)}, {toml_str(b)}]," for a, b in graph_edges(labels)]
    lines += ["]", ""]
    for key, fname in files.items():
        lines += [f"[files.{key}]", f"path = {toml_str(fname)}",
                  f"sha256 = {toml_str(sha256(out / fname))}", ""]
    (out / "manifest.toml").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- synth

def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Natural-looking stand-ins: smooth colour fields with edges and mild noise, uint8 NHWC."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(6):
            fx, fy = rng.uniform(0.5, 4.0, 2)
            ph = rng.uniform(0, 2 * np.pi, 3)
            amp = rng.uniform(20, 60, 3)
            for c in range(3):
                img[..., c] += amp[c] * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph[c])
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        disk = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[disk] += rng.uniform(-60, 60, 3)
        img += 128 + rng.normal(0, 4, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def normalise(images_u8: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC -> CLIP-normalised float32 NCHW (no resize: images must be size x size)."""
    if images_u8.shape[1:3] != (size, size):
        raise ValueError(f"crops must be {size}x{size}, got {images_u8.shape[1:3]}")
    x = images_u8.astype(np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return x.transpose(0, 3, 1, 2).copy()


def calibrated_text(emb: np.ndarray, labels: dict, seed: int, shift: float) -> np.ndarray:
    """Text embeddings whose logits on these image embeddings spread q0 over ~0.05-0.95.

    Each row is t_j = 10 * (b_j * m / |m|^2 + a_j * d_j / sd_j), with m the mean embedding
    and d_j a random direction of the centred embeddings, so f_j ~ b_j + a_j * z_j with z_j
    standardised. The root's offset b_0 is then chosen so the median q0 is sigmoid(shift)."""
    rng = np.random.default_rng(seed + 1)
    nodes = labels["nodes"]
    edges = graph_edges(labels)
    m = emb.mean(0)
    c = emb - m
    rows = []
    offsets = []
    for j, (_, lvl) in enumerate(nodes):
        d = rng.standard_normal(emb.shape[1])
        sd = float((c @ d).std()) or 1.0
        a = 1.2 if lvl == "root" else 0.8
        b = {"root": 0.0, "global": -1.0, "local": -1.5}[lvl] + rng.normal(0, 0.3)
        offsets.append(b)
        rows.append((m / (m @ m), a * d / sd))
    offsets = np.array(offsets)

    def text_for(b0):
        offs = offsets.copy()
        offs[0] = b0
        return np.stack([10.0 * (offs[j] * r[0] + r[1]) for j, r in enumerate(rows)])

    def median_logit(b0):
        t = text_for(b0)
        return float(np.median([sjedd_scores(e, t, nodes, edges)["logit_q0"] for e in emb]))

    lo, hi = -40.0, 40.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if median_logit(mid) < shift:
            lo = mid
        else:
            hi = mid
    return text_for((lo + hi) / 2).astype(np.float32)


def cmd_synth(args) -> None:
    arch = ARCHS[args.arch]
    labels = LABEL_SETS[args.labels]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sd = synth_weights(arch, args.seed)
    calib = normalise(smooth_images(args.calibration, arch["image_size"], args.seed + 2),
                      arch["image_size"])
    emb = np.concatenate([visual_forward(sd, arch, calib[i:i + 16])
                          for i in range(0, len(calib), 16)])
    text = calibrated_text(emb, labels, args.seed, args.shift)
    write_safetensors(out / "image_encoder.safetensors", sd,
                      {"format": "OpenAI-CLIP visual tower, f32", "seed": args.seed})
    write_safetensors(out / "text_embeddings.safetensors", {"text_embeddings": text},
                      {"rows": "label nodes in manifest order", "seed": args.seed})
    export_onnx(sd, arch, out / "image_encoder.onnx")
    write_manifest(out, name=f"sjedd-synth-{args.arch}-{args.labels}", version="0",
                   source={"kind": "synth", "seed": args.seed, "shift": args.shift},
                   arch_name=args.arch, arch=arch, labels=labels, trained=False,
                   files={"image_encoder_onnx": "image_encoder.onnx",
                          "image_encoder_safetensors": "image_encoder.safetensors",
                          "text_embeddings": "text_embeddings.safetensors"})
    q0 = [sjedd_scores(e, text, labels["nodes"], graph_edges(labels))["q0"] for e in emb]
    print(f"synth: {out} ({args.arch}, {args.labels}, seed {args.seed}) in {time.time() - t0:.1f} s; "
          f"q0 on {len(q0)} calibration crops: min {min(q0):.3f} median {np.median(q0):.3f} "
          f"max {max(q0):.3f}")


# ----------------------------------------------------------------------------- bundle reading

def load_bundle(path: Path):
    import tomllib
    man = tomllib.loads((path / "manifest.toml").read_text())
    arch = {k: man["architecture"][k] for k in ARCHS["tiny"]}
    sd = read_safetensors(path / man["files"]["image_encoder_safetensors"]["path"])
    text = read_safetensors(path / man["files"]["text_embeddings"]["path"])["text_embeddings"]
    nodes = [(l["name"], l["level"]) for l in man["labels"]]
    edges = [tuple(e) for e in man["graph"]["edges"]]
    return man, arch, sd, text, nodes, edges


def read_png_rgb(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cmd_reference(args) -> None:
    man, arch, sd, text, nodes, edges = load_bundle(Path(args.model))
    crops = np.stack([read_png_rgb(Path(c)) for c in args.crops])
    emb = visual_forward(sd, arch, normalise(crops, arch["image_size"]))
    result = []
    for c, e in zip(args.crops, emb):
        r = sjedd_scores(e, text, nodes, edges)
        r["crop"] = Path(c).name
        r["embedding"] = e.tolist()
        result.append(r)
    Path(args.out).write_text(json.dumps({"model": man["model"]["name"], "crops": result},
                                         indent=1))
    print(f"reference: {len(result)} crops -> {args.out}; q0 = "
          + ", ".join(f"{r['q0']:.3f}" for r in result))


def cmd_fixture(args) -> None:
    """tests/fixtures/tiny: tiny bundle, 4 crops, expected outputs. Deterministic."""
    from PIL import Image
    out = Path(args.out)
    bundle = out / "bundle"
    ns = argparse.Namespace(arch="tiny", labels="ffpp", seed=args.seed, shift=0.0,
                            calibration=32, out=str(bundle))
    cmd_synth(ns)
    crops = smooth_images(4, 224, args.seed + 100)
    paths = []
    for i, c in enumerate(crops):
        p = out / f"crop{i}.png"
        Image.fromarray(c).save(p, optimize=True)
        paths.append(str(p))
    cmd_reference(argparse.Namespace(model=str(bundle), crops=paths,
                                     out=str(out / "expected.json")))


def cmd_checkset(args) -> None:
    """Crops whose q0 lie between 0.05 and 0.95 under a bundle, with reference outputs: the
    full-size comparison set (made in CI from a seed, never committed)."""
    from PIL import Image
    man, arch, sd, text, nodes, edges = load_bundle(Path(args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = smooth_images(args.pool, arch["image_size"], args.seed)
    emb = np.concatenate([visual_forward(sd, arch, normalise(pool[i:i + 8], arch["image_size"]))
                          for i in range(0, len(pool), 8)])
    kept = []
    for i, e in enumerate(emb):
        r = sjedd_scores(e, text, nodes, edges)
        if 0.05 <= r["q0"] <= 0.95:
            name = f"crop{len(kept)}.png"
            Image.fromarray(pool[i]).save(out / name)
            r["crop"] = name
            r["embedding"] = e.tolist()
            kept.append(r)
        if len(kept) == args.count:
            break
    if len(kept) < args.count:
        raise SystemExit(f"only {len(kept)} of {args.pool} crops have q0 in [0.05, 0.95]")
    (out / "expected.json").write_text(json.dumps({"model": man["model"]["name"], "crops": kept}))
    print(f"checkset: {len(kept)} crops -> {out}; q0 = " + ", ".join(f"{r['q0']:.3f}" for r in kept))


# ----------------------------------------------------------------------------- import

class Steps:
    """Progress of a long command on stderr: `[k/n] what (elapsed)`, one line per step."""

    def __init__(self, command: str, total: int):
        self.command, self.total, self.k, self.t0 = command, total, 0, time.time()

    def __call__(self, what: str) -> None:
        self.k += 1
        print(f"{self.command}: [{self.k}/{self.total}] {what} ({time.time() - self.t0:.1f} s)",
              file=sys.stderr, flush=True)


def cmd_import(args) -> None:
    from checkpoint import ClipTokenizer, infer_visual, load_torch_zip, text_forward
    ckpt = Path(args.checkpoint)
    labels = LABEL_SETS[args.labels]
    step = Steps("import", 5)
    step(f"reading {ckpt.name} (restricted unpickler)")
    obj = load_torch_zip(ckpt)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "visual.conv1.weight" not in {
            k.removeprefix("module.") for k in state}:
        raise SystemExit(f"{ckpt}: no OpenAI-CLIP state dict (expected a 'model' key with "
                         "visual.* and text-tower weights)")
    sd = {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state.items()
          if isinstance(v, np.ndarray)}
    arch = infer_visual(sd)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    tok = ClipTokenizer()
    prompts = [prompt(n, lvl) for n, lvl in labels["nodes"]]
    step(f"text tower over {len(prompts)} label prompts")
    tokens = np.stack([tok.tokenize(p, sd["positional_embedding"].shape[0]) for p in prompts])
    text = text_forward(sd, tokens).astype(np.float32)
    if text.shape[1] != arch["embed_dim"]:
        raise SystemExit(f"{ckpt}: text projection gives {text.shape[1]} dims, the image tower "
                         f"{arch['embed_dim']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step("writing safetensors")
    write_safetensors(out / "image_encoder.safetensors", visual,
                      {"format": "OpenAI-CLIP visual tower, f32", "checkpoint": ckpt.name})
    write_safetensors(out / "text_embeddings.safetensors", {"text_embeddings": text},
                      {"rows": "label nodes in manifest order", "checkpoint": ckpt.name})
    step("exporting the image tower to ONNX")
    export_onnx(visual, arch, out / "image_encoder.onnx")
    step("writing the manifest (SHA-256 of every file)")
    name = {768: "vit-b-32"}.get(arch["width"], "custom") if arch["patch_size"] == 32 else "custom"
    write_manifest(out, name=args.name or f"sjedd-{args.labels}", version=args.version,
                   source={"kind": "import", "checkpoint": ckpt.name,
                           "checkpoint_sha256": sha256(ckpt), "labels": args.labels},
                   arch_name=name, arch=arch, labels=labels, trained=True,
                   files={"image_encoder_onnx": "image_encoder.onnx",
                          "image_encoder_safetensors": "image_encoder.safetensors",
                          "text_embeddings": "text_embeddings.safetensors"})
    print(f"import: {ckpt} -> {out} ({name}: width {arch['width']}, {arch['layers']} layers, "
          f"{arch['heads']} heads; {len(prompts)} label prompts)")


# ----------------------------------------------------------------------------- ONNX Runtime

def cmd_quantize(args) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(args.onnx, args.out, weight_type=QuantType.QInt8, per_channel=True)
    print(f"quantize: {args.onnx} -> {args.out} (dynamic int8, per channel)")


def cmd_ortbench(args) -> None:
    """onnxruntime's Python API on the same ONNX; prints JSON lines per batch size."""
    import onnxruntime as ort
    size = args.image_size
    best = {}
    for threads in sorted(set([args.threads, 1])):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(args.onnx, so, providers=["CPUExecutionProvider"])
        for batch in args.batch:
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
            for _ in range(args.warmup):
                sess.run(None, {"pixels": x})
            t0 = time.perf_counter()
            runs = 0
            while time.perf_counter() - t0 < args.seconds:
                sess.run(None, {"pixels": x})
                runs += 1
            rate = runs * batch / (time.perf_counter() - t0)
            if threads == args.threads or rate > best.get(batch, (0, 0))[0]:
                best[batch] = max(best.get(batch, (0, 0)), (rate, threads))
    for batch, (rate, threads) in sorted(best.items()):
        print(json.dumps({"batch": batch, "faces_per_s": rate, "threads": threads}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="synthetic bundle from a seed")
    s.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    s.add_argument("--labels", choices=sorted(LABEL_SETS), default="ffpp")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shift", type=float, default=0.0,
                   help="median logit(q0) on natural-looking crops: <0 towards real, >0 towards fake")
    s.add_argument("--calibration", type=int, default=48, help="crops used to place the text embeddings")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_synth)
    r = sub.add_parser("reference", help="float64 numpy forward + scores -> JSON")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("crops", nargs="+")
    r.set_defaults(fn=cmd_reference)
    f = sub.add_parser("fixture", help="write the tiny test fixture")
    f.add_argument("--out", default="tests/fixtures/tiny")
    f.add_argument("--seed", type=int, default=11)
    f.set_defaults(fn=cmd_fixture)
    i = sub.add_parser("import", help="bundle from an SJEDD .pth checkpoint (no torch needed)")
    i.add_argument("checkpoint")
    i.add_argument("--labels", choices=sorted(LABEL_SETS), required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--name")
    i.add_argument("--version", default="1")
    i.set_defaults(fn=cmd_import)
    c = sub.add_parser("checkset", help="crops with q0 in [0.05, 0.95] + reference outputs")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--count", type=int, default=4)
    c.add_argument("--pool", type=int, default=24)
    c.add_argument("--seed", type=int, default=1234)
    c.set_defaults(fn=cmd_checkset)
    q = sub.add_parser("quantize", help="int8 dynamic quantisation of an ONNX encoder")
    q.add_argument("onnx")
    q.add_argument("out")
    q.set_defaults(fn=cmd_quantize)
    b = sub.add_parser("ortbench", help="onnxruntime Python baseline")
    b.add_argument("onnx")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--seconds", type=float, default=3.0)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--image-size", type=int, default=224)
    b.set_defaults(fn=cmd_ortbench)
    args = ap.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

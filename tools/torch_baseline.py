#!/usr/bin/env python3
"""PyTorch baselines for dfwatch's native GPU engine, and the check of its embeddings.

What a user would otherwise run on a GPU, measured on the same machine in the same call:
  - the OpenAI-CLIP visual tower (SJEDD's image encoder), written here as torch modules whose
    parameter names are the checkpoint's, loading the bundle's image_encoder.safetensors with a
    numpy reader (no safetensors package);
  - torchvision's vit_b_32 (random weights: only its speed matters), when torchvision is there.
Both in fp16, eager and through a CUDA graph, at batch 1 to 256: faces/s, latency, peak memory.

The check: the engine's embeddings of the crops `dfwatch gpu-check` wrote (inputs.f32,
embeddings.f32) against the PyTorch tower in fp16 and fp32. Where torch or a CUDA device is
absent (CI), it says so and runs the same check against tools/model.py's float64 numpy
reference instead, then exits 0.

With --engine-report (gpu-check's report.json) it prints the ratios the GPU issue targets:
throughput at batch 256 against the faster PyTorch baseline (target >= 1.6x), CUDA-graph
latency at batch 1 (target <= 0.5x).

  python3 tools/torch_baseline.py --model BUNDLE --inputs DIR/inputs.f32 \
      --embeddings DIR/embeddings.f32 [--engine-report DIR/report.json] --out torch.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model as m  # noqa: E402  (tools/model.py: the numpy reader and reference)


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    got = got.astype(np.float64)
    ref = ref.astype(np.float64)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return {"largest_abs_error": float(np.abs(got - ref).max()),
            "smallest_cosine": float(cos.min()), "crops": int(got.shape[0])}


def load(args):
    man, arch, sd, text, nodes, edges = m.load_bundle(Path(args.model))
    size = arch["image_size"]
    x = np.fromfile(args.inputs, dtype="<f4").reshape(-1, 3, size, size)
    emb = np.fromfile(args.embeddings, dtype="<f4").reshape(x.shape[0], arch["embed_dim"])
    return arch, sd, text, nodes, edges, x, emb


def numpy_check(args, reason: str) -> dict:
    arch, sd, text, nodes, edges, x, emb = load(args)
    ref = np.concatenate([m.visual_forward(sd, arch, x[i:i + 4]) for i in range(0, len(x), 4)])
    r = compare(emb, ref)
    # The scores the alerts use, as SJEDD defines them (float64).
    errs = []
    for e, f in zip(emb, ref):
        a = m.sjedd_scores(e.astype(np.float64), text, nodes, edges)
        b = m.sjedd_scores(f, text, nodes, edges)
        errs.append(max(abs(a["log_z"] - b["log_z"]),
                        float(np.abs(np.array(a["logits"]) - np.array(b["logits"])).max())))
    r["largest_logit_or_log_z_error"] = float(max(errs))
    return {"torch": f"skipped: {reason}", "against": "tools/model.py float64 numpy reference",
            "check": r}


def clip_tower(torch, arch: dict):
    nn = torch.nn

    class QuickGELU(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    class Block(nn.Module):
        def __init__(self, w, heads, mlp):
            super().__init__()
            self.ln_1 = nn.LayerNorm(w)
            self.attn = nn.MultiheadAttention(w, heads)
            self.ln_2 = nn.LayerNorm(w)
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(w, mlp))
            self.mlp.add_module("gelu", QuickGELU())
            self.mlp.add_module("c_proj", nn.Linear(mlp, w))

        def forward(self, x):
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class Transformer(nn.Module):
        def __init__(self, w, layers, heads, mlp):
            super().__init__()
            self.resblocks = nn.Sequential(*[Block(w, heads, mlp) for _ in range(layers)])

        def forward(self, x):
            return self.resblocks(x)

    class Visual(nn.Module):
        def __init__(self, a):
            super().__init__()
            w, p = a["width"], a["patch_size"]
            tokens = (a["image_size"] // p) ** 2 + 1
            self.conv1 = nn.Conv2d(3, w, p, p, bias=False)
            self.class_embedding = nn.Parameter(torch.zeros(w))
            self.positional_embedding = nn.Parameter(torch.zeros(tokens, w))
            self.ln_pre = nn.LayerNorm(w)
            self.transformer = Transformer(w, a["layers"], a["heads"], a["mlp_width"])
            self.ln_post = nn.LayerNorm(w)
            self.proj = nn.Parameter(torch.zeros(w, a["embed_dim"]))

        def forward(self, x):
            x = self.conv1(x).flatten(2).transpose(1, 2)
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype)
            x = self.ln_pre(x).permute(1, 0, 2)
            x = self.transformer(x).permute(1, 0, 2)
            return self.ln_post(x[:, 0, :]) @ self.proj

    return Visual(arch)


def bench(torch, net, size: int, batches, seconds: float) -> list[dict]:
    out = []
    for b in batches:
        x = torch.randn(b, 3, size, size, device="cuda", dtype=torch.float16)
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            for _ in range(3):
                net(x)
            torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or n < 3:
                net(x)
                n += 1
            torch.cuda.synchronize()
            eager = (time.perf_counter() - t0) / n
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    net(x)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                y = net(x)
            torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or n < 3:
                g.replay()
                n += 1
            torch.cuda.synchronize()
            graph = (time.perf_counter() - t0) / n
            del y, g
        out.append({"batch": b, "eager_ms": eager * 1e3, "graph_ms": graph * 1e3,
                    "faces_per_s_eager": b / eager, "faces_per_s_graph": b / graph,
                    "peak_memory_bytes": torch.cuda.max_memory_allocated()})
    return out


def torch_run(args, torch) -> dict:
    arch, sd, text, nodes, edges, x, emb = load(args)
    net = clip_tower(torch, arch)
    state = {k[len("visual."):]: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    missing = net.load_state_dict(state, strict=True)
    del missing
    net = net.cuda().eval()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with torch.inference_mode():
        xt = torch.from_numpy(x).cuda()
        f32 = net(xt).float().cpu().numpy()
        net = net.half()
        f16 = net(xt.half()).float().cpu().numpy()
    res["check"] = {"engine_vs_torch_fp32": compare(emb, f32), "engine_vs_torch_fp16": compare(emb, f16),
                    "torch_fp16_vs_torch_fp32": compare(f16, f32)}
    res["openai_clip_tower"] = bench(torch, net, arch["image_size"], args.batches, args.seconds)
    del net
    try:
        import torchvision
        tv = torchvision.models.vit_b_32(weights=None).cuda().eval().half()
        res["torchvision_vit_b_32"] = bench(torch, tv, 224, args.batches, args.seconds)
        del tv
    except Exception as e:  # noqa: BLE001  (absent or failing: say which)
        res["torchvision_vit_b_32"] = f"skipped: {type(e).__name__}: {e}"
    return res


def ratios(res: dict, engine_report: Path) -> dict:
    eng = json.loads(engine_report.read_text())
    rows = {b["batch"]: b for b in eng["speed"]["buckets"]}
    best256, best1 = None, None
    for name in ("openai_clip_tower", "torchvision_vit_b_32"):
        runs = res.get(name)
        if not isinstance(runs, list):
            continue
        by = {r["batch"]: r for r in runs}
        if 256 in by and (best256 is None or by[256]["faces_per_s_graph"] > best256[1]):
            best256 = (name, max(by[256]["faces_per_s_graph"], by[256]["faces_per_s_eager"]))
        if 1 in by and (best1 is None or by[1]["graph_ms"] < best1[1]):
            best1 = (name, by[1]["graph_ms"])
    out = {}
    if best256 and 256 in rows:
        r = rows[256]["faces_per_s_graph"] / best256[1]
        out["throughput_batch_256"] = {"engine": rows[256]["faces_per_s_graph"], "baseline": best256[1],
                                       "baseline_model": best256[0], "ratio": r, "target": ">= 1.6",
                                       "met": r >= 1.6}
    if best1 and 1 in rows:
        r = rows[1]["graph_ms"] / best1[1]
        out["latency_batch_1_graph"] = {"engine_ms": rows[1]["graph_ms"], "baseline_ms": best1[1],
                                        "baseline_model": best1[0], "ratio": r, "target": "<= 0.5",
                                        "met": r <= 0.5}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--engine-report")
    ap.add_argument("--out")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    try:
        import torch
        if not torch.cuda.is_available():
            res = numpy_check(args, "torch has no CUDA device here")
        else:
            res = torch_run(args, torch)
            if args.engine_report:
                res["ratios"] = ratios(res, Path(args.engine_report))
    except ImportError:
        res = numpy_check(args, "torch is not installed")
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writes checkpoints in SJEDD's exact torch.save format without torch, for tests.

A torch >= 1.6 checkpoint is a zip: `<name>/data.pkl` (a protocol-2 pickle in which tensors
are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`
calls and storages are persistent ids `('storage', torch.FloatStorage, key, 'cpu', numel)`),
`<name>/data/<key>` (raw little-endian storage bytes), `<name>/version` and
`<name>/byteorder`. SJEDD's files are `{'model': OpenAI-CLIP state dict, ...}` and may also
pickle a yacs CfgNode, argparse arguments and an optimizer state; so do these.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def _fake_modules():
    """Registers stand-ins named like torch's pickled globals, so pickle writes those names."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    yacs = types.ModuleType("yacs")
    yacs_config = types.ModuleType("yacs.config")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise RuntimeError("only a name for pickle")

    class CfgNode(dict):
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    torch.FloatStorage, torch._utils = FloatStorage, utils
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    yacs.config, yacs_config.CfgNode = yacs_config, CfgNode
    mods = {"torch": torch, "torch._utils": utils, "yacs": yacs, "yacs.config": yacs_config}
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield FloatStorage, _rebuild_tensor_v2, CfgNode
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Storage:
    def __init__(self, key: str, data: bytes, numel: int):
        self.key, self.data, self.numel = key, data, numel


def save_torch_zip(obj_factory, path: Path, name: str = "archive", layout=None) -> None:
    """obj_factory(tensor, CfgNode) builds the object to save; tensor(np.ndarray) wraps one.
    `layout`, for crafted files, gives every tensor's (offset, size, stride) instead of its
    own."""
    storages: list[_Storage] = []
    with _fake_modules() as (FloatStorage, rebuild, CfgNode):
        class _Tensor:
            def __init__(self, arr):
                arr = np.ascontiguousarray(arr, dtype="<f4")
                self.storage = _Storage(str(len(storages)), arr.tobytes(), arr.size)
                storages.append(self.storage)
                self.shape = arr.shape
                self.stride = tuple(s // 4 for s in arr.strides)

            def __reduce__(self):
                offset, shape, stride = layout or (0, self.shape, self.stride)
                return (rebuild, (self.storage, offset, shape, stride, False,
                                  collections.OrderedDict()))

        class _Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Storage):
                    return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
                return None

        obj = obj_factory(_Tensor, CfgNode)
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", buf.getvalue())
        z.writestr(f"{name}/byteorder", "little")
        z.writestr(f"{name}/version", "3\n")
        for s in storages:
            z.writestr(f"{name}/data/{s.key}", s.data)


def clip_state_dict(seed: int, width: int = 128, layers: int = 1, text_width: int = 64,
                    text_layers: int = 1, embed: int = 32) -> dict[str, np.ndarray]:
    """A small but complete OpenAI-CLIP state dict (visual + text towers), random."""
    sys.path.insert(0, str(Path(__file__).parent))
    import model
    arch = dict(image_size=224, patch_size=32, width=width, layers=layers, heads=width // 64,
                mlp_width=4 * width, embed_dim=embed)
    sd = model.synth_weights(arch, seed)
    rng = np.random.default_rng(seed + 7)
    f32 = np.float32
    tw = text_width
    sd["token_embedding.weight"] = (rng.standard_normal((49408, tw)) * 0.02).astype(f32)
    sd["positional_embedding"] = (rng.standard_normal((77, tw)) * 0.01).astype(f32)
    for i in range(text_layers):
        b = f"transformer.resblocks.{i}"
        for ln in ("ln_1", "ln_2"):
            sd[f"{b}.{ln}.weight"] = (1 + rng.standard_normal(tw) * 0.1).astype(f32)
            sd[f"{b}.{ln}.bias"] = (rng.standard_normal(tw) * 0.05).astype(f32)
        sd[f"{b}.attn.in_proj_weight"] = (rng.standard_normal((3 * tw, tw)) * tw ** -0.5).astype(f32)
        sd[f"{b}.attn.in_proj_bias"] = (rng.standard_normal(3 * tw) * 0.02).astype(f32)
        sd[f"{b}.attn.out_proj.weight"] = (rng.standard_normal((tw, tw)) * tw ** -0.5).astype(f32)
        sd[f"{b}.attn.out_proj.bias"] = (rng.standard_normal(tw) * 0.02).astype(f32)
        sd[f"{b}.mlp.c_fc.weight"] = (rng.standard_normal((4 * tw, tw)) * tw ** -0.5).astype(f32)
        sd[f"{b}.mlp.c_fc.bias"] = (rng.standard_normal(4 * tw) * 0.02).astype(f32)
        sd[f"{b}.mlp.c_proj.weight"] = (rng.standard_normal((tw, 4 * tw)) * tw ** -0.5).astype(f32)
        sd[f"{b}.mlp.c_proj.bias"] = (rng.standard_normal(tw) * 0.02).astype(f32)
    sd["ln_final.weight"] = np.ones(tw, f32)
    sd["ln_final.bias"] = np.zeros(tw, f32)
    sd["text_projection"] = (rng.standard_normal((tw, embed)) * tw ** -0.5).astype(f32)
    sd["logit_scale"] = np.array(np.log(1 / 0.07), f32)
    return sd


def write_sjedd_checkpoint(path: Path, seed: int = 3) -> dict[str, np.ndarray]:
    """An SJEDD-format checkpoint with its extra pickled objects; returns the state dict."""
    sd = clip_state_dict(seed)

    def build(tensor, CfgNode):
        cfg = CfgNode()
        cfg["MODEL"] = CfgNode(NAME="ViT-B/32", LAMBDA=[1.0, 1.0, 1.0])
        cfg["TRAIN"] = CfgNode(LR=6e-7, EPOCHS=20)
        return {
            "model": collections.OrderedDict((k, tensor(v)) for k, v in sd.items()),
            "config": cfg,
            "args": argparse.Namespace(dataset="FF++", batch_size=32, amp=True),
            "optimizer": {"state": {0: {"step": 10, "exp_avg": tensor(np.ones(3, np.float32))}},
                          "param_groups": [{"lr": 6e-7, "weight_decay": 1e-3, "params": [0]}]},
            "epoch": 19,
        }

    save_torch_zip(build, path)
    return sd


def write_malicious_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint whose unpickling would run a shell command creating `marker`."""
    import os

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    save_torch_zip(lambda tensor, CfgNode: {"model": {}, "payload": Exploit()}, path)


def write_crafted_tensor_checkpoint(path: Path, offset: int, size, stride) -> None:
    """A checkpoint whose one tensor (16 floats of storage) claims the given layout."""
    save_torch_zip(lambda tensor, CfgNode: {"model": {"w": tensor(np.arange(16, dtype="<f4"))}},
                   path, layout=(offset, tuple(size), tuple(stride)))


def write_zip_bomb_checkpoint(path: Path, member_bytes: int) -> None:
    """A valid checkpoint plus a storage member of `member_bytes` zeros, deflated to almost
    nothing, that its pickle references."""
    save_torch_zip(lambda tensor, CfgNode: {"model": {"w": tensor(np.zeros(4, "<f4"))}}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["archive/data/0"] = bytes(member_bytes)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in members.items():
            z.writestr(n, data)

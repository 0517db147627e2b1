"""Reading SJEDD checkpoints without torch: CLIP's BPE tokeniser, a restricted unpickler for
torch.save zips, and the numpy text tower. Used by `tools/model.py import`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from model import layer_norm, resblock  # noqa: F401  (shared float64 building blocks)

VOCAB_PATH = Path(__file__).resolve().parent.parent / "var/clip/bpe_simple_vocab_16e6.txt.gz"
SOT, EOT, CONTEXT = 49406, 49407, 77


class ClipTokenizer:
    """CLIP's byte-level BPE (vocabulary 49408, context 77), written from the algorithm.

    Text is cleaned (HTML entities, whitespace) and lower-cased, split with CLIP's pattern,
    each piece's UTF-8 bytes mapped to printable characters, then merged by BPE rank; the
    last symbol of a word carries the end-of-word marker '</w>'. The prompts dfwatch needs
    are plain ASCII, so ftfy's mojibake repair (a no-op on them) is not applied."""

    def __init__(self, vocab_path: Path = VOCAB_PATH):
        import gzip
        import regex
        if not vocab_path.exists():
            raise SystemExit(f"{vocab_path} is missing: run ./tools/setup.sh")
        lines = gzip.decompress(vocab_path.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(l.split()) for l in lines[1:49152 - 256 - 2 + 1]]
        self.byte_char = self._byte_chars()
        base = list(self.byte_char.values())
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.rank = {m: i for i, m in enumerate(merges)}
        self.pattern = regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE)
        self.cache: dict[str, list[str]] = {}

    @staticmethod
    def _byte_chars() -> dict[int, str]:
        keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                + list(range(ord("®"), ord("ÿ") + 1)))
        # Printable bytes map to themselves and come first; the others follow in byte order,
        # mapped past U+00FF. The vocabulary's first 256 entries follow this order.
        out = {b: chr(b) for b in keep}
        for extra, b in enumerate(b for b in range(256) if b not in out):
            out[b] = chr(256 + extra)
        return out

    def _bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(self.rank.get((a, b), 1 << 30), i)
                     for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            best, _ = min(pairs)
            if best == 1 << 30:
                break
            pair = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == best)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        import html
        text = html.unescape(html.unescape(text))
        text = " ".join(text.split()).strip().lower()
        out = []
        for piece in self.pattern.findall(text):
            chars = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            out += [self.ids[s] for s in self._bpe(chars)]
        return out

    def tokenize(self, text: str, context: int = CONTEXT) -> np.ndarray:
        ids = [SOT] + self.encode(text) + [EOT]
        if len(ids) > context:
            raise ValueError(f"prompt {text!r} is {len(ids)} tokens; the context is {context}")
        out = np.zeros(context, np.int64)
        out[:len(ids)] = ids
        return out


def text_forward(sd: dict, tokens: np.ndarray) -> np.ndarray:
    """OpenAI CLIP encode_text in float64: token + positional embedding, pre-LN blocks with a
    causal mask, ln_final, the EOT position (largest id) times text_projection."""
    g = {k: v.astype(np.float64) for k, v in sd.items() if not k.startswith("visual.")}
    w = g["ln_final.weight"].shape[0]
    heads = w // 64
    layers = len({k.split(".")[2] for k in g if k.startswith("transformer.resblocks.")})
    n, t = tokens.shape
    x = g["token_embedding.weight"][tokens] + g["positional_embedding"][:t]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(layers):
        x = resblock(x, g, f"transformer.resblocks.{i}", heads, mask)
    x = layer_norm(x, g["ln_final.weight"], g["ln_final.bias"])
    return x[np.arange(n), tokens.argmax(-1)] @ g["text_projection"]


class RefusedPickle(Exception):
    """The checkpoint references something that could run code when unpickled."""


# Modules whose globals can run code or touch the system: a pickle naming them is refused.
_DANGEROUS = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib",
              "runpy", "pty", "code", "codeop", "pickle", "_pickle", "marshal", "ctypes",
              "multiprocessing", "webbrowser", "signal", "threading", "asyncio", "io",
              "tempfile", "pathlib", "glob", "platform", "commands", "popen2", "operator",
              "functools", "types", "inspect", "pdb", "timeit", "torch.hub", "torch.ops"}
_BUILTINS_OK = {"set", "frozenset", "slice", "complex", "bytearray", "int", "float", "str",
                "tuple", "list", "dict", "bool"}
_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16,
                   "DoubleStorage": np.float64, "BFloat16Storage": "bfloat16",
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _Stub(dict):
    """Stands in for any non-tensor object of a checkpoint (yacs configs, argparse
    namespaces, optimizer classes, ...): it records what it was given and runs nothing."""
    _origin = "?"

    def __init__(self, *args, **kwargs):  # noqa: D401 - never calls the real class
        dict.__init__(self)
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def append(self, v):
        self.setdefault("__items__", []).append(v)

    def extend(self, vs):
        self.setdefault("__items__", []).extend(vs)

    def __repr__(self):
        return f"<stub {self._origin}>"


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    arr = storage
    if not size:
        return arr[offset:offset + 1].reshape(()).copy()
    item = arr.itemsize
    view = np.lib.stride_tricks.as_strided(arr[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_rest):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


def load_torch_zip(path: Path) -> dict:
    """Reads a torch.save zip without torch and without running any code from the file."""
    import pickle
    import zipfile

    zf = zipfile.ZipFile(path)
    names = zf.namelist()
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        raise ValueError(f"{path}: not a torch zip checkpoint (no data.pkl)")
    prefix = pkl[:-len("data.pkl")]
    order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    if order != "little":
        raise ValueError(f"{path}: byte order {order!r} is not supported")

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            root = module.split(".")[0]
            if (module, name) in {("torch._utils", "_rebuild_tensor_v2"),
                                  ("torch._utils", "_rebuild_tensor")}:
                return _rebuild_tensor
            if module == "torch._utils" and name.startswith("_rebuild_parameter"):
                return _rebuild_parameter
            if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
                return _rebuild_from_type
            if module == "torch" and name in _STORAGE_DTYPES:
                return ("storage-type", name)
            if (module, name) == ("collections", "OrderedDict"):
                import collections
                return collections.OrderedDict
            if module == "builtins":
                if name in _BUILTINS_OK:
                    import builtins
                    return getattr(builtins, name)
                raise RefusedPickle(f"{path}: refusing: the pickle calls builtins.{name}")
            if module in _DANGEROUS or root in _DANGEROUS:
                raise RefusedPickle(f"{path}: refusing: the pickle references {module}.{name}, "
                                    "which could run code")
            stub = type(name, (_Stub,), {"_origin": f"{module}.{name}"})
            return stub

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise RefusedPickle(f"{path}: unexpected persistent id {pid!r}")
            kind, key = pid[1], pid[2]
            if not (isinstance(kind, tuple) and kind[0] == "storage-type"):
                raise RefusedPickle(f"{path}: unexpected storage type {kind!r}")
            dtype = _STORAGE_DTYPES[kind[1]]
            raw = zf.read(f"{prefix}data/{key}")
            if dtype == "bfloat16":
                u16 = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
                return u16.view(np.float32)
            return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))

    with zf.open(pkl) as f:
        return Unpickler(f).load()


def infer_visual(sd: dict) -> dict:
    w = sd["visual.conv1.weight"].shape[0]
    p = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    return dict(image_size=p * grid, patch_size=p, width=w, layers=layers, heads=w // 64,
                mlp_width=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                embed_dim=sd["visual.proj"].shape[1])

"""Reading SJEDD checkpoints without torch: CLIP's BPE tokeniser, a restricted unpickler for
torch.save zips, and the numpy text tower. Used by `tools/model.py import`."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from model import layer_norm, resblock  # noqa: F401  (shared float64 building blocks)

# CLIP's BPE vocabulary: $DFWATCH_CLIP_VOCAB, else the checkout's var/clip (tools/setup.sh),
# else the Debian package's copy.
_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
if os.environ.get("DFWATCH_CLIP_VOCAB"):
    # Named explicitly: that file or an error, never another copy.
    VOCAB_PATH = Path(os.environ["DFWATCH_CLIP_VOCAB"])
else:
    _VOCAB_CANDIDATES = [
        Path(__file__).resolve().parent.parent / "var/clip" / _VOCAB_NAME,
        Path("/usr/share/dfwatch/clip") / _VOCAB_NAME,
    ]
    VOCAB_PATH = next((p for p in _VOCAB_CANDIDATES if p.exists()), _VOCAB_CANDIDATES[0])
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


class BadCheckpoint(ValueError):
    """The checkpoint's layout is inconsistent (a tensor reading past its storage, a
    negative stride) or larger than the caps below."""


# What a checkpoint zip may expand to: a crafted 300 KB zip once expanded a 300 MB member.
# SJEDD's ViT-B/32 checkpoints are about 600 MB, their largest tensor about 100 MB.
MAX_PICKLE_BYTES = 64 << 20
MAX_STORAGE_BYTES = 2 << 30
MAX_TOTAL_BYTES = 8 << 30
MAX_MEMBERS = 100_000
MAX_TENSOR_DIMS = 8
MAX_TENSOR_ELEMENTS = 1 << 31


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
    """torch's _rebuild_tensor_v2, checked: every element the size and stride address must
    lie inside the storage (as_strided itself would read whatever memory is there)."""
    if not isinstance(storage, np.ndarray):
        raise BadCheckpoint("a tensor's storage is not a storage")

    def ints(xs):
        return all(isinstance(x, int) and not isinstance(x, bool) for x in xs)

    try:
        size, stride = tuple(size), tuple(stride)
    except TypeError:
        raise BadCheckpoint("a tensor's size or stride is not a sequence") from None
    if not (isinstance(offset, int) and ints(size) and ints(stride)
            and len(size) == len(stride) and len(size) <= MAX_TENSOR_DIMS):
        raise BadCheckpoint(f"tensor layout offset={offset!r} size={size!r} stride={stride!r} "
                            "is not a list of integers of one length (at most "
                            f"{MAX_TENSOR_DIMS})")
    if offset < 0 or any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise BadCheckpoint(f"tensor layout offset={offset} size={size} stride={stride} has a "
                            "negative value")
    n = storage.size
    if any(d == 0 for d in size):
        return np.zeros(size, storage.dtype)
    count = math.prod(size)
    if count > MAX_TENSOR_ELEMENTS:
        raise BadCheckpoint(f"tensor of size {size} has {count} elements, more than "
                            f"{MAX_TENSOR_ELEMENTS}")
    last = offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= n:
        raise BadCheckpoint(f"tensor of size {size}, stride {stride} at offset {offset} reads "
                            f"element {last} of a storage of {n}")
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_rest):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


def load_torch_zip(path: Path) -> dict:
    """Reads a torch.save zip without torch and without running any code from the file."""
    import io
    import pickle
    import zipfile

    zf = zipfile.ZipFile(path)
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise BadCheckpoint(f"{path}: {len(infos)} zip members, more than {MAX_MEMBERS}")
    names = [i.filename for i in infos]
    budget = [MAX_TOTAL_BYTES]

    def read(name: str, cap: int) -> bytes:
        """A member, refused by its declared size before it is expanded (zipfile then reads
        no more than that size, and checks the CRC)."""
        info = zf.getinfo(name)
        if info.file_size > cap:
            raise BadCheckpoint(f"{path}: member {name} expands to {info.file_size} bytes, "
                                f"more than {cap}")
        budget[0] -= info.file_size
        if budget[0] < 0:
            raise BadCheckpoint(f"{path}: the members read expand to more than "
                                f"{MAX_TOTAL_BYTES} bytes")
        data = zf.read(name)
        if len(data) != info.file_size:
            raise BadCheckpoint(f"{path}: member {name} is not the size its header says")
        return data

    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        raise ValueError(f"{path}: not a torch zip checkpoint (no data.pkl)")
    prefix = pkl[:-len("data.pkl")]
    order = (read(prefix + "byteorder", 64).decode(errors="replace").strip()
             if prefix + "byteorder" in names else "little")
    if order != "little":
        raise ValueError(f"{path}: byte order {order!r} is not supported")
    storages: dict[str, np.ndarray] = {}

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
            if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
                raise RefusedPickle(f"{path}: unexpected persistent id {pid!r}")
            kind, key = pid[1], pid[2]
            if not (isinstance(kind, tuple) and len(kind) == 2 and kind[0] == "storage-type"
                    and kind[1] in _STORAGE_DTYPES):
                raise RefusedPickle(f"{path}: unexpected storage type {kind!r}")
            if not (isinstance(key, str) and 0 < len(key) <= 64
                    and all(c.isascii() and (c.isalnum() or c in "_.-") for c in key)):
                raise BadCheckpoint(f"{path}: storage key {key!r} is not a plain name")
            # Many tensors may share one storage: it is read (and counted) once.
            if key in storages:
                return storages[key]
            dtype = _STORAGE_DTYPES[kind[1]]
            name = f"{prefix}data/{key}"
            if name not in names:
                raise BadCheckpoint(f"{path}: storage {key} has no member {name}")
            raw = read(name, MAX_STORAGE_BYTES)
            if dtype == "bfloat16":
                if len(raw) % 2:
                    raise BadCheckpoint(f"{path}: storage {key} is not whole bfloat16 values")
                u16 = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
                arr = u16.view(np.float32)
            else:
                dt = np.dtype(dtype).newbyteorder("<")
                if len(raw) % dt.itemsize:
                    raise BadCheckpoint(f"{path}: storage {key} is not whole {dt} values")
                arr = np.frombuffer(raw, dt)
            storages[key] = arr
            return arr

    return Unpickler(io.BytesIO(read(pkl, MAX_PICKLE_BYTES))).load()


def infer_visual(sd: dict) -> dict:
    w = sd["visual.conv1.weight"].shape[0]
    p = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    return dict(image_size=p * grid, patch_size=p, width=w, layers=layers, heads=w // 64,
                mlp_width=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                embed_dim=sd["visual.proj"].shape[1])

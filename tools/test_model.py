"""Tests of tools/model.py: tokeniser, checkpoint import, ONNX export. Run: .venv/bin/pytest tools"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import checkpoint  # noqa: E402
import fake_checkpoint  # noqa: E402
import model  # noqa: E402


def test_prompt_zero_tokenises_as_sjedd_lists_it():
    tok = checkpoint.ClipTokenizer()
    ids = tok.tokenize("A photo of a fake face")
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 5777, 1710, 49407]
    assert ids[8:].tolist() == [0] * 69
    # Every label prompt of both models fits the context and ends with EOT.
    for labels in model.LABEL_SETS.values():
        for name, level in labels["nodes"]:
            t = tok.tokenize(model.prompt(name, level))
            assert t.argmax() == np.count_nonzero(t) - 1


def test_an_sjedd_checkpoint_with_extra_objects_imports(tmp_path):
    ckpt = tmp_path / "FFPP_synthetic.pth"
    sd = fake_checkpoint.write_sjedd_checkpoint(ckpt)
    # The reader sees the tensors exactly and stubs the other objects.
    obj = checkpoint.load_torch_zip(ckpt)
    assert set(obj) == {"model", "config", "args", "optimizer", "epoch"}
    for k, v in sd.items():
        np.testing.assert_array_equal(obj["model"][k], v)
    assert "stub" in repr(obj["args"]) and obj["epoch"] == 19

    out = tmp_path / "bundle"
    model.main(["import", str(ckpt), "--labels", "ffpp", "--out", str(out)])
    man, arch, visual, text, nodes, edges = model.load_bundle(out)
    assert man["model"]["trained"] is True
    assert man["model"]["source"]["kind"] == "import"
    assert man["model"]["source"]["checkpoint_sha256"] == model.sha256(ckpt)
    assert arch == dict(image_size=224, patch_size=32, width=128, layers=1, heads=2,
                        mlp_width=512, embed_dim=32)
    # Text embeddings are the checkpoint's text tower on the exact prompts.
    tok = checkpoint.ClipTokenizer()
    tokens = np.stack([tok.tokenize(model.prompt(n, l)) for n, l in nodes])
    want = checkpoint.text_forward(sd, tokens)
    np.testing.assert_allclose(text, want, rtol=1e-5, atol=1e-5)
    assert text.shape == (10, 32)
    # The image tower round-trips: numpy on the bundle == numpy on the checkpoint == ONNX.
    x = model.normalise(model.smooth_images(2, 224, 0), 224)
    ref = model.visual_forward(sd, arch, x)
    np.testing.assert_allclose(model.visual_forward(visual, arch, x), ref, atol=1e-6)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out / "image_encoder.onnx"),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"pixels": x})[0], ref, atol=1e-4)


def test_a_checkpoint_that_runs_code_on_unpickling_is_refused(tmp_path):
    ckpt = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    fake_checkpoint.write_malicious_checkpoint(ckpt, marker)
    with pytest.raises(checkpoint.RefusedPickle, match="posix.system|os.system"):
        checkpoint.load_torch_zip(ckpt)
    with pytest.raises(checkpoint.RefusedPickle):
        model.main(["import", str(ckpt), "--labels", "ffpp", "--out", str(tmp_path / "b")])
    assert not marker.exists()


def test_the_committed_fixture_is_what_the_script_makes(tmp_path):
    root = Path(__file__).resolve().parent.parent / "tests/fixtures/tiny"
    model.main(["fixture", "--out", str(tmp_path)])
    want = json.loads((root / "expected.json").read_text())
    got = json.loads((tmp_path / "expected.json").read_text())
    for a, b in zip(want["crops"], got["crops"]):
        assert a["crop"] == b["crop"]
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-9)
        np.testing.assert_allclose(a["marginals"], b["marginals"], atol=1e-12)
    assert ((root / "bundle/manifest.toml").read_text()
            == (tmp_path / "bundle/manifest.toml").read_text())


@pytest.mark.parametrize("offset,size,stride,why", [
    (0, (4, 4), (4, 1), None),  # the honest layout reads back
    (12, (2, 3), (3, 1), "reads element 17 of a storage of 16"),  # past the end: heap memory
    (0, (4, 4), (1_000_000, 1), "reads element"),  # a huge stride
    (0, (4, 4), (-4, 1), "negative"),  # a negative stride walks backwards out of it
    (-8, (4,), (1,), "negative"),
    (0, (1 << 20, 1 << 20), (0, 0), "elements"),  # a broadcast of 2^40 elements
])
def test_crafted_tensor_layouts_are_refused_not_read(tmp_path, offset, size, stride, why):
    ckpt = tmp_path / "crafted.pth"
    fake_checkpoint.write_crafted_tensor_checkpoint(ckpt, offset, size, stride)
    if why is None:
        got = checkpoint.load_torch_zip(ckpt)["model"]["w"]
        np.testing.assert_array_equal(got, np.arange(16, dtype=np.float32).reshape(4, 4))
        return
    with pytest.raises(checkpoint.BadCheckpoint, match=why):
        checkpoint.load_torch_zip(ckpt)


def test_a_zip_bomb_is_refused_by_its_declared_size(tmp_path, monkeypatch):
    ckpt = tmp_path / "bomb.pth"
    fake_checkpoint.write_zip_bomb_checkpoint(ckpt, 8 << 20)
    assert ckpt.stat().st_size < 100_000  # 8 MB of zeros deflate to a few KB
    monkeypatch.setattr(checkpoint, "MAX_STORAGE_BYTES", 4 << 20)
    with pytest.raises(checkpoint.BadCheckpoint, match="expands to 8388608 bytes"):
        checkpoint.load_torch_zip(ckpt)
    monkeypatch.setattr(checkpoint, "MAX_STORAGE_BYTES", 16 << 20)
    monkeypatch.setattr(checkpoint, "MAX_TOTAL_BYTES", 1 << 20)
    with pytest.raises(checkpoint.BadCheckpoint, match="more than 1048576 bytes"):
        checkpoint.load_torch_zip(ckpt)

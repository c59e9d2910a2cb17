"""The GGUF conversion cache's integrity check, and the refusals that come before any conversion or load.

A cache entry is written by the real `gguf_cache.convert` from a tiny random Llama (hidden 32, 2 layers) and a
character-level fast tokenizer, handed over by a stand-in for transformers' GGUF de-quantizer (no download, no real
GGUF needed: the entry is keyed by the file's bytes, whatever they are). Each damage of the table is then applied to
the entry and the load is run through the command line (`dapq generate`), with transformers' loaders and the model's
forward replaced by functions that fail the test: a damaged entry must be refused before transformers reads it, as a
one-line error (exit 2) naming the folder. Every case also hashes every file under the test's folder (a sentinel
folder outside the cache, the GGUF file, the cache root) before and after: nothing outside the named entry changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from dapq import gguf_cache
from dapq.cli import main
from dapq.errors import DapqError

VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:?!'\"-\n"


# ---------------------------------------------------------------------------------------------------- fixtures
def tiny_tokenizer() -> Any:
    """A real fast tokenizer (saved and loaded by transformers): one id per character, no merges."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(special + list(VOCAB_CHARS))}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model() -> Any:
    """A tiny seeded random Llama whose vocabulary covers the tokenizer's."""
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=4 + len(VOCAB_CHARS),
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def fake_dequantize(monkeypatch) -> list[Path]:
    """transformers' GGUF de-quantization replaced by a tiny model and tokenizer; returns the list of files 'read'."""
    calls: list[Path] = []

    def load(path: Path, dtype: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        calls.append(Path(path))
        return tiny_model(), tiny_tokenizer()

    monkeypatch.setattr(gguf_cache, "load_gguf_direct", load)
    return calls


@pytest.fixture
def no_model_load(monkeypatch) -> None:
    """transformers' loaders and the model's forward fail the test if anything calls them."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("transformers read a model or the model ran, before the refusal")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", fail)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", fail)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The test's folder as the working directory, with a sentinel folder of files that must never change, and no
    default cache outside it ($XDG_CACHE_HOME and $DAPQ_CACHE_DIR pointed inside)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DAPQ_CACHE_DIR", raising=False)
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "notes.txt").write_text("keep me\n")
    (sentinel / "model.safetensors").write_bytes(os.urandom(256))
    (sentinel / "dapq-gguf.json").write_text("{}\n")
    return tmp_path


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """{relative path: sha256 (or 'dir' / 'link -> target')} of everything under `folder`, except under `skip`."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def make_entry(work: Path, content: bytes = b"GGUF tiny test model") -> tuple[Path, Path, Path]:
    """(gguf file, cache root, entry): the entry converted by the real `convert` (with `fake_dequantize`)."""
    gguf = work / "tiny.gguf"
    gguf.write_bytes(content)
    root = work / "cache"
    entry = gguf_cache.gguf_folder([gguf], gguf.name, root)
    assert entry == gguf_cache.entry_path(root, hashlib.sha256(content).hexdigest())
    return gguf, root, entry


def generate_args(gguf: Path, root: Path | None) -> list[str]:
    cache = ["--cache-dir", str(root)] if root is not None else []
    return ["generate", "--model", str(gguf), *cache, "--context", "abc def", "--question", "what?"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err!r}"
    return lines[0]


def record(entry: Path) -> dict[str, Any]:
    return json.loads((entry / gguf_cache.ENTRY_RECORD).read_text())


def write_record(entry: Path, data: dict[str, Any]) -> None:
    (entry / gguf_cache.ENTRY_RECORD).write_text(json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- damage
def overwrite_middle(entry: Path) -> None:  # same size, bytes in the middle of the weights replaced
    path = entry / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(64))


def overwrite_keep_mtime(entry: Path) -> None:  # the same, with the modification time set back
    path = entry / "model.safetensors"
    st = path.stat()
    overwrite_middle(entry)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def random_same_size(entry: Path) -> None:  # the whole file replaced by random bytes of the same size (the bug)
    path = entry / "model.safetensors"
    path.write_bytes(os.urandom(path.stat().st_size))


def truncate(entry: Path) -> None:
    path = entry / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def break_header(entry: Path) -> None:  # the safetensors header length (first 8 bytes) made absurd, same size
    with open(entry / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 2**62))


def delete(name: str) -> Callable[[Path], None]:
    def damage(entry: Path) -> None:
        (entry / name).unlink()

    return damage


def record_not_json(entry: Path) -> None:
    (entry / gguf_cache.ENTRY_RECORD).write_text("{ not json")


def record_hash_edited(entry: Path) -> None:
    data = record(entry)
    data["files"]["model.safetensors"]["sha256"] = "0" * 64
    write_record(entry, data)


def record_size_edited(entry: Path) -> None:
    data = record(entry)
    data["files"]["config.json"]["size"] += 1
    write_record(entry, data)


def record_file_dropped(entry: Path) -> None:
    data = record(entry)
    del data["files"]["model.safetensors"]
    write_record(entry, data)


def record_other_file(entry: Path) -> None:
    data = record(entry)
    data["sha256"] = "f" * 64
    write_record(entry, data)


def record_files_malformed(entry: Path) -> None:
    data = record(entry)
    data["files"] = ["model.safetensors"]
    write_record(entry, data)


def planted_file(entry: Path) -> None:  # a file transformers would read (a shard index) that the record does not list
    (entry / "model.safetensors.index.json").write_text('{"weight_map": {}}')


def config_replaced_by_link(entry: Path) -> None:
    target = entry.parent.parent / "elsewhere-config.json"
    target.write_bytes((entry / "config.json").read_bytes())
    (entry / "config.json").unlink()
    (entry / "config.json").symlink_to(target)


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "overwrite_middle": (overwrite_middle, "model.safetensors: sha256 differs"),
    "overwrite_keep_mtime": (overwrite_keep_mtime, "model.safetensors: sha256 differs"),
    "random_same_size": (random_same_size, "model.safetensors: sha256 differs"),
    "truncate": (truncate, "model.safetensors: \\d+ bytes, recorded \\d+"),
    "header_broken": (break_header, "model.safetensors: sha256 differs"),
    "weights_deleted": (delete("model.safetensors"), "model.safetensors: missing"),
    "tokenizer_deleted": (delete("tokenizer.json"), "tokenizer.json: missing"),
    "config_deleted": (delete("config.json"), "config.json: missing"),
    "record_not_json": (record_not_json, "dapq-gguf.json: unreadable \\(JSONDecodeError\\)"),
    "record_hash_edited": (record_hash_edited, "model.safetensors: sha256 differs"),
    "record_size_edited": (record_size_edited, "config.json: \\d+ bytes, recorded \\d+"),
    "record_file_dropped": (record_file_dropped, "model.safetensors: not in the record"),
    "record_other_file": (record_other_file, "dapq-gguf.json: not the record of this GGUF file"),
    "record_files_malformed": (record_files_malformed, "dapq-gguf.json: its file list is malformed"),
    "planted_file": (planted_file, "model.safetensors.index.json: not in the record"),
    "config_link": (config_replaced_by_link, "config.json: not a regular file"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_entry_is_refused_before_any_load(case, work, fake_dequantize, no_model_load, capsys):
    """Each damage: `dapq generate` exits 2 with one line that names the folder and says to delete it, before
    transformers reads anything; the entry is left as it was (the user deletes it) and nothing else changes."""
    import re

    damage, problem = DAMAGES[case]
    gguf, root, entry = make_entry(work)
    damage(entry)
    capsys.readouterr()
    before = snapshot(work)
    assert main(generate_args(gguf, root)) == 2
    line = one_error_line(capsys)
    assert re.search(
        rf"{re.escape(str(entry))} is damaged \({problem}\): delete that folder and rerun; it is rebuilt", line
    ), line
    assert snapshot(work) == before, "a refused load changed files"
    assert len(fake_dequantize) == 1, "a damaged entry was converted again instead of being reported"
    # the Python API says the same (as a DapqError), also before any load
    from dapq import load_model

    with pytest.raises(DapqError, match=re.escape(str(entry)) + " is damaged"):
        load_model(str(gguf), cache_dir=root)


def test_deleting_the_damaged_folder_rebuilds_it(work, fake_dequantize, capsys):
    """What the error says to do works: delete the folder, rerun, it is converted again and loads."""
    import shutil

    from dapq import load_model

    gguf, root, entry = make_entry(work)
    truncate(entry)
    with pytest.raises(DapqError, match="is damaged"):
        load_model(str(gguf), cache_dir=root)
    shutil.rmtree(entry)
    model, tok = load_model(str(gguf), cache_dir=root)
    assert len(fake_dequantize) == 2
    assert gguf_cache.entry_state(root, gguf_cache.file_sha256([gguf]))[0] == gguf_cache.OK
    with torch.inference_mode():
        assert model(torch.tensor([tok.encode("abc")])).logits.shape[-1] == model.config.vocab_size


def test_intact_entry_loads_and_answers_through_the_cli(work, fake_dequantize, capsys):
    """The control for the table: the same entry, undamaged, loads through transformers and generates (exit 0)."""
    gguf, root, entry = make_entry(work)
    capsys.readouterr()
    assert main([*generate_args(gguf, root), "--method", "full", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["text"], str) and len(fake_dequantize) == 1


# ---------------------------------------------------------------------------------------------------- old entries
def old_format(entry: Path) -> None:  # the record an earlier dapq wrote: no per-file hashes
    data = record(entry)
    del data["files"], data["format"]
    write_record(entry, data)


def no_record(entry: Path) -> None:  # a folder without its record (an interrupted conversion of an older version)
    (entry / gguf_cache.ENTRY_RECORD).unlink()


@pytest.mark.parametrize("damage", [old_format, no_record], ids=["old_format", "no_record"])
def test_unverifiable_entry_is_converted_again(damage, work, fake_dequantize, capsys):
    """An entry with no per-file hashes cannot be verified: it is converted again with a one-line notice, and the new
    entry has a full record; nothing outside the entry changes."""
    from dapq import load_model

    gguf, root, entry = make_entry(work)
    damage(entry)
    (entry / "model.safetensors").write_bytes(b"whatever an old entry held")
    outside = snapshot(work, skip=entry)
    capsys.readouterr()
    model, tok = load_model(str(gguf), cache_dir=root)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(entry) in err[0] and "cannot be verified: converting tiny.gguf again" in err[0]
    assert len(fake_dequantize) == 2
    assert set(record(entry)["files"]) == {p.name for p in entry.iterdir()} - {gguf_cache.ENTRY_RECORD}
    assert gguf_cache.entry_state(root, gguf_cache.file_sha256([gguf]))[0] == gguf_cache.OK
    assert snapshot(work, skip=entry) == outside
    assert sorted(p.name for p in (root / "models").iterdir()) == [entry.name], "temporary folders left behind"


# ---------------------------------------------------------------------------------------------------- the memo
def test_first_use_hashes_later_loads_check_sizes(work, fake_dequantize, monkeypatch):
    """An entry's files are hashed on its first use in a process; later loads stat them only, and any write (even
    one that keeps size and modification time) brings a new hash check. A conversion's own hashes count as the
    first use."""
    import shutil

    gguf, root, entry = make_entry(work)
    root2 = work / "cache2"
    entry2 = gguf_cache.entry_path(root2, gguf_cache.file_sha256([gguf]))
    hashed: list[Path] = []
    real = gguf_cache.sha256_files

    def counting(paths):
        hashed.extend(Path(p) for p in paths if Path(p).parent in (entry, entry2))
        return real(paths)

    monkeypatch.setattr(gguf_cache, "sha256_files", counting)
    n_files = len(record(entry)["files"])
    gguf_cache.gguf_folder([gguf], gguf.name, root)
    assert hashed == [], "the entry just converted (and hashed) in this process was hashed again"

    # the same entry seen for the first time in this process: a copy under another cache root
    shutil.copytree(root / "models", root2 / "models")
    assert gguf_cache.gguf_folder([gguf], gguf.name, root2) == entry2
    assert sorted(p.name for p in hashed) == sorted(record(entry2)["files"]) and len(hashed) == n_files
    hashed.clear()
    for _ in range(3):
        gguf_cache.gguf_folder([gguf], gguf.name, root2)
    assert hashed == [], "a later load hashed the entry again"

    overwrite_keep_mtime(entry2)  # a write: the change time moves, so the memo no longer vouches for it
    with pytest.raises(DapqError, match="model.safetensors: sha256 differs"):
        gguf_cache.gguf_folder([gguf], gguf.name, root2)
    assert len(hashed) >= 1
    hashed.clear()
    truncate(entry)  # a size change is found by the stat alone, memo or not
    with pytest.raises(DapqError, match=r"model.safetensors: \d+ bytes, recorded"):
        gguf_cache.gguf_folder([gguf], gguf.name, root)
    assert hashed == []


# ---------------------------------------------------------------------------------------------------- bad GGUF files
def header_only(path: Path) -> None:  # a GGUF header that announces 5 tensors and 10 keys, and nothing after it
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 10))


def magic_only(path: Path) -> None:
    path.write_bytes(b"GGUF")


def no_tensors(path: Path) -> None:  # a well-formed GGUF file with no metadata and no tensors
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def text_file(path: Path) -> None:
    path.write_text("this is not a model\n" * 20)


def folder(path: Path) -> None:
    path.mkdir()
    (path / "config.json").write_text("{}")


BAD_GGUF: dict[str, tuple[Callable[[Path], None], str]] = {
    "header_only": (header_only, "is not a readable GGUF file .*truncated or damaged"),
    "magic_only": (magic_only, "is not a readable GGUF file"),
    "no_tensors": (no_tensors, "is a GGUF file without a model"),
    "empty": (empty, "is empty, not a GGUF file"),
    "text_file": (text_file, "is not a GGUF file \\(it does not start with the bytes GGUF\\)"),
    "folder": (folder, "is a folder, not a GGUF file"),
}


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("case", list(BAD_GGUF))
def test_bad_gguf_is_one_line_before_converting(case, cached, work, no_model_load, capsys, monkeypatch):
    """A file that is not a readable GGUF model: one line, exit 2, no 'Converting ...', no cache entry (and nothing
    written at all with the cache off), transformers never called."""
    import re

    make, message = BAD_GGUF[case]
    gguf = work / "x.gguf"
    make(gguf)
    root = work / "cache"
    if not cached:
        monkeypatch.setenv("DAPQ_CACHE_DIR", "off")
    before = snapshot(work)
    assert main(generate_args(gguf, root if cached else None)) == 2
    err = capsys.readouterr().err
    assert "Converting" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert str(gguf) in lines[0]
    after = snapshot(work)
    new = {k: v for k, v in after.items() if k not in before}
    # the CLI makes --cache-dir (and the conversion its models/ folder) before it looks at the file; no entry
    assert set(new) <= ({"cache", "cache/models"} if cached else set()), new
    assert {k: v for k, v in after.items() if k in before} == before


# ---------------------------------------------------------------------------------------------------- --cache-dir
def under_file(work: Path) -> str:
    (work / "plain-file").write_text("x")
    return str(work / "plain-file" / "cache")


def is_file(work: Path) -> str:
    (work / "plain-file").write_text("x")
    return str(work / "plain-file")


def under_proc(work: Path) -> str:
    return "/proc/dapq-test-cache"


@pytest.mark.parametrize("where", [under_file, is_file, under_proc], ids=["under_file", "is_file", "under_proc"])
def test_bad_cache_dir_is_one_line_before_any_load(where, work, no_model_load, capsys, monkeypatch):
    """--cache-dir that cannot be a writable folder: one line naming --cache-dir, exit 2, before the GGUF file is
    even hashed."""
    gguf = work / "x.gguf"
    gguf.write_bytes(b"GGUF whatever")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the GGUF file was hashed or the cache consulted before --cache-dir was checked")

    monkeypatch.setattr(gguf_cache, "file_sha256", fail)
    monkeypatch.setattr(gguf_cache, "gguf_folder", fail)
    cache_dir = where(work)
    before = snapshot(work)
    assert main(generate_args(gguf, Path(cache_dir))) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --cache-dir {cache_dir}") and ("pass a" in line), line
    assert snapshot(work) == before
    assert not Path("/proc/dapq-test-cache").exists()


def test_bad_cache_dir_through_the_api_is_one_line(work, fake_dequantize):
    """load_model(cache_dir=<under a file>): a one-line DapqError before anything is converted."""
    from dapq import load_model

    gguf = work / "x.gguf"
    gguf.write_bytes(b"GGUF whatever")
    (work / "plain-file").write_text("x")
    with pytest.raises(DapqError, match="a part of the path is a file") as info:
        load_model(str(gguf), cache_dir=work / "plain-file" / "cache")
    assert "\n" not in str(info.value) and fake_dequantize == []


@pytest.mark.parametrize("how", ["env_off", "cache_dir_false"])
def test_cache_off_still_loads_and_writes_nothing(how, work, fake_dequantize, monkeypatch, capsys):
    """DAPQ_CACHE_DIR=off (CLI and API) and cache_dir=False load the GGUF directly and write no cache."""
    from dapq import load_model

    gguf = work / "x.gguf"
    gguf.write_bytes(b"GGUF whatever")
    before = snapshot(work)
    if how == "env_off":
        monkeypatch.setenv("DAPQ_CACHE_DIR", "off")
        assert main([*generate_args(gguf, None), "--method", "full", "--max-new-tokens", "2", "--json"]) == 0
        capsys.readouterr()
    else:
        load_model(str(gguf), cache_dir=False)
    assert fake_dequantize and snapshot(work) == before


# ---------------------------------------------------------------------------------------------------- dapq models
@pytest.mark.parametrize(
    "case, state",
    [("intact", "converted"), ("truncate", "damaged"), ("weights_deleted", "damaged"), ("old_format", "old")],
)
def test_dapq_models_shows_damaged_entries(case, state, work, fake_dequantize, capsys, monkeypatch):
    """`dapq models` calls an entry converted only when it passes the size check (no hashing: it stays instant)."""
    import dapq.catalog
    from dapq.catalog import KnownModel, Part

    fake = KnownModel("fake-tiny", "Fake-Tiny", "Llama", (Part("rich", None, "rich/__init__.py"),))
    monkeypatch.setattr(dapq.catalog, "KNOWN_MODELS", {fake.name: fake})
    root = work / "cache"
    (source,) = fake.sources()
    entry = gguf_cache.gguf_folder([source], fake.name, root)
    damage = {"truncate": truncate, "weights_deleted": delete("model.safetensors"), "old_format": old_format}
    if case in damage:
        damage[case](entry)
    hashed: list[Any] = []
    monkeypatch.setattr(gguf_cache, "sha256_files", lambda paths: hashed.append(paths) or "0" * 64)
    capsys.readouterr()
    assert main(["models", "--json", "--cache-dir", str(root)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["cache_state"] == state and row["cached"] == (str(entry) if state == "converted" else None)
    assert row["entry"] == str(entry)
    assert main(["models", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    if state == "damaged":
        assert "model.safetensors" in row["cache_problem"]
        assert f"the cache entry {entry} is damaged" in out and "delete that folder" in out
    else:
        assert "DAMAGED" not in out
    assert not [p for p in hashed if any(Path(x).parent == entry for x in p)], "dapq models hashed the entry"


# ---------------------------------------------------------------------------------------------------- bundled
@pytest.mark.bundled
def test_bundled_entry_records_and_verifies_its_files(bundled):
    """The bundled model's entry (converted by the `bundled` fixture) lists every file with its size and hash."""
    from dapq.catalog import bundled_model_path

    root = gguf_cache.cache_root()
    if root is None:
        pytest.skip("DAPQ_CACHE_DIR=off: no cache entry")
    sha = gguf_cache.file_sha256([bundled_model_path()])
    entry = gguf_cache.entry_path(root, sha)
    files = record(entry)["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert set(files) == {p.name for p in entry.iterdir()} - {gguf_cache.ENTRY_RECORD}
    assert gguf_cache.entry_state(root, sha, deep=True) == ("ok", "")


# ---------------------------------------------------------------------------------------------------- dapq eval
def eval_args(gguf: Path, root: Path, out: Path) -> list[str]:
    return ["eval", "niah", "--model", str(gguf), "--cache-dir", str(root), "--methods", "full", "--budgets", "64"] + [
        "--lengths",
        "1000",
        "--depths",
        "50",
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("case", ["random_same_size", "truncate", "header_broken", "record_not_json"])
def test_eval_refuses_a_damaged_entry_before_any_load(
    case, work, fake_dequantize, no_model_load, capsys, tmp_path_factory
):
    """The same refusal through `dapq eval --model ... --cache-dir ...` (its run folder lies outside `work`)."""
    damage, _ = DAMAGES[case]
    gguf, root, entry = make_entry(work)
    damage(entry)
    capsys.readouterr()
    before = snapshot(work)
    assert main(eval_args(gguf, root, tmp_path_factory.mktemp("runs") / "run")) == 2
    assert f"{entry} is damaged" in one_error_line(capsys)
    assert snapshot(work) == before


@pytest.mark.parametrize("where", [under_file, is_file, under_proc], ids=["under_file", "is_file", "under_proc"])
def test_eval_bad_cache_dir_is_one_line_before_any_load(where, work, no_model_load, capsys, tmp_path_factory):
    gguf = work / "x.gguf"
    gguf.write_bytes(b"GGUF whatever")
    cache_dir = where(work)
    before = snapshot(work)
    assert main(eval_args(gguf, Path(cache_dir), tmp_path_factory.mktemp("runs") / "run")) == 2
    assert one_error_line(capsys).startswith(f"error: --cache-dir {cache_dir}")
    assert snapshot(work) == before

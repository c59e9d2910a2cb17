"""Training learned queries (`dapq.train`): the split is disjoint from the evaluations, the loop lowers its loss,
checkpoints resume to the same result, and the written file serves the `learned` method."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dapq import get_method
from dapq.data import haystack_text, needle_sample
from dapq.engine import compress
from dapq.errors import DapqError
from dapq.hf.capture import prefill_prompt, suffix_attention, trainable
from dapq.train.corpus import evaluation_files, training_files, training_prompts
from dapq.train.fit import learned_distribution, same_but_epochs, train_queries
from dapq.train.settings import TrainSettings
from dapq.train.targets import target_of
from helpers import TinyTokenizer, build_tiny, random_prompt

TOK = TinyTokenizer()
SMALL = dict(
    n_queries=4, n_train=4, n_val=2, lengths=(300, 450), answer_tokens=4, epochs=2, batch=2, budget=16, recipe="needles"
)


def count_builds(monkeypatch) -> list[str]:
    """The ids of the prompts whose targets are built from now on (dapq.train.targets.build_example wrapped)."""
    import dapq.train.targets as targets

    built: list[str] = []
    real = targets.build_example
    monkeypatch.setattr(targets, "build_example", lambda *a, **k: built.append(a[2].id) or real(*a, **k))
    return built


def shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.sub(r"\s+", " ", text).split(" ")
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_training_text_is_disjoint_from_the_evaluations():
    train, evaluation = set(training_files()), set(evaluation_files())
    assert train and evaluation and not train & evaluation

    def text_of(files) -> set[tuple[str, ...]]:  # joined as haystack_text joins, through the test tokenizer's codec
        return shingles(TOK.decode(TOK.encode("\n\n".join(p.read_text(encoding="utf-8") for p in sorted(files)))))

    train_text = text_of(train)
    # the longest NIAH haystack any bundled-model evaluation builds (8k positions), with a character tokenizer (many
    # more words per token than a real one): every 8-word run comes from the evaluation files, none from training
    context = needle_sample(TOK, 60_000, 50, seed=0).context
    ctx = shingles(context)
    eval_text = text_of(evaluation)
    outside = ctx - eval_text  # only the runs across the needle and the cut at the end
    assert len(outside) < 20, sorted(outside)[:5]
    # runs shared with the training files are the essays' own repeats ("Want to start a startup? ...")
    assert ctx & train_text <= eval_text
    assert haystack_text().startswith(sorted(evaluation)[0].read_text(encoding="utf-8")[:200])


def test_training_prompts_are_deterministic_and_fit_their_lengths():
    a = training_prompts(TOK, 6, (500, 900), seed=3)
    b = training_prompts(TOK, 6, (500, 900), seed=3)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert all(len(p.ids) <= 900 for p in a)
    assert {p.kind for p in a} == {"single", "multikey", "multivalue", "alias", "summary"}
    assert [p.ids for p in training_prompts(TOK, 6, (500, 900), seed=4)] != [p.ids for p in a]
    with pytest.raises(DapqError, match="Unknown training kind"):
        training_prompts(TOK, 1, (500, 900), seed=0, kinds=("nope",))


def test_suffix_attention_is_the_forward_attention_and_differentiable():
    model = build_tiny("llama_eager")
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = random_prompt(30, 2)
    state = trainable(prefill_prompt(model, prompt, keep_last=1))
    ids = random_prompt(5, 9)
    emb = model.get_input_embeddings().weight[torch.tensor(ids)].clone().requires_grad_(True)
    probs = suffix_attention(model, state, emb, range(30, 35))
    with torch.inference_mode():  # the same tokens as ids through a plain eager forward with attentions
        out = model(torch.tensor([prompt + ids]), output_attentions=True)
    for i, p in enumerate(probs):
        ref = out.attentions[i][0, :, 30:]  # [H_q, 5, 35]
        assert torch.allclose(p, ref, atol=1e-5), f"layer {i}"
    target = target_of(torch.randn(4, 3, 16), state.keys(0), state.scaling[0])
    dist = learned_distribution(probs[0], 2, 30)
    (target * -torch.log(dist)).sum().backward()
    assert emb.grad is not None and float(emb.grad.abs().sum()) > 0
    assert state.cache.layers[0].keys.shape[2] == 30  # the prompt cache is left as it was


def test_training_lowers_the_loss_and_resumes_to_the_same_result(tmp_path):
    model = build_tiny("llama")
    settings = TrainSettings(**SMALL, lr=0.05)
    train_queries(model, TOK, settings, tmp_path / "a.pt", log=lambda s: None)
    data = torch.load(tmp_path / "a.pt", weights_only=True)
    hist = data["training"]["history"]
    assert hist[-1]["val_loss"] < data["training"]["baselines"]["init"]["loss"]
    assert (tmp_path / "a.png").exists() and (tmp_path / "a.pt.json").exists()

    def stop_after_first(line: str) -> None:
        if line.startswith("epoch 1:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_queries(model, TOK, settings, tmp_path / "b.pt", log=stop_after_first)
    assert not (tmp_path / "b.pt").exists() and (tmp_path / "b.pt.ckpt").exists()
    resumed = train_queries(model, TOK, settings, tmp_path / "b.pt", log=lambda s: None)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    again = torch.load(tmp_path / "b.pt", weights_only=True)
    assert torch.equal(again["embeddings"], data["embeddings"])
    with pytest.raises(DapqError, match="other settings"):
        train_queries(model, TOK, TrainSettings(**{**SMALL, "lr": 0.02}), tmp_path / "b.pt", log=lambda s: None)
    # other --epochs resume: more goes on as an uninterrupted run would, fewer writes the best of the first ones
    longer = TrainSettings(**{**SMALL, "lr": 0.05, "epochs": 3})
    extended = train_queries(model, TOK, longer, tmp_path / "b.pt", log=lambda s: None)
    assert [r["epoch"] for r in extended.history] == [1, 2, 3]
    train_queries(model, TOK, longer, tmp_path / "c.pt", log=lambda s: None)
    ext, whole = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "bc")
    assert torch.equal(ext["embeddings"], whole["embeddings"])
    shorter = train_queries(model, TOK, TrainSettings(**{**SMALL, "lr": 0.05, "epochs": 1}), tmp_path / "b.pt",
                            log=lambda s: None)  # fmt: skip
    first = torch.load(tmp_path / "b.pt.ckpt", weights_only=True)["history"][0]["embeddings"]
    assert [r["epoch"] for r in shorter.history] == [1]
    assert torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["embeddings"], first)

    method = get_method("learned", budget=16, queries=str(tmp_path / "a.pt"))
    cc = compress(model, TOK, [random_prompt(60, 1)], method)
    assert method.n_pseudo == 4 and cc.cache.layers[0].keys.shape[2] == 16


def test_settings_errors():
    with pytest.raises(DapqError, match="--loss"):
        TrainSettings(loss="mse")
    with pytest.raises(DapqError, match="--epochs"):
        TrainSettings(epochs=0)


def test_text_option_adds_the_list_sources_and_keeps_the_default_drafts(tmp_path):
    """--text lists: Pygments' lexer registry and matplotlib's rc file as sources, records one per line with the
    rc file's defaults uncommented; every kind meets every source; the default text keeps its old rule (essays two
    prompts of three); the store key names the texts and the packages' versions; bad values are one-line errors."""
    from dapq.train.generic import GENERIC_KINDS, LIST_FILES, TEXTS, drafts, list_text, sources
    from dapq.train.targets import TargetStore

    srcs = sources(TEXTS)
    names = [src.name for src in srcs]
    assert names[0] == "essays" and names[-2:] == [name for name, _, _ in LIST_FILES]
    rc = list_text("matplotlib", "mpl-data/matplotlibrc")
    assert "\nlines.linewidth: 1.5" in rc and "#lines." not in rc and "***" not in rc
    assert "'PythonLexer': ('pygments.lexers.python'" in list_text("pygments", "lexers/_mapping.py")
    texts = ("essays", "docs", "lists")
    plan = drafts(48, (300, 450), seed=0, texts=texts)
    assert {(d.kind, d.source) for d in plan} == {(k, n) for k in GENERIC_KINDS for n in names}
    assert sum(d.source == "essays" for d in plan) == 24
    lists = {src.name: src for src in srcs if src.records}
    quotes = [d for d in plan if d.kind == "quote" and d.source in lists]
    assert quotes and all(d.passage and d.passage in d.context for d in quotes)
    lines = {name: {" ".join(x.split()) for x in list_text(p, rel).splitlines()} for name, p, rel in LIST_FILES}
    asks = [d for d in plan if d.kind == "selfqa" and d.source in lists]
    assert asks and all(d.passage in d.context and d.passage in lines[d.source] for d in asks)  # one whole record
    default = drafts(6, (300, 450), seed=0)
    assert [d.source == "essays" for d in default] == [False, True, True, False, True, True]
    assert [d.context for d in default] == [d.context for d in drafts(6, (300, 450), seed=0, texts=("essays", "docs"))]
    key = TargetStore(tmp_path, TrainSettings(texts=texts), "m", "f").key
    assert key["texts"] == list(texts) and set(key["list_versions"]) == {"pygments", "matplotlib"}
    assert "texts" not in TargetStore(tmp_path, TrainSettings(), "m", "f").key  # old stores keep their key
    for bad in (("docs",), ("essays", "wiki"), ("essays", "docs", "docs"), ()):
        with pytest.raises(DapqError, match="--text must be essays followed by"):
            TrainSettings(texts=bad)
    with pytest.raises(DapqError, match="drop --text"):
        TrainSettings(recipe="needles", texts=texts)
    old = {k: v for k, v in TrainSettings().as_dict().items() if k != "texts"}  # a checkpoint from before --text
    assert same_but_epochs(old, TrainSettings().as_dict())
    assert not same_but_epochs(old, TrainSettings(texts=texts).as_dict())


def test_generic_recipe_builds_its_targets_once_and_resumes(tmp_path, monkeypatch):
    """The generic recipe: prompts of every kind from the training text only, the selfqa question written by the
    model, targets stored per prompt (gzipped, read back equal), reused by a rerun (nothing rebuilt), extended by a
    larger --train, a torn file and a store of other settings refused."""
    import dapq.train.targets as targets
    from dapq.train.generic import GENERIC_KINDS, drafts

    plan = drafts(8, (300, 450), seed=0)
    assert [d.kind for d in plan[:4]] == list(GENERIC_KINDS)
    assert [d.context for d in drafts(4, (300, 450), seed=0)] == [d.context for d in plan[:4]]  # a prefix
    evaluation = " ".join(p.read_text(encoding="utf-8") for p in evaluation_files())
    assert all(d.context[:200] not in evaluation for d in plan)
    model = build_tiny("llama")
    settings = TrainSettings(**{**SMALL, "recipe": "generic", "n_train": 4, "n_val": 2, "epochs": 1})
    built = count_builds(monkeypatch)
    out = tmp_path / "g.pt"
    result = train_queries(model, TOK, settings, out, log=lambda s: None)
    store = tmp_path / "g.pt.targets"
    assert len(built) == 6 and sorted(p.name for p in store.glob("*.pt.gz")) == [f"{i:05d}.pt.gz" for i in range(6)]
    assert result.history and all(torch.isfinite(torch.tensor(r["val_loss"])) for r in result.history)
    first = targets.TargetStore(store, settings, "", "").load(0)
    assert first.state is None and all(torch.allclose(t.sum(-1), torch.ones(())) for t in first.target)
    built.clear()
    train_queries(model, TOK, settings, out, log=lambda s: None, restart=True)
    assert built == [], "a rerun must read its targets, not build them again"
    bigger = TrainSettings(**{**SMALL, "recipe": "generic", "n_train": 5, "n_val": 2, "epochs": 1})
    bars: dict[str, tuple[int, int]] = {}
    train_queries(
        model,
        TOK,
        bigger,
        tmp_path / "g.pt",
        log=lambda s: None,
        restart=True,
        progress=lambda label, done, total: bars.__setitem__(label, (done, total)),
    )
    assert len(built) == 1  # only the new prompt
    # the bar of building counts the one prompt built, the stored six apart: a resumed build's time left is real
    assert bars["targets"] == (1, 1) and bars["targets read"] == (6, 6), bars
    (store / "00001.pt.gz").write_bytes((store / "00001.pt.gz").read_bytes()[:50])
    with pytest.raises(DapqError, match="00001.pt.gz is not a complete target file"):
        train_queries(model, TOK, settings, out, log=lambda s: None, restart=True)
    other = TrainSettings(**{**SMALL, "recipe": "generic", "n_train": 4, "n_val": 2, "epochs": 1, "seed": 5})
    with pytest.raises(DapqError, match="holds targets of other settings"):
        train_queries(model, TOK, other, out, log=lambda s: None, restart=True)


def test_build_only_fills_one_store_that_training_then_reads(tmp_path, monkeypatch):
    """`--build-only` processes build the missing prompts of one store, skipping a prompt whose claim another
    process holds, and train nothing; the training run afterwards builds no target again and trains on the same
    examples as an unshared store."""
    from dapq.safefile import FileLock
    from dapq.train.fit import build_targets

    model = build_tiny("llama")
    settings = TrainSettings(**{**SMALL, "recipe": "generic", "n_train": 3, "n_val": 2, "epochs": 1})
    built = count_builds(monkeypatch)
    out = tmp_path / "s.pt"
    store = tmp_path / "s.pt.targets"
    store.mkdir()
    held = FileLock(store / "00001.claim")  # another process at work on prompt 1 (a separate open file: flock)
    assert held.acquire()
    build_targets(model, TOK, settings, out, log=lambda s: None)
    assert sorted(p.name for p in store.glob("*.pt.gz")) == [f"{i:05d}.pt.gz" for i in (0, 2, 3, 4)]
    assert [p.name for p in store.glob("*.claim")] == ["00001.claim"]  # the builder's own claims are gone
    assert not out.exists() and not (tmp_path / "s.pt.ckpt").exists()
    held.release()
    build_targets(model, TOK, settings, out, log=lambda s: None)  # the claim is free: prompt 1 now
    build_targets(model, TOK, settings, out, log=lambda s: None)  # a full store builds nothing more
    assert len(built) == 5 and len(list(store.glob("*.pt.gz"))) == 5
    built.clear()
    shared = train_queries(model, TOK, settings, out, log=lambda s: None)
    assert built == [] and shared.history
    whole = train_queries(model, TOK, settings, tmp_path / "w.pt", log=lambda s: None)
    # the same examples (a fresh build keeps float32 targets in memory, the store float16: hence rel=1e-4)
    assert [r["val_loss"] for r in whole.history] == pytest.approx([r["val_loss"] for r in shared.history], rel=1e-4)
    with pytest.raises(DapqError, match="needle recipe keeps no store"):
        build_targets(model, TOK, TrainSettings(**SMALL), out, log=lambda s: None)


def test_builders_side_by_side_build_each_prompt_once(tmp_path, monkeypatch):
    """Three builders at once build every prompt exactly once. Threads stand in for processes (each claim is a
    separate open file, so flock excludes them as it would two processes); the model's work is replaced by a slow
    stand-in, since one model is not shared by processes. A claim that is a symbolic link is refused, not
    followed."""
    import threading
    import time

    import dapq.train.targets as targets
    from dapq.train.fit import build_targets

    built: list[str] = []

    def slow_example(model, tokenizer, prompt, *rest, **kw):
        built.append(prompt.id)
        time.sleep(0.02)
        return targets.Example(prompt.id, [1, 2, 3], None, [torch.full((1, 3), 1 / 3)], [torch.zeros(1, 2)], "a")

    monkeypatch.setattr(targets, "finish", lambda model, tok, draft, *a: draft)
    monkeypatch.setattr(targets, "build_example", slow_example)
    model = build_tiny("llama")
    settings = TrainSettings(**{**SMALL, "recipe": "generic", "n_train": 20, "n_val": 4, "epochs": 1})
    out = tmp_path / "s.pt"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            build_targets(model, TOK, settings, out, log=lambda s: None)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = tmp_path / "s.pt.targets"
    assert len(list(store.glob("*.pt.gz"))) == 24 and not list(store.glob("*.claim"))
    assert len(built) == 24 and len(set(built)) == 24  # no prompt built twice
    bigger = TrainSettings(**{**SMALL, "recipe": "generic", "n_train": 21, "n_val": 4, "epochs": 1})
    (store / "00024.claim").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DapqError, match="cannot be opened"):
        build_targets(model, TOK, bigger, out, log=lambda s: None)
    assert not (tmp_path / "elsewhere").exists()


def test_copy_target_weights_the_steps_that_continue_the_prompt():
    from dapq.train.targets import copy_weights

    # query j is fed a_j and writes a_{j+1}: only (2, 3) is a pair of the prompt, so only query 1 counts
    assert copy_weights([1, 2, 3, 4, 5], [9, 2, 3, 7]).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert copy_weights([1, 2, 3], [3, 2, 1]) is None  # nothing copied: the plain mean is used
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 3, 16, generator=g), torch.randn(2, 30, 16, generator=g)
    one = target_of(q, k, 0.25, torch.tensor([0.0, 1.0, 0.0]))
    ref = torch.stack([torch.softmax(q[h, 1] @ k[h // 2].T * 0.25, -1) for h in range(4)]).view(2, 2, 30).mean(1)
    assert torch.allclose(one, ref, atol=1e-6)
    assert torch.allclose(target_of(q, k, 0.25, torch.ones(3)), target_of(q, k, 0.25), atol=1e-6)
    settings = TrainSettings(**{**SMALL, "recipe": "generic", "target": "copy"})
    from dapq.train.targets import TargetStore

    assert TargetStore(Path("x"), settings, "", "").key["target"] == "copy"
    assert "target" not in TargetStore(Path("x"), TrainSettings(**{**SMALL, "recipe": "generic"}), "", "").key
    with pytest.raises(DapqError, match="--target must be one of"):
        TrainSettings(target="max")


def test_recon_target_is_kvzips_reconstruction_attention(monkeypatch):
    """`--target recon`: each layer's target is, per KV head, the largest attention a prompt key gets from any token
    of KVzip's reconstruction request and repeat (softmax over the prompt keys, max over the query group), divided
    by its sum; checked against the eager model's own attention weights over prompt + request as one sequence."""
    import dapq.train.targets as targets
    from dapq import get_method

    monkeypatch.setattr(targets, "RECON_BLOCK", 7)  # several blocks of reconstruction queries
    model = build_tiny("llama_eager")
    ids = random_prompt(60, seed=3)
    settings = TrainSettings(**{**SMALL, "target": "recon", "budget": 3})  # below KVzip's sinks: the chunks need none
    prompt = type("P", (), {"id": "p", "ids": ids})()
    ex = targets.build_example(model, TOK, prompt, settings, set(), keep_state=False)
    (chunk,) = get_method("kvzip", budget=16).pass_chunks(ids, TOK)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids + chunk.ids]), output_attentions=True)
    h_kv = model.config.num_key_value_heads
    for layer, att in enumerate(out.attentions):  # [1, H_q, S, S]
        rows = att[0, :, len(ids) :, : len(ids)].float()  # the request's queries over the prompt keys
        rows = rows / rows.sum(-1, keepdim=True)  # softmax over the prompt keys alone
        best = rows.amax(dim=1).view(h_kv, -1, len(ids)).amax(dim=1)  # [H_kv, L]
        assert torch.allclose(ex.target[layer], best / best.sum(-1, keepdim=True), atol=1e-5)
        top = torch.sort(ex.target[layer], dim=-1, descending=True, stable=True).indices[:, :3]
        assert torch.equal(ex.gold[layer], top)
    assert ex.answer == "" and ex.state is None
    assert targets.TargetStore(Path("x"), settings, "", "").key["target"] == "recon"

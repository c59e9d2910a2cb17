"""Learned pseudo queries: the defining property against a plain transformers forward, the equivalence with DapQ
when the learned vectors are token embeddings, the file format's errors, and the training loop on a tiny model."""

from __future__ import annotations

import pytest
import torch

from dapq import get_method
from dapq.engine import compress, derive, record
from dapq.engine.replay import suffix_key
from dapq.errors import DapqError
from dapq.methods.learned import load_queries, save_queries
from dapq.methods.scoring import pool_scores
from helpers import TINY_QUERIES, TinyTokenizer, build_tiny, capture_qk, random_prompt
from helpers import kept_sets as kept

TOK = TinyTokenizer()
L = 40


def reference_sets(model, prompt: list[int], emb: torch.Tensor, budget: int, kernel: int = 7) -> dict[int, list]:
    """Per layer and KV head the top-`budget` prompt keys by the learned queries' attention, from a plain forward of
    [embed(prompt), emb] (sdpa, no dapq hook): softmax over prompt + learned keys, summed over the learned queries,
    max-pooled along the keys, averaged over the GQA group."""
    table = model.get_input_embeddings().weight
    embeds = torch.cat([table[torch.tensor(prompt)], emb.to(table.dtype)])[None]
    with capture_qk(model) as cap, torch.inference_mode():
        model(inputs_embeds=embeds)
    out = {}
    n = emb.shape[0]
    for i, (q, k, scaling) in cap.items():
        q, k = q[0].float(), k[0].float()  # [H_q, L + n, D], [H_kv, L + n, D]
        groups = q.shape[0] // k.shape[0]
        kk = k.repeat_interleave(groups, dim=0)
        logits = q[:, L:] @ kk.transpose(-1, -2) * scaling  # [H_q, n, L + n]
        causal = torch.cat([torch.ones(n, L, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], dim=1)
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[..., :L].sum(1)  # [H_q, L]
        s = pool_scores(probs[None], "max", kernel)[0].view(k.shape[0], groups, L).mean(1)
        out[i] = [set(torch.sort(s[h], descending=True, stable=True).indices[:budget].tolist()) for h in range(len(s))]
    return out


def test_learned_keeps_the_top_attention_of_its_embeddings():
    model = build_tiny("llama")
    prompt = random_prompt(L, 5)
    method = get_method("learned", budget=10, queries=TINY_QUERIES)
    emb = load_queries(TINY_QUERIES)["embeddings"]
    cc = compress(model, TOK, [prompt], method)
    want = reference_sets(model, prompt, emb, 10)
    for i, sets in want.items():
        assert kept(cc, i) == sets, f"layer {i}"
    assert cc.cache.layers[0].keys.shape[2] == 10  # the learned entries are dropped, the budget holds


@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
def test_token_embeddings_as_learned_queries_equal_dapq(tmp_path, layout):
    """DapQ with a prompt-independent content (Fix_C) is the learned method whose vectors are those tokens'
    embeddings: same kept sets, same first logits."""
    model = build_tiny("llama")
    prompt = random_prompt(L, 6)
    dapq = get_method("dapq", budget=12, n_pseudo_tokens=8, content="Fix_C", fixed_text="abcdefgh", layout=layout)
    ids = dapq.pseudo_ids(prompt, 128, TOK)
    path = save_queries(tmp_path / "q.pt", model.get_input_embeddings().weight[torch.tensor(ids)], model="tiny")
    learned = get_method("learned", budget=12, queries=str(path), layout=layout)
    a, b = compress(model, TOK, [prompt], dapq), compress(model, TOK, [prompt], learned)
    for i in range(len(a.cache.layers)):
        assert kept(a, i) == kept(b, i), f"layer {i}"
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5)


def test_serving_equals_the_harness_and_recordings_do_not_mix(tmp_path):
    model = build_tiny("llama")
    prompts = [random_prompt(L, 7), random_prompt(31, 8)]  # a batch with left padding
    method = get_method("learned", budget=9, queries=TINY_QUERIES)
    served = compress(model, TOK, prompts, method)
    derived = derive(record(model, TOK, prompts, suffix=method), method)
    for i in range(len(served.cache.layers)):
        assert torch.equal(served.state.tracks[i].pos, derived.state.tracks[i].pos)
        assert torch.allclose(served.cache.layers[i].keys, derived.cache.layers[i].keys)
    other = save_queries(tmp_path / "other.pt", torch.zeros(6, 64), model="tiny")
    second = get_method("learned", budget=9, queries=str(other))
    assert suffix_key(method, prompts, model, TOK) != suffix_key(second, prompts, model, TOK)
    with pytest.raises(ValueError, match="its own pseudo suffix"):
        derive(record(model, TOK, prompts, suffix=method), second)


def test_learned_file_errors(tmp_path):
    with pytest.raises(DapqError, match="train one with"):
        get_method("learned", budget=8, queries=str(tmp_path / "missing.pt"))
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(DapqError, match="not a learned-queries file"):
        load_queries(tmp_path / "foreign.pt")
    (tmp_path / "torn.pt").write_bytes(b"\x00garbage")
    with pytest.raises(DapqError, match="not a learned-queries file"):
        load_queries(tmp_path / "torn.pt")
    wide = save_queries(tmp_path / "wide.pt", torch.zeros(4, 32), model="other")
    with pytest.raises(DapqError, match="trained for hidden size 32"):
        compress(build_tiny("llama"), TOK, [random_prompt(L, 1)], get_method("learned", budget=8, queries=str(wide)))


def test_a_queries_file_of_another_model_is_refused(tmp_path):
    """A file records the model it was trained for (config fingerprint): another model of the same hidden size is a
    one-line error, `allow_other_model=True` uses it with one warning, the trained-for model uses it silently, and
    files from before the fingerprint are checked by hidden size only."""
    import warnings

    from dapq.methods.learned import config_fingerprint, describe_config

    llama, qwen = build_tiny("llama"), build_tiny("qwen2")
    assert llama.config.hidden_size == qwen.config.hidden_size
    assert config_fingerprint(llama.config) != config_fingerprint(qwen.config)
    emb = torch.randn(4, llama.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.2
    path = save_queries(
        tmp_path / "q.pt",
        emb,
        model="tiny-llama",
        model_fingerprint=config_fingerprint(llama.config),
        model_config=describe_config(llama.config),
    )
    prompt = [random_prompt(L, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model it was trained for: no warning
        compress(llama, TOK, prompt, get_method("learned", budget=16, queries=path))
    with pytest.raises(DapqError) as info:
        compress(qwen, TOK, prompt, get_method("learned", budget=16, queries=path))
    msg = str(info.value)
    assert "trained for tiny-llama (llama, hidden 64" in msg and "this model is qwen2" in msg and "\n" not in msg
    assert "allow_other_model=True" in msg
    method = get_method("learned", budget=16, queries=path, allow_other_model=True)
    with pytest.warns(UserWarning, match="used anyway") as caught:
        compress(qwen, TOK, prompt, method)
        compress(qwen, TOK, prompt, method)
    assert len([w for w in caught if "used anyway" in str(w.message)]) == 1
    compress(qwen, TOK, prompt, get_method("learned", budget=16, queries=TINY_QUERIES))  # no fingerprint: legacy


def test_the_shipped_queries_name_the_bundled_model():
    from dapq.methods.learned import SHIPPED

    data = load_queries(SHIPPED)
    assert data["model"] == "smollm2-135m-instruct" and len(data["model_fingerprint"]) == 16
    assert data["model_config"] == "llama, hidden 576, 30 layers, vocabulary 49152"


def test_shipped_queries_by_model_name_and_the_hint_for_a_model_that_has_them():
    """queries=<shipped model name> selects the file shipped for that model; the bundled default refused on a
    model dapq ships queries for names them in the one-line error."""
    from types import SimpleNamespace

    from dapq.methods.learned import SHIPPED_DIR, LearnedQueries, shipped_for, shipped_names

    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"} <= set(shipped_names())
    qwen = LearnedQueries(budget=64, queries="qwen2.5-coder-0.5b-instruct")
    assert qwen.path == SHIPPED_DIR / "qwen2.5-coder-0.5b-instruct.pt" and qwen.n_pseudo == 32
    # Qwen2.5-Coder-0.5B-Instruct's architecture fields, as its converted config has them
    config = SimpleNamespace(
        model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        head_dim=None, intermediate_size=4864, vocab_size=151936, rope_theta=None,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, max_position_embeddings=32768,
    )  # fmt: skip
    assert shipped_for(config) == "qwen2.5-coder-0.5b-instruct"
    assert qwen.suffix_embeddings(config).shape == (32, 896)
    # no argument: the file shipped for the model it runs on (what the engine and the harness apply)
    default = LearnedQueries(budget=64).for_model(config)
    assert default.path == qwen.path and default.queries_sha256 == qwen.queries_sha256
    with pytest.raises(DapqError, match="pass queries=qwen2.5-coder-0.5b-instruct"):
        LearnedQueries(budget=64, queries="smollm2-135m-instruct").suffix_embeddings(config)  # named: never swapped
    with pytest.raises(DapqError, match="pass queries=qwen2.5-coder-0.5b-instruct"):
        LearnedQueries(budget=64).suffix_embeddings(config)  # not resolved for the model: refused, never guessed


@pytest.fixture
def shipped_tiny(tmp_path, monkeypatch):
    """A package folder of shipped queries holding the bundled model's file (the default) and one trained for the
    tiny llama ("tiny-llama"); returns that file's path."""
    import shutil

    from dapq.methods import learned
    from dapq.methods.learned import config_fingerprint, describe_config

    folder = tmp_path / "shipped"
    folder.mkdir()
    shutil.copy(learned.SHIPPED, folder / learned.SHIPPED.name)
    config = build_tiny("llama").config
    emb = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(11)) * 0.2
    path = save_queries(
        folder / "tiny-llama.pt",
        emb,
        model="tiny-llama",
        model_fingerprint=config_fingerprint(config),
        model_config=describe_config(config),
    )
    monkeypatch.setattr(learned, "SHIPPED_DIR", folder)
    monkeypatch.setattr(learned, "SHIPPED", folder / learned.SHIPPED.name)
    return path


def test_learned_without_a_file_uses_the_queries_shipped_for_the_model(shipped_tiny, tmp_path):
    """`learned` with no argument runs on every model dapq ships queries for: the engine (serving, generate) and the
    harness (rows, run.json) take that model's file; the reported key stays `learned`; a model without shipped
    queries is still refused with the one-line error."""
    import hashlib
    import json

    from dapq.harness.runner import MethodSpec, run
    from dapq.runs import RunConfig, load_rows
    from helpers import toy_samples

    llama = build_tiny("llama")
    prompt = random_prompt(L, 4)
    cc = compress(llama, TOK, [prompt], get_method("learned", budget=10))
    explicit = compress(llama, TOK, [prompt], get_method("learned", budget=10, queries=str(shipped_tiny)))
    want = reference_sets(llama, prompt, load_queries(shipped_tiny)["embeddings"], 10)
    for i in want:
        assert kept(cc, i) == kept(explicit, i) == want[i], f"layer {i}"
    assert "queries='tiny-llama'" in cc.stats["method"]
    from dapq.engine import generate

    sample = toy_samples(1)[0]
    out = generate(llama, TOK, sample.context, sample.question, get_method("learned", budget=10), max_new_tokens=2)
    assert "queries='tiny-llama'" in out.stats["method"]
    with pytest.raises(DapqError, match="trained for smollm2-135m-instruct"):  # no queries shipped for it
        compress(build_tiny("qwen2"), TOK, [prompt], get_method("learned", budget=10))

    spec = MethodSpec.of("learned").for_model(llama.config)
    assert spec.key == "learned" and dict(spec.params) == {"queries": "tiny-llama"}
    assert MethodSpec.of("learned", queries=str(shipped_tiny)).for_model(llama.config).key.startswith("learned,")
    sha = hashlib.sha256(shipped_tiny.read_bytes()).hexdigest()
    path = run(llama, TOK, toy_samples(1), [MethodSpec.of("learned")], [10], tmp_path / "run", config=RunConfig("t"))
    (row,) = load_rows(path)
    assert row["method_key"] == "learned" and row["method_config"]["queries"] == "tiny-llama"
    assert row["method_config"]["queries_sha256"] == sha
    assert json.loads((path.parent / "run.json").read_text())["method_files"] == {"learned": {"queries": sha}}


def test_bench_records_the_queries_file_it_measured(shipped_tiny, tmp_path, monkeypatch):
    """`dapq bench` results name each method as it ran: a plain `learned` resolved to the model's shipped file, a
    variant with its own file, each with the sha256 of the file's bytes (in the JSON and under the markdown table)."""
    import hashlib

    from dapq.bench import speed

    monkeypatch.setattr(speed, "bench_prompt", lambda tok, length, seed=0: random_prompt(length, seed + 1))
    llama = build_tiny("llama")
    other = save_queries(tmp_path / "other.pt", torch.randn(4, llama.config.hidden_size) * 0.2)
    params = {"learned@other": {"queries": str(other)}}
    r = speed.bench_memory(llama, TOK, [40], ["full", "learned", "learned@other"], 16, params=params)
    rec = r["methods"]
    assert rec["learned"]["config"]["queries"] == "tiny-llama" and rec["learned"]["method"] == "learned"
    assert rec["learned"]["files"] == {"queries": hashlib.sha256(shipped_tiny.read_bytes()).hexdigest()}
    assert rec["learned@other"]["files"] == {"queries": hashlib.sha256(other.read_bytes()).hexdigest()}
    assert rec["full"]["files"] == {} and rec["learned"]["config"]["budget"] == 16
    md = speed.markdown(r)
    assert f"learned: queries sha256 {rec['learned']['files']['queries']}" in md
    assert f"learned@other: queries sha256 {rec['learned@other']['files']['queries']}" in md


def test_dapq_eval_resolves_learned_for_its_model_before_the_run_json_check(shipped_tiny, monkeypatch):
    """`dapq eval` writes and checks run.json before the model load: it reads --model's config (no weights) only
    when a method takes parameters from it, and resolves `learned` there, so resuming a folder of another model's
    `learned` rows is not a false settings clash; an explicit file is kept."""
    from argparse import Namespace

    from dapq import models
    from dapq.cli.evaluate import method_specs, specs_for_model

    read = []
    monkeypatch.setattr(models, "load_config", lambda name, **kw: read.append(name) or build_tiny("llama").config)
    args = Namespace(model="tiny", cache_dir=None)
    specs = method_specs("full,learned,learned@mine", [f"learned@mine.queries={shipped_tiny}"])
    out = specs_for_model(args, specs)
    assert [s.key for s in out] == ["full", "learned", "learned@mine"] and read == ["tiny"]
    assert dict(out[1].params) == {"queries": "tiny-llama"} and out[0] == specs[0] and out[2] == specs[2]
    plain = method_specs("full,snapkv", [])
    assert specs_for_model(args, plain) == plain and read == ["tiny"]  # no method depends on the model: not read


def test_a_ray_driver_resolves_learned_with_its_workers_model(shipped_tiny):
    """On Ray the driver has no model: it takes the config a worker loaded (`Worker.describe`) and resolves the
    methods with it before any row key or run.json is made (a stand-in for Ray runs the worker in this process)."""
    import hashlib
    from types import SimpleNamespace

    from rich.console import Console

    from dapq.harness.runner import MethodSpec
    from dapq.harness.scheduler import Scheduler, Sweep, WorkerSpec
    from dapq.runs import RunConfig
    from helpers import tiny_loader, toy_samples

    class StandInRay:
        exceptions = SimpleNamespace(RayActorError=RuntimeError)

        def remote(self, **_):
            def wrap(cls):
                def start(spec):
                    worker = cls(spec)
                    return SimpleNamespace(describe=SimpleNamespace(remote=worker.describe))

                return SimpleNamespace(remote=start)

            return wrap

        def get(self, refs):
            return refs  # `describe.remote()` ran the call already

    sweep = Sweep(toy_samples(1), [MethodSpec.of("full"), MethodSpec.of("learned")], [10], RunConfig("tiny"))
    assert sweep.fields[("learned", "10")]["queries"] is None  # the driver alone: not resolved yet
    scheduler = Scheduler(StandInRay(), WorkerSpec(loader=tiny_loader), 1, 0, sweep, Console(), None, 0.0)
    config = scheduler.start_workers()
    assert [s.key for s in sweep.methods] == ["full", "learned"]
    assert sweep.fields[("learned", "10")]["queries"] == "tiny-llama"
    assert config.method_files == {"learned": {"queries": hashlib.sha256(shipped_tiny.read_bytes()).hexdigest()}}

"""The engine's house rules: no module imports another's private names, no import circles, nothing imported from
outside the package; a method defined outside the package registers and runs through `generate` and through the
harness with equal results; eval rows carry the peak KV that `generate` accounts."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dapq import ScorerMethod, generate, get_method, list_methods, register
from dapq.engine import compress, derive, record
from dapq.harness.runner import MethodSpec, run
from dapq.methods.base import unregister
from dapq.methods.inputs import LayerInputs
from dapq.methods.protocols import pseudo_length
from dapq.runs import RunConfig, load_rows
from dapq.tasks.sample import Sample
from helpers import METHOD_PARAMS, TinyTokenizer, build_tiny, random_prompt

SRC = Path(__file__).resolve().parents[1] / "src" / "dapq"
TOK = TinyTokenizer()


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in a source file, relative ones resolved."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
    return out


FILES = sorted(SRC.rglob("*.py"))


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in FILES:
        for line, target, names in _imports(path):
            if not target.startswith("dapq"):
                continue
            if any(part.startswith("_") and part != "__init__" for part in target.split(".")):
                bad.append(f"{path.relative_to(SRC)}:{line} imports module {target}")
            for name in names:
                if name.startswith("_") and name != "__version__" and target != _module(path):
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {target}.{name}")
    assert not bad, "private imports:\n" + "\n".join(bad)


def test_no_import_circles_and_nothing_from_outside_the_package():
    modules = {_module(p): p for p in FILES}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps = set()
        for _, target, names in _imports(path):
            assert target.split(".")[0] not in ("scripts", "tests"), f"{mod} imports {target} from outside dapq"
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in modules and cand != mod:
                    deps.add(cand)
                    break
        graph[mod] = deps
    # a package's __init__ re-exports its children: parent -> child edges are not circles
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue
            if seen.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:])):
                    raise AssertionError("import circle: " + " -> ".join(cycle))
            elif d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not any("parents[" in p.read_text(encoding="utf-8") for p in FILES), "a module reaches outside src/"


# ---------------------------------------------------------------------------------------------------- a new method
@dataclass
class KeyNorm(ScorerMethod):
    """Keep the keys of smallest L2 norm (the worked example of docs/adding-a-method.md), defined in a test file.

    Shapes: keys [B, H_c, T, D] -> scores [B, H_q, T] (each query head gets its KV head's score)."""

    pooling: str = "none"
    recent: int = 2

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_q, T]
        t = inp.prompt_len
        norms = inp.keys[:, :, :t].float().norm(dim=-1)  # [B, H_c, T]
        groups = inp.queries.shape[1] // inp.keys.shape[1]
        return (-norms).repeat_interleave(groups, dim=1)

    def forced_keep(self, inp: LayerInputs) -> torch.Tensor:  # [B, T]
        keep = torch.zeros_like(inp.valid[:, : inp.prompt_len])
        keep[:, inp.prompt_len - self.recent :] = True
        return keep & inp.valid[:, : inp.prompt_len]


@pytest.fixture
def outside_methods():
    """Register the test file's methods for one test only (the table-driven tests see the package's methods)."""
    register("test-keynorm")(KeyNorm)
    register("test-seen")(_Seen)
    yield
    unregister("test-keynorm")
    unregister("test-seen")


@pytest.mark.usefixtures("outside_methods")
def test_a_method_defined_outside_the_package_runs_through_generate_and_the_harness(tmp_path):
    assert "test-keynorm" in list_methods()
    model = build_tiny("llama")
    method = get_method("test-keynorm", budget=10)
    prompt = random_prompt(40, 3)
    cc = compress(model, TOK, [prompt], method)
    keys = cc.cache.layers[0].keys  # the kept keys: the smallest norms among the first 38 plus the last 2
    assert keys.shape[2] == 10
    for track in cc.state.tracks:
        kept = sorted(track.pos[0, 0].tolist())
        assert kept[-2:] == [38, 39], "the forced recent tokens are kept"
    sample = Sample(
        id="x",
        task="toy",
        context="abc " * 12,
        question="q?",
        references=["x"],
        metric="string_match_all",
        max_new_tokens=5,
    )
    out = generate(model, TOK, sample.context, sample.question, method, max_new_tokens=5)
    path = run(model, TOK, [sample], [MethodSpec("test-keynorm")], [10], tmp_path, config=RunConfig(model="tiny"))
    rows = load_rows(path)
    assert len(rows) == 1 and rows[0]["method"] == "test-keynorm"
    assert rows[0]["prediction"] == out.text, "harness and generate disagree for an outside method"
    assert rows[0]["kept_mean"] == out.stats["kept_mean"]


@pytest.mark.usefixtures("outside_methods")
def test_keynorm_keeps_the_smallest_norm_keys():
    model = build_tiny("qwen3")
    prompt = random_prompt(40, 4)
    method = get_method("test-keynorm", budget=8)
    full = compress(model, TOK, [prompt], get_method("full"))
    cc = compress(model, TOK, [prompt], method)
    for i in range(len(cc.cache.layers)):
        k = full.cache.layers[i].keys[0]  # [H_kv, 40, D]
        for h in range(k.shape[0]):
            norms = k[h, :38].float().norm(dim=-1)
            want = set(torch.argsort(norms, stable=True)[:6].tolist()) | {38, 39}
            got = set(cc.state.tracks[i].pos[0, h].tolist())
            assert got == want, f"layer {i} head {h}: {sorted(got)} != {sorted(want)}"


# ---------------------------------------------------------------------------------------------------- peak KV
@pytest.mark.parametrize("name", sorted(list_methods()))
def test_replayed_peak_equals_the_serving_peak(name):
    model = build_tiny("llama")
    prompts = [random_prompt(40, 1), random_prompt(31, 2)]
    method = get_method(name, budget=12, **METHOD_PARAMS.get(name, {}))
    suffix = method if pseudo_length(method) else None
    served = compress(model, TOK, prompts, method)
    derived = derive(record(model, TOK, prompts, suffix=suffix), method)
    assert derived.stats["kv_bytes_peak"] == served.stats["kv_bytes_peak"]


def test_eval_rows_record_the_peak_kv(tmp_path):
    model = build_tiny("llama")
    sample = Sample(
        id="p",
        task="toy",
        context="hello " * 10,
        question="q?",
        references=["x"],
        metric="string_match_all",
        max_new_tokens=3,
    )
    specs = [MethodSpec("full"), MethodSpec.of("laq", **METHOD_PARAMS["laq"]), MethodSpec.of("snapkv", window=4)]
    rows = load_rows(run(model, TOK, [sample], specs, [12], tmp_path, config=RunConfig(model="tiny")))
    ctx, q = sample.prompt_ids(TOK)
    peaks = {r["method"]: r["kv_bytes_peak"] for r in rows}
    for spec in specs:
        served = compress(model, TOK, [ctx + q], spec.build(None if spec.name == "full" else 12))
        assert peaks[spec.name] == served.stats["kv_bytes_peak"], spec.name
    assert peaks["laq"] > peaks["full"] > peaks["snapkv"], "LAQ's peak exceeds FullKV's, SnapKV's is below it"


# ---------------------------------------------------------------------------------------------------- LayerInputs
@dataclass
class _Seen(ScorerMethod):
    """SnapKV-like scorer that keeps every LayerInputs the engine hands it (for the tests below)."""

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:
        type(self).seen.append(inp)
        return inp.queries[:, :, -1:].float().sum(-1).expand(-1, -1, inp.prompt_len).clone()


_Seen.seen = []


@pytest.mark.usefixtures("outside_methods")
def test_layer_inputs_carry_values_config_and_pre_rope_queries():
    model = build_tiny("llama")
    prompt = random_prompt(30, 5)
    projected: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: projected.__setitem__(i, out.detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    _Seen.seen.clear()
    try:
        full = compress(model, TOK, [prompt], get_method("full"))
        compress(model, TOK, [prompt], get_method("test-seen", budget=8))
    finally:
        for h in hooks:
            h.remove()
    cfg = model.config
    assert len(_Seen.seen) == cfg.num_hidden_layers
    for inp in _Seen.seen:
        i = inp.layer_idx
        assert inp.config is not None and inp.config.num_hidden_layers == cfg.num_hidden_layers
        assert torch.allclose(inp.values[:, :, :30], full.cache.layers[i].values, atol=1e-6), "values"
        q = projected[i].view(1, 30, cfg.num_attention_heads, -1).transpose(1, 2)  # [1, H_q, 30, D] before RoPE
        assert torch.allclose(inp.pre_rope_queries(), q, atol=1e-5), f"layer {i}: pre-RoPE queries"


@pytest.mark.parametrize("n_prompts", [1, 2])
def test_batched_lookahead_selects_like_one_lookahead_per_budget(n_prompts):
    """derive_many(batch_lookahead=True) decodes the lookahead of every LAQ budget as one batch: same kept sets,
    next positions, accounted peaks and tokens as deriving each budget on its own."""
    from dapq.engine import derive_many, greedy_decode

    model = build_tiny("llama")
    prompts = [random_prompt(50 - 7 * j, 20 + j) for j in range(n_prompts)]
    rec = record(model, TOK, prompts)
    methods = [
        get_method(name, budget=budget, **METHOD_PARAMS.get(name, {}))
        # laq_reference keeps a per-query-head cache: its lookahead decodes in a batch of its own layout
        for name in ("laq", "laq++", "snapkv", "laq_reference")
        for budget in (12, 20, 30)
    ]
    batched = derive_many(rec, methods, batch_lookahead=True)
    for method, got in zip(methods, batched):
        want = derive(rec, method)
        for i in range(len(want.cache.layers)):
            assert torch.equal(want.state.tracks[i].pos, got.state.tracks[i].pos), f"{method.describe()} layer {i}"
            assert torch.equal(want.state.tracks[i].valid, got.state.tracks[i].valid), f"{method.describe()} layer {i}"
        assert want.stats["kept_mean"] == got.stats["kept_mean"]
        assert want.stats["kv_bytes_peak"] == got.stats["kv_bytes_peak"], method.describe()
        assert got.stats["select_s"] > 0
        assert greedy_decode(got, got.first_logits, 6, set()) == greedy_decode(want, want.first_logits, 6, set())


def test_derive_all_groups_methods_by_recording_and_keeps_their_order(monkeypatch):
    """derive_all: one recording per pseudo suffix (methods without one reuse it), a draft's suffix key computed once
    per method, results in the order of the methods and equal to deriving each from its own recording."""
    from dapq.engine import derive_all, greedy_decode, replay

    model = build_tiny("llama")
    prompts = [random_prompt(48, 3)]
    methods = [
        get_method("snapkv", budget=20, window=8),
        get_method("dapq", budget=20, n_pseudo_tokens=6, content="random_vocab"),
        get_method("laq", budget=24, n_lookahead=3, stage1_window=8),
        get_method("dapq", budget=30, n_pseudo_tokens=6, content="random_vocab"),
        get_method("full"),
    ]
    recordings = []
    real_record = replay.record
    monkeypatch.setattr(replay, "record", lambda *a, **k: recordings.append(k.get("suffix")) or real_record(*a, **k))
    got = derive_all(model, TOK, prompts, methods, batch_lookahead=True)
    assert len(recordings) == 1 and recordings[0] is methods[1], "one recording, with the first DapQ's suffix"
    assert len({d.prefill_s for d in got}) == 1 and got[0].prefill_s > 0
    for method, d in zip(methods, got):
        assert d.cache.state.method is method
        own = derive(real_record(model, TOK, prompts, suffix=method if method.name == "dapq" else None), method)
        assert greedy_decode(d.cache, d.cache.first_logits, 5, set()) == greedy_decode(own, own.first_logits, 5, set())

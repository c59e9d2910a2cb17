"""The capacity step of learned queries: low-rank adapters active at the pseudo positions only (`dapq.hf.adapters`).

Must hold: the kept sets are the top attention of the learned tokens when their path runs through the adapters
(against a plain forward with adapters hooked by this test, not by dapq); the prompt's keys, values and first-token
logits are exactly those without adapters; zero adapters change nothing; serving equals the harness; training with
`lora_rank` writes adapters that the method serves and resumes from its checkpoint; malformed adapters or adapters
of another shape are one-line errors before any forward.
"""

from __future__ import annotations

import pytest
import torch

from dapq import get_method
from dapq.engine import compress, derive, record
from dapq.errors import DapqError
from dapq.hf.adapters import init_adapters, suffix_adapters
from dapq.hf.capture import prefill_prompt, suffix_attention, trainable
from dapq.methods.learned import load_queries, save_queries
from dapq.methods.scoring import pool_scores
from dapq.train.fit import train_queries
from dapq.train.settings import TrainSettings
from helpers import TinyTokenizer, build_tiny, capture_qk, random_prompt
from helpers import kept_sets as kept

TOK = TinyTokenizer()
L, N = 40, 5
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")


def random_adapters(model, rank: int = 3, seed: int = 1, zero: bool = False) -> dict:
    """Adapters with a non-zero B (or all-zero B), as a file stores them."""
    ad = init_adapters(model, MODULES, rank, alpha=2.0 * rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    for name in ad.b:
        if not zero:
            ad.b[name] = torch.randn(ad.b[name].shape, generator=g) * 0.3
    return ad.as_dict()


def queries_file(tmp_path, model, adapters: dict | None, name: str = "q.pt") -> str:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(N, model.config.hidden_size, generator=g) * 0.2
    meta = {"adapters": adapters} if adapters is not None else {}
    return str(save_queries(tmp_path / name, emb, model="tiny", **meta))


def reference_sets(model, prompt: list[int], emb: torch.Tensor, adapters: dict, budget: int) -> dict[int, list]:
    """Kept sets from a plain sdpa forward of [embed(prompt), emb] with this test's own hooks adding
    scale * B A x to the rows >= L of each adapted layer (independent of dapq.hf.adapters)."""
    mods = dict(model.named_modules())
    handles = []
    for name in adapters["a"]:
        a, b, scale = adapters["a"][name], adapters["b"][name], adapters["scale"]

        def hook(module, args, output, a=a, b=b, scale=scale):
            out = output.clone()
            out[:, L:] = out[:, L:] + scale * (args[0][:, L:] @ a.T @ b.T)
            return out

        handles.append(mods[name].register_forward_hook(hook))
    table = model.get_input_embeddings().weight
    embeds = torch.cat([table[torch.tensor(prompt)], emb])[None]
    try:
        with capture_qk(model) as cap, torch.inference_mode():
            model(inputs_embeds=embeds)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, (q, k, scaling) in cap.items():
        q, k = q[0].float(), k[0].float()
        groups = q.shape[0] // k.shape[0]
        logits = q[:, L:] @ k.repeat_interleave(groups, dim=0).transpose(-1, -2) * scaling  # [H_q, N, L + N]
        causal = torch.cat([torch.ones(N, L, dtype=torch.bool), torch.ones(N, N, dtype=torch.bool).tril()], dim=1)
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[..., :L].sum(1)
        s = pool_scores(probs[None], "max", 7)[0].view(k.shape[0], groups, L).mean(1)
        out[i] = [set(torch.sort(s[h], descending=True, stable=True).indices[:budget].tolist()) for h in range(len(s))]
    return out


def test_kept_sets_are_the_top_attention_through_the_adapters(tmp_path):
    model = build_tiny("llama")
    adapters = random_adapters(model)
    path = queries_file(tmp_path, model, adapters)
    prompt = random_prompt(L, 5)
    cc = compress(model, TOK, [prompt], get_method("learned", budget=10, queries=path))
    want = reference_sets(model, prompt, load_queries(path)["embeddings"], adapters, 10)
    plain_file = queries_file(tmp_path, model, None, "p.pt")
    plain = compress(model, TOK, [prompt], get_method("learned", budget=10, queries=plain_file))
    assert any(kept(plain, i) != kept(cc, i) for i in want)  # the adapters change what is kept
    for i, sets in want.items():
        assert kept(cc, i) == sets, f"layer {i}"


def test_the_prompt_stays_the_models_own(tmp_path):
    """With adapters the recorded prompt keys and values and the first-token logits are bit for bit those without:
    the adapters act on the pseudo rows only."""
    model = build_tiny("llama")
    prompts = [random_prompt(L, 1), random_prompt(L - 7, 2)]  # left padding: the suffix is last in every row
    with_ad = get_method("learned", budget=12, queries=queries_file(tmp_path, model, random_adapters(model)))
    without = get_method("learned", budget=12, queries=queries_file(tmp_path, model, None, "p.pt"))
    a, b = record(model, TOK, prompts, suffix=with_ad), record(model, TOK, prompts, suffix=without)
    for la, lb in zip(a.full.cache.layers, b.full.cache.layers):  # the prompt columns (pseudo entries may follow)
        assert la.keys.shape[2] >= L
        assert torch.equal(la.keys[:, :, :L], lb.keys[:, :, :L])
        assert torch.equal(la.values[:, :, :L], lb.values[:, :, :L])
    ca, cb = compress(model, TOK, prompts, with_ad), compress(model, TOK, prompts, without)
    assert torch.equal(ca.first_logits, cb.first_logits)
    full = compress(model, TOK, prompts, get_method("full"))
    assert torch.allclose(ca.first_logits, full.first_logits, atol=1e-5)


def test_zero_adapters_change_nothing_and_serving_equals_the_harness(tmp_path):
    model = build_tiny("qwen2")
    prompts = [random_prompt(L, 4)]
    zero = get_method("learned", budget=12, queries=queries_file(tmp_path, model, random_adapters(model, zero=True)))
    none = get_method("learned", budget=12, queries=queries_file(tmp_path, model, None, "p.pt"))
    cz, cn = compress(model, TOK, prompts, zero), compress(model, TOK, prompts, none)
    for i in range(model.config.num_hidden_layers):
        assert kept(cz, i) == kept(cn, i)
    assert zero.embedding_key() != none.embedding_key()  # recordings of the two never mix
    live = get_method("learned", budget=12, queries=queries_file(tmp_path, model, random_adapters(model), "r.pt"))
    served = compress(model, TOK, prompts, live)
    derived = derive(record(model, TOK, prompts, suffix=live), live)
    for i in range(model.config.num_hidden_layers):
        assert kept(served, i) == kept(derived, i)


def test_suffix_adapters_hook_only_inside_the_block():
    model = build_tiny("llama")
    ad = init_adapters(model, ("q_proj",), 2, 4.0)
    x = torch.tensor([random_prompt(10, 3)])
    with torch.inference_mode():
        before = model(x).logits
        with suffix_adapters(model, ad, 3):
            pass
        after = model(x).logits
    assert torch.equal(before, after)
    assert all(not m._forward_hooks for m in model.modules())


def test_suffix_attention_with_adapters_is_differentiable_in_them():
    model = build_tiny("llama_eager")
    for p in model.parameters():
        p.requires_grad_(False)
    state = trainable(prefill_prompt(model, random_prompt(30, 2), keep_last=1))
    ad = init_adapters(model, ("q_proj", "v_proj"), 2, 4.0)
    for t in ad.parameters():
        t.requires_grad_(True)
    emb = torch.randn(4, 64) * 0.2
    probs = suffix_attention(model, state, emb, range(30, 34), ad)
    sum(p[..., :30].max() for p in probs).backward()
    q = [b for name, b in ad.b.items() if name.endswith("q_proj")]  # every layer's queries shape its probabilities
    assert len(q) == 3 and all(b.grad is not None and float(b.grad.abs().sum()) > 0 for b in q)


def test_training_with_adapters_writes_and_resumes_them(tmp_path):
    model = build_tiny("llama")
    small = dict(
        n_queries=4,
        n_train=4,
        n_val=2,
        lengths=(300, 450),
        answer_tokens=4,
        epochs=2,
        batch=2,
        budget=16,
        recipe="needles",
        lr=0.05,
        lora_rank=2,
        lora_lr=0.01,
    )
    train_queries(model, TOK, TrainSettings(**small), tmp_path / "a.pt", log=lambda s: None)
    data = load_queries(tmp_path / "a.pt")
    ad = data["adapters"]
    assert ad["rank"] == 2 and set(ad["modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(ad["a"]) == 4 * model.config.num_hidden_layers
    assert any(float(b.abs().sum()) > 0 for b in ad["b"].values())  # trained away from the identity
    assert data["training"]["lora_rank"] == 2
    compress(model, TOK, [random_prompt(L, 1)], get_method("learned", budget=12, queries=str(tmp_path / "a.pt")))

    def stop_after_first(line: str) -> None:
        if line.startswith("epoch 1:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_queries(model, TOK, TrainSettings(**small), tmp_path / "b.pt", log=stop_after_first)
    train_queries(model, TOK, TrainSettings(**small), tmp_path / "b.pt", log=lambda s: None)
    resumed = load_queries(tmp_path / "b.pt")["adapters"]
    for name in ad["a"]:
        assert torch.allclose(resumed["b"][name], ad["b"][name], atol=1e-6), name
    with pytest.raises(DapqError, match="other settings"):
        train_queries(model, TOK, TrainSettings(**{**small, "lora_rank": 0}), tmp_path / "b.pt", log=lambda s: None)


def test_bad_adapters_are_one_line_errors(tmp_path):
    model = build_tiny("llama")
    good = random_adapters(model)
    broken = {**good, "b": {k: v[:, :1] for k, v in good["b"].items()}}  # B of rank 1 under rank 3
    path = queries_file(tmp_path, model, broken)
    with pytest.raises(DapqError, match="adapters are malformed") as info:
        get_method("learned", budget=8, queries=path)
    assert "\n" not in str(info.value)
    nan = {**good, "a": {k: v * float("nan") for k, v in good["a"].items()}}
    with pytest.raises(DapqError, match="adapters are malformed"):
        get_method("learned", budget=8, queries=queries_file(tmp_path, model, nan, "n.pt"))
    other = build_tiny("qwen2_gqa7")  # same hidden size, q_proj 64 -> 224: the adapter's shape does not fit
    wide = init_adapters(other, ("q_proj",), 2, 4.0).as_dict()
    method = get_method("learned", budget=8, queries=queries_file(tmp_path, model, wide, "w.pt"))
    with pytest.raises(DapqError, match="trained for another model"):
        compress(model, TOK, [random_prompt(L, 1)], method)
    with pytest.raises(DapqError, match="--lora-rank must be"):
        TrainSettings(lora_rank=-1)
    with pytest.raises(DapqError, match="--lora-modules must be"):
        TrainSettings(lora_modules=("lm_head",))

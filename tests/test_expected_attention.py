"""Expected Attention (`expected_attention`): its defining property against a Monte-Carlo estimate, an independent
float64 re-implementation from a plain transformers forward, sinks, value norms, the mean-only path, validation.

References here never go through dapq's rotary helpers: pre-RoPE queries come from the layer's own `q_proj` (and
`q_norm`) on the captured hidden states, and RoPE matrices are built explicitly from the model's `inv_freq`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dapq import get_method
from dapq.engine import compress, record
from dapq.errors import DapqError
from dapq.methods.expected_attention import ExpectedAttention
from helpers import TinyTokenizer, build_tiny, capture_qk, random_prompt

TOK = TinyTokenizer()
L = 40


# ---------------------------------------------------------------------------------------------------- references
def plain_forward(model, prompt: list[int]):
    """Per layer: (pre-RoPE queries [H_q, L, D] from q_proj / q_norm, rotated keys [H_kv, L, D], values
    [H_kv, L, D], scaling), all float64, from a plain transformers forward of one unpadded row."""
    values: dict[int, torch.Tensor] = {}
    with capture_qk(model, values) as cap, torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), output_hidden_states=True)
    layers = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        with torch.inference_mode():
            h = layer.input_layernorm(out.hidden_states[i])  # the layer's attention input [1, L, hidden]
            q = attn.q_proj(h).view(1, len(prompt), -1, attn.head_dim).transpose(1, 2)  # [1, H_q, L, D]
            if getattr(attn, "q_norm", None) is not None:  # Qwen3
                q = attn.q_norm(q)
        _, k, scaling = cap[i]
        layers[i] = (q[0].double(), k[0].double(), values[i][0].double(), scaling)
    return layers


def rope_matrix(model, position: int) -> torch.Tensor:  # [D, D] float64
    """The RoPE rotation at `position` as a matrix (transformers' rotate_half convention: dims i and i + D/2)."""
    inv_freq = model.model.rotary_emb.inv_freq.double()  # [D/2]
    half = inv_freq.shape[0]
    angle = position * inv_freq
    r = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    idx = torch.arange(half)
    r[idx, idx] = r[idx + half, idx + half] = torch.cos(angle)
    r[idx, idx + half] = -torch.sin(angle)
    r[idx + half, idx] = torch.sin(angle)
    return r


def reference_scores(model, layer, n_sink, n_future, covariance=True, vnorm=True, epsilon=0.0) -> torch.Tensor:
    """[H_kv, L] scores of one layer, head by head, written from the paper / kvpress in float64 (sinks: +inf)."""
    q_pre, k, v, scaling = layer
    h_q, n, _ = q_pre.shape
    h_kv = k.shape[0]
    g = h_q // h_kv
    r = torch.stack([rope_matrix(model, p) for p in range(n, n + n_future)]).mean(0)  # [D, D]
    out = torch.zeros(h_kv, n, dtype=torch.float64)
    for h in range(h_q):
        qs = q_pre[h, n_sink:]  # [L - n_sink, D]
        mu = qs.mean(0)
        sigma = (qs - mu).T @ (qs - mu) / qs.shape[0]  # divided by the count, as kvpress
        mu_r, sigma_r = r @ mu, r @ sigma @ r.T
        keys = k[h // g, n_sink:]  # [L - n_sink, D]
        z = scaling * keys @ mu_r
        if covariance:
            z = z + scaling**2 / 2 * torch.einsum("td,de,te->t", keys, sigma_r, keys)
        out[h // g, n_sink:] += torch.softmax(z, -1) / g  # mean over the GQA group
    if vnorm:
        out = (out + epsilon) * v.norm(dim=-1)
    out[:, :n_sink] = float("inf")
    return out


def method_scores(model, prompts: list[list[int]], method) -> list[torch.Tensor]:
    """`method.scores` on the LayerInputs dapq's own recording prefill passes (engine path), per layer [B, H_c, T]."""
    rec = record(model, TOK, prompts)
    budgets = torch.tensor([method.token_budget(len(p)) for p in prompts])
    return [method.scores(replace(inp, budgets=budgets, memo=None)) for inp in rec.full.state.recorded]


# ---------------------------------------------------------------------------------------------------- (1) MC
def gaussian_fit(q_pre: torch.Tensor, n_sink: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mu [D], Sigma [D, D] (divided by the count) of one head's pre-RoPE queries after the sinks, and a Cholesky
    factor of Sigma for sampling."""
    qs = q_pre[n_sink:]
    mu = qs.mean(0)
    sigma = (qs - mu).T @ (qs - mu) / qs.shape[0]
    return mu, sigma, torch.linalg.cholesky(sigma + 1e-12 * torch.eye(sigma.shape[0], dtype=torch.float64))


def tempered_scaling(layer, n_sink: int, rotations: torch.Tensor) -> float:
    """A smaller attention scaling s' for the Monte-Carlo checks: with the tiny model's s the log-normal variance
    s^2 k^T Sigma' k reaches ~20, where a Monte-Carlo mean of exp(...) is dominated by draws it never sees. s' makes
    the largest variance of the layer 1 (relative error of a 100k-draw mean ~0.4 %); queries and keys stay real."""
    q_pre, k, _, scaling = layer
    g = q_pre.shape[0] // k.shape[0]
    worst = 0.0
    for h in range(q_pre.shape[0]):
        _, sigma, _ = gaussian_fit(q_pre[h], n_sink)
        keys = k[h // g, n_sink:]
        for r in rotations:
            worst = max(worst, float((scaling**2 * torch.einsum("td,de,te->t", keys, r @ sigma @ r.T, keys)).max()))
    return scaling / math.sqrt(max(worst, 1.0))


def tempered_scores(model, prompt: list[int], method, scalings: dict[int, float]) -> list[torch.Tensor]:
    """`method.query_head_scores` ([B, H_q, T], one per query head, before the GQA reduction) on dapq's recorded
    LayerInputs with each layer's scaling replaced by `scalings[i]`."""
    rec = record(model, TOK, [prompt])
    return [
        method.query_head_scores(replace(inp, scaling=scalings[i], budgets=torch.tensor([12]), memo=None))
        for i, inp in enumerate(rec.full.state.recorded)
    ]


def test_closed_form_matches_monte_carlo_expected_attention():
    """The defining property: with n_future_positions=1 (the future position L exactly, no averaged rotation) the
    normalised closed form softmax_k(z) equals the Monte-Carlo expected attention E_q[exp(s q.k)] / sum_k (...),
    q = R(L) q_pre, q_pre ~ N(mu, Sigma) fitted from the tiny model's prompt queries (pre-RoPE from q_proj, sinks
    excluded), k the real rotated keys. Both sides are normalised over keys, so log(score) is compared with
    log(MC mean) - logsumexp. The scaling is tempered (`tempered_scaling`) so that the Monte-Carlo mean converges."""
    model = build_tiny("llama")
    prompt = random_prompt(L, 7)
    layers = plain_forward(model, prompt)
    n_sink, n_samples = 4, 100_000
    r = rope_matrix(model, L)
    scalings = {i: tempered_scaling(layer, n_sink, r[None]) for i, layer in layers.items()}
    method = ExpectedAttention(budget=12, n_future_positions=1, use_vnorm=False)
    got = tempered_scores(model, prompt, method, scalings)
    gen = torch.Generator().manual_seed(0)
    for i, (q_pre, k, _, _) in layers.items():
        g = q_pre.shape[0] // k.shape[0]
        assert scalings[i] < 0.5 * layers[i][3], "the tempering is the point of this test: it must be in effect"
        for h in range(q_pre.shape[0]):
            mu, _, chol = gaussian_fit(q_pre[h], n_sink)
            draws = mu + torch.randn(n_samples, mu.shape[0], generator=gen, dtype=torch.float64) @ chol.T
            logits = scalings[i] * (draws @ r.T) @ k[h // g, n_sink:].T  # [N, L - n_sink]: rotated query . key
            log_mc = torch.logsumexp(logits, dim=0) - math.log(n_samples)  # log E[exp(s q.k)] per key
            want = log_mc - torch.logsumexp(log_mc, 0)
            have = got[i][0, h, n_sink:].double().log()
            err = float((have - want).abs().max())
            assert err < 0.03, f"layer {i} head {h}: log expected attention off the Monte-Carlo estimate by {err:.3f}"
            # the covariance term matters at this scaling (the check could tell a mean-only formula apart)
            mean_only = scalings[i] * k[h // g, n_sink:] @ (r @ mu)
            assert float((mean_only - torch.logsumexp(mean_only, 0) - want).abs().max()) > 0.1


def test_averaged_rotation_ranks_like_monte_carlo_over_future_positions():
    """n_future_positions > 1: kvpress (and we) apply the rotation averaged over L .. L+F-1 to the statistics, an
    approximation of the expectation over a uniformly random future position (not exact: the mean of rotations is
    not a rotation). So only the ranking is checked: Spearman correlation of the method's scores with the
    Monte-Carlo estimate (queries rotated to uniformly random positions in [L, L+F)) per layer and head."""
    model = build_tiny("llama")
    prompt = random_prompt(L, 8)
    layers = plain_forward(model, prompt)
    n_future, n_sink, n_samples = 16, 4, 100_000
    rotations = torch.stack([rope_matrix(model, p) for p in range(L, L + n_future)])  # [F, D, D]
    scalings = {i: tempered_scaling(layer, n_sink, rotations) for i, layer in layers.items()}
    method = ExpectedAttention(budget=12, n_future_positions=n_future, use_vnorm=False)
    got = tempered_scores(model, prompt, method, scalings)
    gen = torch.Generator().manual_seed(1)

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(torch.argsort(x)).double()

    rhos = []
    for i, (q_pre, k, _, _) in layers.items():
        g = q_pre.shape[0] // k.shape[0]
        for h in range(q_pre.shape[0]):
            mu, _, chol = gaussian_fit(q_pre[h], n_sink)
            draws = mu + torch.randn(n_samples, mu.shape[0], generator=gen, dtype=torch.float64) @ chol.T
            pos = torch.randint(0, n_future, (n_samples,), generator=gen)
            rotated = torch.einsum("nde,ne->nd", rotations[pos], draws)
            log_mc = torch.logsumexp(scalings[i] * rotated @ k[h // g, n_sink:].T, dim=0)
            a, b = ranks(got[i][0, h, n_sink:].double()), ranks(log_mc)
            rhos.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    print("Spearman per layer x head:", [round(r, 3) for r in rhos])
    assert min(rhos) > 0.7, f"closed form vs Monte-Carlo ranking: Spearman {min(rhos):.3f} (all: {rhos})"
    assert sum(rhos) / len(rhos) > 0.85


# ---------------------------------------------------------------------------------------------------- (2) reference
@pytest.mark.parametrize("model_name", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "params",
    [{}, {"use_covariance": False}, {"use_vnorm": False}, {"epsilon": 0.01, "n_sink": 2, "n_future_positions": 7}],
    ids=["defaults", "no_covariance", "no_vnorm", "epsilon_sinks2_future7"],
)
def test_scores_equal_an_independent_reimplementation(model_name, params):
    """The method's scores on dapq's recorded LayerInputs (the engine's unrotated queries, its values and rotary)
    equal the float64 reference from q_proj / q_norm, explicit RoPE matrices and the captured keys and values."""
    model = build_tiny(model_name)
    prompt = random_prompt(L, 9)
    method = get_method("expected_attention", budget=12, **params)
    got = method_scores(model, [prompt], method)
    p = {"n_sink": 4, "n_future_positions": 512, "use_covariance": True, "use_vnorm": True, "epsilon": 0.0} | params
    for i, layer in plain_forward(model, prompt).items():
        want = reference_scores(
            model, layer, p["n_sink"], p["n_future_positions"], p["use_covariance"], p["use_vnorm"], p["epsilon"]
        )
        have = got[i][0].double()
        assert torch.equal(torch.isinf(have), torch.isinf(want)), f"layer {i}: the force-kept sinks differ"
        finite = ~torch.isinf(want)
        rel = float(((have - want).abs() / want.abs().clamp(min=1e-12))[finite].max())
        assert rel < 1e-4, f"layer {i}: scores differ from the reference by {rel:.2e} (relative)"


def test_left_padded_rows_score_like_rows_alone():
    """Statistics, future positions (each row's own L) and the softmax are per row: pads change nothing."""
    model = build_tiny("llama")
    prompts = [random_prompt(n, 30 + n) for n in (40, 23, 31)]
    method = ExpectedAttention(budget=12)
    batch = method_scores(model, prompts, method)
    t = max(len(p) for p in prompts)
    for b, p in enumerate(prompts):
        alone = method_scores(model, [p], method)
        for i, (x, y) in enumerate(zip(batch, alone)):
            row = x[b, :, t - len(p) :]
            assert bool(torch.isneginf(x[b, :, : t - len(p)]).all()), f"row {b} layer {i}: a pad is keepable"
            assert torch.equal(torch.isinf(row), torch.isinf(y[0])), f"row {b} layer {i}: sinks differ"
            fin = ~torch.isinf(y[0])
            diff = float(((row - y[0]).abs() / y[0].abs().clamp(min=1e-12))[fin].max())
            assert diff < 1e-4, f"row {b} layer {i}: scores differ from the row alone by {diff:.2e} (relative)"


# ---------------------------------------------------------------------------------------------------- (3) properties
@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
def test_sinks_always_kept(layout):
    """Every layer and head keeps the first n_sink real tokens of every row, whatever their scores."""
    model = build_tiny("llama")
    prompts = [random_prompt(n, 50 + n) for n in (40, 23)]
    for n_sink in (1, 4, 7):
        cc = compress(model, TOK, prompts, ExpectedAttention(budget=10, n_sink=n_sink, layout=layout))
        for i, track in enumerate(cc.state.tracks):
            h_c = cc.cache.layers[i].keys.shape[1]
            for b in range(len(prompts)):
                pos, valid = track.pos[b].expand(h_c, -1), track.valid[b].expand(h_c, -1)
                for h in range(h_c):
                    kept = set(pos[h][valid[h]].tolist())
                    assert len(kept) == 10
                    assert set(range(n_sink)) <= kept, f"n_sink={n_sink} layer {i} row {b} head {h}: {sorted(kept)}"


@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
def test_value_norm_scaling(layout):
    """use_vnorm multiplies each key's (group-averaged) expected attention + epsilon by ||v|| of its cache head."""
    model = build_tiny("qwen3")
    prompt = random_prompt(L, 11)
    rec = record(model, TOK, [prompt])
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for eps in (0.0, 0.5):
        on = ExpectedAttention(budget=12, layout=layout, epsilon=eps)
        off = replace(on, use_vnorm=False)
        for inp in rec.full.state.recorded:
            if layout == "query_head":
                inp = replace(
                    inp, keys=inp.keys.repeat_interleave(groups, 1), values=inp.values.repeat_interleave(groups, 1)
                )
            inp = replace(inp, budgets=torch.tensor([12]), memo=None)
            vnorm = inp.values[0].float().norm(dim=-1)  # [H_c, T]
            a, b = on.scores(inp)[0, :, 4:], off.scores(inp)[0, :, 4:]
            diff = float(((a - (b + eps) * vnorm[:, 4:]).abs() / a.abs()).max())
            assert diff < 1e-5, f"layer {inp.layer_idx}: scores are not (attention + {eps}) * ||v|| ({diff:.2e})"
            assert not torch.allclose(a, b), "the value norms changed nothing: the test cannot tell"


def test_covariance_changes_the_scores():
    """use_covariance=False drops the quadratic term (checked against the reference above); here: it matters."""
    model = build_tiny("llama")
    prompt = random_prompt(L, 12)
    with_cov = method_scores(model, [prompt], ExpectedAttention(budget=12))
    mean_only = method_scores(model, [prompt], ExpectedAttention(budget=12, use_covariance=False))
    for i, (a, b) in enumerate(zip(with_cov, mean_only)):
        fin = ~torch.isinf(a)
        assert float((a[fin] - b[fin]).abs().max()) > 1e-3 * float(a[fin].abs().max()), f"layer {i}: no change"


def test_prompt_shorter_than_sinks_keeps_everything_finite():
    """A row with no token after the sinks has nothing to score: zeros, not NaN (the sinks are still forced)."""
    model = build_tiny("llama")
    rec = record(model, TOK, [random_prompt(3, 13), random_prompt(20, 14)])
    method = ExpectedAttention(budget=0.5)
    for inp in rec.full.state.recorded:
        s = method.query_head_scores(replace(inp, budgets=torch.tensor([2, 10]), memo=None))
        assert not bool(torch.isnan(s).any())
        assert bool((s[0] == 0).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 4}, "budget (4) must be larger than n_sink"),
        ({"budget": 2, "n_sink": 2}, "budget (2) must be larger than n_sink"),
        ({"n_sink": -1}, "n_sink must be an integer >= 0"),
        ({"n_future_positions": 0}, "n_future_positions must be an integer >= 1"),
        ({"epsilon": -0.1}, "epsilon must be a finite number >= 0"),
        ({"epsilon": float("nan")}, "epsilon must be a finite number >= 0"),
        ({"use_covariance": "no"}, "use_covariance must be bool"),
        ({"use_vnorm": 1}, "use_vnorm must be bool"),
        ({"n_future_positions": 5.0}, "n_future_positions must be int"),
        ({"pooling": "median"}, "pooling must be one of none, max, avg"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(DapqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_method("expected_attention", **({"budget": 64} | kwargs))


def test_defaults_are_kvpress_defaults():
    m = get_method("expected_attention", budget=64)
    assert (m.n_future_positions, m.n_sink, m.use_covariance, m.use_vnorm, m.epsilon) == (512, 4, True, True, 0.0)
    assert (m.pooling, m.gqa, m.layout, m.min_budget) == ("none", "mean", "kv_head", 5)


def test_needs_the_rotary_embedding():
    model = build_tiny("llama")
    inp = record(model, TOK, [random_prompt(L, 15)]).full.state.recorded[0]
    with pytest.raises(DapqError, match="needs pre-RoPE queries"):
        ExpectedAttention(budget=12).query_head_scores(replace(inp, rotary=None, memo=None))

"""Expected Attention (Devoto, Jeblick, Jegou, 2025, "Expected Attention: KV Cache Compression by Estimating
Attention from Future Queries Distribution", arXiv 2510.00636), with the defaults of kvpress 0.5.5's
`ExpectedAttentionPress`.

Per layer and row, the prompt's queries before RoPE (the valid tokens after the first `n_sink`) are modelled as a
Gaussian per query head: mean mu and (`use_covariance`) covariance Sigma, both divided by the token count (as
kvpress). A future query at position p is R(p) q; R = the mean of the RoPE rotations R(p) over the next
`n_future_positions` positions L .. L + n_future_positions - 1 (L = the row's prompt length) gives the rotated
statistics mu' = R mu and Sigma' = R Sigma R^T. For q ~ N(mu', Sigma') the Gaussian moment-generating function gives
the expected attention logit of a (rotated) key k:

    log E[exp(s q.k)] = z = s k.mu' + s^2 / 2 k^T Sigma' k        (s = the layer's scaling, 1/sqrt(d) by default:
                                                                    k.mu'/sqrt(d) + k^T Sigma' k / (2 d))

The score of key k is softmax_k(z) over the prompt's keys (sinks and pads excluded), per query head, then
(`use_vnorm`) (score + epsilon) * ||v_k||_2. The GQA reduction (mean over the group by default, as kvpress) is the
base class's: the value-norm scaling is per KV head, so it commutes with it. The first `n_sink` real tokens of every
row are always kept (they count towards the budget). No pooling by default (kvpress has none).

Shapes: queries [B, H_q, T, D] and keys / values [B, H_c, T, D] of one layer; statistics mu' [B, H_q, D] and
Sigma' [B, H_q, D, D]; scores [B, H_q, T]; returns kept indices [B, H_c, B_tokens].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DapqError
from ..lazy import torch
from .base import LayerInputs, ScorerMethod, positive_int, register
from .scoring import rotate


def sink_mask(valid: torch.Tensor, n_sink: int) -> torch.Tensor:  # [B, T] bool
    """The first `n_sink` real tokens of every row (left padding: they start after the row's pads)."""
    return valid & (torch.cumsum(valid.long(), dim=-1) <= n_sink)


def query_statistics(
    queries: torch.Tensor,  # [B, H_q, T, D] pre-RoPE queries
    used: torch.Tensor,  # [B, T] bool, the tokens the statistics are taken over
    covariance: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # mu [B, H_q, D], Sigma [B, H_q, D, D] or None (fp32)
    """Per row and head, the mean and covariance of the used queries (divided by the count, as kvpress)."""
    w = used.to(torch.float32)[:, None, :, None]  # [B, 1, T, 1]
    count = used.sum(dim=-1).clamp(min=1).to(torch.float32)[:, None, None]  # [B, 1, 1]
    q = queries.float()
    mu = (q * w).sum(dim=2) / count  # [B, H_q, D]
    if not covariance:
        return mu, None
    centred = (q - mu[:, :, None, :]) * w  # [B, H_q, T, D], zero on unused tokens
    sigma = torch.matmul(centred.transpose(-1, -2), centred) / count[..., None]  # [B, H_q, D, D]
    return mu, sigma


def average_rotation(
    mu: torch.Tensor,  # [B, H, D]
    sigma: torch.Tensor | None,  # [B, H, D, D]
    cos: torch.Tensor,  # [B, F, D_rot] at the F future positions
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """mu' = R mu and Sigma' = R Sigma R^T with R the rotation matrix averaged over the F positions.

    RoPE is x -> x cos + rotate_half(x) sin, linear in (cos, sin), so R = the RoPE of the mean cos and mean sin
    (kvpress builds the same matrix as mean(cos) I + mean(sin) P). R Sigma R^T: R applied to Sigma's rows
    (Sigma R^T), then to the rows of the transpose."""
    c = cos.float().mean(dim=1)[:, None, None, :]  # [B, 1, 1, D_rot]
    s = sin.float().mean(dim=1)[:, None, None, :]
    mu_r = rotate(mu[:, :, None, :], c, s)[:, :, 0]  # [B, H, D]
    if sigma is None:
        return mu_r, None
    half = rotate(sigma, c, s)  # [B, H, D, D] = Sigma R^T
    return mu_r, rotate(half.transpose(-1, -2), c, s)  # R Sigma R^T


@register("expected_attention")
@dataclass
class ExpectedAttention(ScorerMethod):
    """Expected Attention: keys scored by the attention that future queries, modelled as a Gaussian of the prompt's
    pre-RoPE queries rotated to the next positions, pay to them in expectation (Devoto et al. 2025).

    Fields: `n_future_positions` (512: the future positions L .. L+511 the rotation is averaged over), `n_sink` (4
    first tokens, excluded from the statistics and always kept), `use_covariance` (True), `use_vnorm` (True: scores
    times ||v||), `epsilon` (0.0, added before the value-norm scaling), `pooling` ("none") / `kernel`, plus the base
    fields (budget, layout, gqa).

    Shapes: queries [B, H_q, T, D], keys and values [B, H_c, T, D] of one layer; scores [B, H_q, T]; returns kept
    indices [B, H_c, B_tokens].
    """

    pooling: str = "none"
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_future_positions", self.n_future_positions)
        positive_int("n_sink", self.n_sink, minimum=0)
        if not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise DapqError(f"epsilon must be a finite number >= 0; got {self.epsilon!r}.")

    @property
    def min_budget(self) -> int:
        return self.n_sink + 1

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        return (f"its {self.n_sink} sink tokens", "n_sink", "Lower n_sink or raise the budget.")

    def future_statistics(self, inp: LayerInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """mu' [B, H_q, D] and Sigma' [B, H_q, D, D] (None without covariance): the rotated query statistics."""
        t = inp.prompt_len
        valid = inp.valid[:, :t]  # [B, T]
        used = valid & ~sink_mask(valid, self.n_sink)  # [B, T]
        mu, sigma = query_statistics(inp.pre_rope_queries(slice(0, t)), used, self.use_covariance)
        # the row's next position: its prompt length L (positions 0 .. L-1 after the left padding)
        start = inp.positions[:, :t].masked_fill(~valid, -1).amax(dim=-1) + 1  # [B]
        future = start[:, None] + torch.arange(self.n_future_positions, device=start.device)  # [B, F]
        assert inp.rotary is not None  # pre_rope_queries has checked it
        cos, sin = inp.rotary(future)  # [B, F, D_rot]
        return average_rotation(mu, sigma, cos.to(mu.device), sin.to(mu.device))

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_q, T]
        t = inp.prompt_len
        valid = inp.valid[:, :t]  # [B, T]
        scored = valid & ~sink_mask(valid, self.n_sink)  # [B, T]: sinks and pads are not in the softmax
        mu, sigma = self.future_statistics(inp)  # [B, H_q, D], [B, H_q, D, D]
        groups = inp.queries.shape[1] // inp.keys.shape[1]
        keys = inp.keys[:, :, :t].float().repeat_interleave(groups, dim=1)  # [B, H_q, T, D]
        z = torch.matmul(keys, mu[..., None])[..., 0] * inp.scaling  # [B, H_q, T]
        if sigma is not None:
            z = z + (torch.matmul(keys, sigma) * keys).sum(dim=-1) * (inp.scaling**2 / 2)
        z = z.masked_fill(~scored[:, None, :], float("-inf"))
        scores = torch.softmax(z, dim=-1).nan_to_num(nan=0.0)  # a row with nothing to score gets zeros
        if self.use_vnorm:
            if inp.values is None:
                raise DapqError("expected_attention with use_vnorm=True needs the values: pass values to layer_inputs.")
            vnorm = inp.values[:, :, :t].float().norm(dim=-1)  # [B, H_c, T]
            scores = (scores + self.epsilon) * vnorm.repeat_interleave(groups, dim=1)
        return scores.masked_fill(~scored[:, None, :], 0.0)  # sinks: forced_keep; pads: -inf in the base

    def forced_keep(self, inp: LayerInputs) -> torch.Tensor:  # [B, T] bool
        return sink_mask(inp.valid[:, : inp.prompt_len], self.n_sink)

"""Low-rank adapters that act only at the last n positions of a forward: the capacity step of learned queries
(learned lookahead tokens plus LoRA active on them alone, LookaheadKV, arXiv 2603.10899, Sec. 3; LoRA: Hu et al.,
arXiv 2106.09685, Sec. 4.1).

For every adapted linear layer W (a module of the decoder whose name ends in one of `ADAPTABLE`), the output rows
of the last n sequence positions become W x + scale * B (A x) with A [r, in] and B [out, r]; every earlier row is
W x unchanged. The learned pseudo tokens are fed last (after the prompt, in sequence order), so under a causal mask
the prompt's hidden states, keys, values and its last token's logits are exactly the model's own; only the pseudo
tokens' path changes, and their KV is dropped after selection.

    with suffix_adapters(model, adapters, n_last=N):     # forward hooks, removed on exit
        model(inputs_embeds=..., ...)

Enabling is explicit and scoped: nothing is hooked outside the `with` block, nothing at import time. The same
context serves training (`dapq.hf.capture.suffix_attention`, where every fed row is a pseudo token) and serving
(`dapq.engine.prefill`, where the last N of T + N rows are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DapqError
from ..methods.learned import ADAPTABLE  # the projections an adapter may wrap (Llama/Qwen/Mistral names)


@dataclass
class SuffixAdapters:
    """Low-rank adapters by module name (as in `model.named_modules()`): `a[name]` [r, in], `b[name]` [out, r]."""

    rank: int
    scale: float
    modules: tuple[str, ...]  # which projections (entries of ADAPTABLE)
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in sorted(self.a) for t in (self.a[name], self.b[name])]

    def as_dict(self) -> dict[str, Any]:
        """Plain tensors and values (what a queries file and a checkpoint store; read back with `from_dict`)."""
        return {
            "rank": self.rank,
            "scale": self.scale,
            "modules": list(self.modules),
            "a": {k: v.detach().float().cpu().contiguous() for k, v in self.a.items()},
            "b": {k: v.detach().float().cpu().contiguous() for k, v in self.b.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SuffixAdapters:
        """The adapters of a file's `adapters` entry (checked when the file was read: `dapq.methods.learned`)."""
        return cls(int(data["rank"]), float(data["scale"]), tuple(data["modules"]), dict(data["a"]), dict(data["b"]))


def adaptable_modules(model: Any, modules: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The model's linear layers whose name ends in one of `modules`, by full name; none found is an error."""
    unknown = [m for m in modules if m not in ADAPTABLE]
    if unknown:
        raise DapqError(f"Unknown adapter module(s) {', '.join(unknown)}: choose from {', '.join(ADAPTABLE)}.")
    found = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in modules
    }
    if not found:
        raise DapqError(
            f"This model has no linear layer named {', '.join(modules)}: adapters need Llama-style projections."
        )
    return found


def init_adapters(model: Any, modules: tuple[str, ...], rank: int, alpha: float, seed: int = 0) -> SuffixAdapters:
    """Fresh adapters (float32, on the model's device): A ~ N(0, 1/in), B = 0, so they start as the identity (the
    learned queries alone); scale = alpha / rank (LoRA's convention)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DapqError(f"--lora-rank must be an integer >= 1; got {rank!r}")
    gen = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for name, mod in sorted(adaptable_modules(model, modules).items()):
        device = mod.weight.device
        a[name] = (torch.randn(rank, mod.in_features, generator=gen) / mod.in_features**0.5).to(device)
        b[name] = torch.zeros(mod.out_features, rank, device=device)
    return SuffixAdapters(rank, float(alpha) / rank, tuple(modules), a, b)


@contextlib.contextmanager
def suffix_adapters(model: Any, adapters: SuffixAdapters | None, n_last: int) -> Iterator[None]:
    """Inside the block, each adapted linear layer adds scale * B (A x) to the output rows of the last `n_last`
    sequence positions (x: that layer's input, [..., S, in]); earlier rows are untouched. None: nothing is hooked."""
    if adapters is None or n_last < 1:
        yield
        return
    found = adaptable_modules(model, adapters.modules)
    missing = sorted(set(adapters.a) - set(found))
    if missing:
        raise DapqError(
            f"The adapters name {len(missing)} layer(s) this model lacks (first: {missing[0]}): they were trained "
            "for another architecture."
        )
    handles = []

    def hook_for(a: torch.Tensor, b: torch.Tensor):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0][..., -n_last:, :]
            aa, bb = a.to(x.device), b.to(x.device)
            delta = (x.to(aa.dtype) @ aa.T) @ bb.T * adapters.scale  # [..., n_last, out]
            output[..., -n_last:, :] += delta.to(output.dtype)  # in place: no copy of the prompt's rows
            return output

        return hook

    try:
        for name in sorted(adapters.a):
            mod = found[name]
            if adapters.a[name].shape[1] != mod.in_features or adapters.b[name].shape[0] != mod.out_features:
                shape = (adapters.b[name].shape[0], adapters.a[name].shape[1])
                raise DapqError(
                    f"The adapter of {name} is {shape} but the layer is {(mod.out_features, mod.in_features)}: "
                    "trained for another model."
                )
            handles.append(mod.register_forward_hook(hook_for(adapters.a[name], adapters.b[name])))
        yield
    finally:
        for h in handles:
            h.remove()

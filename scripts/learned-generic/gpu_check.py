"""GPU check of the capacity step, on a CUDA machine:

    PYTHONPATH=src:tests python3 scripts/learned-generic/gpu_check.py      # DEVICE=cpu runs the same checks here

On a tiny random Llama moved to the GPU in float32 and in bfloat16 with sdpa: the prompt's first-token logits are the
same with and without adapters at the pseudo positions, zero adapters keep the same sets, and the kept sets on the
GPU in float32 equal the CPU's."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from dapq import get_method
from dapq.engine import compress
from dapq.hf.adapters import init_adapters
from dapq.methods.learned import save_queries
from helpers import TinyTokenizer, build_tiny, kept_sets, random_prompt

tok = TinyTokenizer()
cpu = build_tiny("llama")
tmp = Path(tempfile.mkdtemp())
emb = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)) * 0.2
ad = init_adapters(cpu, ("q_proj", "k_proj", "v_proj", "o_proj"), 3, 6.0)
for name in ad.b:
    ad.b[name] = torch.randn(ad.b[name].shape, generator=torch.Generator().manual_seed(len(name))) * 0.3
with_ad = save_queries(tmp / "a.pt", emb, model="tiny", adapters=ad.as_dict())
plain = save_queries(tmp / "p.pt", emb, model="tiny")
prompts = [random_prompt(40, 1), random_prompt(33, 2)]
ref = compress(cpu, tok, prompts, get_method("learned", budget=12, queries=str(with_ad)))
for dtype in (torch.float32, torch.bfloat16):
    gpu = copy.deepcopy(cpu).to(os.environ.get("DEVICE", "cuda"), dtype)
    a = compress(gpu, tok, prompts, get_method("learned", budget=12, queries=str(with_ad)))
    p = compress(gpu, tok, prompts, get_method("learned", budget=12, queries=str(plain)))
    same_logits = torch.equal(a.first_logits, p.first_logits)
    same_cpu = all(kept_sets(a, i) == kept_sets(ref, i) for i in range(3))
    print(f"{gpu.device} {dtype}: logits with == without adapters {same_logits}, kept == CPU {same_cpu}")
    assert same_logits
print("gpu check ok")

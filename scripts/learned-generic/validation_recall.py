"""Validation recall@budget, per prompt kind, of several learned-queries files and DapQ's pseudo tokens on the
validation prompts of a generic target store (docs/results/learned-generic.md, "what the generic validation
measures"). Reads the stored targets only; no target is rebuilt.

    OMP_NUM_THREADS=1 python scripts/learned-generic/validation_recall.py \\
        runs/queries/generic-smollm2.pt.targets 240 24 \\
        shipped=- generic=runs/queries/generic-smollm2.pt gold=runs/queries/generic-gold.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dapq import get_method, load_model
from dapq.methods.learned import SHIPPED, load_queries
from dapq.train.fit import embeddings_of, evaluate
from dapq.train.generic import GENERIC_KINDS
from dapq.train.settings import TrainSettings
from dapq.train.targets import TargetStore


def main() -> None:
    store_dir, n_train, n_val, *named = sys.argv[1:]
    torch.set_num_threads(1)
    model, tok = load_model()
    for p in model.parameters():
        p.requires_grad_(False)
    settings = TrainSettings(n_train=int(n_train), n_val=int(n_val), recipe="generic", kinds=())
    store = TargetStore(Path(store_dir), settings, "", "")
    val = [store.load(i) for i in range(int(n_train), int(n_train) + int(n_val))]
    vocab = model.get_input_embeddings().weight.shape[0]
    dapq = get_method("dapq", budget=settings.budget, n_pseudo_tokens=settings.n_queries)
    emb_of = {"dapq": lambda ex: embeddings_of(model, dapq.pseudo_ids(ex.ids, vocab, tok))}
    for item in named:
        name, path = item.split("=", 1)
        emb = load_queries(SHIPPED if path == "-" else path)["embeddings"]
        emb_of[name] = lambda ex, e=emb: e
    print("| queries | " + " | ".join(GENERIC_KINDS) + " |")
    for name, fn in emb_of.items():
        cells = []
        for kind in GENERIC_KINDS:
            subset = [ex for ex in val if f"-{kind}-" in ex.id]
            cells.append(f"{evaluate(model, subset, fn, settings.loss)['recall']:.3f}" if subset else "-")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

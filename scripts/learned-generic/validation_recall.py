"""Validation recall@budget, per prompt kind or per source, of several learned-queries files (their adapters
included) and DapQ's pseudo tokens on the validation prompts of a generic target store
(docs/results/learned-generic.md, "what the generic validation measures" and the tenth session's common
validation). Reads the stored targets only; no target is rebuilt.

    OMP_NUM_THREADS=1 python scripts/learned-generic/validation_recall.py \\
        runs/queries/generic-smollm2.pt.targets 240 24 \\
        shipped=- generic=runs/queries/generic-smollm2.pt gold=runs/queries/generic-gold.pt

    # a store of other text or seed names them; --by source groups the prompts by their text's source
    python scripts/learned-generic/validation_recall.py runs/queries/common-val.pt.targets 1 40 \\
        --texts essays,docs,lists --seed 1 --by source cpu8=docs/results/learned-generic/cpu/cpu-lora8.pt ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dapq import get_method, load_model
from dapq.hf.adapters import SuffixAdapters
from dapq.methods.learned import SHIPPED, load_queries
from dapq.train.fit import embeddings_of, evaluate
from dapq.train.generic import GENERIC_KINDS, drafts
from dapq.train.settings import TrainSettings
from dapq.train.targets import TargetStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("n_train", type=int)
    ap.add_argument("n_val", type=int)
    ap.add_argument("files", nargs="*", help="NAME=PATH (PATH '-': the shipped file)")
    ap.add_argument("--texts", default="essays,docs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="512-2048")
    ap.add_argument("--by", choices=("kind", "source"), default="kind")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(1)
    model, tok = load_model()
    for p in model.parameters():
        p.requires_grad_(False)
    lo, hi = (int(x) for x in args.lengths.split("-"))
    texts = tuple(args.texts.split(","))
    settings = TrainSettings(n_train=args.n_train, n_val=args.n_val, recipe="generic", texts=texts, seed=args.seed)
    store = TargetStore(Path(args.store), settings, "", "")
    first, last = args.n_train, args.n_train + args.n_val
    val = [store.load(i) for i in range(first, last)]
    plan = drafts(last, (lo, hi), args.seed, GENERIC_KINDS, texts)[first:last]
    assert [d.id for d in plan] == [ex.id for ex in val], "the store holds other prompts: check --texts/--seed"
    group = {ex.id: (d.kind if args.by == "kind" else d.source) for ex, d in zip(val, plan)}
    groups = list(dict.fromkeys(group.values()))
    vocab = model.get_input_embeddings().weight.shape[0]
    dapq = get_method("dapq", budget=settings.budget, n_pseudo_tokens=settings.n_queries)
    runs = {"dapq": (lambda ex: embeddings_of(model, dapq.pseudo_ids(ex.ids, vocab, tok)), None)}
    for item in args.files:
        name, path = item.split("=", 1)
        data = load_queries(SHIPPED if path == "-" else path)
        adapters = SuffixAdapters.from_dict(data["adapters"]) if data.get("adapters") else None
        runs[name] = (lambda ex, e=data["embeddings"]: e, adapters)
    print(
        f"| queries | all ({len(val)}) | " + " | ".join(f"{g} ({list(group.values()).count(g)})" for g in groups) + " |"
    )
    print("|---" * (len(groups) + 2) + "|")
    for name, (fn, adapters) in runs.items():
        recall = {ex.id: evaluate(model, [ex], fn, settings.loss, adapters)["recall"] for ex in val}
        cells = [f"{sum(recall.values()) / len(recall):.3f}"]
        for g in groups:
            mine = [r for i, r in recall.items() if group[i] == g]
            cells.append(f"{sum(mine) / len(mine):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""How concentrated the training targets are: the generic recipe's stored targets per kind and source, against the
needle recipe's targets built here (docs/results/learned-generic.md, "How sharp the targets are"). A target is the
mean attention of the model's greedy answer over the prompt's keys, one distribution per layer and KV head.

Per prompt and averaged over layers and heads: the share of the target's mass on its top-B keys (B = the budget the
queries are trained for, 128), the effective number of keys exp(entropy), the share of the mass on the document (all
keys but the first 4 and the last 64) and the effective number of document keys. Per prompt: the share of the answer's
words and numbers (4+ characters) found in the prompt, a rough sign that the answer draws on the text.

    OMP_NUM_THREADS=1 python scripts/learned-generic/target_sharpness.py \\
        runs/queries/lists-lora8.pt.targets --n 384 --texts essays,docs,lists --needles 40 \\
        --rows docs/results/learned-generic/sharpness/rows.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from pathlib import Path

import torch

from dapq import load_model
from dapq.prompts import stop_token_ids
from dapq.safefile import write_bytes
from dapq.train.corpus import KINDS, training_prompts
from dapq.train.generic import GENERIC_KINDS, drafts
from dapq.train.settings import TrainSettings
from dapq.train.targets import Example, TargetStore, build_example

WORD = re.compile(r"[A-Za-z0-9]{4,}")  # words and numbers
SINK, TAIL = 4, 64


def effective_keys(t: torch.Tensor) -> torch.Tensor:  # [..., L] distributions -> [...] exp(entropy)
    return (-(t * t.clamp_min(1e-12).log()).sum(-1)).exp()


def measures(target: list[torch.Tensor], budget: int) -> tuple[float, ...]:
    """Means over layers and heads (each target [H_kv, L]): the top-`budget` mass, the effective number of keys, the
    mass on the document (every key but the first SINK and the last TAIL: the attention sink, and the request and
    chat template at the end) and the effective number of document keys (the document's part renormalised)."""
    t = torch.stack([x.float() / x.float().sum(-1, keepdim=True) for x in target])  # [layers, H_kv, L]
    top = t.topk(min(budget, t.shape[-1]), dim=-1).values.sum(-1)  # [layers, H_kv]
    doc = t[..., SINK : t.shape[-1] - TAIL]  # [layers, H_kv, L - SINK - TAIL]
    mass = doc.sum(-1)
    return (
        float(top.mean()),
        float(effective_keys(t).mean()),
        float(mass.mean()),
        float(effective_keys(doc / mass.clamp_min(1e-12)[..., None]).mean()),
    )


def grounded(answer: str, prompt: str) -> float:
    words = [w.lower() for w in WORD.findall(answer)]
    text = prompt.lower()
    return sum(w in text for w in words) / len(words) if words else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="a generic target store (<out>.targets)")
    ap.add_argument("--n", type=int, required=True, help="prompts in the store (train + val)")
    ap.add_argument("--texts", default="essays,docs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="512-2048")
    ap.add_argument("--needles", type=int, default=0, help="build this many needle-recipe targets to compare")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--rows", help="also write one JSON line per prompt here (gzipped)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model()
    lo, hi = (int(x) for x in args.lengths.split("-"))
    texts = tuple(args.texts.split(","))
    settings = TrainSettings(n_train=args.n, n_val=1, recipe="generic", texts=texts, seed=args.seed)
    store = TargetStore(Path(args.store), settings, "", "")
    plan = drafts(args.n, (lo, hi), args.seed, GENERIC_KINDS, texts)
    names = ("top_mass", "effective_keys", "document_mass", "effective_document_keys", "answer_in_prompt", "tokens")
    records: list[dict[str, object]] = []  # one per prompt: the rows file, and the table's groups below

    def record(ex: Example, recipe: str, kind: str, source: str) -> None:
        values = (*measures(ex.target, args.budget), grounded(ex.answer, tok.decode(ex.ids)), len(ex.ids))
        records.append({"recipe": recipe, "id": ex.id, "kind": kind, "source": source, **dict(zip(names, values))})

    for i, d in enumerate(plan):
        if store.path(i).is_file():
            ex = store.load(i)
            assert ex.id == d.id, "the store holds other prompts: check --texts/--seed/--lengths"
            record(ex, "generic", d.kind, d.source)
    if args.needles:
        needle = TrainSettings(recipe="needles")
        stops = stop_token_ids(tok)
        for prompt in training_prompts(tok, args.needles, needle.lengths, needle.seed, KINDS):
            record(build_example(model, tok, prompt, needle, stops, keep_state=False), "needles", prompt.kind, "essays")
    groups: dict[str, list[dict[str, object]]] = {}  # in the order first met, as the committed table has them
    for r in records:
        kind, source = r["kind"], r["source"]
        keys = ["all", kind] + ([source, f"{kind} / {source}"] if r["recipe"] == "generic" else [])
        for key in keys:
            groups.setdefault(f"{r['recipe']}: {key}", []).append(r)
    print(
        f"| prompts | n | top-{args.budget} mass | effective keys | document mass | effective document keys | "
        "answer words in the prompt | tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for group, members in groups.items():
        top, eff, mass, doc_eff, g, n = (statistics.mean(float(r[name]) for r in members) for name in names)
        print(f"| {group} | {len(members)} | {top:.3f} | {eff:.0f} | {mass:.3f} | {doc_eff:.0f} | {g:.2f} | {n:.0f} |")

    if args.rows:
        text = "".join(json.dumps(r) + "\n" for r in records)
        write_bytes(args.rows, gzip.compress(text.encode(), compresslevel=9, mtime=0), "gzip")


if __name__ == "__main__":
    main()

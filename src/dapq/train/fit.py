"""Training learned pseudo queries (`dapq train-queries`): N input embeddings, the model frozen.

    settings = TrainSettings(n_queries=32, n_train=60, n_val=15, epochs=8)
    result = train_queries(model, tokenizer, settings, out="queries.pt")   # resumes from queries.pt.ckpt

For every training prompt (`dapq.train.corpus`, disjoint from the evaluations): one full prefill, the model's own
greedy answer (up to `answer_tokens`, stopping at end of turn) teacher-forced to capture its real decoding
queries (`dapq.hf.capture`, as the analysis suite does), and the target of every layer and KV head: the mean
attention distribution of those queries over the prompt keys (softmax over the prompt, averaged over the answer's
queries and the GQA group) [H_kv, L], and its gold set (the top `budget` keys). The learned embeddings E [N, hidden]
are then fed after the prompt at positions L .. L+N-1 on top of the prompt cache (differentiable eager attention;
the prompt KV is a constant because the prompt comes first), and their own distribution (the attention of the N
queries over the prompt keys, the softmax including their own keys as the method computes it, averaged, then
renormalised over the prompt) is pulled towards the target with Adam:
- `loss="kl"`: KL(target || learned), averaged over layers and KV heads;
- `loss="gold"`: -log of the learned distribution's mass on the gold set, averaged the same way.
Validation after every epoch: the loss and the gold-set recall at `budget` of the learned scores as the `learned`
method ranks them (summed attention, max-pooled with kernel 7, group mean), beside DapQ's default pseudo tokens
(F4_L28) and the initial embeddings scored the same way. The best epoch by validation recall is written.
Checkpoints (`<out>.ckpt`, every epoch) hold E, Adam's state and the history (tensors, plain containers and numbers
only: they are read with weights_only=True, so a planted checkpoint can never run code); a rerun with the same
settings resumes after the last finished epoch (the examples are rebuilt: they are deterministic), other settings
refuse. Every file (`<out>`, `<out>.json`, the plot `<out stem>.png`, `<out>.ckpt`) is written through
`dapq.safefile` (never through a link, never over a file of another kind), all four are checked before any work,
and a run holds a lock (`.<out name>.lock` beside it) so two runs on one `--out` cannot both claim success.
"""

from __future__ import annotations

import io
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..analysis.quantities import recall, topk_indices
from ..errors import DapqError
from ..hf.adapters import SuffixAdapters, init_adapters
from ..hf.capture import suffix_attention
from ..methods.base import get_method
from ..methods.learned import config_fingerprint, describe_config, save_queries
from ..methods.scoring import aggregate_groups, pool_scores
from ..prompts import stop_token_ids
from ..safefile import FileLock, check_target, ensure_dir, save_figure, save_torch, write_json
from .corpus import N_EVAL_FILES, TRAIN_SEED_BASE, training_files, training_prompts
from .generic import DEFAULT_TEXTS
from .settings import EPS, TrainSettings
from .targets import Example, TargetStore, build_example, prompt_state


@dataclass(frozen=True)
class TrainOutputs:
    """The files a training run writes: the queries, their JSON record, the plot and the checkpoint."""

    queries: Path
    record: Path
    plot: Path
    checkpoint: Path
    lock: Path
    targets: Path  # the generic recipe's target store (a folder of gzipped files, one per prompt: resumable)

    @classmethod
    def of(cls, out: str | Path) -> TrainOutputs:
        """The outputs of `--out`, every one checked before any work: a link, a folder, a file of another kind
        (`notes.txt`, a PNG as the queries) or two outputs on one path (`--out q.png`) is a one-line error; the
        folder is created and proven writable."""
        out = Path(out)
        if out.name in ("", ".", ".."):
            raise DapqError(f"--out {out} is not a file name: pass one such as runs/queries/q.pt.")
        outputs = cls(
            out,
            out.with_name(out.name + ".json"),
            out.with_suffix(".png"),
            out.with_name(out.name + ".ckpt"),
            out.with_name(f".{out.name}.lock"),
            out.with_name(out.name + ".targets"),
        )
        if len({outputs.queries, outputs.record, outputs.plot, outputs.checkpoint}) < 4:
            raise DapqError(f"--out {out}: the loss plot would overwrite the queries; use a name ending in .pt.")
        for path, kind in (
            (outputs.queries, "torch"),
            (outputs.record, "json"),
            (outputs.plot, "png"),
            (outputs.checkpoint, "torch"),
        ):
            check_target(path, kind)
        if outputs.targets.is_symlink() or (outputs.targets.exists() and not outputs.targets.is_dir()):
            raise DapqError(f"{outputs.targets} (the target store) must be a folder, not a link or a file.")
        ensure_dir(out.parent, "the folder of --out")
        return outputs


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, read with weights_only=True (tensors and plain values; a pickle that would run code
    is refused unrun); a torn, empty, foreign or malformed file is a one-line error."""
    advice = "delete it or pass --restart to start over"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # torn, empty, text, a pickle of objects: never unpickled beyond plain data
        raise DapqError(f"{path} is not a dapq training checkpoint ({type(exc).__name__}): {advice}.") from None
    shape = {
        "settings": dict,
        "model": str,
        "epoch": int,
        "embeddings": torch.Tensor,
        "optimizer": dict,
        "history": list,
        "baselines": dict,
    }
    for name, kind in shape.items():
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get(name), kind):
            raise DapqError(f"{path} is not a dapq training checkpoint (no valid {name!r}): {advice}.")
    return ckpt


def same_but_epochs(recorded: Any, wanted: dict[str, Any]) -> bool:
    """A checkpoint resumes under other `--epochs` (more: training goes on with the same shuffles as an
    uninterrupted run; fewer: the best of the first epochs is written), never under other settings."""
    if not isinstance(recorded, dict):
        return False
    recorded = {"texts": list(DEFAULT_TEXTS), **recorded}  # checkpoints from before --text used the default text
    return {k: v for k, v in recorded.items() if k != "epochs"} == {k: v for k, v in wanted.items() if k != "epochs"}


def check_finite_epoch(row: dict[str, Any], emb: torch.Tensor, adapters: SuffixAdapters | None = None) -> None:
    """Training that diverged (a NaN or infinite loss, embedding or adapter) stops with a one-line error, never a
    "best epoch" of garbage."""
    bad = [k for k in ("train_loss", "val_loss", "val_recall") if not math.isfinite(row[k])]
    weights = [emb] + (adapters.parameters() if adapters is not None else [])
    if bad or not all(bool(torch.isfinite(w).all()) for w in weights):
        what = ", ".join(f"{k} {row[k]}" for k in bad) or "non-finite embeddings"
        raise DapqError(f"Training diverged at epoch {row['epoch']} ({what}): lower --lr and pass --restart.")


@dataclass
class TrainResult:
    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def learned_distribution(probs: torch.Tensor, h_kv: int, length: int) -> torch.Tensor:  # [H_kv, L]
    """From attention probabilities [H_q, n, L + n]: the mean over the n queries of the mass on each prompt key,
    averaged over the group and renormalised over the prompt."""
    p = probs[:, :, :length].mean(dim=1)  # [H_q, L]
    p = p.reshape(h_kv, -1, length).mean(dim=1)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(EPS)


def learned_ranking(probs: torch.Tensor, h_kv: int, length: int, kernel: int = 7) -> torch.Tensor:  # [H_kv, L]
    """The scores the `learned` method ranks by: attention summed over the queries, max-pooled, group mean."""
    s = pool_scores(probs[:, :, :length].sum(dim=1)[None], "max", kernel)  # [1, H_q, L]
    return aggregate_groups(s, h_kv, "mean")[0]


def example_loss(probs: list[torch.Tensor], ex: Example, loss: str) -> torch.Tensor:
    total = torch.zeros(())
    for p, target, gold in zip(probs, ex.target, ex.gold):
        target, gold = target.to(p.device), gold.to(p.device)  # stored targets live on the CPU, a model may not
        dist = learned_distribution(p, target.shape[0], target.shape[1])
        if loss == "kl":
            per_head = (target * (torch.log(target + EPS) - torch.log(dist + EPS))).sum(dim=-1)
        else:
            per_head = -torch.log(dist.gather(-1, gold).sum(dim=-1) + EPS)
        total = total + per_head.mean()
    return total / len(probs)


def recall_of(probs: list[torch.Tensor], ex: Example) -> float:
    vals = []
    for p, target, gold in zip(probs, ex.target, ex.gold):
        p, gold = p.cpu(), gold.cpu()
        pred = topk_indices(learned_ranking(p, target.shape[0], target.shape[1]), gold.shape[1])
        vals.append(float(recall(gold, pred).mean()))
    return sum(vals) / len(vals)


def embeddings_of(model: Any, ids: list[int]) -> torch.Tensor:  # [len(ids), hidden]
    table = model.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].detach().float().clone()


def initial_embeddings(model: Any, tokenizer: Any, settings: TrainSettings) -> torch.Tensor:
    """The embeddings of `init_text`'s tokens, repeated to N."""
    ids = list(tokenizer.encode(settings.init_text, add_special_tokens=False)) or [0]
    return embeddings_of(model, [ids[i % len(ids)] for i in range(settings.n_queries)])


def evaluate(
    model: Any,
    examples: list[Example],
    emb_of: Callable[[Example], torch.Tensor],
    loss: str,
    adapters: SuffixAdapters | None = None,
) -> dict:
    losses, recalls = [], []
    with torch.no_grad():
        for ex in examples:
            emb = emb_of(ex)
            state = prompt_state(model, ex)
            length = state.length
            fed = suffix_attention(model, state, emb, range(length, length + len(emb)), adapters)
            probs = [p.float() for p in fed]
            losses.append(float(example_loss(probs, ex, loss)))
            recalls.append(recall_of(probs, ex))
    return {"loss": sum(losses) / len(losses), "recall": sum(recalls) / len(recalls)}


def check_buildable(settings: TrainSettings) -> None:
    """`--build-only` fills a target store, which only the generic recipe keeps."""
    if settings.recipe != "generic":
        raise DapqError("--build-only fills the generic recipe's target store; the needle recipe keeps no store.")


def build_targets(
    model: Any,
    tokenizer: Any,
    settings: TrainSettings,
    out: str | Path,
    *,
    model_name: str = "",
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Fill the generic recipe's target store of `out` and train nothing (`dapq train-queries --build-only`): any
    number of such processes side by side, each building the next unclaimed prompt, then one training run that
    finds every target stored."""
    check_buildable(settings)
    outputs = TrainOutputs.of(out)
    store = TargetStore(outputs.targets, settings, model_name, config_fingerprint(model.config))
    store.build(model, tokenizer, stop_token_ids(tokenizer), progress, log, build_only=True)


def train_queries(
    model: Any,
    tokenizer: Any,
    settings: TrainSettings,
    out: str | Path,
    *,
    model_name: str = "",
    restart: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train, checkpoint every epoch, write the best epoch's embeddings to `out` (+ `<out>.json`, `<out>.png`)
    under a lock on `out`."""
    outputs = TrainOutputs.of(out)
    with FileLock(outputs.lock, str(outputs.queries)):
        return _train_locked(model, tokenizer, settings, outputs, model_name, restart, progress, log)


def _train_locked(
    model: Any,
    tokenizer: Any,
    settings: TrainSettings,
    outputs: TrainOutputs,
    model_name: str,
    restart: bool,
    progress: Callable[[str, int, int], None] | None,
    log: Callable[[str], None],
) -> TrainResult:
    out, ckpt_path = outputs.queries, outputs.checkpoint
    started = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt = None
    if ckpt_path.exists() and not restart:
        ckpt = load_checkpoint(ckpt_path)
        if not same_but_epochs(ckpt.get("settings"), settings.as_dict()) or ckpt.get("model") != model_name:
            raise DapqError(
                f"{ckpt_path} was written with other settings or another model: pass --restart to start over, or "
                "another --out."
            )
        if ckpt["epoch"] >= settings.epochs:  # --epochs lower than the checkpoint's: the best of the first ones
            log(f"{ckpt_path}: all {settings.epochs} epochs are done; writing {out}.")
            ckpt["history"] = ckpt["history"][: settings.epochs]
    stops = stop_token_ids(tokenizer)
    if settings.recipe == "generic":
        store = TargetStore(outputs.targets, settings, model_name, config_fingerprint(model.config))
        examples = store.build(model, tokenizer, stops, progress, log)
    else:
        prompts = training_prompts(
            tokenizer, settings.n_train + settings.n_val, settings.lengths, settings.seed, settings.kinds
        )
        examples = []
        for j, prompt in enumerate(prompts):
            examples.append(build_example(model, tokenizer, prompt, settings, stops))
            if progress:
                progress("targets", j + 1, len(prompts))
    train, val = examples[: settings.n_train], examples[settings.n_train :]
    built_s = time.perf_counter() - started
    log(f"{len(train)} training and {len(val)} validation prompts with their targets ready in {built_s:.0f} s")

    emb = initial_embeddings(model, tokenizer, settings).requires_grad_(True)
    adapters = None
    groups: list[dict[str, Any]] = [{"params": [emb], "lr": settings.lr}]
    if settings.lora_rank:
        adapters = init_adapters(
            model, settings.lora_modules, settings.lora_rank, settings.lora_alpha, seed=TRAIN_SEED_BASE + settings.seed
        )
        for t in adapters.parameters():
            t.requires_grad_(True)
        groups.append({"params": adapters.parameters(), "lr": settings.lora_lr})
    opt = torch.optim.Adam(groups)
    history: list[dict[str, Any]] = []
    baselines: dict[str, dict] = {}
    if ckpt is not None:
        if ckpt["embeddings"].shape != emb.shape:
            raise DapqError(f"{ckpt_path}: its embeddings do not fit these settings; pass --restart to start over.")
        saved = ckpt.get("adapters")
        if (saved is None) != (adapters is None):
            raise DapqError(f"{ckpt_path}: its adapters do not fit these settings; pass --restart to start over.")
        with torch.no_grad():
            emb.copy_(ckpt["embeddings"])
            if adapters is not None:
                try:
                    for name in adapters.a:
                        adapters.a[name].copy_(saved["a"][name])
                        adapters.b[name].copy_(saved["b"][name])
                except (KeyError, TypeError, RuntimeError):
                    raise DapqError(f"{ckpt_path}: its adapters are damaged; pass --restart to start over.") from None
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise DapqError(f"{ckpt_path}: its optimizer state is damaged ({exc}); pass --restart.") from None
        history, baselines = ckpt["history"], ckpt["baselines"]
        log(f"resuming {ckpt_path} after epoch {ckpt['epoch']}")
    else:
        vocab = model.get_input_embeddings().weight.shape[0]
        dapq = get_method("dapq", budget=settings.budget, n_pseudo_tokens=settings.n_queries)
        baselines["dapq"] = evaluate(
            model, val, lambda ex: embeddings_of(model, dapq.pseudo_ids(ex.ids, vocab, tokenizer)), settings.loss
        )
        start = emb.detach().clone()
        baselines["init"] = evaluate(model, val, lambda ex: start, settings.loss)
        log(
            f"validation before training: DapQ (F4_L28) recall@{settings.budget} {baselines['dapq']['recall']:.3f}, "
            f"initial embeddings recall {baselines['init']['recall']:.3f} loss {baselines['init']['loss']:.4f}"
        )
    first_epoch = (ckpt or {}).get("epoch", 0)
    rng = random.Random(TRAIN_SEED_BASE + settings.seed)
    for _ in range(first_epoch):  # the same shuffles as an uninterrupted run
        rng.shuffle(list(range(len(train))))
    for epoch in range(first_epoch + 1, settings.epochs + 1):
        t0 = time.perf_counter()
        order = list(range(len(train)))
        rng.shuffle(order)
        total = 0.0
        opt.zero_grad()
        for step, j in enumerate(order):
            ex = train[j]
            state = prompt_state(model, ex)
            length = state.length
            probs = suffix_attention(model, state, emb, range(length, length + settings.n_queries), adapters)
            loss = example_loss([p.float() for p in probs], ex, settings.loss) / settings.batch
            loss.backward()
            total += float(loss.detach()) * settings.batch
            if (step + 1) % settings.batch == 0 or step + 1 == len(order):
                opt.step()
                opt.zero_grad()
            if progress:
                progress(f"epoch {epoch}/{settings.epochs}", step + 1, len(order))
        val_metrics = evaluate(model, val, lambda ex: emb.detach(), settings.loss, adapters)
        row = {
            "epoch": epoch,
            "train_loss": total / len(order),
            "val_loss": val_metrics["loss"],
            "val_recall": val_metrics["recall"],
            "epoch_s": time.perf_counter() - t0,
            "embeddings": emb.detach().clone(),
            "adapters": adapters.as_dict() if adapters is not None else None,
        }
        check_finite_epoch(row, emb.detach(), adapters)
        history.append(row)
        save_torch(
            ckpt_path,
            {
                "settings": settings.as_dict(),
                "model": model_name,
                "epoch": epoch,
                "embeddings": emb.detach().clone(),
                "adapters": adapters.as_dict() if adapters is not None else None,
                "optimizer": opt.state_dict(),
                "history": history,
                "baselines": baselines,
            },
        )
        log(
            f"epoch {epoch}: train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
            f"val recall@{settings.budget} {row['val_recall']:.3f}  ({row['epoch_s']:.0f} s)"
        )
    if not history:
        raise DapqError("No epoch was trained: raise --epochs.")
    best = max(history, key=lambda r: (r["val_recall"], -r["val_loss"]))
    seconds = time.perf_counter() - started
    summary = [{k: v for k, v in r.items() if k not in ("embeddings", "adapters")} for r in history]
    meta = {
        "model": model_name,
        "model_fingerprint": config_fingerprint(model.config),
        "model_config": describe_config(model.config),
        "hidden_size": int(emb.shape[1]),
        "n_layers": len(train[0].target),
        "training": {
            **settings.as_dict(),
            "best_epoch": best["epoch"],
            "history": summary,
            "baselines": baselines,
            "seconds_this_run": seconds,
            "split": (
                f"essays sorted by file name: the first {N_EVAL_FILES} are the evaluations', training reads "
                f"{len(training_files())} files from {training_files()[0].name}; seeds from {TRAIN_SEED_BASE}"
            ),
        },
    }
    adapters_of_best = {"adapters": best["adapters"]} if best.get("adapters") is not None else {}
    save_queries(out, best["embeddings"], **meta, **adapters_of_best)  # tensors: in the file, not in the JSON record
    write_json(outputs.record, meta)
    plot_history(summary, baselines, settings, outputs.plot)
    log(f"best epoch {best['epoch']} (val recall {best['val_recall']:.3f}) written to {out} ({seconds:.0f} s)")
    return TrainResult(out, summary, best["epoch"], seconds)


def plot_history(history: list[dict], baselines: dict, settings: TrainSettings, path: Path) -> None:
    """Loss curves and validation recall per epoch, DapQ's and the initial embeddings' recall as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    a.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
    if "init" in baselines:
        a.axhline(baselines["init"]["loss"], color="grey", ls=":", label="initial (validation)")
    a.set(xlabel="epoch", ylabel=f"{settings.loss} loss", title="loss")
    a.legend()
    b.plot(epochs, [r["val_recall"] for r in history], "o-", label="learned")
    for name, style in (("dapq", "--"), ("init", ":")):
        if name in baselines:
            b.axhline(baselines[name]["recall"], color="grey", ls=style, label=f"{name} (before training)")
    b.set(xlabel="epoch", ylabel=f"gold-set recall@{settings.budget}", title="validation recall")
    b.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)

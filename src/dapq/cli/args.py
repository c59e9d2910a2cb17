"""Arguments shared by the commands: one parser each for budgets, comma lists, lengths, sizes and `--param`
values, the model options, and the output-folder name.

Options hold the text the user typed (so the config hash that names a run's folder stays what it was); the commands
parse them with these functions before any model is loaded. Every parser raises a one-line DapqError (exit code 2)
that names the option and shows an example. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any, NoReturn

from ..errors import DapqError
from ..prompts import MODES  # noqa: F401  (the command modules take it from here)
from ..tasks.registry import parse_lengths  # noqa: F401  (the command modules take it from here)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------------- values
def parse_value(text: str) -> Any:
    """A Python literal (16, 0.5, True, None, 'x', [1, 2]); anything else stays a string."""
    if text in ("None", "none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_params(items: list[str], option: str = "--param") -> dict[str, str]:
    """`key=value` items (repeatable option) -> {key: value text}."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DapqError(f"{option} takes key=value (e.g. {option} n_pseudo_tokens=16); got {item!r}")
        params[key.strip()] = value
    return params


def parse_params(items: list[str], option: str = "--param") -> dict[str, Any]:
    """`key=value` items (repeatable option) -> {key: Python literal (`parse_value`)}."""
    return {key: parse_value(value.strip()) for key, value in split_params(items, option).items()}


def parse_method_params(items: list[str], option: str = "--param") -> dict[str, dict[str, Any]]:
    """`method.key=value` items (repeatable option) -> {method: {key: value typed by the method's field}}; the
    budget comes from --budgets, never from --param."""
    raw: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not name.strip() or not field.strip():
            raise DapqError(f"{option} takes method.key=value (e.g. {option} dapq.n_pseudo_tokens=16); got {item!r}")
        if field.strip() == "budget":
            raise DapqError(f"{option} {item}: budgets come from --budgets, not from --param.")
        raw.setdefault(name.strip(), {})[field.strip()] = value
    return {name: typed_params(name.split("@", 1)[0], values) for name, values in raw.items()}


# ---------------------------------------------------------------------------------------------------- budgets
def parse_budget(text: str, option: str = "--budget") -> int | float:
    """A budget: tokens kept per head (an int >= 1, e.g. 128) or a ratio of the prompt in (0, 1) (e.g. 0.1)."""
    item = str(text).strip()
    try:
        value: int | float = int(item)
    except ValueError:
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
    if isinstance(value, float) and value >= 1 and value.is_integer():  # 1.0 meant 1 token while 1.5 was refused
        raise DapqError(f"{option} {item}: pass an int ({int(value)}) for a token count, or a ratio in (0, 1).")
    if not (isinstance(value, int) and value >= 1) and not (isinstance(value, float) and 0 < value < 1):
        raise DapqError(
            f"{option} takes a token count >= 1 (e.g. 128) or a ratio in (0, 1) of the prompt (e.g. 0.1); got {item!r}"
        )
    return value


def parse_budgets(text: str, option: str = "--budgets") -> list[int | float]:
    """Comma-separated budgets ('64,128', '0.1'), each as `parse_budget`; at least one."""
    out = [parse_budget(item, option) for item in (x.strip() for x in str(text).split(",")) if item]
    if not out:
        raise DapqError(f"{option} is empty; pass token counts such as 128 or 64,128 (or ratios such as 0.1).")
    return out


# ---------------------------------------------------------------------------------------------------- lists
def parse_names(text: str, option: str) -> list[str]:
    """Comma-separated names ('full,snapkv,dapq'), blanks dropped; at least one."""
    out = [x.strip() for x in str(text).split(",") if x.strip()]
    if not out:
        raise DapqError(f"{option} is empty; pass comma-separated names (e.g. full,snapkv,dapq).")
    return out


def parse_ints(text: str, option: str, minimum: int = 1) -> list[int]:
    """Comma-separated integers ('1,2,4'), each >= `minimum`; at least one."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise DapqError(f"{option} takes comma-separated integers (e.g. 1,2,4); got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise DapqError(f"{option} needs integers >= {minimum}; got {text!r}")
    return values


def parse_size(text: str, option: str = "--memory-cap") -> int:
    """Bytes: '4GiB', '512MiB', '2.5GB', '4g' or a plain byte count."""
    t = str(text).strip()
    units = {"gib": 2**30, "mib": 2**20, "gb": 10**9, "mb": 10**6, "g": 2**30, "m": 2**20}
    value: int | None = None
    for unit, mult in units.items():
        if t.lower().endswith(unit):
            try:
                value = int(float(t[: -len(unit)]) * mult)
            except (ValueError, OverflowError):  # not a number, or inf / nan
                pass
            break
    else:
        try:
            value = int(t)
        except ValueError:
            pass
    if value is None or value < 1:
        raise DapqError(f"{option} takes a size (positive) such as 4GiB or 512MiB; got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------- options
def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device, --attn (the same for every command that loads a model)."""
    parser.add_argument(
        "--model",
        default=None,
        help="a known offline model (dapq models), a .gguf file, a local folder or a hub id "
        "(default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where GGUF files are converted to safetensors once (default: $DAPQ_CACHE_DIR or ~/.cache/dapq)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 or auto (default: float32 on CPU, else the checkpoint's dtype)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where it loads, the CPU)")
    parser.add_argument(
        "--attn", default="sdpa", help="attention backend under the hook: sdpa (default), eager or flash_attention_2"
    )


ATTN_CHOICES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_model_options(args: argparse.Namespace) -> None:
    """--model, --dtype, --device, --attn checked before the (slow) model load: a local path that does not exist, an
    unknown dtype or attention backend, a device this torch cannot use."""
    model = getattr(args, "model", None)
    if model:
        from ..catalog import known_model

        known = known_model(model)
        if known is not None:
            known.sources()  # not installed: the install command, before the slow start
        else:
            looks_local = model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or Path(model).exists()
            if looks_local and not Path(model).expanduser().exists():
                raise DapqError(
                    f"--model {model}: no such file or folder. Pass a .gguf file, a local model folder, a hub id or a "
                    "name from `dapq models`."
                )
    cache_dir = getattr(args, "cache_dir", None)
    if cache_dir:  # created and proven writable now: under a file or /proc it fails here, not after a model load
        from ..safefile import ensure_dir

        ensure_dir(Path(cache_dir).expanduser(), "--cache-dir")
    attn = getattr(args, "attn", None)
    if attn is not None and attn not in ATTN_CHOICES:
        raise DapqError(f"--attn {attn!r} is not an attention backend. Use one of: {', '.join(ATTN_CHOICES)}.")
    dtype, device = getattr(args, "dtype", None), getattr(args, "device", None)
    if dtype is None and device is None:
        return
    from .. import models  # imports torch (~2 s), still far less than a model load

    models.resolve_dtype(dtype)
    if device is not None:
        models.check_device(device)


def load_model_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) from --model, --dtype, --device, --attn and --cache-dir."""
    from .. import models

    return models.load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        attn_implementation=args.attn,
        cache_dir=getattr(args, "cache_dir", None),
    )


def check_positive(value: Any, option: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DapqError(f"{option} must be an integer >= 1; got {value!r}")


def check_out(args: argparse.Namespace) -> None:
    """--out may be a new or an existing folder, never an existing file, a dangling link, or a path under a file
    or in a place that cannot be written (/proc): checked before any model load."""
    from ..safefile import ensure_dir

    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise DapqError(f"--out {out} is an existing file: pass a folder (new, or a run to resume).")
    if out:
        ensure_dir(out, "--out")


def typed_params(name: str, raw: dict[str, str]) -> dict[str, Any]:
    """{field: value text} of method `name` -> values typed by the method's fields (`parse_param`)."""
    from ..methods import list_methods
    from ..methods.base import get_method, parse_param

    methods = list_methods()
    if name not in methods:
        get_method(name)  # the registry's error, with the valid names
    return {key: parse_param(methods[name], key, value) for key, value in raw.items()}


def method_params(name: str, items: list[str], option: str = "--param") -> dict[str, Any]:
    """`key=value` items for method `name`, each value typed by the method's field."""
    return typed_params(name, split_params(items, option))


UNHASHED_EVERYWHERE = ("cache_dir", "ray", "workers", "gpus_per_worker", "threads_per_worker")
#: options added after their command's folders were in use: hashed only when given, so the folder of a command
#: that does not use them stays the one it always was
HASHED_WHEN_SET = ("bench_params",)


def run_dir(args: argparse.Namespace, prefix: str, exclude: tuple[str, ...]) -> Path:
    """`--out`, or runs/<prefix>-<hash of the options except `exclude`>: the same command reuses (resumes) its
    folder."""
    check_out(args)
    if getattr(args, "out", None):
        return Path(args.out)
    from ..runs import config_hash

    # where GGUF conversions are cached and how a sweep is scheduled do not change its rows
    skip = (*exclude, *UNHASHED_EVERYWHERE)
    config = {k: v for k, v in vars(args).items() if k not in skip and (v or k not in HASHED_WHEN_SET)}
    return Path("runs") / f"{prefix}-{config_hash(config)}"


def method_from_args(args: argparse.Namespace) -> Any:
    """The Method of --method, --param and --budget (`dapq generate`, `dapq chat`), checked before any model load."""
    from ..methods import get_method

    params = method_params(args.method, args.param)
    if args.budget is not None:
        if "budget" in params:
            raise DapqError("--param budget=... and --budget both set the budget: pass only --budget.")
        params["budget"] = parse_budget(args.budget)
    return get_method(args.method, **params)

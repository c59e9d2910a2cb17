"""Modules imported on first use. The method files reach torch through `dapq.lazy.torch`, so that registering the
methods (what `dapq list` and the CLI's checks need) does not import torch, which costs ~2 s of CPU:

    from ..lazy import torch                 # instead of `import torch`
    from ..lazy import torch_functional as F # instead of `import torch.nn.functional as F`

The first attribute access (`torch.zeros`, ...) imports the real module; later accesses go straight to it. Use it
only in modules whose top level does not touch torch (type annotations are fine under `from __future__ import
annotations`).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["LazyModule", "torch", "torch_functional"]


class LazyModule(types.ModuleType):
    """Stands for module `name` and imports it on first attribute access."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_module"] = None

    def _load(self) -> types.ModuleType:
        module = self.__dict__["_lazy_module"]
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_lazy_module"] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())

    def __repr__(self) -> str:
        loaded = self.__dict__["_lazy_module"] is not None
        return f"<lazy module {self.__name__!r}{'' if loaded else ' (not imported yet)'}>"


torch = LazyModule("torch")
torch_functional = LazyModule("torch.nn.functional")

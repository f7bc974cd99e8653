"""Import the real timm package beside a CPU torch that has no torchvision.

timm imports torchvision at package import time for its data pipeline (datasets,
transforms, a frozen batch norm); the models under test never call it. A meta-path
finder answers every ``torchvision.*`` import with a module whose attributes are inert
placeholder classes, so ``import timm`` succeeds and timm's own model code runs.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _Placeholder(name, (cls,), {})  # distinct per name (timm keys dicts by them)
        setattr(cls, name, sub)
        return sub

    def __call__(cls, *args, **kwargs):
        return cls

    def __or__(cls, other):
        return cls

    __ror__ = __or__


class _Inert(metaclass=_Placeholder):
    pass


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _Placeholder(name, (_Inert,), {})
        setattr(self, name, sub)
        return sub


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0"
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """timm, or None if it is not installed (a real torchvision is used when present)."""
    if importlib.util.find_spec("timm") is None:
        return None
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        import torchvision  # noqa: F401
        return importlib.import_module("timm")
    except Exception:  # noqa: BLE001  (absent, or the PyPI build that fails beside this torch)
        sys.modules.pop("torchvision", None)
    # The stub lives only while timm imports: later `torchvision` lookups (Lightning's
    # optional-dependency checks, say) must not find it.
    stub = _TorchvisionStub()
    sys.meta_path.insert(0, stub)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(stub)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

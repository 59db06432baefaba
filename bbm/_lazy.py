"""Packages whose public names are imported on first use.

``bbm``, ``bbm.data``, ``bbm.model`` and ``bbm.train`` export names from modules that import torch, while their
config dataclasses (``bbm.train.config`` and the modules it reads) do not: train.py checks a config before it
imports torch or DeepSpeed, so a mistake is reported at once. ``lazy_exports`` keeps ``from bbm.data import
PackedLoader`` working while ``import bbm.train.config`` loads no torch."""
import importlib
import sys
import types


def lazy_exports(package: str, homes: dict):
    """Makes each name of ``homes`` (name -> the module that defines it) an attribute of ``package`` that imports
    its module when first read. The names live on the package's class, so they win over the package's own
    attributes: ``bbm.attention`` stays the function after the import system binds the module ``bbm.attention``
    to that name (it does so when the module is first imported)."""

    def public(name: str, home: str):
        def get(module):
            return getattr(sys.modules.get(home) or importlib.import_module(home), name)

        def bind(module, value):  # only the import system's binding of a submodule of that name is accepted
            if not (isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}"):
                raise AttributeError(f"{package}.{name} is read-only")

        return property(get, bind)

    def listing(module):  # dir(package): its attributes and the public names not imported yet
        return sorted(set(module.__dict__) | set(homes))

    module = sys.modules[package]
    names = {name: public(name, home) for name, home in homes.items()}
    module.__class__ = type(f"{package}.package", (types.ModuleType,), {**names, "__dir__": listing})

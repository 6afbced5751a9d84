"""Registers any4 in transformers' quantizer registry (any4lib.hf) as soon as transformers loads that registry.

`import any4lib` calls install(): transformers (seconds to import) is not imported here. When its registry module is
already loaded, any4lib.hf registers now; otherwise a one-shot import hook registers it right after the registry
module executes, whatever the order in which the user imports the two packages.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

REGISTRY = "transformers.quantizers.auto"


def install() -> None:
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


def _register() -> None:
    try:
        importlib.import_module("any4lib.hf")
    except Exception as err:  # a transformers without the registry API must not break transformers itself
        logging.getLogger("any4lib").warning(
            "any4lib could not register its quantizer with transformers (%s: %s); from_pretrained will not read "
            "any4 folders, any4lib.load_quantized still does", type(err).__name__, err)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds the registry module with the other finders and runs _register after its loader executes it; leaves
    sys.meta_path once it has."""

    finding = False

    def find_spec(self, name, path, target=None):
        if name != REGISTRY or self.finding:
            return None
        self.finding = True  # the other finders' turn
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding = False
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_register(module):
            execute(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = execute_then_register
        return spec

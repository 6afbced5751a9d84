"""The compiled CPU k-means (`any4lib/csrc/kmeans_cpu.cpp`), built on first use and cached.

On a CPU, `kmeans_1d` runs this loop-per-row version of its algorithm: the tensor version's per-op overhead and
full-size temporaries cost more there than the arithmetic. It is JIT-built with `torch.utils.cpp_extension` (a C++
compiler and ninja) into $ANY4_CACHE (default ~/.cache/any4lib)/kmeans_cpu/<hash of source, flags, torch>.
$ANY4_KMEANS picks the backend: "auto" (default: native when it builds, else the tensor version with one warning),
"native" (a build failure is an error) or "torch" (always the tensor version).
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

from .paths import cache_root

SOURCE = Path(__file__).resolve().parent / "csrc" / "kmeans_cpu.cpp"
FLAGS = ["-O3", "-fopenmp"]  # OpenMP: torch's parallel_for spreads the rows over its threads
BACKENDS = ("auto", "native", "torch")

_lock = threading.Lock()
_module = None
_failed: str | None = None


def backend() -> str:
    choice = os.environ.get("ANY4_KMEANS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"ANY4_KMEANS={choice!r}: choose one of {', '.join(BACKENDS)}")
    return choice


def _build():
    import torch
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, torch.__version__)).encode()).hexdigest()[:16]
    build_dir = cache_root() / "kmeans_cpu" / digest
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        print(f"any4lib: building the CPU k-means into {build_dir} (once)", flush=True)
    return cpp_extension.load(
        name=f"any4_kmeans_cpu_{digest}",
        sources=[str(SOURCE)],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )


def kmeans_module():
    """The compiled module, or None when the backend is "torch" or (under "auto") it cannot be built."""
    global _module, _failed
    choice = backend()
    if choice == "torch":
        return None
    with _lock:
        if _module is None and _failed is None:
            try:
                _module = _build()
            except Exception as err:  # no compiler, no ninja, a broken toolchain: all mean "use the tensor version"
                _failed = f"{type(err).__name__}: {err}".splitlines()[0]
                if choice == "auto":
                    warnings.warn(
                        f"any4lib: the CPU k-means did not build ({_failed}); using the slower tensor version. "
                        "Install a C++ compiler and ninja (pip install ninja) for the fast one.",
                        stacklevel=3,
                    )
    if _module is None and choice == "native":
        raise RuntimeError(f"ANY4_KMEANS=native but the CPU k-means did not build: {_failed}")
    return _module

"""JIT build of tinygemm_src on first GPU use, cached by a hash of what went into it.

The cache lives in $ANY4_CACHE (default ~/.cache/any4lib)/tinygemm/<hash>; the hash covers the sources and headers,
the flags, torch's and CUDA's versions and the target architectures, so any change rebuilds and nothing stale loads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

from ..paths import cache_root

SOURCE_DIR = Path(__file__).resolve().parents[2] / "tinygemm_src"
CUDA_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
# Extra nvcc flags for tuning experiments (e.g. "-DTINYGEMM_UNROLL=2"); part of the cache key like the rest.
EXTRA_FLAGS_ENV = "ANY4_TINYGEMM_CUDA_FLAGS"
CXX_FLAGS = ["-O3"]

_lock = threading.Lock()
_loaded = False


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cu")) + sorted(SOURCE_DIR.glob("*.cpp"))


def headers() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.h")) + sorted(SOURCE_DIR.glob("*.cuh"))


def target_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else the current device's compute capability (e.g. "9.0")."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def build_key(arch_list: str) -> str:
    import torch

    digest = hashlib.sha256()
    for path in sources() + headers():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (cuda_flags(), CXX_FLAGS, torch.__version__, torch.version.cuda, arch_list):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def cuda_flags() -> list[str]:
    return CUDA_FLAGS + os.environ.get(EXTRA_FLAGS_ENV, "").split()


def check_toolchain() -> None:
    """Raise a RuntimeError saying what to install when the JIT build cannot run here."""
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise RuntimeError("tinygemm kernels need a CUDA device; on CPU, any4lib.kernels.linear uses the reference")
    if torch.version.cuda is None:
        raise RuntimeError(f"this torch ({torch.__version__}) was built without CUDA; install a CUDA build of torch")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("cannot find the CUDA toolkit (nvcc): install it and set CUDA_HOME to its folder")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("the tinygemm JIT build needs ninja: `pip install ninja`")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise RuntimeError("the tinygemm JIT build needs a host C++ compiler (c++ / g++) on PATH")


def load_kernels() -> None:
    """Build (once per source/toolchain hash) and load the CUDA op into torch.ops.any4lib. Idempotent."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        check_toolchain()
        from torch.utils import cpp_extension

        from . import ops  # noqa: F401  (the schema must exist before the implementation registers)

        arch_list = target_arch_list()
        key = build_key(arch_list)
        build_dir = cache_root() / "tinygemm" / key
        build_dir.mkdir(parents=True, exist_ok=True)
        name = f"any4lib_tinygemm_{key}"
        if not (build_dir / f"{name}.so").exists():
            print(f"any4lib: building tinygemm kernels for sm {arch_list} into {build_dir} (once, ~1 min)",
                  file=sys.stderr, flush=True)
        previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        try:
            cpp_extension.load(
                name=name,
                sources=[str(p) for p in sources()],
                extra_cflags=CXX_FLAGS,
                extra_cuda_cflags=cuda_flags(),
                extra_include_paths=[str(SOURCE_DIR)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        finally:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous
        _loaded = True

"""Builds and loads the C++/CUDA extension (``csrc/``) with ninja on first use.

The extension registers the operator library ``torch.ops.bayeskern_cpp``.  The CPU kernels are
compiled for the host (``-O3 -march=native``; override with ``BAYESKERN_CXXFLAGS``); the CUDA kernels
are added when ``torch.cuda.is_available()`` (or ``cuda=True``) and nvcc is found.  If the build fails,
``load()`` warns once and returns False, and bayeskern runs on its other backends.

``python -m bayeskern.ops.extension [--cuda]`` builds it and prints the registered ops (CI uses
``--cuda`` on a CPU machine as a compile-and-link check of the CUDA sources).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import warnings
from pathlib import Path

import torch

LIBRARY = "bayeskern_cpp"


def source_dir() -> Path:
    """The csrc/ folder: shipped as package data, or the repository's when run from a checkout."""
    packaged = Path(__file__).resolve().parents[1] / "csrc"
    if (packaged / "bayeskern.cpp").exists():
        return packaged
    return Path(__file__).resolve().parents[2] / "csrc"


def _sources(cuda: bool) -> list[str]:
    root = source_dir()
    files = [root / "bayeskern.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def _cuda_toolkit_found() -> bool:
    return bool(os.environ.get("CUDA_HOME") or shutil.which("nvcc"))


def build(cuda: bool = False, verbose: bool = False) -> None:
    """Compile (or reuse the cached build of) the extension and load it into this process."""
    from torch.utils import cpp_extension

    root = source_dir()
    cxxflags = os.environ.get("BAYESKERN_CXXFLAGS", "-O3 -march=native -fno-math-errno").split()
    cpp_extension.load(
        name="bayeskern_cpp_cuda" if cuda else "bayeskern_cpp_cpu",
        sources=_sources(cuda),
        extra_include_paths=[str(root)],
        extra_cflags=[*cxxflags, "-fopenmp"],
        extra_cuda_cflags=["-O3", f"-I{root}"],
        extra_ldflags=["-fopenmp"],
        with_cuda=cuda,
        is_python_module=False,
        verbose=verbose,
    )


@functools.cache
def load() -> bool:
    """Load the extension once per process; False (with one warning) if it cannot be built."""
    if os.environ.get("BAYESKERN_NO_EXTENSION") == "1":
        return False
    cuda = torch.cuda.is_available() and _cuda_toolkit_found()
    try:
        build(cuda=cuda)
    except Exception as error:  # compiler missing, toolkit mismatch, ...: fall back, say so once
        warnings.warn(
            f"bayeskern: the C++ extension could not be built ({type(error).__name__}: {error}); "
            "the 'cpp' backend is unavailable and the reference/triton backends are used instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def release_cached_memory() -> int:
    """Free the CPU memory the extension keeps for reuse (the fused draws' freed outputs, at most
    ``BAYESKERN_CPU_POOL_MB`` MiB, default 1024); returns the bytes freed (0 without the extension)."""
    if not load():
        return 0
    return int(getattr(torch.ops, LIBRARY).release_cached_blocks())


def registered_ops() -> list[str]:
    """The operators the loaded extension registered."""
    prefix = f"{LIBRARY}::"
    return sorted({name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="also compile and link the CUDA kernels")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    build(cuda=args.cuda, verbose=args.verbose)
    print(f"built {LIBRARY} (cuda={args.cuda}): {', '.join(registered_ops())}")


if __name__ == "__main__":
    main()

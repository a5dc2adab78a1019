"""Test-wide set-up. Runs before any test module, so before anything imports jax.

- 8 simulated CPU devices (`jax_stack.md` §5) and the CPU backend (JAX_PLATFORMS may be set by
  the caller, e.g. `JAX_PLATFORMS=cuda python -m pytest -m gpu`); on the CPU, XLA's backend at
  optimisation level 0 (faster compiles).
- A per-session persistent compilation cache (JAX_COMPILATION_CACHE_DIR) for repeated compiles.
- No network: HF_HUB_OFFLINE=1 makes an accidental hub lookup fail fast.
- absl flags marked as parsed (grain reads absl flags; entry points parse them in app.run).
- float32 matmuls at 'highest' precision, for deterministic comparisons with references.
- tests marked `gpu` / `tpu` are skipped unless JAX runs on that platform.
- an inert stand-in for torchvision where the installed one cannot work (see below).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O0 for the CPU tests: compilation is most of the suite's time, and the tests' arrays
# are small (tests/models + tests/parity: 188 s -> 131 s, same results; docs/benchmarks.md).
# GPU/TPU runs (`-m gpu`) keep the default, as users run.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if (os.environ["JAX_PLATFORMS"] == "cpu"
        and "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]):
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAG
# A compilation cache for this session: the training-loop tests compile the same train step
# in several runs (resume = a new run), so later runs load it instead of compiling again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="magnet_jax_xla_cache_")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist workers (pyproject addopts) inherit the controller's directory: one each.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------------------------
# torchvision stand-in.
#
# PyPI's only Linux torchvision wheels are CUDA builds. Installed next to the CPU build of torch
# (the test pin), `import torchvision` fails ("operator torchvision::nms does not exist"), and
# with it `import timm` (timm imports torchvision unconditionally) and
# `transformers.BertModel` (transformers imports torchvision whenever it is installed).
# Without torchvision, timm cannot be imported at all. The parity tests use neither library's
# torchvision-backed parts, so where torchvision is missing, or is a CUDA build next to a CPU
# torch, `torchvision` resolves to an inert module: any attribute exists, and calling or
# instantiating anything from it raises. The check reads package metadata only; it imports
# nothing, and it does nothing where torch is not installed.
# --------------------------------------------------------------------------------------------

_STUB_NOTE = (
    "inert torchvision stand-in from tests/conftest.py (the installed torchvision "
    "cannot run with this torch build)"
)


class _PlaceholderMeta(type):
    """Classes standing for any torchvision object: attributes exist, calls raise."""

    def __getattr__(cls, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        value = _placeholder(f"{cls.__qualname__}.{attr}")
        setattr(cls, attr, value)
        return value

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__qualname__}: {_STUB_NOTE}")


def _placeholder(qualname: str) -> type:
    return _PlaceholderMeta(
        qualname.rpartition(".")[2],
        (),
        {"__qualname__": qualname, "__module__": qualname.rpartition(".")[0]},
    )


class _StubModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name, _STUB_NOTE)
        self.__path__ = []
        self.__version__ = "0.0.0+stub"

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        value = _placeholder(f"{self.__name__}.{attr}")
        setattr(self, attr, value)
        return value


def _torchvision_unusable() -> bool:
    dists = importlib.metadata
    try:
        torch_dist = dists.distribution("torch")
    except dists.PackageNotFoundError:
        return False  # no torch: leave torchvision (if any) alone
    try:
        tv_dist = dists.distribution("torchvision")
    except dists.PackageNotFoundError:
        return True  # torch without torchvision: timm still needs the import to succeed
    tv_is_cuda_build = any("libcudart" in str(f) for f in (tv_dist.files or ()))
    torch_has_cuda = any("libtorch_cuda" in str(f) for f in (torch_dist.files or ()))
    return tv_is_cuda_build and not torch_has_cuda


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self):
        self._unusable: bool | None = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            if self._unusable is None:
                self._unusable = _torchvision_unusable()
            if not self._unusable:
                return None
        elif not (
            fullname.startswith("torchvision.")
            and isinstance(sys.modules.get("torchvision"), _StubModule)
        ):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _TorchvisionStandIn) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionStandIn())


# --------------------------------------------------------------------------------------------
# JAX and absl.
# --------------------------------------------------------------------------------------------

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    for platform in ("gpu", "tpu"):
        marked = [item for item in items if item.get_closest_marker(platform) is not None]
        if not marked:
            continue
        if jax.default_backend() != platform:
            skip = pytest.mark.skip(
                reason=f"needs JAX on {platform} (backend is {jax.default_backend()})"
            )
            for item in marked:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def vocab_path() -> str:
    """The bert-base-uncased vocabulary bundled in magnet_jax/assets."""
    from magnet_jax.data.tokenizer import DEFAULT_VOCAB

    return str(DEFAULT_VOCAB)

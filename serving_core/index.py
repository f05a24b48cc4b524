"""The FAISS side of a bundle at serving time: device choice (CPU/GPU), search parameters, loading index/index.faiss.

The stored index is always the CPU form; ``load_index(..., device="gpu")`` moves it to the GPU. FAISS id = item
table row = internal item id (row 0, padding, is a zero vector that retrieval always excludes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss

from serving_core.bundle import INDEX_FILE, BundleError, IndexInfo, Manifest

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
DEFAULT_EF_SEARCH = 128
_GPU: dict[str, Any] = {}  # one StandardGpuResources per process; GPU indexes must not outlive it


class DeviceError(ValueError):
    """The requested FAISS device is not available here."""


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' when this FAISS build sees a GPU, else 'cpu'; 'gpu' without one -> DeviceError."""
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        build = "GPU build" if hasattr(faiss, "StandardGpuResources") else "CPU-only build (faiss-cpu)"
        raise DeviceError(
            f"device 'gpu' requested but FAISS {faiss.__version__} ({build}) sees {faiss.get_num_gpus()} GPUs; "
            "install faiss-gpu on a CUDA machine or use --device cpu (or auto)"
        )
    return device


def to_device(index: faiss.Index, device: str) -> faiss.Index:
    """The CPU index itself for 'cpu'; a GPU copy for 'gpu' (DeviceError when FAISS has no GPU version of this
    index type, e.g. HNSW); 'auto' falls back to the CPU index in that case."""
    if resolve_device(device) == "cpu":
        return index
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        # FAISS would move only the inner index (a CPU wrapper around a GPU index): the search parameters, the
        # GPU checks and the catalogue's index copies see a CPU index type; not supported here
        if device == "auto":
            log.warning("a pre-transformed index (e.g. RR304,IVF…,SQ8) stays on the CPU")
            return index
        raise DeviceError(
            "a pre-transformed index (RR…, PCA…, OPQ…) is served on the CPU only: use --device cpu, or an index "
            "without a transform on GPUs (IVF…,Flat or IVF…,SQ8)"
        )
    if "res" not in _GPU:
        _GPU["res"] = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_GPU["res"], 0, index)
    except RuntimeError as exc:
        kind = type(faiss.downcast_index(index)).__name__
        if device == "auto":
            log.warning("%s has no FAISS GPU implementation; staying on CPU", kind)
            return index
        raise DeviceError(f"{kind} has no FAISS GPU implementation: {exc}") from None


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if type(index).__name__.startswith("Gpu") else index


def default_search_params(index: faiss.Index) -> dict[str, int]:
    """Search-time parameters for an index: efSearch for HNSW, nprobe for IVF (none for flat)."""
    idx = faiss.downcast_index(to_cpu(index))
    params: dict[str, int] = {}
    if isinstance(idx, faiss.IndexHNSW):
        params["efSearch"] = DEFAULT_EF_SEARCH
    ivf = faiss.try_extract_index_ivf(idx)  # None for non-IVF (no C++ exception: that crashed GPU builds)
    if ivf is not None:
        params["nprobe"] = int(min(ivf.nlist, max(8, ivf.nlist // 16)))
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            params["quantizer_efSearch"] = DEFAULT_EF_SEARCH
    return params


def apply_search_params(index: faiss.Index, params: Mapping[str, float]) -> None:
    """Set search parameters by name (ParameterSpace names: efSearch, nprobe, quantizer_efSearch, ...)."""
    space = faiss.GpuParameterSpace() if type(index).__name__.startswith("Gpu") else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as exc:
            raise ValueError(f"search parameter {name}={value} does not apply to this index: {exc}") from None


def load_index(
    root: str | Path, manifest: Manifest, device: str = "cpu", params: Mapping[str, float] | None = None
) -> tuple[faiss.Index, IndexInfo]:
    """Read index/index.faiss, check it against the manifest, apply the recorded (or given) search params, move it
    to ``device``. Checksums are the caller's start-up check (serving_core.bundle.read_bundle)."""
    root = Path(root)
    info = manifest.index
    if info is None or INDEX_FILE not in manifest.files or not (root / INDEX_FILE).is_file():
        raise BundleError(f"bundle {root} has no {INDEX_FILE} (run `missrec build-index --bundle {root}`)")
    index = faiss.read_index(str(root / INDEX_FILE))
    if index.ntotal != manifest.num_items or index.d != manifest.dims.hidden:
        raise BundleError(
            f"{INDEX_FILE}: {index.ntotal} x {index.d} vectors, manifest says {manifest.num_items} x "
            f"{manifest.dims.hidden}"
        )
    index = to_device(index, device)
    apply_search_params(index, dict(info.params) | dict(params or {}))
    return index, info


def is_ivf(index: faiss.Index) -> bool:
    """True when the (CPU or GPU) index is an inverted-file index (asked of the index, not of its factory string)."""
    return faiss.try_extract_index_ivf(faiss.downcast_index(to_cpu(index))) is not None

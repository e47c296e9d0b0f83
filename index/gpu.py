"""GPU placement of the item index (the policy is in index.ann's docstring): Flat and IVF inners
move to GPU 0 when one exists and the caller did not say no; everything else stays on CPU."""
from __future__ import annotations

import logging

import faiss

log = logging.getLogger(__name__)
_gpu_resources = None


def on_gpu(inner: faiss.Index) -> bool:
    """Whether this (downcast) index lives on a GPU."""
    return hasattr(faiss, "GpuIndex") and isinstance(inner, faiss.GpuIndex)


def to_gpu(index: faiss.Index, use_gpu: bool | None) -> faiss.Index:
    """Move a Flat/IVF index to GPU 0 when asked (or by default) and one exists; else return it."""
    if use_gpu is False:
        return index
    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "StandardGpuResources"):
        if use_gpu:
            log.warning("use_gpu=True but faiss sees no GPU; keeping the index on CPU")
        return index
    if not isinstance(faiss.downcast_index(index.index), (faiss.IndexFlat, faiss.IndexIVF)):
        return index
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)
    except RuntimeError as err:
        log.warning("could not move index to GPU (%s); keeping it on CPU", err)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """The index itself if on CPU, else a CPU copy."""
    return faiss.index_gpu_to_cpu(index) if on_gpu(faiss.downcast_index(index.index)) else index

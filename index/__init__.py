"""Torch-free serving index: bundle manifest, bundle I/O and FAISS build/search/add/remove."""
from index.ann import (add, build, compact, contains, get_search_params, live_ids, load, n_deleted,
                       ntotal, remove, save, search, set_search_params)
from index.bundle import (Bundle, BundleError, current_version, list_versions, load_bundle,
                          load_current, publish, sha256_file, write_bundle)
from index.manifest import Counts, EncoderSpec, FileEntry, Manifest

__all__ = [
    "Bundle", "BundleError", "Counts", "EncoderSpec", "FileEntry", "Manifest", "add", "build",
    "compact", "contains", "current_version", "get_search_params", "list_versions", "live_ids",
    "load", "load_bundle", "load_current", "n_deleted", "ntotal", "publish", "remove", "save",
    "search", "set_search_params", "sha256_file", "write_bundle",
]

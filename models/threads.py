"""CPU thread budget for model inference and registration, set by the node's workers (torch and SimpleITK are
imported only when asked)."""

from __future__ import annotations


def set_thread_count(threads: int) -> None:
    """Limit torch's intra-op threads and SimpleITK's filter threads; harmless when either is not installed."""
    try:
        import SimpleITK as sitk
    except ImportError:
        pass
    else:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(threads)
    try:
        import torch
    except ImportError:
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

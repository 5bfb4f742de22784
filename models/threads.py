"""CPU thread budget for model inference, set by the node's workers (torch is imported only when asked)."""

from __future__ import annotations


def set_thread_count(threads: int) -> None:
    """Limit torch's intra-op threads; harmless when torch is not installed or already limited."""
    try:
        import torch
    except ImportError:
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

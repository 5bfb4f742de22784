"""SAM2's video predictor, adapted to a slice stack in memory and to CPU. Imports ``sam2`` (the optional extra):
only :func:`models.sam2_engine.build_predictor` imports this module, when a sam2 engine is loaded.

Two differences from ``sam2.sam2_video_predictor.SAM2VideoPredictor`` (sam2 1.1.0), and nothing else:

- :meth:`Sam2VolumePredictor.init_volume_state` builds the inference state that ``init_state`` builds, from
  frames handed over in memory; ``init_state`` reads only a JPEG folder or an MP4 file.
- Memories are kept in the model's dtype. The package stores them in bfloat16 and relies on CUDA autocast to mix
  them with float32 features; on CPU, without autocast, a frame whose only memory is a conditioning frame (an
  object tracked before its first seed) fails with "mat1 and mat2 must have the same dtype".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor

__all__ = ["Sam2VolumePredictor"]


class Sam2VolumePredictor(SAM2VideoPredictor):
    """``SAM2VideoPredictor`` over frames in memory, with memories in the model's dtype."""

    def init_volume_state(self, frames: Sequence[torch.Tensor], height: int, width: int) -> dict[str, Any]:
        """The state ``init_state`` builds (same keys, checked by tests/test_sam2_engine.py), for ``frames``:
        ``frames[z]`` is a normalised (3, image_size, image_size) tensor; masks come back at ``height x width``."""
        device = self.device
        return {
            "images": frames, "num_frames": len(frames), "offload_video_to_cpu": False,
            "offload_state_to_cpu": False, "video_height": height, "video_width": width, "device": device,
            "storage_device": device, "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
            "cached_features": {}, "constants": {}, "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(),
            "obj_ids": [], "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
        }

    def _run_single_frame_inference(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], torch.Tensor]:
        out, masks = super()._run_single_frame_inference(*args, **kwargs)
        if out["maskmem_features"] is not None:
            out["maskmem_features"] = out["maskmem_features"].to(self._dtype())
        return out, masks

    def _run_memory_encoder(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        features, pos_enc = super()._run_memory_encoder(*args, **kwargs)
        return features.to(self._dtype()), pos_enc

    def _dtype(self) -> torch.dtype:
        return self.maskmem_tpos_enc.dtype

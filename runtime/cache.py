"""Portrait cache: an in-memory LRU with a byte budget, plus an optional on-disk safetensors store.

Key = portrait content (crop, mask, CLIP image, FiLM reference) + weights id + backend/dtype + seed. The
state's ReferenceNet banks are keyed by timestep inside the state, so one entry serves any step count.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megactor_rt.runtime.portrait import PortraitInputs, PortraitState

logger = logging.getLogger(__name__)


class PortraitCache:
    """LRU of ``PortraitState`` by key.

    Args:
        max_bytes: memory budget of the cached tensors (least recently used entries are evicted).
        disk_dir: optional folder; states are also written there and read back on a memory miss.
    """

    def __init__(self, max_bytes: int = 2 << 30, disk_dir: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._mem: OrderedDict[str, PortraitState] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._mem)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._mem.values())

    def get(self, key: str, device: torch.device | str = "cpu") -> PortraitState | None:
        state = self._mem.get(key)
        if state is None and self.disk_dir is not None:
            state = self._load(key, device)
            if state is not None:
                self._mem[key] = state
        if state is None:
            self.misses += 1
            return None
        self._mem.move_to_end(key)
        self.hits += 1
        return state

    def put(self, state: PortraitState) -> None:
        self._mem[state.key] = state
        self._mem.move_to_end(state.key)
        self.trim()

    def trim(self) -> None:
        """Evict least-recently-used entries until within budget (banks grow after ``put``)."""
        while len(self._mem) > 1 and self.nbytes > self.max_bytes:
            key, _ = self._mem.popitem(last=False)
            logger.debug("portrait cache: evicted %s", key[:12])

    def save(self, state: PortraitState) -> None:
        """Write a state (with the banks computed so far) to the disk store."""
        if self.disk_dir is None:
            return
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.tensors().items()}
        inp = state.inputs
        tensors.update({"in_image": inp.image, "in_background_mask": inp.background_mask,
                        "in_clip_image": inp.clip_image, "in_ada_reference": inp.ada_reference})
        final = self.disk_dir / f"{_file_key(state.key)}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"key": state.key, "banks": json.dumps(sorted(state.banks))})
        tmp.replace(final)

    def _load(self, key: str, device: torch.device | str) -> PortraitState | None:
        if self.disk_dir is None:
            return None
        path = self.disk_dir / f"{_file_key(key)}.safetensors"
        if not path.is_file():
            return None
        t = {k: v.to(device) for k, v in load_file(str(path)).items()}
        banks: dict[int, list[torch.Tensor]] = {}
        for name in sorted(k for k in t if k.startswith("bank_")):
            _, ts, _ = name.split("_")
            banks.setdefault(int(ts), []).append(t[name])
        inputs = PortraitInputs(t["in_image"].cpu(), t["in_background_mask"].cpu(), t["in_clip_image"].cpu(),
                                t["in_ada_reference"].cpu())
        return PortraitState(key=key, inputs=inputs, ref_latent=t["ref_latent"], cond=t["cond"],
                             tokens=t["tokens"], film_scale=t["film_scale"], film_shift=t["film_shift"],
                             ada_reference=t["ada_reference"], banks=banks)


def _file_key(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:32]

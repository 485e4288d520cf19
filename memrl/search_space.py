"""The search space: module groups enumerated from a loaded UNet, and masks over them.

Three granularities, all read off the model (never a hard-coded list):

* ``block``: conv_in, time embedding, each down block, the mid block, each up block, conv_out.
* ``transformer``: every ``attentions[j]`` (MemControl's space: 16 groups on SD 1.5).
* ``layer``: every resnet and every attention.

A mask is a 0/1 vector of length ``k``; it selects groups, each a list of module-name prefixes
that a PEFT method (:mod:`memrl.peft_methods`) consumes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from torch import nn

from memrl.registry import GRANULARITIES  # noqa: F401  (re-exported)
from memrl.utils import stable_hash

__all__ = ["SearchSpace", "enumerate_groups"]

_STAGE = {"conv_in": 0, "time_embedding": 1, "down_blocks": 2, "mid_block": 3, "up_blocks": 4, "conv_out": 5}
_TRANSFORMER = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+$")
_LAYER = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(attentions|resnets)\.\d+$")


def _order(name: str) -> tuple[int, ...]:
    head = name.split(".")[0]
    numbers = tuple(int(p) for p in name.split(".") if p.isdigit())
    kind = 1 if ".attentions." in name else 0  # resnet before the attention that follows it
    return (_STAGE.get(head, 9), *numbers[:1], *numbers[1:], kind)


def enumerate_groups(unet: nn.Module, granularity: str) -> dict[str, list[str]]:
    """Group name -> module-name prefixes, in the order data flows down then up the UNet."""
    names = [n for n, _ in unet.named_modules() if n]
    if granularity == "block":
        groups: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            if parts[0] in ("down_blocks", "up_blocks") and len(parts) == 2:
                groups[name] = [name]
            elif parts[0] in ("mid_block", "conv_in") and len(parts) == 1:
                groups[name] = [name]
        groups["time_embedding"] = [n for n in ("time_proj", "time_embedding") if n in names]
        groups["conv_out"] = [n for n in ("conv_norm_out", "conv_out") if n in names]
        ordered = sorted(groups, key=lambda g: (_STAGE[g.split(".")[0]], _order(g)))
        return {g: groups[g] for g in ordered}
    pattern = {"transformer": _TRANSFORMER, "layer": _LAYER}.get(granularity)
    if pattern is None:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    matched = sorted((n for n in names if pattern.match(n)), key=_order)
    return {n: [n] for n in matched}


class SearchSpace:
    """Module groups of one UNet at one granularity, for one PEFT method.

    Args:
        unet: the diffusers UNet whose modules are grouped.
        granularity: ``block``, ``transformer`` or ``layer``.
        method: the PEFT method applied inside selected groups (part of the signature).
    """

    def __init__(self, unet: nn.Module, granularity: str = "transformer", method: str = "full"):
        self.granularity = granularity
        self.method = method
        self.groups = enumerate_groups(unet, granularity)
        if not self.groups:
            raise ValueError(
                f"the UNet has no {granularity!r} groups (a UNet without cross-attention blocks "
                "has no transformer groups); use granularity 'block' or 'layer'"
            )
        self._shapes = sorted((n, tuple(p.shape)) for n, p in unet.named_parameters())
        self._group_params = {
            g: sum(p.numel() for prefix in prefixes for p in unet.get_submodule(prefix).parameters())
            for g, prefixes in self.groups.items()
        }
        self.total_params = sum(p.numel() for p in unet.parameters())

    @property
    def k(self) -> int:
        return len(self.groups)

    def __len__(self) -> int:
        return self.k

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    @property
    def signature(self) -> str:
        """Hash of the architecture (every parameter's name and shape), granularity, method and
        group names: the same on any machine and diffusers version that builds the same network."""
        return stable_hash([self._shapes, self.granularity, self.method, self.names])

    def validate(self, mask: Sequence[int] | np.ndarray) -> np.ndarray:
        """Check and return ``mask`` as an int8 array of 0s and 1s of length ``k``."""
        array = np.asarray(mask)
        if array.shape != (self.k,):
            raise ValueError(f"mask has shape {array.shape}; this search space needs ({self.k},)")
        if not ((array == 0) | (array == 1)).all():  # np.isin costs 10x this on 7 entries
            raise ValueError(f"mask values must be 0 or 1, got {array.tolist()}")
        return array.astype(np.int8)

    def selected(self, mask: Sequence[int] | np.ndarray) -> list[str]:
        """Names of the groups a mask unfreezes."""
        return [g for g, m in zip(self.names, self.validate(mask)) if m]

    def prefixes(self, mask: Sequence[int] | np.ndarray) -> list[str]:
        """Module-name prefixes of the selected groups."""
        return [p for g in self.selected(mask) for p in self.groups[g]]

    def group_fraction(self, mask: Sequence[int] | np.ndarray) -> float:
        """Share of the UNet's parameters inside the selected groups (before the PEFT method)."""
        return sum(self._group_params[g] for g in self.selected(mask)) / self.total_params

    def mask_from_groups(self, groups: Sequence[str]) -> np.ndarray:
        unknown = set(groups) - set(self.names)
        if unknown:
            raise ValueError(f"unknown groups {sorted(unknown)}; this space has {self.names}")
        return np.array([int(g in groups) for g in self.names], dtype=np.int8)

    def __repr__(self) -> str:
        return f"SearchSpace(k={self.k}, granularity={self.granularity!r}, method={self.method!r})"

"""Replica groups of an HLO collective -> logical device groups -> the mesh axes they span.

Replica groups come in three textual forms, all decoded into explicit groups of logical device
indices (= positions in ``mesh.devices.flat``): explicit ``{{0,1},{2,3}}``; iota
``[G,S]<=[dims]T(perm)`` (iota(prod dims) reshaped to dims, transposed by perm, reshaped to
[G, S]); and the newer ``mesh['axis_0'=a,...] {'axis_k',...}`` with an optional
``device_ids=([dims]T(perm))`` (the device iota, optionally permuted, reshaped to the listed axis
sizes; a group = the devices that differ only along the named axes). A group's mesh axes are the
jaxlm mesh axes whose coordinate varies inside it. An unknown form gives ``mesh_axes=["?"]``.

Example::

    from jaxlm.plan.replica_groups import decode_groups, group_axes
    groups = decode_groups("replica_groups=[2,2]<=[2,2]T(1,0)")     # [[0, 2], [1, 3]]
    group_axes(groups, {"data": 1, "fsdp": 2, "tensor": 2})          # (['fsdp'], 2)
"""

from __future__ import annotations

import math
import re

import numpy as np


def decode_groups(attrs: str) -> list[list[int]] | None:
    """Replica groups of a collective as lists of logical device indices (None if unknown)."""
    m = re.search(r"replica_groups=(\{.*?\}\})", attrs)
    if m:
        return [[int(x) for x in g.split(",") if x.strip()]
                for g in re.findall(r"\{([\d,\s]*)\}", m.group(1)[1:-1])]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        ids = _iota(m.group(3), m.group(4))
        return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                  r"(?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        n = math.prod(sizes)
        ids = _iota(m.group(2), m.group(3)) if m.group(2) else np.arange(n)
        grid = ids.reshape(sizes)
        group_axes = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
        if any(":" in a for a in m.group(4).split(",")):  # sub-axis syntax: not decoded
            return None
        rest = [i for i in range(len(sizes)) if i not in group_axes]
        grid = np.transpose(grid, rest + group_axes)
        size = math.prod(sizes[i] for i in group_axes)
        return grid.reshape(-1, size).tolist()
    if re.search(r"replica_groups=\{\}", attrs):
        return []  # all devices in one group
    return None


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    if perm:
        ids = np.transpose(ids, [int(p) for p in perm.split(",")])
    return ids.reshape(-1)


def group_axes(groups, mesh_shape: dict) -> tuple[list[str], int]:
    """(mesh axes varying inside the first group, group size) for logical device groups."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    n = math.prod(sizes)
    if groups == []:
        groups = [list(range(n))]
    if not groups or not groups[0]:
        return ["?"], 0
    coords = np.array(np.unravel_index(np.asarray(groups[0]), sizes)).T  # [group, n_axes]
    varying = [names[i] for i in range(len(names)) if len(set(coords[:, i])) > 1]
    return varying, len(groups[0])


def permute_axes(attrs: str, mesh_shape: dict) -> tuple[list[str], int]:
    pairs = re.findall(r"\{(\d+),(\d+)\}", attrs.split("source_target_pairs=", 1)[-1])
    if not pairs:
        return ["?"], 0
    sizes = list(mesh_shape.values())
    varying = set()
    for a, b in pairs:
        ca, cb = np.unravel_index(int(a), sizes), np.unravel_index(int(b), sizes)
        varying |= {i for i in range(len(sizes)) if ca[i] != cb[i]}
    return [list(mesh_shape)[i] for i in sorted(varying)], 2

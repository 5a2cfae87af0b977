"""Build a SentencePiece `precompiled_charsmap` (a darts-clone double-array trie + replacement strings).

Hugging Face `tokenizers` reads this format in its `Precompiled` normaliser; writing one lets a per-codepoint
normalisation table travel inside a standard `tokenizer.json`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

_HAS_LEAF = 1 << 8
_IS_VALUE = 1 << 31
_MAX_OFFSET = 1 << 21  # offsets below this are stored directly (no 'extension' bit needed)


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.value: int | None = None


def _double_array(keys: Mapping[bytes, int]) -> list[int]:
    """Lay a byte trie out as darts-clone units: child `c` of a node with base B sits at B ^ c."""
    root = _Node()
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.children.setdefault(byte, _Node())
        node.value = value

    units = [0] * 1024
    used = bytearray(1024)
    used[0] = 1  # the root unit
    used_bases: set[int] = set()
    first_free = 1

    def grow(upto: int) -> None:
        if upto >= len(units):
            extra = max(upto + 1 - len(units), len(units))
            units.extend([0] * extra)
            used.extend(bytes(extra))

    def place(labels: list[int]) -> int:
        nonlocal first_free
        while first_free < len(used) and used[first_free]:
            first_free += 1
        pos = first_free
        while True:
            grow(pos + 256)
            if not used[pos]:
                base = pos ^ labels[0]
                if base not in used_bases and all(not used[base ^ label] for label in labels):
                    return base
            pos += 1

    # Breadth-first: (position of the node's own unit, node).
    queue: list[tuple[int, _Node]] = [(0, root)]
    while queue:
        position, node = queue.pop(0)
        labels = sorted(node.children)
        if node.value is not None:
            labels = [0, *labels]
        if not labels:
            continue
        base = place(labels)
        used_bases.add(base)
        offset = position ^ base
        if offset >= _MAX_OFFSET:
            raise ValueError("charsmap too large for the simple double-array layout")
        units[position] |= offset << 10
        for label in labels:
            used[base ^ label] = 1
        if node.value is not None:
            units[base] = _IS_VALUE | node.value
        for label in labels:
            if label == 0:
                continue
            child = node.children[label]
            child_pos = base ^ label
            units[child_pos] = label | (_HAS_LEAF if child.value is not None else 0)
            queue.append((child_pos, child))
    size = max(i for i, flag in enumerate(used) if flag) + 1
    return units[:size]


def build_precompiled_charsmap(table: Mapping[int, str]) -> bytes:
    """Encode `{codepoint: replacement}` as SentencePiece's precompiled charsmap.

    Args:
        table: each codepoint that normalisation changes, and what it becomes ("" deletes it).

    Returns:
        The binary blob `[u32 trie bytes][u32 units...][replacements, each NUL-terminated]`.
    """
    blob = bytearray()
    keys: dict[bytes, int] = {}
    seen: dict[str, int] = {}
    for codepoint in sorted(table):
        replacement = table[codepoint]
        if replacement not in seen:
            seen[replacement] = len(blob)
            blob += replacement.encode("utf-8") + b"\0"
        keys[chr(codepoint).encode("utf-8")] = seen[replacement]
    units = _double_array(keys)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(blob)

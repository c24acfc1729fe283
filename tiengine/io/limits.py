"""Limits on untrusted input, shared by the readers of pickles, safetensors, images and JSON.

Every reader checks sizes the file declares before it allocates, and refuses nesting deeper than a
limit before anything recursive (hashing, JSON decoding, walking a loaded object) can overflow the
stack. The defaults below come from what real files need; each reader takes them as keyword options
(README, "Threat model and limits").

- MAX_NESTING_DEPTH: containers inside containers. Real files nest a few levels (an A1111 embedding
  dict: 3; a Lightning checkpoint: 5; a safetensors header: 3; an image's embedding JSON: 4); Python's
  own recursion limit is 1,000 frames and hashing a tuple nested ~100,000 deep crashes the process.
"""

from __future__ import annotations

import re

import numpy as np

MAX_NESTING_DEPTH = 100

# A JSON string, quotes and escapes included ("unrolled loop" form: fast on long strings).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPENERS, _CLOSERS = b"[{", b"]}"
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(_OPENERS + _CLOSERS)))
_SCAN_CHUNK = 1 << 20  # brackets per numpy step, bounds the scan's scratch memory


def json_nesting_depth(raw: bytes | str, limit: int) -> int:
    """Deepest bracket nesting of a JSON text, counted without decoding it (strings skipped).

    Stops early: returns a value above `limit` as soon as one is seen. Cost is linear in the text
    (regular expressions and numpy, no Python loop per character) and scratch memory stays bounded.
    Malformed text (unbalanced brackets) is left to the JSON decoder to report.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if data.count(b"[") + data.count(b"{") <= limit:  # cheap exact bound for ordinary files
        return min(limit, data.count(b"[") + data.count(b"{"))
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth, deepest = 0, 0
    for start in range(0, len(brackets), _SCAN_CHUNK):
        chunk = np.frombuffer(brackets, dtype=np.uint8, count=min(_SCAN_CHUNK, len(brackets) - start),
                              offset=start)  # (n,)
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int64)  # (n,)
        running = depth + np.cumsum(steps)  # (n,) depth after each bracket
        deepest = max(deepest, int(running.max()))
        if deepest > limit:
            return deepest
        depth = int(running[-1])
    return deepest

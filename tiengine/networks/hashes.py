"""The hash AUTOMATIC1111 gives an extra-network file (infotext `Lora hashes: "name: <first 12 hex>"`).

A1111 (`extensions-builtin/Lora/network.py`, `NetworkOnDisk`) hashes a `.safetensors` file with the
"addnet" hash of `modules/hashes.py` (`addnet_hash_safetensors`, itself kohya-ss sd-scripts'
`train_util.addnet_hash_safetensors`): sha256 of every byte after the 8-byte little-endian header length
and the JSON header it announces, so that editing the metadata leaves the hash unchanged. Any other file
(`.pt`, `.ckpt`) is hashed whole with sha256. A1111 chooses by the file's extension, and so does this
module. The file is streamed in 1 MiB blocks.

A1111 shows a hash stored in the file's own metadata (`sshs_model_hash`, written by sd-scripts) in place
of computing one when the key is present; `lora_file_hash` always computes (a stored value can be stale),
and `tiengine.networks.lora.describe_lora` reports both.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tiengine.errors import NetworkError

BLOCK_BYTES = 1 << 20  # A1111 and sd-scripts read 1 MiB at a time
SHORT_HASH_LENGTH = 12  # A1111's `NetworkOnDisk.shorthash`: the first 12 hex digits
HEADER_LENGTH_BYTES = 8  # safetensors: little-endian u64 length of the JSON header


def lora_file_hash(path: str | os.PathLike[str]) -> str:
    """Full sha256 hex digest of `path` as A1111 computes a Lora's hash (see the module docstring)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            if path.suffix.lower() == ".safetensors":
                header_length = int.from_bytes(file.read(HEADER_LENGTH_BYTES), "little")
                file.seek(HEADER_LENGTH_BYTES + header_length)  # past the end: the digest of no bytes, as A1111
            for block in iter(lambda: file.read(BLOCK_BYTES), b""):
                digest.update(block)
    except OSError as error:
        raise NetworkError(f"{path}: cannot read the file to hash it ({error.strerror or error})") from None
    return digest.hexdigest()


def short_hash(full_hash: str) -> str:
    """The 12-digit form A1111 writes in infotext."""
    return full_hash[:SHORT_HASH_LENGTH]

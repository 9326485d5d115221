"""Is an uploaded file a safetensors file? Read only its header, in pure Python (the web process imports
no torch): 8 bytes of little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, then the data. A pickle (what `torch.save` writes, inside a zip) is refused by name: loading
one can run code.
"""
from __future__ import annotations

import json
import math
from typing import BinaryIO

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class NotSafetensors(ValueError):
    """Why a file is not a usable safetensors file, in one sentence."""


def check(handle: BinaryIO, size: int) -> int:
    """The number of tensors in a safetensors file of `size` bytes; NotSafetensors says what is wrong."""
    head = handle.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise NotSafetensors("this looks like a PyTorch/pickle file (torch.save); only safetensors is accepted, "
                             "because loading a pickle can run code: save it with safetensors.torch.save_file")
    if len(head) < 8:
        raise NotSafetensors(f"{size} bytes is too short for a safetensors file")
    length = int.from_bytes(head, "little")
    if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
        raise NotSafetensors(f"not a safetensors file: its first 8 bytes give a header of {length} bytes, "
                             f"and the file has {size}")
    try:
        header = json.loads(handle.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NotSafetensors("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise NotSafetensors("not a safetensors file: its header is not a JSON object")
    data = size - 8 - length
    count = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (dtype in ITEMSIZE and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data
                  and end - start == math.prod(shape) * ITEMSIZE[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise NotSafetensors(f"tensor {name[:100]!r} has a malformed entry in the header (dtype, shape and "
                                 "byte range must agree, within the file)")
        count += 1
    if count == 0:
        raise NotSafetensors("the file holds no tensors")
    return count

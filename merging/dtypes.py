"""Tensor dtypes by their safetensors names ("F32", "BF16", ...), the one vocabulary every engine shares.

Plans, headers and the writer speak these names so that deciding and writing a merge needs
neither torch nor numpy; each array backend maps them to its own dtype objects.
"""

from __future__ import annotations

ITEM_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
READABLE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
"""The `--dtype` choices: what merged float tensors are saved as."""


def widest_float(names: list[str]) -> str:
    """The float dtype that holds every value of every one of `names` (float16 and bfloat16 hold
    each other's values only in float32): a merge of an fp16 base (OpenAI's release) with an fp32
    fine-tune is saved as fp32, not rounded to the base's fp16."""
    kinds = set(names)
    if "F64" in kinds:
        return "F64"
    if "F32" in kinds or {"F16", "BF16"} <= kinds:
        return "F32"
    return names[0]

"""The cache's on-disk format: Arrow schema of a shard, vector encodings, file metadata.

A shard row is one caption: ``key``, one fixed-size-list column per vector name (float16 by
default; float32; or int8 with a per-vector float32 scale in ``<name>__scale``), the caption
texts it was made from, the caption token counts per column (``tokens__<column>``, before
truncation) and a ``truncated`` flag. Every file also carries the recipe and vector layout in
its key-value metadata so a lone shard explains itself.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
VECTOR_DTYPES = ("float16", "float32", "int8")
META_RECIPE = b"facetclip.recipe"
META_LAYOUT = b"facetclip.layout"
SCALE_SUFFIX = "__scale"
TOKENS_PREFIX = "tokens__"

_ARROW = {"float16": pa.float16(), "float32": pa.float32(), "int8": pa.int8()}


def shard_schema(
    vector_names: list[str], dim: int, dtype: str, text_columns: list[str], token_columns: list[str]
) -> pa.Schema:
    fields = [pa.field("key", pa.string(), nullable=False)]
    for c in text_columns:
        fields.append(pa.field(c, pa.string()))
    for name in vector_names:
        fields.append(pa.field(name, vector_type(dtype, dim), nullable=False))
        if dtype == "int8":
            fields.append(pa.field(name + SCALE_SUFFIX, pa.float32(), nullable=False))
    for c in token_columns:
        fields.append(pa.field(TOKENS_PREFIX + c, pa.int32(), nullable=False))
    fields.append(pa.field("truncated", pa.bool_(), nullable=False))
    return pa.schema(fields)


def vector_type(dtype: str, dim: int) -> pa.DataType:
    """A vector column's type: a fixed-size list of non-null values (no Parquet definition
    levels per value to decode)."""
    return pa.list_(pa.field("item", _ARROW[dtype], nullable=False), dim)


def encode_vectors(v: np.ndarray, dtype: str) -> dict[str, pa.Array]:
    """[N, D] float32 -> the column(s) storing them (``""`` = the vector column itself)."""
    n, d = v.shape
    if dtype == "int8":
        # Symmetric per-vector scale: q = round(v / s), s = max|v| / 127. Worst-case error per
        # component is s / 2; for unit vectors in high dimension that is ~1e-3 relative.
        scale = np.abs(v).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(v / scale[:, None]), -127, 127).astype(np.int8)
        return {
            "": pa.FixedSizeListArray.from_arrays(
                pa.array(q.reshape(-1)), type=vector_type("int8", d)
            ),
            SCALE_SUFFIX: pa.array(scale.astype(np.float32)),
        }
    flat = v.astype(np.float16 if dtype == "float16" else np.float32).reshape(-1)
    return {"": pa.FixedSizeListArray.from_arrays(pa.array(flat), type=vector_type(dtype, d))}


def decode_vectors(table: pa.Table, name: str, dtype: str) -> np.ndarray:
    """The column(s) of vector ``name`` -> [N, D] float32."""
    col = table.column(name)
    d = col.type.list_size
    out = np.empty((table.num_rows, d), np.float32)
    row = 0
    for chunk in col.chunks:
        # The values buffer of a non-null fixed-size list is the [rows x D] matrix itself:
        # view it without a copy, convert once into the output.
        values = chunk.values.to_numpy(zero_copy_only=False)
        n = len(chunk)
        values = (
            values[chunk.offset * d : (chunk.offset + n) * d] if len(values) != n * d else values
        )
        out[row : row + n] = values.reshape(n, d)
        row += n
    if dtype == "int8":
        out *= table.column(name + SCALE_SUFFIX).to_numpy()[:, None]
    return out


def layout_metadata(vector_names: list[str], dim: int, dtype: str, text_columns: list[str]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "vector_names": list(vector_names),
        "dim": int(dim),
        "dtype": dtype,
        "text_columns": list(text_columns),
    }

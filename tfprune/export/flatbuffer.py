"""Reading a TFLite flatbuffer: sizes, constant tensors (sparse and quantized) and metadata.

`tflite_size` and `tflite_weights` let tests check that a sparsity pattern or
a quantization survived conversion; `_add_metadata` and `_read_metadata`
store and read tfprune's own entries (the Keras input order).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

_INPUT_NAMES_METADATA = "tfprune_input_names"
"""Flatbuffer metadata entry holding the Keras input order (a JSON list of input names)."""


def _load(model) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            return f.read()
    raise TypeError(
        f"`model` must be the .tflite bytes or a path to a .tflite file, "
        f"got {type(model).__name__}."
    )


def _add_metadata(blob: bytes, name: str, data: bytes) -> bytes:
    """The flatbuffer with one more (or a replaced) metadata entry ``name`` holding ``data``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != name.encode()] + [entry]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _read_metadata(blob: bytes, name: str):
    """The bytes of metadata entry ``name`` of the flatbuffer, or None."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(blob, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() is not None and entry.Name().decode() == name:
            buffer = root.Buffers(entry.Buffer())
            return buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
    return None


def _flex_ops(blob: bytes) -> list[str]:
    """The Select TF (Flex) ops of the flatbuffer (custom op codes named ``Flex...``)."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(blob, 0)
    names = []
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i).CustomCode()
        if code is not None and code.startswith(b"Flex") and code.decode() not in names:
            names.append(code.decode())
    return names


def tflite_size(model) -> dict:
    """Sizes of a TFLite flatbuffer: raw and gzip-compressed (what a download costs).

    Args:
        model: The flatbuffer bytes or a path to a ``.tflite`` file.

    Returns:
        ``{"bytes": raw size, "gzip_bytes": gzip-compressed size}``.

    Example:
        >>> tflite_size(export_tflite(model))  # doctest: +SKIP
        {'bytes': 39336, 'gzip_bytes': 35571}
    """
    blob = _load(model)
    return {"bytes": len(blob), "gzip_bytes": len(gzip.compress(blob, compresslevel=9))}


class QuantizedArray(np.ndarray):
    """The raw integer values of a quantized weight tensor, with its quantization parameters.

    Attributes:
        scale: Per-tensor (shape ``(1,)``) or per-channel scales.
        zero_point: Zero points, same shape as ``scale``.
        axis: The quantized (channel) dimension for per-channel scales.
    """

    def __new__(cls, values, scale, zero_point, axis):
        obj = np.asarray(values).view(cls)
        obj.scale = np.asarray(scale, np.float32)
        obj.zero_point = np.asarray(zero_point, np.int64)
        obj.axis = int(axis)
        return obj

    def __array_finalize__(self, obj):
        self.scale = getattr(obj, "scale", None)
        self.zero_point = getattr(obj, "zero_point", None)
        self.axis = getattr(obj, "axis", 0)

    def dequantize(self) -> np.ndarray:
        """The float values: ``(q - zero_point) * scale`` (per channel along ``axis``)."""
        shape = [1] * self.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        q = np.asarray(self, dtype=np.float32)
        zero_point = self.zero_point.astype(np.float32).reshape(shape)
        return (q - zero_point) * self.scale.reshape(shape)


_TENSOR_DTYPES = {
    "FLOAT32": np.float32,
    "FLOAT16": np.float16,
    "FLOAT64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}


def _index_vector(schema, kind, table):
    """Reads a SparseIndexVector union member as an int64 array."""
    classes = {
        schema.SparseIndexVector.Int32Vector: schema.Int32Vector,
        schema.SparseIndexVector.Uint16Vector: schema.Uint16Vector,
        schema.SparseIndexVector.Uint8Vector: schema.Uint8Vector,
    }
    vector = classes[kind]()
    vector.Init(table.Bytes, table.Pos)
    return vector.ValuesAsNumpy().astype(np.int64)


def _densify(schema, values, sparsity, shape):
    """Expands the compressed ``values`` of a sparse tensor to its dense ``shape``.

    The encoding (TFLite's ``SparsityParameters``): the dense shape, with each
    blocked dimension split into (blocks, block size), is traversed in
    ``traversal_order``; a DENSE level enumerates all its positions, a
    SPARSE_CSR level only those listed in ``array_indices`` between the
    parent's ``array_segments``. The stored values follow that traversal.
    """
    order = sparsity.TraversalOrderAsNumpy().astype(int)
    block_map = sparsity.BlockMapAsNumpy().astype(int) if sparsity.BlockMapLength() else []
    levels = len(order)
    prev = np.zeros(1, dtype=np.int64)  # position of each node in its level's storage
    coords = np.zeros((1, levels), dtype=np.int64)  # coordinate per traversal level
    sizes = np.zeros(levels, dtype=np.int64)
    for level in range(levels):
        meta = sparsity.DimMetadata(level)
        if meta.Format() == schema.DimensionType.DENSE:
            size = meta.DenseSize()
            sizes[level] = size
            prev = (prev[:, None] * size + np.arange(size)).reshape(-1)
            coords = np.repeat(coords, size, axis=0)
            coords[:, level] = np.tile(np.arange(size), len(coords) // max(size, 1))
        else:
            segments = _index_vector(schema, meta.ArraySegmentsType(), meta.ArraySegments())
            indices = _index_vector(schema, meta.ArrayIndicesType(), meta.ArrayIndices())
            counts = segments[prev + 1] - segments[prev]
            starts = np.repeat(segments[prev], counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            prev = starts + offsets
            coords = np.repeat(coords, counts, axis=0)
            coords[:, level] = indices[prev]
    if len(prev) != values.size:
        raise ValueError(
            f"tflite_weights: sparse tensor holds {values.size} values, its index "
            f"describes {len(prev)}."
        )
    expanded = np.zeros((len(prev), levels), dtype=np.int64)
    expanded[:, order] = coords
    expanded_sizes = np.zeros(levels, dtype=np.int64)
    expanded_sizes[order] = sizes
    dense_index = expanded[:, : len(shape)].copy()
    for j, dim in enumerate(block_map):
        block_size = expanded_sizes[len(shape) + j]
        dense_index[:, dim] = dense_index[:, dim] * block_size + expanded[:, len(shape) + j]
    dense = np.zeros(shape, dtype=values.dtype)
    dense[tuple(dense_index.T)] = values.reshape(-1)
    return dense


def tflite_weights(model, *, dequantize=False) -> dict:
    """Reads the constant tensors (weights, biases, constants) back from a TFLite flatbuffer.

    Sparse-encoded tensors are expanded to their dense shape, so zeros show as
    zeros whatever the encoding. Quantized tensors come back as their raw
    integer values (a `QuantizedArray` with ``scale``, ``zero_point`` and
    ``axis``), or as floats with ``dequantize=True``. float16 weights keep
    their dtype.

    Args:
        model: The flatbuffer bytes or a path to a ``.tflite`` file.
        dequantize: Return quantized tensors as float32 values.

    Returns:
        ``{tensor name: numpy array}`` for every tensor of the main subgraph
        whose data is stored in the flatbuffer; names are those the converter
        gave (e.g. ``"functional/dense/MatMul"``). A Dense kernel appears in
        TFLite's ``[units, fan_in]`` layout (transposed).

    Example:
        >>> w = tflite_weights(export_tflite(model, quantize="int8", representative_data=x))
        ... # doctest: +SKIP
        >>> kernel = w["functional/dense/MatMul"]  # doctest: +SKIP
        >>> kernel.dtype, kernel.scale.shape  # doctest: +SKIP
        (dtype('int8'), (16,))
    """
    from ai_edge_litert import schema_py_generated as schema

    blob = _load(model)
    root = schema.Model.GetRootAs(blob, 0)
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    graph = root.Subgraphs(0)
    out = {}
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        buffer = root.Buffers(tensor.Buffer())
        if buffer is None:
            continue
        if buffer.Offset() > 1:  # data stored after the flatbuffer (models over 2 GB)
            raw = blob[buffer.Offset() : buffer.Offset() + buffer.Size()]
        elif buffer.DataLength():
            raw = buffer.DataAsNumpy().tobytes()
        else:
            continue
        dtype = _TENSOR_DTYPES.get(type_names.get(tensor.Type()))
        if dtype is None:
            continue
        values = np.frombuffer(raw, dtype=dtype)
        shape = tuple(int(s) for s in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        sparsity = tensor.Sparsity()
        if sparsity is not None:
            values = _densify(schema, values, sparsity, shape)
        else:
            values = values.reshape(shape)
        quant = tensor.Quantization()
        if quant is not None and quant.ScaleLength() and np.issubdtype(dtype, np.integer):
            q = QuantizedArray(
                values,
                quant.ScaleAsNumpy(),
                quant.ZeroPointAsNumpy() if quant.ZeroPointLength() else np.zeros(1),
                quant.QuantizedDimension(),
            )
            values = q.dequantize() if dequantize else q
        name = tensor.Name().decode()
        out[name] = values if isinstance(values, QuantizedArray) else np.array(values)
    return out

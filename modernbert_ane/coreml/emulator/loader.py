"""Reading a saved package: Model.proto, tensor types and constants (through coremltools' blob reader)."""
import json
import os

import numpy as np

from .errors import NotAnMLPackageError, UnsupportedOpError
from .numerics import F32, f16

def import_ct():
    from modernbert_ane.coreml.quiet_coremltools import import_coremltools

    return import_coremltools()


def read_package(package_path, spec=None):
    """Return (spec, weights_dir) for an .mlpackage, or raise NotAnMLPackageError. `spec`: the package's spec
    when the caller has parsed it already (it is not parsed again)."""
    p = os.fspath(package_path)
    model_file = spec_file(p)
    if spec is None:
        import_ct()
        from coremltools.proto import Model_pb2

        spec = Model_pb2.Model()
        try:
            with open(model_file, "rb") as f:
                spec.ParseFromString(f.read())
        except Exception as e:  # protobuf DecodeError and friends
            raise NotAnMLPackageError(f"unreadable model specification in {p}: {type(e).__name__}") from None
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise NotAnMLPackageError(f"not an ML Program package ({kind or 'empty'} model): {p}")
    return spec, os.path.join(os.path.dirname(model_file), "weights")


def manifest_items(p: str) -> tuple[str, list[str]]:
    """(the root model item's path, every item's path) from the package's Manifest.json, relative to its Data
    folder; the JSON or key errors of a damaged manifest are the caller's to word."""
    with open(os.path.join(p, "Manifest.json")) as f:
        manifest = json.load(f)
    items = {key: item["path"] for key, item in manifest["itemInfoEntries"].items()}
    return items[manifest["rootModelIdentifier"]], list(items.values())


def spec_file(p: str) -> str:
    """The model specification file of the .mlpackage at `p` (Manifest.json's root item, else the usual path)."""
    if not os.path.exists(p):
        raise NotAnMLPackageError(f"no such .mlpackage: {p}")
    if not os.path.isdir(p):
        raise NotAnMLPackageError(f"not an .mlpackage (not a directory): {p}")
    manifest = os.path.join(p, "Manifest.json")
    if not os.path.isfile(manifest):
        raise NotAnMLPackageError(f"not an .mlpackage (no Manifest.json): {p}")
    model_file = None
    try:
        model_file = os.path.join(p, "Data", manifest_items(p)[0])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        model_file = None
    if model_file is None or not os.path.isfile(model_file):
        model_file = os.path.join(p, "Data", "com.apple.CoreML", "model.mlmodel")
    if not os.path.isfile(model_file):
        raise NotAnMLPackageError(f"not an .mlpackage (no model specification file): {p}")
    return model_file


ARRAY_DTYPES = {
    "FLOAT16": np.float16, "FLOAT32": np.float32, "DOUBLE": np.float64, "INT32": np.int32, "INT8": np.int8,
}

# MIL proto DataType name -> (numpy storage dtype, bit width for sub-byte types or 0, signed)
MIL_DTYPES = {
    "BOOL": (np.dtype(bool), 0, False),
    "STRING": (None, 0, False),
    "FLOAT16": (np.dtype(np.float16), 0, True),
    "FLOAT32": (np.dtype(np.float32), 0, True),
    "FLOAT64": (np.dtype(np.float64), 0, True),
    "INT8": (np.dtype(np.int8), 0, True),
    "INT16": (np.dtype(np.int16), 0, True),
    "INT32": (np.dtype(np.int32), 0, True),
    "INT64": (np.dtype(np.int64), 0, True),
    "UINT8": (np.dtype(np.uint8), 0, False),
    "UINT16": (np.dtype(np.uint16), 0, False),
    "UINT32": (np.dtype(np.uint32), 0, False),
    "UINT64": (np.dtype(np.uint64), 0, False),
    "INT4": (np.dtype(np.int8), 4, True),
    "UINT1": (np.dtype(np.uint8), 1, False),
    "UINT2": (np.dtype(np.uint8), 2, False),
    "UINT3": (np.dtype(np.uint8), 3, False),
    "UINT4": (np.dtype(np.uint8), 4, False),
    "UINT6": (np.dtype(np.uint8), 6, False),
}
FLOAT_NAMES = frozenset({"FLOAT16", "FLOAT32", "FLOAT64"})

# Blob reader method per dtype (coremltools' native MIL weight-file reader)
_BLOB_READERS = {
    "FLOAT16": "read_fp16_data", "FLOAT32": "read_float_data", "INT32": "read_int32_data",
    "UINT32": "read_uint32_data", "INT16": "read_int16_data", "UINT16": "read_uint16_data",
    "INT8": "read_int8_data", "UINT8": "read_uint8_data", "INT4": "read_int4_data",
    "UINT1": "read_uint1_data", "UINT2": "read_uint2_data", "UINT3": "read_uint3_data",
    "UINT4": "read_uint4_data", "UINT6": "read_uint6_data",
}

# Parameters that are always a tuple of tensors (TupleInputType in the MIL op definitions).
TUPLE_PARAMS = frozenset({("concat", "values"), ("stack", "values"), ("einsum", "values"),
                           ("reshape_like", "ref_tensors")})


def _unpack_sub_byte(raw: bytes, nbits: int, signed: bool, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: count * nbits]
    vals = (bits.reshape(count, nbits).astype(np.int32) << np.arange(nbits, dtype=np.int32)).sum(axis=1)
    if signed:
        vals = np.where(vals >= (1 << (nbits - 1)), vals - (1 << nbits), vals)
        return vals.astype(np.int8)
    return vals.astype(np.uint8)


class ProtoReader:
    """Decodes MIL proto values (immediate and weight-file) into NumPy."""

    def __init__(self, weights_dir):
        from coremltools.proto import MIL_pb2

        self.weights_dir = weights_dir
        self._dtype_name = MIL_pb2.DataType.Name
        self._blob_readers = {}

    def tensor_type(self, value_type):
        """(dtype name, shape with None for unknown dims) of a ValueType, or (kind, None)."""
        which = value_type.WhichOneof("type")
        if which != "tensorType":
            return which, None
        tt = value_type.tensorType
        shape = tuple(
            d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions
        )
        return self._dtype_name(tt.dataType), shape

    def kind(self, value_type, where):
        """'f' for floats, a numpy dtype for ints/bool, None for strings."""
        name, _ = self.tensor_type(value_type)
        if name in FLOAT_NAMES:
            return "f"
        if name == "STRING":
            return None
        if name in MIL_DTYPES and MIL_DTYPES[name][1] == 0:
            return MIL_DTYPES[name][0]
        if name in MIL_DTYPES:  # sub-byte ints are held unpacked
            return MIL_DTYPES[name][0]
        raise UnsupportedOpError(f"{where}: value type {name} is not supported")

    def value(self, v, where):
        """A proto Value -> numpy array (float tensors rounded to float16, stored as float32),
        or a Python str for string scalars."""
        name, shape = self.tensor_type(v.type)
        if shape is None:
            raise UnsupportedOpError(f"{where}: {name} values are not supported")
        if name not in MIL_DTYPES:
            raise UnsupportedOpError(f"{where}: value type {name} is not supported")
        npdt, nbits, signed = MIL_DTYPES[name]
        if any(d is None for d in shape):
            raise UnsupportedOpError(f"{where}: constant with unknown shape")
        count = int(np.prod(shape)) if shape else 1
        which = v.WhichOneof("value")
        if which == "blobFileValue":
            fname = os.path.join(self.weights_dir, v.blobFileValue.fileName.split("/")[-1])
            reader = self._blob_readers.get(fname)
            if reader is None:
                from coremltools.libmilstoragepython import _BlobStorageReader

                reader = self._blob_readers[fname] = _BlobStorageReader(fname)
            if name not in _BLOB_READERS:
                raise UnsupportedOpError(f"{where}: weight-file values of type {name} are not supported")
            raw = np.asarray(getattr(reader, _BLOB_READERS[name])(v.blobFileValue.offset))
            arr = raw.view(np.float16) if name == "FLOAT16" else raw
            arr = arr.reshape(-1)[:count].reshape(shape)
        elif which == "immediateValue":
            iv = v.immediateValue
            if iv.WhichOneof("value") != "tensor":
                raise UnsupportedOpError(f"{where}: immediate {iv.WhichOneof('value')} values are not supported")
            tv = iv.tensor
            field = tv.WhichOneof("value")
            if field is None:
                vals = []
            else:
                vals = getattr(tv, field).values
            if name == "STRING":
                strs = [str(s) for s in vals]
                return strs[0] if not shape else np.array(strs).reshape(shape)
            if field == "bytes":
                raw = bytes(vals)
                if nbits:
                    arr = _unpack_sub_byte(raw, nbits, signed, count)
                else:
                    arr = np.frombuffer(raw, dtype=npdt)[:count].copy()
            else:
                arr = np.asarray(list(vals))
                if arr.size == 0:
                    arr = np.zeros((count,), npdt)
            arr = arr.astype(npdt).reshape(shape)
        else:
            raise UnsupportedOpError(f"{where}: value without data")
        if name == "FLOAT16":
            return arr.astype(F32)
        if name in FLOAT_NAMES:
            return f16(arr)
        return np.asarray(arr)

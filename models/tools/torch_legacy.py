"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format, without torch.

The format is a sequence of pickles: a magic number, a protocol version, system info, the
state dict itself (whose tensors refer to storages by persistent id), the list of storage
keys, and then each storage's raw bytes, prefixed by its element count as a little-endian
int64. Reading it by hand keeps the bundle tools free of torch and its CUDA libraries.
"""

import collections
import pickle
import struct

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}


class _StorageType:
    def __init__(self, name):
        if name not in _STORAGE_DTYPES:
            raise ValueError(f"unsupported storage type torch.{name}")
        self.dtype = _STORAGE_DTYPES[name]


class _TensorRef:
    def __init__(self, key, offset, shape, strides):
        self.key, self.offset, self.shape, self.strides = key, offset, shape, strides


def _rebuild_tensor_v2(storage, offset, shape, strides, *_ignored):
    return _TensorRef(storage, offset, tuple(shape), tuple(strides))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        kind, storage_type, key = pid[0], pid[1], pid[2]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id kind {kind!r}")
        return (key, storage_type.dtype)


def load_state_dict(path):
    """Return {name: np.ndarray} for every tensor of a legacy-format .pth file."""
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy torch file (zip-format files need torch)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info
        state = _Unpickler(f).load()
        keys = pickle.load(f)
        dtypes = {}
        for ref in state.values():
            if isinstance(ref, _TensorRef):
                dtypes[ref.key[0]] = ref.key[1]
        storages = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(dtypes.get(key, np.float32))
            storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
    out = collections.OrderedDict()
    for name, ref in state.items():
        storage = storages[ref.key[0]]
        itemsize = storage.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            storage[ref.offset:],
            shape=ref.shape,
            strides=tuple(s * itemsize for s in ref.strides),
        )
        out[name] = np.ascontiguousarray(arr)
    return out

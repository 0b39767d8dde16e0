"""Read Paddle's `.pdparams` pickles without running code: arrays and plain containers only.

`paddle.save(state_dict)` (paddle/framework/io.py `_pickle_save`, protocol 4 by default) pickles a dict of numpy
arrays; a live tensor inside another object pickles as `(tuple, ((name, array),))`; protocol 2/3 files split arrays
over 1 GiB into `<key>@@.<i>` slices listed under "UnpackBigParamInfor@@" (`io_utils._unpack_saved_dict`); every
file carries a "StructuredToParameterName@@" dict of names. Unpickling can call any importable function, so
`find_class` allows only numpy's array/dtype/scalar reconstructors and plain containers; anything else (os.system,
builtins.eval, which Paddle itself uses for raw DenseTensors) is refused before it is called. Object arrays are
refused too (their items would be unpickled as arbitrary objects).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np

try:  # numpy 2
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct, scalar

# (module, name) pairs a Paddle state dict needs. numpy 2 pickles from numpy._core, numpy 1 from numpy.core.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "tuple"): tuple,  # reduce_varbase: (tuple, ((name, array),)) rebuilds a plain tuple
}
NAMES_KEY = "StructuredToParameterName@@"
SLICES_KEY = "UnpackBigParamInfor@@"


class UnsafePickle(pickle.UnpicklingError):
    """The pickle asks for something other than arrays and containers."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        found = ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickle(f"{module}.{name}")
        return found

    def persistent_load(self, pid: object) -> object:  # torch-style external storages: never in Paddle files
        raise UnsafePickle("a persistent reference")


def load_pdparams(file: str | Path) -> dict[str, np.ndarray]:
    """{name: array} from a `.pdparams` file. Raises UnsafePickle for anything but arrays and containers,
    pickle.UnpicklingError / EOFError / ValueError for a damaged file, ValueError if it holds no state dict."""
    with open(file, "rb") as fh:
        obj = _Unpickler(fh).load()
    if not isinstance(obj, dict):
        raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
    obj = dict(obj)
    obj.pop(NAMES_KEY, None)
    for key, info in (obj.pop(SLICES_KEY, None) or {}).items():  # protocol 2/3: arrays over 1 GiB in slices
        parts = [obj.pop(s) for s in info["slices"]]
        obj[key] = np.concatenate([np.asarray(p).ravel() for p in parts]).reshape(info["OriginShape"])
    out = {}
    for key, value in obj.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]  # (paddle name, array)
        if not isinstance(value, np.ndarray) and not np.isscalar(value):
            continue  # other entries (Paddle's metadata) are not tensors
        value = np.asarray(value)
        if value.dtype == object:
            raise UnsafePickle(f"an object array ({key!r})")
        out[str(key)] = value
    return out

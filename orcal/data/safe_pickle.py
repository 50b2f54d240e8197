"""Reading pickles from strangers: only numpy arrays and plain Python data may be rebuilt."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

from ._io import MAX_FILE_BYTES

_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int",
                       "float", "complex", "bool", "slice", "range"})
_NUMPY = {
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},
    "numpy._core.numeric": {"_frombuffer"},
}


class UnsafePickleError(ValueError):
    """The pickle asks for something other than numpy arrays and plain Python data."""


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` whose ``find_class`` allows numpy arrays/dtypes and builtins only."""

    source = "<pickle>"

    def find_class(self, module: str, name: str):
        allowed = ((module == "builtins" and name in _BUILTINS)
                   or name in _NUMPY.get(module, ())
                   or (module == "numpy.dtypes" and name.endswith("DType"))
                   or (module == "collections" and name == "OrderedDict")
                   or (module == "_codecs" and name == "encode"))  # bytes in protocol-2 pickles
        if not allowed:
            raise UnsafePickleError(
                f"{self.source}: refusing to load {module}.{name} from the pickle: only numpy arrays and "
                "plain Python data (dict, list, str, numbers) are allowed in data files")
        return super().find_class(module, name)


def safe_loads(data: bytes, source: str = "<bytes>"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    unpickler.source = source
    try:
        return unpickler.load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as err:
        raise ValueError(f"cannot read {source}: not a valid pickle ({type(err).__name__}: {err})") from err


def safe_load(path: str | os.PathLike):
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler`; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a pickle file at {path}, found none")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than the {MAX_FILE_BYTES / 1024**3:.0f} GiB allowed for one file")
    return safe_loads(path.read_bytes(), str(path))

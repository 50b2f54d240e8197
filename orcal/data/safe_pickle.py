"""Reading pickles from strangers: only numpy arrays and plain Python data may be rebuilt, within bounds.

Three defences: ``find_class`` allows numpy arrays/dtypes and plain builtins only (no code runs); every call
the pickle makes (``REDUCE``, ``NEWOBJ``) is checked before it runs, so it cannot ask for a huge allocation
(``bytearray(10**11)``, ``list(range(10**12))``, an array of 10^12 elements); and the result is walked once
(memoised, so shared references cost nothing to walk) to bound its depth and its logical size, which memo
references can make exponentially larger than the file (a list of two references to a list of two
references to ... one mask).
"""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path

import numpy as np

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
#: Nesting depth of containers a data file may use.
MAX_DEPTH = 64
#: The least logical size (bytes of arrays and strings, 8 per container slot, shared references counted each
#: time) a pickle may unfold to; larger files may unfold to a few times their own size.
MIN_UNFOLDED_BYTES = 256 * 1024**2
UNFOLD_FACTOR = 4


class UnsafePickleError(ValueError):
    """The pickle asks for something other than numpy arrays and plain Python data, or for too much."""


def _elements(shape) -> int:
    if isinstance(shape, int | np.integer):
        return int(shape)
    try:
        return math.prod(int(s) for s in shape)
    except TypeError:
        return 0


class RestrictedUnpickler(pickle._Unpickler):
    """A pure-Python :class:`pickle.Unpickler` that allows numpy arrays/dtypes and builtins only, and checks
    the size of what each call it makes would allocate against ``budget`` bytes."""

    source = "<pickle>"
    budget = MIN_UNFOLDED_BYTES

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

    def _check_call(self, func, args) -> None:
        """Refuse a call whose result would exceed the budget: sized constructors, ranges, array shapes."""
        name = getattr(func, "__name__", "")
        size = 0
        if func in (bytes, bytearray) and args and isinstance(args[0], int):
            size = args[0]
        elif func in (list, tuple, set, frozenset, dict, bytes, bytearray) and args and isinstance(args[0], range):
            size = 8 * len(args[0])
        elif func is np.ndarray or name == "_reconstruct" or isinstance(func, type) and issubclass(func, np.ndarray):
            shape = args[1] if name == "_reconstruct" and len(args) > 1 else (args[0] if args else ())
            size = 8 * _elements(shape)
        if size > self.budget:
            raise UnsafePickleError(f"{self.source}: the pickle asks {name or func!r} for {size} bytes, over the "
                                    f"{self.budget} bytes allowed for this file")

    def load_reduce(self):
        args = self.stack[-1]
        self._check_call(self.stack[-2], args)
        super().load_reduce()

    def load_newobj(self):
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self):
        self._check_call(self.stack[-3], self.stack[-2])
        super().load_newobj_ex()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex


def _unfolded_size(obj, source: str, budget: int) -> int:
    """The logical size of ``obj`` (shared references counted each time), found by one memoised walk."""
    sizes: dict[int, int] = {}
    stack: list[tuple[object, int, bool]] = [(obj, 0, False)]
    on_path: set[int] = set()
    while stack:
        item, depth, done = stack.pop()
        key = id(item)
        if done:
            children = item.values() if isinstance(item, dict) else item
            total = 8 * len(item) + sum(sizes[id(c)] for c in children)
            if isinstance(item, dict):
                total += sum(sizes[id(k)] for k in item)
            sizes[key] = total
            on_path.discard(key)
            if total > budget:
                raise UnsafePickleError(f"{source}: the pickle unfolds to more than {budget} bytes (shared "
                                        "references counted each time): refusing it")
            continue
        if key in sizes:
            continue
        if isinstance(item, dict | list | tuple | set | frozenset):
            if key in on_path:
                raise UnsafePickleError(f"{source}: the pickle holds a container that contains itself")
            if depth >= MAX_DEPTH:
                raise UnsafePickleError(f"{source}: the pickle nests containers more than {MAX_DEPTH} deep")
            on_path.add(key)
            stack.append((item, depth, True))
            children = list(item.values()) + list(item) if isinstance(item, dict) else item
            stack.extend((c, depth + 1, False) for c in children)
        elif isinstance(item, np.ndarray):
            sizes[key] = item.nbytes if item.dtype != object else 8 * item.size
        elif isinstance(item, str | bytes | bytearray):
            sizes[key] = len(item)
        else:
            sizes[key] = 8
    return sizes[id(obj)]


def safe_loads(data: bytes, source: str = "<bytes>"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` and bound what it unfolds to."""
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    unpickler.source = source
    unpickler.budget = max(MIN_UNFOLDED_BYTES, UNFOLD_FACTOR * len(data))
    try:
        obj = unpickler.load()
    except UnsafePickleError:
        raise
    except MemoryError as err:
        raise UnsafePickleError(f"{source}: unpickling ran out of memory; refusing the file") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, KeyError,
            ValueError, RecursionError) as err:
        raise ValueError(f"cannot read {source}: not a valid pickle ({type(err).__name__}: {err})") from err
    _unfolded_size(obj, source, unpickler.budget)
    return obj


def safe_load(path: str | os.PathLike):
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler`; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a pickle file at {path}, found none")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than the {MAX_FILE_BYTES / 1024**3:.0f} GiB allowed for one file")
    return safe_loads(path.read_bytes(), str(path))

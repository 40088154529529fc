"""A pickle reader that never runs code from the file: only numpy arrays and plain containers.

Pickle is a program: every global it names (``os.system``, ``subprocess.Popen``,
``builtins.eval``, ...) is imported and may then be called. ``RestrictedUnpickler.find_class``
resolves a global only from the allowlist below and refuses every other one *before* it is
looked up, let alone called. dict / list / tuple / str / bytes / int / float / bool / None
and sets (protocol 4) are opcodes and need no global at all. The allowlist is what numpy
arrays, dtypes and scalars reduce to, under both numpy < 2 (``numpy.core``, which MMSA's files
were written with) and numpy >= 2 (``numpy._core``) names; an object-dtype array's elements are
pickled in the same stream, so they go through the same ``find_class``.

Allowed, and why (each resolves to an object fixed at import, never to a name looked up by
string, so no module is ever imported on a file's behalf):

- ``numpy.ndarray``: only as the first argument of ``_reconstruct`` (the sentinel
  ``_NDARRAY``; it cannot be called, so no ``ndarray(shape)`` of any size is built).
- ``numpy[._]core.multiarray._reconstruct``: every ndarray reduces to it (all protocols);
  called with an empty shape -- ``__setstate__`` gives the real one, checked against the data.
- ``numpy[._]core.numeric._frombuffer``: ndarrays at protocol 5.
- ``numpy.dtype``: the dtype of every array and scalar.
- ``numpy[._]core.multiarray.scalar``: numpy scalars (np.float64(1.5), ...).
- ``_codecs.encode``, with encoding 'latin1' only: bytes at protocols 0-2 (array data).
- ``builtins.bytes``, with no argument only: empty bytes at protocols 0-2.
- ``collections.OrderedDict``: a dict of splits or keys written from an OrderedDict.

Python 2 names (``__builtin__``, ``copy_reg``, ...) are mapped to Python 3's first, as pickle
itself does for protocols < 3.

Two things the C unpickler would let a file do, closed here:
- memory: ``LONG_BINPUT 4294967295`` makes ``_pickle`` grow its memo *array* to that index
  (32 GB zero-filled; 430M took 13 s and 3.4 GB). The pure-Python ``pickle._Unpickler`` keeps
  the memo in a dict, and reads everything else as the C one does. Array payloads are single
  opcodes read at C speed; each small object costs ~2 us more (a 124 MB file with 180k strings
  and numpy scalars: 0.34 s against 0.08 s).
- tampering: BUILD on a global sets attributes on it (``setattr(numpy's _frombuffer,
  '__defaults__', ...)`` would outlive the load). Every allowed callable is wrapped in a
  ``_Frozen`` that refuses attributes; np.dtype and OrderedDict are C types, already frozen.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import pickle
from pathlib import Path

import numpy as np

__all__ = ["RefusedGlobal", "RestrictedUnpickler", "load_file", "ALLOWED"]

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist (``name``: "module.name")."""

    def __init__(self, name: str, written: str):
        aka = f" (written as {written!r})" if written != name else ""
        super().__init__(f"refused global {name!r}{aka}: not a numpy array, dtype or plain "
                         "container, and a pickle naming it could run code; nothing was called")
        self.name = name


class _Frozen:
    """A callable that BUILD cannot alter (no __dict__, no __setstate__, setattr refused)."""

    __slots__ = ("_func", "_name")

    def __init__(self, func, name: str):
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args):
        return self._func(*args)

    def __setattr__(self, key, value):
        raise pickle.UnpicklingError(f"cannot set attribute {key!r} of {self._name}")

    def __repr__(self):
        return self._name


class _NdarraySentinel:
    """Stands for ``numpy.ndarray`` in a pickle; usable only as ``_reconstruct``'s subtype."""

    __slots__ = ()

    def __repr__(self):
        return "numpy.ndarray"

    def __setattr__(self, key, value):
        raise pickle.UnpicklingError(f"cannot set attribute {key!r} of numpy.ndarray")


_NDARRAY = _NdarraySentinel()


def _reconstruct(subtype, shape, dtype):
    # numpy pickles always pass shape (0,): the real shape arrives with the data in
    # __setstate__, which checks that they agree -- so the shape here is never allocated.
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError(f"_reconstruct of {subtype!r}: only numpy.ndarray allowed")
    return _multiarray._reconstruct(np.ndarray, (0,), dtype)


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # protocols 0-2 write bytes as _codecs.encode(str, 'latin1'); any other codec is refused
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode: only (str, 'latin1') allowed")
    return codecs.encode(text, "latin1")


def _empty_bytes(*args):
    # protocols 0-2 write b"" as bytes(); bytes(n) would allocate n bytes
    if args:
        raise pickle.UnpicklingError("builtins.bytes: only bytes() allowed")
    return b""


#: (module, name) -> the object find_class returns for it
ALLOWED = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _Frozen(_latin1_encode, "_codecs.encode"),
    ("builtins", "bytes"): _Frozen(_empty_bytes, "builtins.bytes"),
    ("collections", "OrderedDict"): collections.OrderedDict,
}
for _core in ("numpy.core", "numpy._core"):
    ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _Frozen(_reconstruct, "_reconstruct")
    ALLOWED[(f"{_core}.multiarray", "scalar")] = _Frozen(_multiarray.scalar, "scalar")
    ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _Frozen(_numeric._frombuffer, "_frombuffer")


class _Opcodes(dict):
    def __missing__(self, code):  # the pure-Python unpickler would say "KeyError: 185"
        raise pickle.UnpicklingError(f"invalid load key, {bytes([code])!r}")


class RestrictedUnpickler(pickle._Unpickler):  # pure Python: a dict memo (module docstring)
    """An unpickler resolving globals from ``ALLOWED`` only; any other raises RefusedGlobal
    before it is imported or called."""

    dispatch = _Opcodes(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        key = (module, name)
        # Python 2 names, mapped as pickle.Unpickler does for protocols < 3; mapped at every
        # protocol here, which only changes the name in the error (none maps onto ALLOWED)
        key = _compat_pickle.NAME_MAPPING.get(key, key)
        key = (_compat_pickle.IMPORT_MAPPING.get(key[0], key[0]), key[1])
        try:
            return ALLOWED[key]
        except (KeyError, TypeError):  # TypeError: a non-str name from a crafted pickle
            raise RefusedGlobal(f"{key[0]}.{key[1]}", f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_file(path: Path, label: str):
    """The object in the pickle at `path`, read with RestrictedUnpickler: first with Python 3's
    defaults, then with encoding='latin1' (pickles written by Python 2 numpy need it), under the
    same restriction.

    Raises ValueError "<label> <path>: ..." naming the refused global (at once; no retry), or
    why the file is not a readable pickle (truncated, empty, garbage, absurd sizes).
    """
    errors = []
    for kwargs in ({}, {"encoding": "latin1"}):
        try:
            with open(path, "rb") as f:
                return RestrictedUnpickler(f, **kwargs).load()
        except RefusedGlobal as exc:
            raise ValueError(f"{label} {path}: {exc}") from None
        except OSError as exc:
            raise ValueError(f"{label} {path}: cannot read it ({exc})") from None
        except Exception as exc:  # anything the bytes can provoke: EOF, bad opcode, MemoryError...
            errors.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    raise ValueError(f"{label} {path}: not a readable pickle ({'; '.join(errors)})")

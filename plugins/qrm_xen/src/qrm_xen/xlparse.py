"""Xen's own parser of xl config files, without a hypervisor.

``xl`` cannot check a file on a machine without Xen: even ``xl -N create``
(dry run) first opens the hypervisor and stops with "cannot init xl
context". The parser ``xl`` uses, however, is a library of its own:
``libxlutil`` (Debian's ``libxenmisc4.17``), whose ``xlu_cfg_readdata``
reads a file with xl's grammar and whose ``xlu_cfg_get_*`` functions read
settings back. :class:`XlParser` calls it through ctypes: qrm checks each
file it writes, and its tests hold qrm's files and Xen's shipped examples to
it. Where the library is missing, :func:`parser` returns None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field
from typing import Any

#: Sonames tried in order (Debian 12 ships 4.17).
LIBRARIES = ("libxlutil.so.4.17", "libxlutil.so")
PACKAGE = "libxenmisc4.17"


@dataclass
class Parsed:
    """What libxlutil made of a file: its return code, its report and the values asked for."""

    rc: int
    report: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.report.strip()


class XlParser:
    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self._libc = libc
        libc.open_memstream.restype = ctypes.c_void_p
        libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
        libc.fflush.argtypes = [ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        libc.free.argtypes = [ctypes.c_void_p]
        lib.xlu_cfg_init.restype = ctypes.c_void_p
        lib.xlu_cfg_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.xlu_cfg_readdata.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        lib.xlu_cfg_destroy.argtypes = [ctypes.c_void_p]
        lib.xlu_cfg_get_string.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_int,
        ]
        lib.xlu_cfg_get_long.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_long),
            ctypes.c_int,
        ]
        lib.xlu_cfg_get_list.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        lib.xlu_cfg_get_listitem.restype = ctypes.c_char_p
        lib.xlu_cfg_get_listitem.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._lib = lib

    def parse(self, text: str, wanted: dict[str, type], filename: str = "qrm.cfg") -> Parsed:
        """Parse ``text`` as xl does; read back ``wanted`` (key -> ``str``, ``int`` or ``list``).

        A value that is absent or of another type is reported as missing in
        ``Parsed.report`` (libxlutil's own warning).
        """
        lib, libc = self._lib, self._libc
        buf, size = ctypes.c_char_p(), ctypes.c_size_t()
        stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
        cfg = lib.xlu_cfg_init(stream, filename.encode())
        try:
            data = text.encode()
            rc = lib.xlu_cfg_readdata(cfg, data, len(data))
            values: dict[str, Any] = {}
            for key, kind in wanted.items():
                name = key.encode()
                if kind is int:
                    number = ctypes.c_long()
                    if lib.xlu_cfg_get_long(cfg, name, ctypes.byref(number), 0) == 0:
                        values[key] = number.value
                elif kind is list:
                    handle, count = ctypes.c_void_p(), ctypes.c_int()
                    if lib.xlu_cfg_get_list(cfg, name, ctypes.byref(handle), ctypes.byref(count), 0) == 0:
                        values[key] = [
                            (lib.xlu_cfg_get_listitem(handle, i) or b"").decode() for i in range(count.value)
                        ]
                else:
                    value = ctypes.c_char_p()
                    if lib.xlu_cfg_get_string(cfg, name, ctypes.byref(value), 0) == 0:
                        values[key] = (value.value or b"").decode()
            libc.fflush(stream)
            report = (buf.value or b"").decode(errors="replace")
        finally:
            lib.xlu_cfg_destroy(cfg)
            libc.fclose(stream)
            libc.free(ctypes.cast(buf, ctypes.c_void_p))
        return Parsed(rc=rc, report=report, values=values)


_parser: XlParser | None = None
_searched = False


def parser() -> XlParser | None:
    """libxlutil's parser, or None where the library is not installed."""
    global _parser, _searched
    if not _searched:
        _searched = True
        for name in (*LIBRARIES, ctypes.util.find_library("xlutil")):
            if not name:
                continue
            try:
                _parser = XlParser(name)
                break
            except OSError:
                continue
    return _parser

"""A reader of R's serialized objects (XDR format, versions 2 and 3) and of an R package's lazy-load
database (``Rdata.rdx`` index + ``Rdata.rdb`` objects): enough for character vectors, lists,
integer, logical and double vectors, and their attributes.

An object is returned as a Python value (a list for a vector, a dict for a pairlist, None for
``NULL`` and ``NA_character_``), or as ``(value, attributes)`` when it has attributes.

>>> import struct
>>> xdr = b"X\\n" + struct.pack(">3i", 2, 0, 0) + struct.pack(">2i", 16, 2)
>>> xdr += struct.pack(">2i", 9, 2) + b"hi" + struct.pack(">2i", 9, -1)
>>> parse(xdr)
['hi', None]
"""

import gzip
import pathlib
import struct
import zlib

_NIL, _REF, _SYM, _PAIRLIST, _CHAR, _LGL, _INT, _REAL, _STR, _LIST = 254, 255, 1, 2, 9, 10, 13, 14, 16, 19


def parse(data: bytes):
    """The object serialized in ``data`` (R's ``serialize(x, NULL, xdr=TRUE)``)."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ValueError(f"truncated R serialization: {n} bytes wanted at offset {pos} of {len(data)}")
        pos += n
        return data[pos - n:pos]

    def integer() -> int:
        return struct.unpack(">i", take(4))[0]

    if take(2) != b"X\n":
        raise ValueError("not an R XDR serialization (no 'X\\n' header)")
    version = integer()
    take(8)  # the writer's R version and the oldest reader's
    if version == 3:
        take(integer())  # the native encoding's name
    symbols: list = []

    def item():
        flags = integer()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NIL:
            return None
        if kind == _REF:
            return symbols[(flags >> 8) - 1]
        if kind == _SYM:
            symbols.append(item())
            return symbols[-1]
        if kind == _CHAR:
            n = integer()
            return None if n == -1 else take(n).decode("utf-8", "replace")
        if kind == _PAIRLIST:
            out = {}
            while kind == _PAIRLIST:
                if has_attr:
                    item()
                tag = item() if has_tag else len(out)
                out[tag] = item()
                flags = integer()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != _NIL:
                raise ValueError(f"a pairlist ends with R type {kind}, not NULL")
            return out
        n = integer()
        if kind in (_STR, _LIST):
            value = [item() for _ in range(n)]
        elif kind in (_LGL, _INT):
            value = list(struct.unpack(f">{n}i", take(4 * n)))
        elif kind == _REAL:
            value = list(struct.unpack(f">{n}d", take(8 * n)))
        else:
            raise ValueError(f"R type {kind} is not supported by this reader")
        attributes = item() if has_attr else None
        return (value, attributes) if attributes else value

    return item()


def lazy_load(folder: pathlib.Path, name: str = "Rdata") -> dict:
    """``{variable: object}`` of the lazy-load database ``folder/<name>.rdx`` + ``.rdb`` (an R
    package's ``data/`` or ``R/`` folder; zlib-compressed entries, as R writes by default)."""
    index, attributes = parse(gzip.decompress((folder / f"{name}.rdx").read_bytes()))
    fields = dict(zip(attributes["names"], index))
    (offsets, names) = fields["variables"]
    if fields["compressed"] != [1]:
        raise ValueError(f"{folder}/{name}.rdb: compression {fields['compressed']} is not zlib (1)")
    blob = (folder / f"{name}.rdb").read_bytes()
    out = {}
    for (start, length), variable in zip(offsets, names["names"]):
        entry = blob[start:start + length]
        size = struct.unpack(">i", entry[:4])[0]
        data = zlib.decompress(entry[4:])
        if len(data) != size:
            raise ValueError(f"{folder}/{name}.rdb: {variable} is {len(data)} bytes, its header says {size}")
        out[variable] = parse(data)
    return out

"""Build qjax's embedded corpus from Debian's r-cran-janeaustenr (public-domain text of Jane Austen's novels).

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb pkg
    python scripts/extract_austen.py pkg/usr/lib/R/site-library/janeaustenr/data qjax/data/corpus

Reads R's lazy-load database (Rdata.rdx index + Rdata.rdb: zlib blocks of R-serialized character
vectors) with the standard library and writes one gzip file per novel, one line of text per line.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
import zlib

NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


class RReader:
    """The subset of R's XDR serialization needed for an index list and character vectors."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization stream")
        self.data, self.pos = data, 2
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal reader version
        if version == 3:
            n = self.int()  # native encoding name: skip it
            self.pos += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def strings(self) -> list[str]:
        flags = self.int()
        if flags & 0xFF != 16:
            raise ValueError(f"expected a character vector (STRSXP), found SEXP type {flags & 0xFF}")
        out = []
        for _ in range(self.int()):
            if self.int() & 0xFF != 9:
                raise ValueError("malformed CHARSXP")
            n = self.int()
            out.append("" if n < 0 else self.data[self.pos : self.pos + n].decode("utf-8", errors="replace"))
            self.pos += max(n, 0)
        return out


def read_index(rdx: bytes) -> dict[str, tuple[int, int]]:
    """name → (offset, length) in Rdata.rdb, from the 'variables' element of the index."""
    raw = zlib.decompress(rdx[4:]) if rdx[:2] != b"\x1f\x8b" else gzip.decompress(rdx)
    names = []
    for novel in NOVELS:
        key = novel.encode()
        at = raw.find(b"\x00\x00\x00" + bytes([len(key)]) + key)
        if at < 0:
            raise ValueError(f"{novel} not in the index")
        names.append((at, novel))
    # the (offset, length) integer pairs precede the names, in the same order as the names
    pairs = []
    pos = 0
    while len(pairs) < len(NOVELS):
        pos = raw.index(b"\x00\x00\x00\x0d\x00\x00\x00\x02", pos) + 8
        pairs.append(struct.unpack_from(">ii", raw, pos))
    return {name: pairs[i] for i, (_, name) in enumerate(sorted(names))}


def extract(data_dir: str) -> dict[str, list[str]]:
    with open(os.path.join(data_dir, "Rdata.rdx"), "rb") as f:
        index = read_index(f.read())
    with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
        rdb = f.read()
    texts = {}
    for name, (offset, length) in index.items():
        block = rdb[offset : offset + length]
        texts[name] = RReader(zlib.decompress(block[4:])).strings()
    return texts


def main(data_dir: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, lines in extract(data_dir).items():
        path = os.path.join(out_dir, f"austen_{name}.txt.gz")
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime=0: byte-identical reruns
            f.write(("\n".join(lines) + "\n").encode("utf-8"))
        print(f"{path}: {len(lines)} lines, {sum(map(len, lines))} characters")


if __name__ == "__main__":
    main(*sys.argv[1:3])

#!/usr/bin/env python3
"""Writes the seeds of the nfs_export fuzz target (fuzz/seeds/nfs_export/):
NFSv3 and MOUNT calls as a guest sends them, framed, where the 12 bytes of
an XDR opaque holding b"ROOTFH!!" stand for the export's root handle (the
harness puts the genuine handle there)."""
import os
import struct
import sys

ROOT = struct.pack(">I", 8) + b"ROOTFH!!"
NFS, MOUNT = 100003, 100005


def u32(v):
    return struct.pack(">I", v)


def u64(v):
    return struct.pack(">Q", v)


def opaque(b):
    return u32(len(b)) + b + b"\0" * (-len(b) % 4)


def sattr(mode=None):
    # set_it booleans: mode, uid, gid, size; atime, mtime: DONT_CHANGE.
    m = u32(1) + u32(mode) if mode is not None else u32(0)
    return m + u32(0) + u32(0) + u32(0) + u32(0) + u32(0)


def call(xid, prog, proc_, args, vers=3):
    body = u32(xid) + u32(0) + u32(2) + u32(prog) + u32(vers) + u32(proc_)
    body += u32(0) + u32(0) + u32(0) + u32(0)  # AUTH_NONE credential, verifier
    body += args
    return u32(0x80000000 | len(body)) + body


def where(name):
    return ROOT + opaque(name)


def seeds():
    n = {}
    n["mount"] = call(1, MOUNT, 1, opaque(b"/shared")) + call(2, MOUNT, 1, opaque(b"/shared/../.."))
    n["lookup"] = b"".join(
        call(10 + i, NFS, 3, where(name))
        for i, name in enumerate([b"..", b".", b"outside", b"a/b", b"x" * 300])
    )
    n["create_rename_remove"] = (
        call(20, NFS, 8, where(b"a") + u32(0) + sattr(0o644))
        + call(21, NFS, 14, where(b"a") + where(b"b"))
        + call(22, NFS, 14, where(b"b") + where(b".."))
        + call(23, NFS, 12, where(b"b"))
    )
    n["mkdir_symlink"] = (
        call(30, NFS, 9, where(b"d") + sattr(0o755))
        + call(31, NFS, 10, where(b"l") + sattr() + opaque(b"../outside"))
        + call(32, NFS, 3, where(b"l"))
        + call(33, NFS, 13, where(b"d"))
    )
    n["readdir"] = call(40, NFS, 9, where(b"d") + sattr(0o700)) + call(
        41, NFS, 17, ROOT + u64(0) + u64(0) + u32(4096) + u32(8192)
    ) + call(42, NFS, 16, ROOT + u64(0) + u64(0) + u32(4096))
    n["attrs"] = (
        call(50, NFS, 1, ROOT)
        + call(51, NFS, 2, ROOT + sattr(0o777) + u32(0))
        + call(52, NFS, 4, ROOT + u32(0x3F))
        + call(53, NFS, 18, ROOT)
        + call(54, NFS, 19, ROOT)
        + call(55, NFS, 20, ROOT)
    )
    n["link"] = call(60, NFS, 8, where(b"f") + u32(0) + sattr(0o600)) + call(
        61, NFS, 15, ROOT + where(b"g")
    )
    return n


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "../../fuzz/seeds/nfs_export"
    )
    os.makedirs(out, exist_ok=True)
    for name, data in seeds().items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)

"""A directory laid out as the kubelet lays out a Secret volume, for certificate-renewal tests.

Each key is a link `<key> -> ..data/<key>`; `..data` is a link to a timestamped directory holding the files.
An update writes a new timestamped directory, points a new link at it and renames that link over `..data`:
every key changes at once, in one rename (the kubelet's AtomicWriter), and the old directory is removed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

DATA = "..data"


class SecretVolume:
    """`directory` as a mounted Secret; `write` is what the kubelet does when the Secret changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, files: dict[str, bytes]) -> None:
        """Replace the volume's content with `files` (key -> bytes), atomically."""
        link = self.directory / DATA
        old = os.readlink(link) if link.is_symlink() else None
        stamp = self.directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
        stamp.mkdir()
        for name, data in files.items():
            (stamp / name).write_bytes(data)
        tmp = self.directory / f"{DATA}_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, link)
        for name in files:
            if not (self.directory / name).is_symlink():
                (self.directory / name).symlink_to(f"{DATA}/{name}")
        if old is not None:
            shutil.rmtree(self.directory / old)

    def write_dir(self, source: Path, names: tuple[str, ...]) -> None:
        """`write` the files `names` of `source`."""
        self.write({name: (source / name).read_bytes() for name in names})

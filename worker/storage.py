"""Output storage on local disk (embedded profile): written atomically, named by the job."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    """The PNG encoding of `image`; deterministic for identical pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class LocalStorage:
    """Files under one directory. A re-run overwrites the same names, so no duplicates appear."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def save(self, filename: str, data: bytes) -> None:
        """Write `data` as `filename` atomically: readers see the old file or the whole new one."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.root / filename)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

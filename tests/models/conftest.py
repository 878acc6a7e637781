"""Fixtures for bringing models: tiny files in the original layouts, served from loopback."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from darkroom.identities import Family
from worker.models import tiny, tiny_addons


@dataclass
class Served:
    """One file: its bytes, and how to misbehave (announce more than is sent, send slowly)."""

    body: bytes
    announce: int | None = None  # Content-Length to claim (a truncated download)
    delay_per_chunk_s: float = 0.0  # drip the body, in CHUNK pieces


@dataclass
class FileServer:
    """Serves files on 127.0.0.1 with Range support; records every request's Range header."""

    files: dict[str, Served] = field(default_factory=dict)
    ranges: list[str | None] = field(default_factory=list)
    chunk: int = 64 * 1024
    _server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served = owner.files.get(self.path)
                owner.ranges.append(self.headers.get("range"))
                if served is None:
                    self.send_error(404)
                    return
                body, start = served.body, 0
                wanted = self.headers.get("range")
                if wanted and wanted.startswith("bytes="):
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("content-range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                rest = body[start:]
                self.send_header("content-length", str(served.announce or len(rest)))
                self.end_headers()
                try:
                    for offset in range(0, len(rest), owner.chunk):
                        self.wfile.write(rest[offset : offset + owner.chunk])
                        self.wfile.flush()
                        time.sleep(served.delay_per_chunk_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def url(self, path: str) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class TinyFiles:
    """Tiny models written as model sites ship them, and the folders they came from."""

    sd_folder: Path
    sd_checkpoint: bytes
    kohya_lora: bytes
    embedding: bytes


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    """The tiny SD 1.x model as an original-layout single file, a kohya LoRA and an embedding."""
    build = tmp_path_factory.mktemp("tiny-build")
    tiny.ensure_tiny_models(build)
    folder = build / "sd-img2img"  # the tiny SD 1.x img2img folder
    tiny_addons.write_sd_checkpoint(folder, build / "sd.safetensors")
    tiny_addons.ensure_tiny_lora(build / "lora.safetensors", "brought", Family.SD)
    save_file(
        tiny_addons.kohya_lora(load_file(str(build / "lora.safetensors"))),
        str(build / "k.safetensors"),
    )
    tiny_addons.ensure_tiny_embedding(build / "emb.safetensors", "brought-emb", Family.SD)
    return TinyFiles(
        folder,
        (build / "sd.safetensors").read_bytes(),
        (build / "k.safetensors").read_bytes(),
        (build / "emb.safetensors").read_bytes(),
    )


def models_folder(root: Path, files: TinyFiles) -> Path:
    """An empty models folder with the SD family's configuration (as an operator prepares it)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(files.sd_folder, root / "configs" / Family.SD)
    return root


@dataclass(frozen=True)
class TinySdxl:
    """The tiny SDXL model as a folder and as an original-layout single file, an SDXL embedding."""

    folder: Path
    checkpoint: bytes
    embedding: bytes


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> TinySdxl:
    build = tmp_path_factory.mktemp("tiny-sdxl")
    tiny.ensure_tiny_family_model(build, "sdxl-img2img")
    tiny_addons.write_sd_checkpoint(build / "sdxl-img2img", build / "xl.safetensors")
    tiny_addons.ensure_tiny_embedding(build / "xl-emb.safetensors", "xl-emb", Family.SDXL)
    return TinySdxl(
        build / "sdxl-img2img",
        (build / "xl.safetensors").read_bytes(),
        (build / "xl-emb.safetensors").read_bytes(),
    )

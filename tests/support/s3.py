"""A real S3-protocol server on 127.0.0.1 for storage tests (moto's server mode)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from moto.server import ThreadedMotoServer

#: Any credentials do for moto; the real variables keep boto3 off the machine's own AWS setup.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "darkroom-test",
    "AWS_SECRET_ACCESS_KEY": "darkroom-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on a free loopback port, and AWS credentials in the environment; its
    endpoint URL. Both end with the block."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in AWS_ENV.items():
            env.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()

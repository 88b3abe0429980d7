"""The real servers started by dev/services.py answer like the real thing."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import S3Server


@pytest.mark.s3
def test_s3_stores_lists_and_returns_an_object(s3_bucket: tuple[S3Server, str]) -> None:
    server, bucket = s3_bucket
    client = server.client()
    payload = os.urandom(64 * 1024) + b"\x00end"
    name = "packages/demo/1.0.0/package.tar.gz"

    client.put_object(bucket, name, io.BytesIO(payload), length=len(payload))

    response = client.get_object(bucket, name)
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()
    listed = [(obj.object_name, obj.size) for obj in client.list_objects(bucket, recursive=True)]
    assert listed == [(name, len(payload))]

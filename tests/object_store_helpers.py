"""A real S3 endpoint on 127.0.0.1 for tests: moto's server in a thread, a bucket, uploads.

`S3Server.environ()` is what a user sets for an S3-compatible store (`AWS_ENDPOINT_URL`, keys,
region); tests hand it to child processes or apply it with monkeypatch, so nothing leaves the
loopback interface and no real credentials are read (`AWS_CONFIG_FILE` and
`AWS_SHARED_CREDENTIALS_FILE` point to nothing).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
KEY_ID = "testing-key-id"
SECRET = "testing-secret-key"


@dataclass
class S3Server:
    """A running moto server; `endpoint` is `http://127.0.0.1:PORT`."""

    server: ThreadedMotoServer
    endpoint: str
    buckets: list[str] = field(default_factory=list)

    def environ(self, endpoint: str | None = None) -> dict[str, str]:
        """Environment variables that point boto3/s3fs at this server (or at `endpoint`, a proxy
        in front of it), with throwaway credentials and no config files."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )

    def bucket(self, name: str | None = None) -> str:
        """A new empty bucket (a fresh name by default)."""
        name = name or f"bkt-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def upload_tree(self, local: Path, bucket: str, prefix: str) -> int:
        """Every regular file under `local` to `s3://bucket/prefix/<relative path>` (what `aws s3
        sync` does); returns the number of objects written."""
        client, n = self.client(), 0
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                key = f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}".lstrip("/")
                client.upload_file(str(path), bucket, key)
                n += 1
        return n

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def stop(self) -> None:
        self.server.stop()


def start_s3_server() -> S3Server:
    """moto's S3 server on 127.0.0.1 at a free port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(server, f"http://{host}:{port}")

"""AWS Signature Version 4, just enough to sign the S3 probe's ListBuckets."""

from __future__ import annotations

import datetime
import hashlib
import hmac


def signed_headers(host: str, port: int, access_key: str, secret_key: str) -> dict[str, str]:
    """Headers signing an empty-bodied ``GET /`` with AWS Signature Version 4."""
    region, service = "us-east-1", "s3"
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload_hash = hashlib.sha256(b"").hexdigest()
    headers = {
        "host": f"{host}:{port}",
        "x-amz-content-sha256": payload_hash,
        "x-amz-date": amz_date,
    }
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        ["GET", "/", "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed, payload_hash]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return headers

"""Server-side apply of any objects, with the standard library, for the `cluster` service.

What ``kubectl apply --server-side`` does for a folder of manifests, reduced to what
installing Knative on a fresh cluster needs: the resource of each kind comes from the API
server's discovery, CustomResourceDefinitions go first, and an object that cannot be
applied yet (its CRD is not served yet, its admission webhook has no pod yet) is tried again
until a deadline, as ``kubectl`` users do by running it twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Api = Callable[..., tuple[int, bytes]]
"""``api(method, path, body=None, content_type=...) -> (status, body)``, as `Kube.api`."""

FIELD_MANAGER = "mayfly-dev-services"
_RETRY_S = 2.0


class Discovery:
    """Kind -> (resource path prefix, resource, namespaced), per apiVersion, read lazily."""

    def __init__(self, api: Api) -> None:
        self._api = api
        self._known: dict[str, dict[str, tuple[str, bool]]] = {}

    def path(self, obj: Mapping[str, Any]) -> str | None:
        """The object's path for apply, or None while its kind is not served."""
        version = obj["apiVersion"]
        kinds = self._known.get(version)
        if kinds is None or obj["kind"] not in kinds:
            kinds = self._read(version)
        if kinds is None or obj["kind"] not in kinds:
            return None
        resource, namespaced = kinds[obj["kind"]]
        prefix = "/api/v1" if version == "v1" else f"/apis/{version}"
        meta = obj["metadata"]
        where = f"/namespaces/{meta.get('namespace') or 'default'}" if namespaced else ""
        return f"{prefix}{where}/{resource}/{meta['name']}"

    def _read(self, version: str) -> dict[str, tuple[str, bool]] | None:
        prefix = "/api/v1" if version == "v1" else f"/apis/{version}"
        status, body = self._api("GET", prefix)
        if status != 200:
            return None
        kinds = {
            r["kind"]: (r["name"], bool(r["namespaced"]))
            for r in json.loads(body)["resources"]
            if "/" not in r["name"]
        }
        self._known[version] = kinds
        return kinds


def apply(
    api: Api, objects: Iterable[Mapping[str, Any]], *, timeout: float, what: str = "objects"
) -> None:
    """Apply every object (CRDs first), retrying those refused for now until ``timeout``.

    Raises RuntimeError naming the objects still refused, with the API server's last answer.
    """
    ordered = sorted(
        objects, key=lambda o: o["kind"] not in ("Namespace", "CustomResourceDefinition")
    )
    pending = list(ordered)
    discovery = Discovery(api)
    deadline = time.monotonic() + timeout
    last: dict[int, str] = {}
    while pending:
        waiting = []
        for obj in pending:
            path = discovery.path(obj)
            if path is None:
                last[id(obj)] = f"{obj['apiVersion']} {obj['kind']} is not served yet"
                waiting.append(obj)
                continue
            status, body = api(
                "PATCH",
                f"{path}?fieldManager={FIELD_MANAGER}&force=true",
                obj,
                content_type="application/apply-patch+yaml",
            )
            if status not in (200, 201):
                last[id(obj)] = f"HTTP {status}: {body[:300].decode(errors='replace')}"
                waiting.append(obj)
        pending = waiting
        if pending and time.monotonic() > deadline:
            names = [f"{o['kind']} {o['metadata']['name']}" for o in pending]
            raise RuntimeError(
                f"{what}: {len(pending)} not applied after {timeout:.0f}s "
                f"({', '.join(names[:5])}...); the first: {last[id(pending[0])]}"
            )
        if pending:
            time.sleep(_RETRY_S)

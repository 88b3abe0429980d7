"""Send rendered resources to a Kubernetes API server: server-side apply, or its dry run.

Server-side apply with strict field validation, so the API server checks every
object against the installed schemas (Knative's CRDs included) and a misspelt
or mistyped field is an error naming the field, never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes import config as kube_config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from mayfly.deploy.render import Resource, describe
from mayfly.errors import DeployError

__all__ = ["Applied", "KubeTarget", "open_cluster"]

FIELD_MANAGER = "mayfly"


@dataclass(frozen=True)
class Applied:
    """One object the API server took (or would take, in a dry run)."""

    api_version: str
    description: str
    dry_run: bool

    def __str__(self) -> str:
        verb = "would apply" if self.dry_run else "applied"
        return f"{verb} {self.api_version} {self.description}"


class KubeTarget:
    """A cluster reached through a kubeconfig (or the in-cluster service account)."""

    def __init__(self, api: ApiClient) -> None:
        self._client = DynamicClient(api)

    def apply(self, resources: Iterable[Resource], *, dry_run: bool = False) -> list[Applied]:
        """Server-side apply each object in order; stops at the first refusal.

        Raises:
            DeployError: the cluster lacks the resource's API (e.g. Knative not installed)
                or refused the object; the message names it and the API server's reason.
        """
        done = []
        for resource in resources:
            self._apply_one(resource, dry_run=dry_run)
            done.append(Applied(resource["apiVersion"], describe(resource), dry_run))
        return done

    def _apply_one(self, resource: Resource, *, dry_run: bool) -> None:
        api_version, kind = resource.get("apiVersion"), resource.get("kind")
        try:
            api = self._client.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            raise DeployError(
                f"{describe(resource)}: the cluster does not serve {api_version} {kind}; "
                "install the Knative component that defines it first (see knative/README.md)"
            ) from None
        extra: dict[str, Any] = {"query_params": [("fieldValidation", "Strict")]}
        if dry_run:
            extra["dry_run"] = "All"
        try:
            self._client.server_side_apply(
                api,
                body=resource,
                namespace=resource.get("metadata", {}).get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
                **extra,
            )
        except ApiException as exc:
            raise DeployError(f"{describe(resource)}: {_reason(exc)}") from None


def _reason(exc: ApiException) -> str:
    """The API server's own message (it names the field), else the HTTP status."""
    try:
        status = json.loads(exc.body or "")
    except ValueError:
        return f"HTTP {exc.status} {exc.reason}"
    if not isinstance(status, dict):
        return f"HTTP {exc.status} {exc.reason}"
    return str(status.get("message") or f"HTTP {exc.status} {exc.reason}")


def open_cluster(kubeconfig: str | None = None, context: str | None = None) -> KubeTarget:
    """Connect the usual way: ``--kubeconfig``, else ``$KUBECONFIG`` or ``~/.kube/config``,
    else the in-cluster service account.

    Raises:
        DeployError: no usable configuration was found.
    """
    try:
        api = kube_config.new_client_from_config(config_file=kubeconfig, context=context)
    except (ConfigException, OSError) as exc:
        if kubeconfig is not None or context is not None:
            raise DeployError(f"cannot use kubeconfig: {exc}") from None
        try:
            kube_config.load_incluster_config()
        except ConfigException:
            raise DeployError(
                f"no cluster configured: {exc} (set KUBECONFIG or pass --kubeconfig)"
            ) from None
        api = ApiClient()
    return KubeTarget(api)

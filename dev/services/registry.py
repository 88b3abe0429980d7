"""`SERVICES`: every service, by name. A new service is one `Service` subclass listed here."""

from __future__ import annotations

from services.base import Service
from services.cluster import Cluster
from services.jaeger import Jaeger
from services.kafka import Kafka
from services.knative import Knative
from services.kube import Kube
from services.s3 import S3

SERVICES: dict[str, Service] = {
    service.name: service for service in (S3(), Kafka(), Jaeger(), Kube(), Knative(), Cluster())
}
"""Every service this script manages, by name; `up` without names starts the default ones
(all but `cluster`, which is started by name)."""

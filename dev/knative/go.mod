// Pins the Knative release whose CRDs dev/services.py installs into the `kube` service's API
// server (DESIGN.md, "Real services"). Nothing is built from here: at install time
// `go mod download -json knative.dev/serving ...` (checked against go.sum) names each
// module's folder in the Go module cache, and every CustomResourceDefinition under
// serving's and eventing's config/ and eventing-kafka-broker's control-plane/config/ is
// copied out (Kube.crd_sources). Nothing imports these modules, so `go mod tidy` would drop
// them: edit the versions by hand, then `go mod download knative.dev/serving
// knative.dev/eventing knative.dev/eventing-kafka-broker` to refresh go.sum.
//
// One Knative release (1.23, July 2026): eventing-kafka-broker v0.50.1 is that release's patch and
// requires eventing v0.50.0. The webhooks of the same release are built from
// dev/knative/webhooks and dev/knative/kafka (the `knative` service); kn, whose newer
// releases the module proxy cannot build, from dev/kn at v0.42.0.
module mayfly.dev/services/knative

go 1.24

require (
	knative.dev/eventing v0.50.0
	knative.dev/eventing-kafka-broker v0.50.1
	knative.dev/serving v0.50.0
)

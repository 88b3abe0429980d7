//go:build tools

package tools

import _ "knative.dev/eventing-kafka-broker/control-plane/cmd/webhook-kafka"

//go:build tools

package main

import (
	_ "knative.dev/eventing/cmd/webhook"
	_ "knative.dev/serving/cmd/webhook"
)

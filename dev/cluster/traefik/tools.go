//go:build tools

package main

import _ "github.com/traefik/traefik/v3/cmd/traefik"

//go:build tools

// Package tools only exists so that `go mod tidy` keeps the commands built by
// build.sh in go.mod/go.sum; the build tag keeps it out of every real build.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)

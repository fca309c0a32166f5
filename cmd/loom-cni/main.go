// Command loom-cni is loom's CNI plugin; a container runtime runs it for
// each pod. All of it lives in package cni; main only hands over to skel,
// which reads the CNI environment and stdin and prints the result or error.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/loomnet/loom/internal/cni"
)

func main() {
	skel.PluginMainFuncs(cni.Funcs(), cni.Versions(), cni.About)
}

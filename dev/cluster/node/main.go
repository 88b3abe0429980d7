// Command mayfly-node is the node half of the `cluster` service of dev/services (DESIGN.md,
// "Real services"): kubelet, kube-controller-manager, kube-scheduler and kube-proxy from
// k8s.io/kubernetes, in one binary as the old hyperkube was, so one build serves them all.
//
//	mayfly-node kubelet|controller-manager|scheduler|proxy FLAGS...
//
// The API server and etcd are mayfly-kube (dev/kube), started by the same service.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // as upstream's mains: JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // as upstream's mains: client metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // as upstream's mains: version metric
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	commands := map[string]func() *cobra.Command{
		"kubelet":            func() *cobra.Command { return kubelet.NewKubeletCommand(context.Background()) },
		"controller-manager": controllermanager.NewControllerManagerCommand,
		"scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
		"proxy":              proxy.NewProxyCommand,
	}
	if len(os.Args) < 2 || commands[os.Args[1]] == nil {
		fmt.Fprintln(os.Stderr, "usage: mayfly-node kubelet|controller-manager|scheduler|proxy FLAGS...")
		os.Exit(2)
	}
	command := commands[os.Args[1]]()
	// cobra reads os.Args[1:]; the component's own flags start after its name.
	command.SetArgs(os.Args[2:])
	os.Exit(cli.Run(command))
}

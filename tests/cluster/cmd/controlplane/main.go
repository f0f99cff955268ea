// Command controlplane starts a detached test control plane (etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler) in a directory and stops it again, for poking at the
// integration tier's cluster by hand:
//
//	go run ./tests/cluster/cmd/controlplane up --dir /tmp/cp      # prints the kubeconfig path
//	KUBECONFIG=/tmp/cp/admin.kubeconfig ~/.cache/stasis/k8s-v1.37.2/bin/kubectl get ns
//	go run ./tests/cluster/cmd/controlplane down --dir /tmp/cp
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/stasis-k8s/stasis/tests/cluster"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) < 2 || (os.Args[1] != "up" && os.Args[1] != "down") {
		return fmt.Errorf("usage: controlplane up|down --dir DIR [--advertise-address IP] [--no-controller-manager] [--no-scheduler]")
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ContinueOnError)
	dir := fs.String("dir", "", "state directory (certs, etcd data, logs, kubeconfig)")
	adv := fs.String("advertise-address", "127.0.0.1", "address the API server listens on and advertises")
	noCM := fs.Bool("no-controller-manager", false, "do not start kube-controller-manager")
	noSched := fs.Bool("no-scheduler", false, "do not start kube-scheduler")
	if err := fs.Parse(os.Args[2:]); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("--dir is required")
	}
	if os.Args[1] == "down" {
		return cluster.StopDir(*dir, 15*time.Second)
	}
	bin, err := cluster.Binaries()
	if err != nil {
		return err
	}
	c, err := cluster.Start(context.Background(), cluster.Options{
		Dir: *dir, BinDir: bin, AdvertiseAddress: *adv,
		ControllerManager: !*noCM, Scheduler: !*noSched, HostPathProvisioner: !*noCM,
		Detach: true,
	})
	if err != nil {
		return err
	}
	fmt.Printf("API server %s\nkubeconfig %s\nlogs %s\nstop with: go run ./tests/cluster/cmd/controlplane down --dir %s\n",
		c.Server(), c.Kubeconfig(), c.LogDir(), *dir)
	return nil
}

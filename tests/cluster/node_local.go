package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// LocalOptions configures a whole local cluster: control plane, network and real nodes.
type LocalOptions struct {
	// Dir holds everything (Options.Dir). Required.
	Dir string
	// BinDir holds the Kubernetes binaries (Binaries()). Required.
	BinDir string
	// Nodes are the node names, in order (addresses and pod subnets follow the order).
	// Default: node-a, node-b.
	Nodes []string
	// Images are imported into every node's containerd (the pause image among them).
	Images []string
	// Detach lets the cluster outlive the starting process (`make demo`); TeardownDir(Dir) ends it.
	Detach bool
	// Network overrides the default addresses (Dir is set from LocalOptions.Dir).
	Network NetworkOptions
}

// Local is a running local cluster.
type Local struct {
	*Cluster
	Net   *Network
	Nodes []*Node
	// Timings of the start, for reports.
	ControlPlaneAfter time.Duration
	NodesReadyAfter   time.Duration
	dir               string
}

// DefaultStorageClass is the name of the default StorageClass UpLocal creates: the
// controller-manager's host-path provisioner. Both nodes share this machine's filesystem, so its
// volumes are reachable from either node; a real cluster needs storage that can move between nodes
// (network block storage or RWX).
const DefaultStorageClass = "local-hostpath"

// UpLocal starts a network, a control plane (with controller-manager, scheduler and the host-path
// provisioner) and the nodes, waits until every node is Ready and creates the default
// StorageClass. On error everything is torn down again.
func UpLocal(ctx context.Context, o LocalOptions) (_ *Local, err error) {
	if o.Dir == "" || o.BinDir == "" {
		return nil, errors.New("cluster: LocalOptions.Dir and BinDir are required")
	}
	if len(o.Nodes) == 0 {
		o.Nodes = []string{"node-a", "node-b"}
	}
	// A previous run that crashed in this directory leaves a journal: revert it first, then start
	// from an empty directory (no kubelet, containerd or IPAM state of an earlier cluster).
	if err := TeardownDir(o.Dir); err != nil {
		return nil, err
	}
	if err := os.RemoveAll(o.Dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	l := &Local{dir: o.Dir}
	defer func() {
		if err != nil {
			if terr := TeardownDir(o.Dir); terr != nil {
				err = errors.Join(err, terr)
			}
		}
	}()
	start := time.Now()
	netOpts := o.Network
	netOpts.Dir = o.Dir
	if l.Net, err = StartNetwork(netOpts); err != nil {
		return nil, err
	}
	if l.Cluster, err = Start(ctx, Options{
		Dir:                 o.Dir,
		BinDir:              o.BinDir,
		AdvertiseAddress:    l.Net.APIServerIP(),
		ServiceCIDR:         l.Net.ServiceCIDR(),
		ControllerManager:   true,
		Scheduler:           true,
		HostPathProvisioner: true,
		Detach:              o.Detach,
		// Node names are not resolvable here (no DNS): reach kubelets (logs, exec) at their IPs.
		ExtraAPIServerArgs: []string{"--kubelet-preferred-address-types=InternalIP"},
	}); err != nil {
		return nil, err
	}
	l.ControlPlaneAfter = time.Since(start)
	if err = l.Net.ExposeAPIServer(l.Cluster); err != nil {
		return nil, err
	}

	nodesStart := time.Now()
	l.Nodes = make([]*Node, len(o.Nodes))
	errs := make([]error, len(o.Nodes))
	var wg sync.WaitGroup
	for i, name := range o.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.Nodes[i], errs[i] = StartNode(ctx, l.Cluster, l.Net, NodeOptions{
				Name: name, Index: i, BinDir: o.BinDir, Images: o.Images,
			})
		}()
	}
	wg.Wait()
	if err = errors.Join(errs...); err != nil {
		return nil, err
	}
	l.NodesReadyAfter = time.Since(nodesStart)

	sc := &storagev1.StorageClass{
		ObjectMeta: metav1.ObjectMeta{
			Name:        DefaultStorageClass,
			Annotations: map[string]string{"storageclass.kubernetes.io/is-default-class": "true"},
		},
		Provisioner: "kubernetes.io/host-path",
	}
	if _, err = l.Client().StorageV1().StorageClasses().Create(ctx, sc, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("cluster: default StorageClass: %w", err)
	}
	err = nil
	return l, nil
}

// Import loads image tarballs into every node.
func (l *Local) Import(tarballs ...string) error {
	var errs []error
	for _, n := range l.Nodes {
		errs = append(errs, n.Import(tarballs...))
	}
	return errors.Join(errs...)
}

// Down tears the whole cluster down (TeardownDir).
func (l *Local) Down() error {
	err := TeardownDir(l.dir)
	if l.Cluster != nil {
		// The script stopped the control plane by its PID files; Stop reaps the processes this
		// process started.
		err = errors.Join(err, l.Cluster.Stop())
	}
	return err
}

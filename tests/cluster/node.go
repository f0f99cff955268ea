package cluster

// Real nodes for the e2e tier: a kubelet v1.37 and its own containerd per node, on this one machine.
// The host-level work (bridge, DNAT, mount namespace, cgroups, processes, teardown) is done by
// hack/node/node.sh, which journals every change so that `node.sh down DIR` (TeardownDir) reverts
// all of it, also from another process (`make down`) or after a crashed test. This file writes the
// configuration, runs the script and waits for the API to show the result.
//
// Layout of one cluster (Options.Dir = NetworkOptions.Dir):
//
//	pki/ etcd/ logs/ pids/ *.kubeconfig   control plane (cluster.go)
//	undo                                   the host-change journal (node.sh)
//	nodes/<name>/                          node.env, configs, root/<node paths>, logs/, pids/

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Images built by hack/testimages (same names there).
const (
	PauseImage   = "stasis.local/pause:3.10"
	CounterImage = "stasis.local/counter:v1"
	// CounterImageV2 is the same program in another image (another digest).
	CounterImageV2 = "stasis.local/counter:v2"
)

// NetworkOptions describes the addresses of a local cluster. Everything lives on a bridge the
// harness creates; pods get no route beyond these ranges and no masquerading.
type NetworkOptions struct {
	// Dir is the cluster directory (the same as Options.Dir).
	Dir string
	// Bridge holds the API server's address (the first host of NodeCIDR) and the node IPs.
	// Default "stasis0".
	Bridge string
	// NodeCIDR is the range of the API server and node addresses. Default 10.250.0.0/24.
	NodeCIDR string
	// ServiceCIDR must match Options.ServiceCIDR. Default 10.0.0.0/24.
	ServiceCIDR string
	// PodCIDR is the cluster's pod range; each node takes a /24 of it. Default 10.244.0.0/16.
	PodCIDR string
}

func (o *NetworkOptions) defaults() error {
	if o.Dir == "" {
		return errors.New("cluster: NetworkOptions.Dir is required")
	}
	if o.Bridge == "" {
		o.Bridge = "stasis0"
	}
	if o.NodeCIDR == "" {
		o.NodeCIDR = "10.250.0.0/24"
	}
	if o.ServiceCIDR == "" {
		o.ServiceCIDR = "10.0.0.0/24"
	}
	if o.PodCIDR == "" {
		o.PodCIDR = "10.244.0.0/16"
	}
	for field, v := range map[string]string{"NodeCIDR": o.NodeCIDR, "ServiceCIDR": o.ServiceCIDR, "PodCIDR": o.PodCIDR} {
		if ip, _, err := net.ParseCIDR(v); err != nil || ip.To4() == nil {
			return fmt.Errorf("cluster: NetworkOptions.%s %q is not an IPv4 CIDR", field, v)
		}
	}
	return nil
}

// Network is the host side of a local cluster: its bridge, addresses and DNAT rules.
type Network struct {
	opts NetworkOptions
}

// StartNetwork creates the bridge with the API server's address. Call it before Start (the API
// server binds that address) and TeardownDir(Dir) afterwards, also when something failed.
func StartNetwork(o NetworkOptions) (*Network, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	n := &Network{opts: o}
	prefix := strings.SplitN(o.NodeCIDR, "/", 2)[1]
	if err := nodeScript("net-up", o.Dir, o.Bridge, n.APIServerIP()+"/"+prefix, o.ServiceCIDR); err != nil {
		return nil, err
	}
	return n, nil
}

// APIServerIP is the advertise address to pass to Start (first host of NodeCIDR).
func (n *Network) APIServerIP() string { return nthHost(n.opts.NodeCIDR, 1) }

// NodeIP is the address of the i-th node (0-based): the hosts after the API server's.
func (n *Network) NodeIP(i int) string { return nthHost(n.opts.NodeCIDR, 2+i) }

// NodePodCIDR is the i-th node's pod subnet: the (i+1)-th /24 of PodCIDR.
func (n *Network) NodePodCIDR(i int) string {
	return nthHost(n.opts.PodCIDR, (i+1)*256) + "/24"
}

// ServiceCIDR is NetworkOptions.ServiceCIDR.
func (n *Network) ServiceCIDR() string { return n.opts.ServiceCIDR }

// ExposeAPIServer gives pods (and the host) the `kubernetes` Service: its ClusterIP:443 is DNATed
// to the API server. There is no kube-proxy; nothing else needs a Service IP.
func (n *Network) ExposeAPIServer(c *Cluster) error {
	host := strings.TrimPrefix(c.Server(), "https://")
	return nodeScript("dnat", n.opts.Dir, nthHost(n.opts.ServiceCIDR, 1)+":443", host)
}

// NodeOptions configures one node.
type NodeOptions struct {
	// Name is the node name (and the kubelet's hostname), e.g. "node-a".
	Name string
	// Index picks the node's address (Network.NodeIP), pod subnet (Network.NodePodCIDR) and the
	// name of its CNI bridge; distinct per node of a cluster.
	Index int
	// BinDir holds the kubelet (Binaries()).
	BinDir string
	// Images are docker-archive tarballs imported into the node's containerd before the kubelet
	// starts (hack/testimages, hack/image). At least the pause image.
	Images []string
	// Labels are added to the Node once it registered.
	Labels map[string]string
	// StartTimeout bounds the wait for the Node to be Ready (default 2 minutes).
	StartTimeout time.Duration
}

// Node is a running kubelet with its containerd.
type Node struct {
	Name    string
	IP      string
	PodCIDR string
	dir     string
	cluster *Cluster
	net     *Network
	// ReadyAfter is how long the node took from start to the Ready condition.
	ReadyAfter time.Duration
}

// StartNode starts containerd and the kubelet of one node and waits until the Node is Ready.
func StartNode(ctx context.Context, c *Cluster, n *Network, o NodeOptions) (*Node, error) {
	if o.Name == "" {
		return nil, errors.New("cluster: NodeOptions.Name is required")
	}
	if o.BinDir == "" {
		return nil, errors.New("cluster: NodeOptions.BinDir is required (cluster.Binaries())")
	}
	kubelet := filepath.Join(o.BinDir, "kubelet")
	if _, err := os.Stat(kubelet); err != nil {
		return nil, fmt.Errorf("cluster: kubelet missing in %s (run hack/k8s/build.sh): %w", o.BinDir, err)
	}
	for _, img := range o.Images {
		if _, err := os.Stat(img); err != nil {
			return nil, fmt.Errorf("cluster: NodeOptions.Images: %w", err)
		}
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	start := time.Now()
	node := &Node{Name: o.Name, IP: n.NodeIP(o.Index), PodCIDR: n.NodePodCIDR(o.Index),
		dir: filepath.Join(n.opts.Dir, "nodes", o.Name), cluster: c, net: n}
	if err := node.writeConfig(o, kubelet); err != nil {
		return nil, err
	}
	if err := nodeScript("node-up", n.opts.Dir, o.Name); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, o.StartTimeout)
	defer cancel()
	if err := node.waitReady(ctx); err != nil {
		return nil, err
	}
	node.ReadyAfter = time.Since(start)
	if len(o.Labels) > 0 {
		nodes := c.Client().CoreV1().Nodes()
		obj, err := nodes.Get(ctx, o.Name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		for k, v := range o.Labels {
			obj.Labels[k] = v
		}
		if _, err := nodes.Update(ctx, obj, metav1.UpdateOptions{}); err != nil {
			return nil, err
		}
	}
	return node, nil
}

// Import loads more image tarballs into the node's containerd.
func (nd *Node) Import(tarballs ...string) error {
	return nodeScript(append([]string{"import", nd.net.opts.Dir, nd.Name}, tarballs...)...)
}

// Stop kills the node's kubelet, containerd and every container (its whole cgroup root). The Node
// object stays in the API (it turns NotReady).
func (nd *Node) Stop() error { return nodeScript("node-down", nd.net.opts.Dir, nd.Name) }

// LogDir holds kubelet.log and containerd.log.
func (nd *Node) LogDir() string { return filepath.Join(nd.dir, "logs") }

// CRISocket is the node's containerd socket as seen from the host.
func (nd *Node) CRISocket() string {
	return filepath.Join(nd.dir, "root", "run", "containerd", "containerd.sock")
}

// TeardownDir stops every node and the control plane of the cluster in dir and reverts every host
// change (bridges, addresses, routes, iptables rules, cgroups, mount points, sysctls). It is
// idempotent and works from the directory alone.
func TeardownDir(dir string) error { return nodeScript("down", dir) }

func (nd *Node) writeConfig(o NodeOptions, kubelet string) error {
	for _, d := range []string{nd.dir, filepath.Join(nd.dir, "logs"), filepath.Join(nd.dir, "pids")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	ca, err := LoadCA(nd.cluster.CA())
	if err != nil {
		return err
	}
	cert, key, err := ca.Sign(CertRequest{
		CommonName: "system:node:" + o.Name, Organization: []string{"system:nodes"}, Client: true,
	})
	if err != nil {
		return err
	}
	kubeconfig := filepath.Join(nd.dir, "kubelet.kubeconfig")
	if err := nd.cluster.WriteKubeconfig(kubeconfig, "system:node:"+o.Name, cert, key); err != nil {
		return err
	}
	cniBridge := fmt.Sprintf("stcni%d", o.Index)
	cgroupRoot := "/stasis-" + o.Name
	prefix := strings.SplitN(nd.net.opts.NodeCIDR, "/", 2)[1]
	files := map[string]string{
		"containerd.toml": fmt.Sprintf(containerdConfig, PauseImage),
		"kubelet.yaml":    fmt.Sprintf(kubeletConfig, cgroupRoot, nd.IP, nd.IP, nd.cluster.CAFile()),
		// The CNI config lives in the node's /etc/cni/net.d (bind-mounted from here).
		"root/etc/cni/net.d/10-stasis.conflist": fmt.Sprintf(cniConfig, o.Name, cniBridge, nd.PodCIDR,
			nd.net.opts.PodCIDR, nd.net.opts.ServiceCIDR, nd.net.opts.NodeCIDR),
		"node.env": envFile(map[string]string{
			"NODE_IP":            nd.IP,
			"NODE_PREFIX":        prefix,
			"BRIDGE":             nd.net.opts.Bridge,
			"CNI_BRIDGE":         cniBridge,
			"CGROUP_ROOT":        cgroupRoot,
			"KUBELET":            kubelet,
			"CONTAINERD_CONFIG":  filepath.Join(nd.dir, "containerd.toml"),
			"KUBELET_CONFIG":     filepath.Join(nd.dir, "kubelet.yaml"),
			"KUBELET_KUBECONFIG": kubeconfig,
			"IMAGES":             strings.Join(o.Images, " "),
		}),
	}
	for name, content := range files {
		p := filepath.Join(nd.dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func (nd *Node) waitReady(ctx context.Context) error {
	var last string
	for {
		obj, err := nd.cluster.Client().CoreV1().Nodes().Get(ctx, nd.Name, metav1.GetOptions{})
		if err == nil {
			last = "registered, not Ready"
			for _, cond := range obj.Status.Conditions {
				if cond.Type == corev1.NodeReady {
					if cond.Status == corev1.ConditionTrue {
						return nil
					}
					last = fmt.Sprintf("Ready=%s: %s", cond.Status, cond.Message)
				}
			}
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: node %s not Ready (%s); last lines of %s:\n%s", nd.Name, last,
				filepath.Join(nd.LogDir(), "kubelet.log"), logTail(filepath.Join(nd.LogDir(), "kubelet.log"), 30))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// nodeScript runs hack/node/node.sh with args; its output is returned in the error.
func nodeScript(args ...string) error {
	root, err := RepoRoot()
	if err != nil {
		return err
	}
	cmd := exec.Command(filepath.Join(root, "hack", "node", "node.sh"), args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("hack/node/node.sh %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// nthHost returns the n-th address of an IPv4 CIDR (n=1: the first host).
func nthHost(cidr string, n int) string {
	_, ipnet, err := net.ParseCIDR(cidr)
	if err != nil || ipnet.IP.To4() == nil {
		return ""
	}
	ip := ipnet.IP.To4()
	v := uint32(ip[0])<<24 | uint32(ip[1])<<16 | uint32(ip[2])<<8 | uint32(ip[3])
	v += uint32(n)
	return net.IPv4(byte(v>>24), byte(v>>16), byte(v>>8), byte(v)).String()
}

func envFile(vars map[string]string) string {
	var b strings.Builder
	for k, v := range vars {
		fmt.Fprintf(&b, "%s='%s'\n", k, strings.ReplaceAll(v, "'", `'\''`))
	}
	return b.String()
}

// containerdConfig: containerd 1.6 with the standard paths, which the node's mount namespace makes
// private. restrict_oom_score_adj clamps the kubelet's negative oom_score_adj (-998 for sandboxes,
// -997 for Guaranteed pods) to containerd's own: without CAP_SYS_RESOURCE, runc fails on a negative
// value ("can't get final child's PID from pipe: EOF").
const containerdConfig = `version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[debug]
  level = "warn"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
`

// kubeletConfig: cgroup v1 (the VM binds its controllers to v1), one cgroup root per node, the
// kubelet's ports on the node's own address (so both nodes use the standard ports), imported
// images never garbage-collected, no DNS for pods (nothing to resolve; no server outside).
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %s
address: %s
port: 10250
readOnlyPort: 0
healthzBindAddress: %s
healthzPort: 10248
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: %s
authorization:
  mode: Webhook
failSwapOn: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%%
  nodefs.inodesFree: 1%%
  imagefs.available: 1%%
resolvConf: ""
volumePluginDir: /var/lib/kubelet/volume-plugins
serializeImagePulls: false
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
fileCheckFrequency: 10s
`

// cniConfig: a bridge per node, no masquerading and routes only to the cluster's own ranges (pods,
// Services, nodes): no pod traffic can leave the machine.
const cniConfig = `{
  "cniVersion": "0.4.0",
  "name": "stasis-%s",
  "plugins": [{
    "type": "bridge",
    "bridge": %q,
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "ranges": [[{"subnet": %q}]],
      "routes": [{"dst": %q}, {"dst": %q}, {"dst": %q}]
    }
  }]
}
`

// Package cluster starts and stops a real Kubernetes control plane for tests: etcd, kube-apiserver
// and, on request, kube-controller-manager and kube-scheduler, built by hack/k8s/build.sh. Everything
// runs on loopback (or the given advertise address) with free ports, a PKI generated in Go, client
// certificate authentication and RBAC, and is stopped by PID when the test ends.
//
// The integration tier runs the webhooks against it; the e2e tier adds kubelets (node*.go).
package cluster

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Options configures a control plane. Zero values get working defaults (see defaults).
type Options struct {
	// Dir holds everything of this cluster: pki/, etcd/, logs/, pids/ and the kubeconfigs.
	// Required; t.TempDir() in tests.
	Dir string
	// BinDir holds etcd, kube-apiserver, kube-controller-manager, kube-scheduler (Binaries()).
	BinDir string
	// AdvertiseAddress is where the API server listens and what it advertises: 127.0.0.1 by
	// default; the e2e tier passes an address on a bridge it created so that kubelets and pods can
	// reach the API server.
	AdvertiseAddress string
	// ServiceCIDR is the service IP range; 10.0.0.0/24 by default.
	ServiceCIDR string
	// ControllerManager and Scheduler start those components (Jobs, garbage collection,
	// ServiceAccounts need the controller-manager; pods without a nodeName need the scheduler).
	ControllerManager bool
	Scheduler         bool
	// HostPathProvisioner turns on the controller-manager's host-path PV provisioner.
	HostPathProvisioner bool

	ExtraAPIServerArgs         []string
	ExtraControllerManagerArgs []string
	ExtraSchedulerArgs         []string

	// Detach starts the processes in their own session without a parent-death signal, so they
	// outlive the starting process (the controlplane command); StopDir(Dir) stops them.
	Detach bool
	// StartTimeout bounds the start (default 2 minutes).
	StartTimeout time.Duration
	// StopTimeout is how long each process gets between SIGTERM and SIGKILL (default 15 s).
	StopTimeout time.Duration
}

func (o *Options) defaults() error {
	if o.Dir == "" {
		return errors.New("cluster: Options.Dir is required")
	}
	if o.BinDir == "" {
		return errors.New("cluster: Options.BinDir is required (cluster.Binaries() builds or finds it)")
	}
	if o.AdvertiseAddress == "" {
		o.AdvertiseAddress = "127.0.0.1"
	}
	if net.ParseIP(o.AdvertiseAddress) == nil {
		return fmt.Errorf("cluster: Options.AdvertiseAddress %q is not an IP address", o.AdvertiseAddress)
	}
	if o.ServiceCIDR == "" {
		o.ServiceCIDR = "10.0.0.0/24"
	}
	if _, _, err := net.ParseCIDR(o.ServiceCIDR); err != nil {
		return fmt.Errorf("cluster: Options.ServiceCIDR: %w", err)
	}
	if o.HostPathProvisioner && !o.ControllerManager {
		return errors.New("cluster: Options.HostPathProvisioner needs Options.ControllerManager")
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	if o.StopTimeout == 0 {
		o.StopTimeout = 15 * time.Second
	}
	return nil
}

// Cluster is a running control plane.
type Cluster struct {
	opts       Options
	ca         *CA
	server     string
	kubeconfig string
	rest       *rest.Config
	client     kubernetes.Interface

	mu    sync.Mutex
	procs []*process // in start order; stopped in reverse
}

// Binaries returns the directory with the Kubernetes binaries, building them on first use through
// hack/k8s/build.sh (cached under $STASIS_CACHE; ≈ 10 min cold, < 1 s warm).
// $STASIS_K8S_BIN, when set, is used as is.
func Binaries() (string, error) {
	if d := os.Getenv("STASIS_K8S_BIN"); d != "" {
		return d, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(filepath.Join(root, "hack/k8s/build.sh"))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("hack/k8s/build.sh: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// RepoRoot is the root of the Stasis work tree (where go.mod is).
func RepoRoot() (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok {
		root := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
		if _, err := os.Stat(filepath.Join(root, "go.mod")); err == nil {
			return root, nil
		}
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if data, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && strings.Contains(string(data), "module github.com/stasis-k8s/stasis\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("cluster: cannot find the Stasis repository root (go.mod)")
		}
		dir = parent
	}
}

// Start brings up the control plane and returns once the API server is ready and the default
// ServiceAccount exists. On error everything already started is stopped again.
func Start(ctx context.Context, o Options) (_ *Cluster, err error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	need := []string{"etcd", "kube-apiserver"}
	if o.ControllerManager {
		need = append(need, "kube-controller-manager")
	}
	if o.Scheduler {
		need = append(need, "kube-scheduler")
	}
	for _, b := range need {
		if _, err := os.Stat(filepath.Join(o.BinDir, b)); err != nil {
			return nil, fmt.Errorf("cluster: %s missing in %s (run hack/k8s/build.sh): %w", b, o.BinDir, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, o.StartTimeout)
	defer cancel()

	c := &Cluster{opts: o}
	for _, d := range []string{c.pkiDir(), c.LogDir(), c.pidDir(), filepath.Join(o.Dir, "etcd")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil {
			_ = c.Stop()
		}
	}()

	ports, err := freePorts(o.AdvertiseAddress, 1, "127.0.0.1", 4)
	if err != nil {
		return nil, err
	}
	apiPort, etcdClient, etcdPeer, cmPort, schedPort := ports[0], ports[1], ports[2], ports[3], ports[4]
	c.server = "https://" + net.JoinHostPort(o.AdvertiseAddress, strconv.Itoa(apiPort))

	pki, err := c.writePKI()
	if err != nil {
		return nil, fmt.Errorf("cluster: PKI: %w", err)
	}

	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	if err := c.start("etcd", []string{
		"--name=default",
		"--data-dir=" + filepath.Join(o.Dir, "etcd"),
		"--listen-client-urls=" + etcdURL,
		"--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=default=" + peerURL,
		// Test data: durability buys nothing and fsync makes every write slow.
		"--unsafe-no-fsync=true",
		"--log-level=warn",
	}); err != nil {
		return nil, err
	}

	apiArgs := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=" + o.AdvertiseAddress,
		"--advertise-address=" + o.AdvertiseAddress,
		"--secure-port=" + strconv.Itoa(apiPort),
		"--tls-cert-file=" + pki.apiCert,
		"--tls-private-key-file=" + pki.apiKey,
		"--client-ca-file=" + pki.caCert,
		"--service-account-key-file=" + pki.saPub,
		"--service-account-signing-key-file=" + pki.saKey,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=" + o.ServiceCIDR,
		"--authorization-mode=Node,RBAC",
		// Webhook Services are reached at their endpoints' IPs: no kube-proxy needed.
		"--enable-aggregator-routing=true",
		"--allow-privileged=true",
		"--kubelet-client-certificate=" + pki.kubeletClientCert,
		"--kubelet-client-key=" + pki.kubeletClientKey,
		"--profiling=false",
		"--v=1",
	}
	if net.ParseIP(o.AdvertiseAddress).IsLoopback() {
		// The endpoint reconciler refuses a loopback address for the kubernetes Service.
		apiArgs = append(apiArgs, "--endpoint-reconciler-type=none")
	}
	if err := c.start("kube-apiserver", append(apiArgs, o.ExtraAPIServerArgs...)); err != nil {
		return nil, err
	}

	rc := &rest.Config{
		Host: c.server,
		TLSClientConfig: rest.TLSClientConfig{
			CAData: c.ca.CertPEM, CertData: pki.adminCertPEM, KeyData: pki.adminKeyPEM,
		},
		QPS: 200, Burst: 400,
	}
	c.rest = rc
	if c.client, err = kubernetes.NewForConfig(rc); err != nil {
		return nil, err
	}
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}

	if o.ControllerManager {
		args := []string{
			"--kubeconfig=" + pki.cmKubeconfig,
			"--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(cmPort),
			"--service-account-private-key-file=" + pki.saKey,
			"--root-ca-file=" + pki.caCert,
			"--cluster-signing-cert-file=" + pki.caCert,
			"--cluster-signing-key-file=" + pki.caKey,
			"--use-service-account-credentials=true",
			"--service-cluster-ip-range=" + o.ServiceCIDR,
			"--leader-elect=false",
			"--v=1",
		}
		if o.HostPathProvisioner {
			args = append(args, "--enable-hostpath-provisioner=true")
		}
		if err := c.start("kube-controller-manager", append(args, o.ExtraControllerManagerArgs...)); err != nil {
			return nil, err
		}
	}
	if o.Scheduler {
		args := []string{
			"--kubeconfig=" + pki.schedKubeconfig,
			"--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(schedPort),
			"--leader-elect=false",
			"--v=1",
		}
		if err := c.start("kube-scheduler", append(args, o.ExtraSchedulerArgs...)); err != nil {
			return nil, err
		}
	}
	if err := c.ensureDefaultServiceAccount(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Kubeconfig is the path of the admin kubeconfig (client certificate in system:masters).
func (c *Cluster) Kubeconfig() string { return c.kubeconfig }

// RestConfig returns a copy of the admin client configuration.
func (c *Cluster) RestConfig() *rest.Config { return rest.CopyConfig(c.rest) }

// Client is an admin clientset.
func (c *Cluster) Client() kubernetes.Interface { return c.client }

// Server is the API server's URL.
func (c *Cluster) Server() string { return c.server }

// CA returns the cluster CA, which also signs the API server's serving certificate and every
// client certificate; tests sign webhook and agent certificates with it (LoadCA or SignFiles).
func (c *Cluster) CA() (certPEM, keyPEM []byte) { return c.ca.CertPEM, c.ca.KeyPEM }

// CAFile is the path of the CA certificate.
func (c *Cluster) CAFile() string { return filepath.Join(c.pkiDir(), "ca.crt") }

// LogDir holds one <component>.log per process.
func (c *Cluster) LogDir() string { return filepath.Join(c.opts.Dir, "logs") }

// Dir is Options.Dir.
func (c *Cluster) Dir() string { return c.opts.Dir }

func (c *Cluster) pkiDir() string { return filepath.Join(c.opts.Dir, "pki") }
func (c *Cluster) pidDir() string { return filepath.Join(c.opts.Dir, "pids") }

// stopOrder: clients of the API server first, then the API server while etcd is still there (it
// can take over a minute to exit once etcd is gone), etcd last.
var stopOrder = []string{"kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"}

// Stop stops every process by PID: SIGTERM, then SIGKILL after Options.StopTimeout. It is safe to
// call more than once.
func (c *Cluster) Stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	byName := map[string]*process{}
	for _, p := range c.procs {
		byName[p.name] = p
	}
	for _, name := range stopOrder {
		if p := byName[name]; p != nil {
			if err := p.stop(c.opts.StopTimeout); err != nil {
				errs = append(errs, err)
			}
			_ = os.Remove(filepath.Join(c.pidDir(), name+".pid"))
		}
	}
	return errors.Join(errs...)
}

// StopDir stops a detached cluster started with Options{Dir: dir, Detach: true}, from its PID files.
func StopDir(dir string, timeout time.Duration) error {
	var errs []error
	for _, name := range stopOrder {
		if err := stopPID(filepath.Join(dir, "pids", name+".pid"), name, timeout); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Failed reports a process of the control plane that has exited, with its log tail; "" when all run.
func (c *Cluster) Failed() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.procs {
		if p.exited() {
			return fmt.Sprintf("%s exited (%v); last lines of %s:\n%s", p.name, p.err, p.logPath, logTail(p.logPath, 30))
		}
	}
	return ""
}

func (c *Cluster) start(name string, args []string) error {
	p, err := startProcess(name, filepath.Join(c.opts.BinDir, name), args, c.LogDir(), c.pidDir(), c.opts.Detach)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	return nil
}

func (c *Cluster) waitReady(ctx context.Context) error {
	var last string
	for {
		if f := c.Failed(); f != "" {
			return fmt.Errorf("cluster: %s", f)
		}
		body, err := c.client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil {
			return nil
		}
		last = fmt.Sprintf("%v %s", err, body)
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: kube-apiserver not ready at %s: %s; last lines of its log:\n%s",
				c.server, last, logTail(filepath.Join(c.LogDir(), "kube-apiserver.log"), 30))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ensureDefaultServiceAccount: pod creation needs the namespace's default ServiceAccount. The
// controller-manager creates it; without one, create it here.
func (c *Cluster) ensureDefaultServiceAccount(ctx context.Context) error {
	sas := c.client.CoreV1().ServiceAccounts(metav1.NamespaceDefault)
	if !c.opts.ControllerManager {
		_, err := sas.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("cluster: create default ServiceAccount: %w", err)
		}
		return nil
	}
	for {
		if f := c.Failed(); f != "" {
			return fmt.Errorf("cluster: %s", f)
		}
		if _, err := sas.Get(ctx, "default", metav1.GetOptions{}); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: the controller-manager did not create the default ServiceAccount; last lines of its log:\n%s",
				logTail(filepath.Join(c.LogDir(), "kube-controller-manager.log"), 30))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

type pkiFiles struct {
	caCert, caKey                       string
	apiCert, apiKey                     string
	saKey, saPub                        string
	kubeletClientCert, kubeletClientKey string
	cmKubeconfig, schedKubeconfig       string
	adminCertPEM, adminKeyPEM           []byte
}

func (c *Cluster) writePKI() (*pkiFiles, error) {
	dir := c.pkiDir()
	ca, err := NewCA("stasis-test-ca")
	if err != nil {
		return nil, err
	}
	c.ca = ca
	f := &pkiFiles{caCert: filepath.Join(dir, "ca.crt"), caKey: filepath.Join(dir, "ca.key")}
	if err := os.WriteFile(f.caCert, ca.CertPEM, 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(f.caKey, ca.KeyPEM, 0o600); err != nil {
		return nil, err
	}

	_, svcNet, _ := net.ParseCIDR(c.opts.ServiceCIDR)
	firstSvcIP := append(net.IP(nil), svcNet.IP.To4()...)
	if firstSvcIP != nil {
		firstSvcIP[3]++
	}
	ips := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(c.opts.AdvertiseAddress)}
	if firstSvcIP != nil {
		ips = append(ips, firstSvcIP)
	}
	if f.apiCert, f.apiKey, err = ca.SignFiles(dir, "apiserver", CertRequest{
		CommonName: "kube-apiserver",
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		IPs:    ips,
		Server: true,
	}); err != nil {
		return nil, err
	}
	if f.kubeletClientCert, f.kubeletClientKey, err = ca.SignFiles(dir, "apiserver-kubelet-client", CertRequest{
		CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}, Client: true,
	}); err != nil {
		return nil, err
	}
	saPriv, saPub, err := rsaKeyPair()
	if err != nil {
		return nil, err
	}
	f.saKey, f.saPub = filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	if err := os.WriteFile(f.saKey, saPriv, 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(f.saPub, saPub, 0o600); err != nil {
		return nil, err
	}

	if f.adminCertPEM, f.adminKeyPEM, err = ca.Sign(CertRequest{
		CommonName: "kubernetes-admin", Organization: []string{"system:masters"}, Client: true,
	}); err != nil {
		return nil, err
	}
	c.kubeconfig = filepath.Join(c.opts.Dir, "admin.kubeconfig")
	if err := c.WriteKubeconfig(c.kubeconfig, "admin", f.adminCertPEM, f.adminKeyPEM); err != nil {
		return nil, err
	}
	for _, comp := range []struct {
		user string
		path *string
	}{
		{"system:kube-controller-manager", &f.cmKubeconfig},
		{"system:kube-scheduler", &f.schedKubeconfig},
	} {
		cert, key, err := ca.Sign(CertRequest{CommonName: comp.user, Client: true})
		if err != nil {
			return nil, err
		}
		*comp.path = filepath.Join(c.opts.Dir, strings.TrimPrefix(comp.user, "system:")+".kubeconfig")
		if err := c.WriteKubeconfig(*comp.path, comp.user, cert, key); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// WriteKubeconfig writes a kubeconfig for this cluster that authenticates with a client certificate
// (sign one with the CA for any user or group: CommonName = user, Organization = groups).
func (c *Cluster) WriteKubeconfig(path, user string, certPEM, keyPEM []byte) error {
	b64 := base64.StdEncoding.EncodeToString
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: stasis-test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %q
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: stasis-test
  context:
    cluster: stasis-test
    user: %q
current-context: stasis-test
`, c.server, b64(c.ca.CertPEM), user, b64(certPEM), b64(keyPEM), user)
	return os.WriteFile(path, []byte(cfg), 0o600)
}

// freePorts reserves n1 ports on host1 and n2 on host2, holding all listeners until every port is
// chosen so they are distinct. Another process may still take one before the component binds it;
// the component then exits and Start reports its log.
func freePorts(host1 string, n1 int, host2 string, n2 int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for _, hn := range []struct {
		host string
		n    int
	}{{host1, n1}, {host2, n2}} {
		for i := 0; i < hn.n; i++ {
			l, err := net.Listen("tcp", net.JoinHostPort(hn.host, "0"))
			if err != nil {
				return nil, fmt.Errorf("cluster: free port on %s: %w", hn.host, err)
			}
			ls = append(ls, l)
			ports = append(ports, l.Addr().(*net.TCPAddr).Port)
		}
	}
	return ports, nil
}

// FreePort returns a free TCP port on host (for webhooks and agents that tests start).
func FreePort(host string) (int, error) {
	p, err := freePorts(host, 1, host, 0)
	if err != nil {
		return 0, err
	}
	return p[0], nil
}

//go:build integration

// Package deploy checks the installable manifests (deploy/) against a real kube-apiserver and
// controller-manager (tests/cluster), both TLS paths: cert-manager's own controller and CA injector
// built from the cert-manager module (hack/cert-manager/build.sh), and the no-cert-manager overlay
// fed by `stasis certs`. The real `stasis webhook` then serves with the Secrets' files, and the API
// server calls it through the webhook Service with the injected caBundle.
package deploy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"

	"github.com/stasis-k8s/stasis/tests/cluster"
)

const ns = "stasis-system"

// tools are the binaries every test needs, found or built once.
type tools struct {
	root    string // repository root
	kubectl string
	stasis  string
}

func needTools(t *testing.T) tools {
	t.Helper()
	root, err := cluster.RepoRoot()
	require.NoError(t, err)
	bin, err := cluster.Binaries()
	require.NoError(t, err, "Kubernetes binaries: run `make k8s` (hack/k8s/build.sh)")
	kubectl := filepath.Join(bin, "kubectl")
	_, err = os.Stat(kubectl)
	require.NoError(t, err, "kubectl missing in %s: run `make k8s`", bin)
	stasis := filepath.Join(t.TempDir(), "stasis")
	cmd := exec.Command("go", "build", "-o", stasis, ".")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go build stasis: %s", out)
	return tools{root: root, kubectl: kubectl, stasis: stasis}
}

func (tl tools) kubectlRun(t *testing.T, kubeconfig string, args ...string) (string, error) {
	t.Helper()
	if kubeconfig != "" {
		args = append([]string{"--kubeconfig", kubeconfig}, args...)
	}
	cmd := exec.Command(tl.kubectl, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func (tl tools) kubectlOK(t *testing.T, kubeconfig string, args ...string) string {
	t.Helper()
	out, err := tl.kubectlRun(t, kubeconfig, args...)
	require.NoError(t, err, "kubectl %s:\n%s", strings.Join(args, " "), out)
	return out
}

// copyDeploy copies deploy/ into a temporary directory (the overlay needs generated files, which
// never go into the work tree).
func copyDeploy(t *testing.T, root string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "deploy")
	err := filepath.WalkDir(filepath.Join(root, "deploy"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(filepath.Join(root, "deploy"), p)
		if d.IsDir() {
			if rel == filepath.Join("overlays", "no-cert-manager", "tls") {
				return filepath.SkipDir // a developer's own generated files
			}
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), data, 0o644)
	})
	require.NoError(t, err)
	return dst
}

func decodeObjects(t *testing.T, manifests string) []*unstructured.Unstructured {
	t.Helper()
	dec := yaml.NewYAMLOrJSONDecoder(strings.NewReader(manifests), 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		err := dec.Decode(&m)
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		if len(m) == 0 {
			continue
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
	return objs
}

func find(objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	return nil
}

// startCluster starts a control plane with the controller-manager (Deployments, ServiceAccount
// tokens, EndpointSlices, namespaces).
func startCluster(t *testing.T) *cluster.Cluster {
	t.Helper()
	bin, err := cluster.Binaries()
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := cluster.Start(ctx, cluster.Options{Dir: t.TempDir(), BinDir: bin, ControllerManager: true})
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("control plane logs: %s", c.LogDir())
		}
		_ = c.Stop()
	})
	return c
}

// eventually polls f until it returns nil or the bound passes; the bound only turns a hang into a
// failure with f's last error, it is not a speed assertion.
func eventually(t *testing.T, bound time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still not true after %s: %v", what, bound, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// secretFiles writes a Secret's data the way the kubelet projects a secret volume: files are
// symlinks through ..data, which is swapped atomically on update (what the servers' reload sees in
// a pod).
type secretFiles struct {
	dir string
	gen int
}

func newSecretFiles(t *testing.T) *secretFiles {
	return &secretFiles{dir: t.TempDir()}
}

func (s *secretFiles) write(t *testing.T, data map[string][]byte) {
	t.Helper()
	s.gen++
	ts := fmt.Sprintf("..gen_%d", s.gen)
	require.NoError(t, os.MkdirAll(filepath.Join(s.dir, ts), 0o755))
	for k, v := range data {
		require.NoError(t, os.WriteFile(filepath.Join(s.dir, ts, k), v, 0o600))
	}
	tmp := filepath.Join(s.dir, "..data_tmp")
	_ = os.Remove(tmp)
	require.NoError(t, os.Symlink(ts, tmp))
	require.NoError(t, os.Rename(tmp, filepath.Join(s.dir, "..data")))
	for k := range data {
		link := filepath.Join(s.dir, k)
		if _, err := os.Lstat(link); err != nil {
			require.NoError(t, os.Symlink(filepath.Join("..data", k), link))
		}
	}
}

func (s *secretFiles) path(key string) string { return filepath.Join(s.dir, key) }

func getSecret(t *testing.T, kube kubernetes.Interface, name string) map[string][]byte {
	t.Helper()
	s, err := kube.CoreV1().Secrets(ns).Get(context.Background(), name, metav1.GetOptions{})
	require.NoError(t, err)
	return s.Data
}

// testNetwork is an address on a bridge this test creates: the API server must reach the webhook
// at an EndpointSlice address, and EndpointSlices refuse loopback addresses.
type testNetwork struct {
	link string
	ip   string
}

func newTestNetwork(t *testing.T, link, ip string) testNetwork {
	t.Helper()
	_ = exec.Command("ip", "link", "del", link).Run() // a leftover of an interrupted run
	for _, args := range [][]string{
		{"link", "add", link, "type", "bridge"},
		{"addr", "add", ip + "/32", "dev", link},
		{"link", "set", link, "up"},
	} {
		out, err := exec.Command("ip", args...).CombinedOutput()
		require.NoError(t, err, "ip %s: %s (the deployment tests need root and iproute2: `make deps`)", strings.Join(args, " "), out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", link).Run() })
	return testNetwork{link: link, ip: ip}
}

// webhookProcess is the real `stasis webhook`, run on the host as the Deployment would run it: its
// identity is the stasis-webhook ServiceAccount (a token from the TokenRequest API, so the RBAC of
// deploy/ is what it gets), its TLS files are the Secrets' files.
type webhookProcess struct {
	*process
	addr   string
	health string
}

// process is a program a test runs in the background: its output goes to a log file, it is stopped
// (interrupt, then kill after 15 s) when the test ends, and its log is printed when the test failed.
type process struct {
	name   string
	cmd    *exec.Cmd
	log    string
	exited chan struct{}
	err    error // valid once exited is closed
}

func startProcess(t *testing.T, name string, cmd *exec.Cmd) *process {
	t.Helper()
	p := &process{name: name, cmd: cmd, log: filepath.Join(t.TempDir(), name+".log"), exited: make(chan struct{})}
	f, err := os.Create(p.log)
	require.NoError(t, err)
	cmd.Stdout, cmd.Stderr = f, f
	require.NoError(t, cmd.Start(), "start %s", name)
	go func() { p.err = cmd.Wait(); f.Close(); close(p.exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-p.exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			data, _ := os.ReadFile(p.log)
			if len(data) > 16000 {
				data = data[len(data)-16000:]
			}
			t.Logf("%s log (tail):\n%s", name, data)
		}
	})
	return p
}

// waitReady waits until url answers 200; it fails at once, with the log, if the process exited.
func (p *process) waitReady(t *testing.T, url string) {
	t.Helper()
	eventually(t, time.Minute, p.name+" "+url, func() error {
		select {
		case <-p.exited:
			data, _ := os.ReadFile(p.log)
			t.Fatalf("%s exited: %v\n%s", p.name, p.err, data)
		default:
		}
		return httpOK(url)
	})
}

func startWebhook(t *testing.T, tl tools, c *cluster.Cluster, net testNetwork, serving, agentClient *secretFiles) *webhookProcess {
	t.Helper()
	ctx := context.Background()
	exp := int64(3600)
	tok, err := c.Client().CoreV1().ServiceAccounts(ns).CreateToken(ctx, "stasis-webhook",
		&authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	require.NoError(t, err, "token of ServiceAccount stasis-webhook")
	caPEM, _ := c.CA()
	kc := filepath.Join(t.TempDir(), "webhook.kubeconfig")
	require.NoError(t, os.WriteFile(kc, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: stasis-webhook
  user:
    token: %s
contexts:
- name: test
  context: {cluster: test, user: stasis-webhook}
current-context: test
`, c.Server(), b64(caPEM), tok.Status.Token)), 0o600))

	port := freePort(t, net.ip)
	hport := freePort(t, "127.0.0.1")
	cmd := exec.Command(tl.stasis, "webhook", "--kubeconfig", kc)
	// The applied Deployment's configuration (its env), with this host's addresses and the Secret
	// volumes' mount paths mapped to the local copies of the Secrets.
	w := &webhookProcess{addr: net.ip + ":" + strconv.Itoa(port), health: "127.0.0.1:" + strconv.Itoa(hport)}
	cmd.Env = append(os.Environ(), deployedWebhookEnv(t, c.Client(), map[string]*secretFiles{
		"stasis-webhook-tls": serving, "stasis-agent-client-tls": agentClient,
	})...)
	cmd.Env = append(cmd.Env, "STASIS_LISTEN="+w.addr, "STASIS_HEALTH_LISTEN="+w.health)
	w.process = startProcess(t, "stasis webhook", cmd)
	w.waitReady(t, "http://"+w.health+"/readyz")
	return w
}

// routeService points the webhook Service at addr with an EndpointSlice of our own (no kubelet runs
// the webhook pods here); the API server's service resolver reads EndpointSlices.
func routeService(t *testing.T, kube kubernetes.Interface, addr string) {
	t.Helper()
	host, portS, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	port, _ := strconv.Atoi(portS)
	p32 := int32(port)
	name, proto, ready := "https", corev1.ProtocolTCP, true
	_, err = kube.DiscoveryV1().EndpointSlices(ns).Create(context.Background(), &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "stasis-webhook-test", Labels: map[string]string{
			discoveryv1.LabelServiceName: "stasis-webhook",
			discoveryv1.LabelManagedBy:   "stasis-deploy-tests",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{host}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &p32, Protocol: &proto}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
}

// evictPlainPod creates a pod (no kubelet: it stays Pending, which eviction does not mind) and
// evicts it. Every eviction outside stasis-system and kube-system goes through the webhook with
// failurePolicy Fail, so success means the API server called the webhook and trusted its TLS.
func evictPlainPod(kube kubernetes.Interface, namespace, name string) error {
	ctx := context.Background()
	_, err := kube.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/none:1"}}},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create pod: %w", err)
	}
	return kube.PolicyV1().Evictions(namespace).Evict(ctx, &policyv1.Eviction{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace},
	})
}

func createNamespace(t *testing.T, kube kubernetes.Interface, name string) {
	t.Helper()
	ctx := context.Background()
	_, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
	eventually(t, time.Minute, "default ServiceAccount in "+name, func() error {
		_, err := kube.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// servedCert is the leaf certificate a TLS server at addr presents (verified against roots for
// serverName).
func servedCert(addr, serverName string, roots *x509.CertPool, clientCert *tls.Certificate) (*x509.Certificate, error) {
	cfg := &tls.Config{ServerName: serverName, RootCAs: roots}
	if clientCert != nil {
		cfg.Certificates = []tls.Certificate{*clientCert}
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0], nil
}

func leafOf(t *testing.T, data map[string][]byte) *x509.Certificate {
	t.Helper()
	pair, err := tls.X509KeyPair(data["tls.crt"], data["tls.key"])
	require.NoError(t, err)
	c, err := x509.ParseCertificate(pair.Certificate[0])
	require.NoError(t, err)
	return c
}

func pool(t *testing.T, pemData []byte) *x509.CertPool {
	t.Helper()
	p := x509.NewCertPool()
	require.True(t, p.AppendCertsFromPEM(pemData), "not a PEM certificate bundle")
	return p
}

func freePort(t *testing.T, host string) int {
	t.Helper()
	p, err := cluster.FreePort(host)
	require.NoError(t, err)
	return p
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func httpOK(url string) error {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s: %d %s", url, resp.StatusCode, body)
	}
	return nil
}

func errf(format string, a ...any) error { return fmt.Errorf(format, a...) }

// deployedWebhookEnv is the env of the stasis-webhook Deployment as applied to the cluster: values
// under a Secret volume's mountPath point into the local copy of that Secret, the downward-API
// namespace is resolved.
func deployedWebhookEnv(t *testing.T, kube kubernetes.Interface, secrets map[string]*secretFiles) []string {
	t.Helper()
	dep, err := kube.AppsV1().Deployments(ns).Get(context.Background(), "stasis-webhook", metav1.GetOptions{})
	require.NoError(t, err)
	spec := dep.Spec.Template.Spec
	c := spec.Containers[0]
	mountOf := map[string]string{} // secret name → mount path
	for _, v := range spec.Volumes {
		if v.Secret == nil {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.Name == v.Name {
				mountOf[v.Secret.SecretName] = m.MountPath
			}
		}
	}
	var env []string
	for _, e := range c.Env {
		val := e.Value
		if e.ValueFrom != nil {
			require.NotNil(t, e.ValueFrom.FieldRef, "env %s", e.Name)
			require.Equal(t, "metadata.namespace", e.ValueFrom.FieldRef.FieldPath, "env %s", e.Name)
			val = ns
		}
		for secret, mp := range mountOf {
			if strings.HasPrefix(val, mp+"/") {
				sf := secrets[secret]
				require.NotNil(t, sf, "the Deployment mounts Secret %s, the test has no copy", secret)
				val = filepath.Join(sf.dir, strings.TrimPrefix(val, mp+"/"))
			}
		}
		env = append(env, e.Name+"="+val)
	}
	return env
}

//go:build integration

package integration

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/fakeagent"
)

// waitBudget is the webhook's --wait-budget here: dumps scripted longer than this get 429s.
const waitBudget = 2 * time.Second

// webhookProcess is the real `stasis webhook` binary running on the host, reached by the API
// server at https://127.0.0.1:<port>.
type webhookProcess struct {
	e          *environment
	port       int
	healthPort int
	args       []string // the fixed flags; extra ones per start
	logPath    string
	cmd        *exec.Cmd
	done       chan struct{}
	policy     string
}

func newWebhookProcess(e *environment) (*webhookProcess, error) {
	dir := filepath.Join(e.dir, "webhook")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	port, err := cluster.FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	healthPort, err := cluster.FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	// Serving certificate: the API server calls https://127.0.0.1:<port>/... and verifies it
	// against the caBundle (the cluster CA).
	servingCert, servingKey, err := e.ca.SignFiles(dir, "serving", cluster.CertRequest{
		CommonName: "stasis-webhook.stasis-system.svc",
		DNSNames:   []string{"stasis-webhook.stasis-system.svc", "stasis-webhook.stasis-system.svc.cluster.local"},
		IPs:        []net.IP{net.ParseIP("127.0.0.1")},
		Server:     true,
	})
	if err != nil {
		return nil, err
	}
	agentCert, agentKey, err := e.ca.SignFiles(dir, "agent-client", cluster.CertRequest{
		CommonName: agentapi.WebhookIdentity, Client: true,
	})
	if err != nil {
		return nil, err
	}
	// The webhook talks to the API server as its ServiceAccount would, with the RBAC from deploy/:
	// a missing permission there fails these tests.
	cert, key, err := e.ca.Sign(cluster.CertRequest{
		CommonName:   "system:serviceaccount:stasis-system:stasis-webhook",
		Organization: []string{"system:serviceaccounts", "system:serviceaccounts:stasis-system"},
		Client:       true,
	})
	if err != nil {
		return nil, err
	}
	kubeconfig := filepath.Join(dir, "webhook.kubeconfig")
	if err := e.cluster.WriteKubeconfig(kubeconfig, "stasis-webhook", cert, key); err != nil {
		return nil, err
	}
	caFile := filepath.Join(dir, "ca.crt")
	caPEM, _ := e.cluster.CA()
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		return nil, err
	}
	return &webhookProcess{
		e: e, port: port, healthPort: healthPort,
		logPath: filepath.Join(e.cluster.LogDir(), "webhook.log"),
		policy:  "fail-closed",
		args: []string{"webhook",
			"--listen=127.0.0.1:" + strconv.Itoa(port),
			"--health-listen=127.0.0.1:" + strconv.Itoa(healthPort),
			"--tls-cert-file=" + servingCert,
			"--tls-key-file=" + servingKey,
			"--kubeconfig=" + kubeconfig,
			"--agent-endpoint=" + e.agent.URL(),
			"--agent-ca-file=" + caFile,
			"--agent-cert-file=" + agentCert,
			"--agent-key-file=" + agentKey,
			"--wait-budget=" + waitBudget.String(),
			"--tools-image=stasis-tools:integration",
			"--log-level=debug",
		},
	}, nil
}

func (w *webhookProcess) url(path string) string {
	return fmt.Sprintf("https://127.0.0.1:%d%s", w.port, path)
}

// start runs the webhook with the current failure policy and waits for /readyz.
func (w *webhookProcess) start(ctx context.Context) error {
	f, err := os.OpenFile(w.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	args := append(append([]string{}, w.args...), "--failure-policy="+w.policy)
	fmt.Fprintf(f, "### %s %s\n", w.e.stasisBin, strings.Join(args, " "))
	cmd := exec.Command(w.e.stasisBin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start stasis webhook: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(done) }()
	w.cmd, w.done = cmd, done

	for {
		select {
		case <-done:
			return fmt.Errorf("stasis webhook exited at start; last lines of %s:\n%s", w.logPath, tail(w.logPath, 20))
		case <-ctx.Done():
			return fmt.Errorf("stasis webhook not ready; last lines of %s:\n%s", w.logPath, tail(w.logPath, 20))
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", w.healthPort))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
	}
}

// stop ends the webhook by PID: SIGTERM (graceful shutdown), SIGKILL after 15 s.
func (w *webhookProcess) stop() error {
	if w.cmd == nil {
		return nil
	}
	defer func() { w.cmd = nil }()
	select {
	case <-w.done:
		return nil
	default:
	}
	_ = w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-w.done:
		return nil
	case <-time.After(15 * time.Second):
	}
	_ = w.cmd.Process.Kill()
	<-w.done
	return errors.New("stasis webhook did not stop on SIGTERM within 15 s")
}

// restart stops the webhook and starts it again with the given failure policy.
func (w *webhookProcess) restart(ctx context.Context, policy string) error {
	if err := w.stop(); err != nil {
		return err
	}
	w.policy = policy
	return w.start(ctx)
}

// metrics scrapes /metrics on the health port.
func (w *webhookProcess) metrics() (string, error) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", w.healthPort))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("/metrics answered %d: %s", resp.StatusCode, b)
	}
	return string(b), err
}

// reviews counts the admission reviews the webhook handled (its review-duration histogram),
// optionally only those about one namespace ("" = all) and one webhook id ("" = all:
// eviction, job-suspend, pod, job). It restarts from 0 when the webhook restarts.
func (w *webhookProcess) reviews(namespace, id string) (int, error) {
	text, err := w.metrics()
	if err != nil {
		return 0, err
	}
	return sumSamples(text, `stasis_webhook_review_duration_seconds_count`, map[string]string{
		"namespace": namespace, "webhook": id,
	}), nil
}

var sampleRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? ([0-9.eE+-]+)`)
var labelRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

// sumSamples adds the values of the samples whose name matches nameRE and whose labels match every
// non-empty entry of want.
func sumSamples(text, nameRE string, want map[string]string) int {
	re := regexp.MustCompile("^" + nameRE + "$")
	total := 0.0
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		m := sampleRE.FindStringSubmatch(sc.Text())
		if m == nil || !re.MatchString(m[1]) {
			continue
		}
		labels := map[string]string{}
		for _, l := range labelRE.FindAllStringSubmatch(m[3], -1) {
			labels[l[1]] = l[2]
		}
		ok := true
		for k, v := range want {
			if v != "" && labels[k] != v {
				ok = false
			}
		}
		if ok {
			v, _ := strconv.ParseFloat(m[4], 64)
			total += v
		}
	}
	return int(total)
}

// deployDir is deploy/base in the work tree: the tests apply the same files users apply.
func deployDir() string {
	root, err := cluster.RepoRoot()
	if err != nil {
		panic(err)
	}
	return filepath.Join(root, "deploy", "base")
}

// applyWebhookRBAC applies the webhook's namespace, ServiceAccount and RBAC from deploy/base.
func applyWebhookRBAC(ctx context.Context, e *environment) error {
	if out, err := e.kubectl(ctx, "apply", "-f", filepath.Join(deployDir(), "namespace.yaml"),
		"-f", filepath.Join(deployDir(), "webhook-rbac.yaml")); err != nil {
		return fmt.Errorf("apply deploy/base namespace and RBAC: %v\n%s", err, out)
	}
	return nil
}

// applyWebhookConfigurations applies the webhook
// configurations from deploy/base/webhook-configurations.yaml — the single source — with two
// changes only: each clientConfig.service becomes a url on 127.0.0.1 (the webhook runs on the
// host, not behind a Service) and caBundle is the cluster CA.
func applyWebhookConfigurations(ctx context.Context, e *environment) error {
	data, err := os.ReadFile(filepath.Join(deployDir(), "webhook-configurations.yaml"))
	if err != nil {
		return err
	}
	caPEM, _ := e.cluster.CA()
	rewrite := func(cc *admissionregistrationv1.WebhookClientConfig, name string) error {
		if cc.Service == nil || cc.Service.Path == nil {
			return fmt.Errorf("webhook %s: clientConfig.service.path missing in deploy/base/webhook-configurations.yaml", name)
		}
		u := e.webhook.url(*cc.Service.Path)
		cc.Service, cc.URL, cc.CABundle = nil, &u, caPEM
		return nil
	}
	dec := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	n := 0
	for {
		doc, err := dec.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return err
		}
		client := e.cluster.Client().AdmissionregistrationV1()
		switch meta.Kind {
		case "ValidatingWebhookConfiguration":
			var c admissionregistrationv1.ValidatingWebhookConfiguration
			if err := yaml.UnmarshalStrict(doc, &c); err != nil {
				return fmt.Errorf("deploy/base/webhook-configurations.yaml: %w", err)
			}
			for i := range c.Webhooks {
				if err := rewrite(&c.Webhooks[i].ClientConfig, c.Webhooks[i].Name); err != nil {
					return err
				}
			}
			_ = client.ValidatingWebhookConfigurations().Delete(ctx, c.Name, metav1.DeleteOptions{})
			if _, err := client.ValidatingWebhookConfigurations().Create(ctx, &c, metav1.CreateOptions{}); err != nil {
				return err
			}
			n += len(c.Webhooks)
		case "MutatingWebhookConfiguration":
			var c admissionregistrationv1.MutatingWebhookConfiguration
			if err := yaml.UnmarshalStrict(doc, &c); err != nil {
				return fmt.Errorf("deploy/base/webhook-configurations.yaml: %w", err)
			}
			for i := range c.Webhooks {
				if err := rewrite(&c.Webhooks[i].ClientConfig, c.Webhooks[i].Name); err != nil {
					return err
				}
			}
			_ = client.MutatingWebhookConfigurations().Delete(ctx, c.Name, metav1.DeleteOptions{})
			if _, err := client.MutatingWebhookConfigurations().Create(ctx, &c, metav1.CreateOptions{}); err != nil {
				return err
			}
			n += len(c.Webhooks)
		case "":
			continue
		default:
			return fmt.Errorf("deploy/base/webhook-configurations.yaml: unexpected kind %q", meta.Kind)
		}
	}
	if n != 5 {
		return fmt.Errorf("deploy/base/webhook-configurations.yaml: %d webhooks, want 5 (eviction, job-suspend, pod, job, deployment)", n)
	}
	return nil
}

// startFakeAgent starts the FAKE agent (scripted dumps, no CRIU) with a serving certificate for
// agentapi.ServerName signed by the cluster CA; only agentapi.WebhookIdentity may call it.
func startFakeAgent(ca *cluster.CA) (*fakeagent.Agent, error) {
	cert, key, err := ca.Sign(cluster.CertRequest{
		CommonName: agentapi.ServerName, DNSNames: []string{agentapi.ServerName},
		IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true,
	})
	if err != nil {
		return nil, err
	}
	return fakeagent.Start(fakeagent.Config{
		ServerCertPEM: cert, ServerKeyPEM: key, ClientCAPEM: ca.CertPEM, Node: "fake-agent",
		// Unscripted pods: a dump that fits the wait budget.
		Default: fakeagent.Script{Duration: 200 * time.Millisecond, Bytes: 32 << 20},
	})
}

func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// kubectl runs the kubectl v1.37.2 built with the control plane (not the machine's) against the
// test cluster and returns its combined output.
func (e *environment) kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, e.kubectlBin, append([]string{"--kubeconfig=" + e.cluster.Kubeconfig()}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

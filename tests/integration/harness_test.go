//go:build integration

package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/tests/cluster"
)

// The control plane is the real one, at the pinned version, with RBAC on.
func TestControlPlaneIsRealAPIServerWithRBAC(t *testing.T) {
	s := newScenario(t, "harness-cp")
	out, err := s.kubectl("version", "-o", "json")
	require.NoError(t, err, out)
	assert.Contains(t, out, `"gitVersion": "v1.37.2"`, "server and kubectl are the v1.37.2 builds")

	// The webhook runs as its ServiceAccount with deploy/'s RBAC: it may read pods, not Secrets.
	out, err = s.kubectl("auth", "can-i", "list", "pods", "--as=system:serviceaccount:stasis-system:stasis-webhook")
	require.NoError(t, err, out)
	assert.Equal(t, "yes", strings.TrimSpace(out))
	out, _ = s.kubectl("auth", "can-i", "get", "secrets", "--as=system:serviceaccount:stasis-system:stasis-webhook")
	assert.Equal(t, "no", strings.TrimSpace(out))
}

// The webhook configurations come from deploy/base/webhook-configurations.yaml; only the client
// config (URL on loopback instead of the Service) and the caBundle differ.
func TestWebhookConfigurationsAppliedFromDeploy(t *testing.T) {
	s := newScenario(t, "harness-config")
	v, err := s.c.AdmissionregistrationV1().ValidatingWebhookConfigurations().Get(s.ctx, "stasis", metav1.GetOptions{})
	require.NoError(t, err)
	m, err := s.c.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(s.ctx, "stasis", metav1.GetOptions{})
	require.NoError(t, err)
	paths := map[string]string{}
	for _, w := range v.Webhooks {
		require.NotNil(t, w.ClientConfig.URL)
		assert.NotEmpty(t, w.ClientConfig.CABundle)
		paths[w.Name] = *w.ClientConfig.URL
	}
	for _, w := range m.Webhooks {
		require.NotNil(t, w.ClientConfig.URL)
		assert.NotEmpty(t, w.ClientConfig.CABundle)
		paths[w.Name] = *w.ClientConfig.URL
	}
	assert.Equal(t, map[string]string{
		"evictions.stasis.dev":    env.webhook.url("/validate/eviction"),
		"job-suspends.stasis.dev": env.webhook.url("/validate/job-suspend"),
		"pods.stasis.dev":         env.webhook.url("/mutate/pod"),
		"jobs.stasis.dev":         env.webhook.url("/mutate/job"),
		"deployments.stasis.dev":  env.webhook.url("/mutate/deployment"),
	}, paths)
}

// Admission reaches the real webhook over TLS: a dry-run create of an enabled pod comes back
// wired, and nothing is created.
func TestAdmissionReachesWebhookDryRunPod_NoKubelet(t *testing.T) {
	s := newScenario(t, "harness-admission", "a")
	s.createPVC("checkpointing-volume")
	p := s.podObject("dry", podOpts{node: s.nodes[0], pvc: "checkpointing-volume",
		labels: enabled(storageLabel, "checkpointing")})
	before := s.reviews("pod")
	out, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, p, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	require.NoError(t, err)
	assert.Equal(t, "true", out.Annotations["stasis.dev/wired"], "the dry-run answer carries the webhook's mutation")
	assert.Greater(t, s.reviews("pod"), before)
	_, err = s.c.CoreV1().Pods(s.ns).Get(s.ctx, "dry", metav1.GetOptions{})
	assert.True(t, err != nil, "a dry run creates nothing")
}

// tests/cluster without the controller-manager: the harness creates the default ServiceAccount
// itself, and Stop leaves no process behind (checked by PID).
func TestClusterWithoutControllerManagerStartsAndStopsClean(t *testing.T) {
	bin, err := cluster.Binaries()
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := cluster.Start(ctx, cluster.Options{Dir: t.TempDir(), BinDir: bin})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Stop() })

	_, err = c.Client().CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
	require.NoError(t, err, "default ServiceAccount created by the harness")
	pids := map[string]int{}
	for _, name := range []string{"etcd", "kube-apiserver"} {
		data, err := os.ReadFile(filepath.Join(c.Dir(), "pids", name+".pid"))
		require.NoError(t, err)
		pids[name], err = strconv.Atoi(strings.TrimSpace(string(data)))
		require.NoError(t, err)
	}
	require.NoError(t, c.Stop())
	for name, pid := range pids {
		_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
		assert.True(t, os.IsNotExist(err), "%s (pid %d) still running after Stop", name, pid)
	}
	_, err = c.Client().CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	assert.Error(t, err, "the API server is gone")
}

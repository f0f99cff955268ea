//go:build integration

package deploy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/certs"
)

// readSecretDir reads one Secret's files as `stasis certs --out-dir` wrote them.
func readSecretDir(t *testing.T, dir, secret string) map[string][]byte {
	t.Helper()
	data := map[string][]byte{}
	for _, k := range []string{"tls.crt", "tls.key", "ca.crt"} {
		b, err := os.ReadFile(filepath.Join(dir, secret, k))
		require.NoError(t, err)
		data[k] = b
	}
	return data
}

// The agent started with the agent Secret's files (mounted as the DaemonSet mounts them) serves the
// webhook's client certificate, refuses a caller without one, and picks up a renewed serving
// certificate without a restart.
func TestAgentServesSecretFiles(t *testing.T) {
	tl := needTools(t)
	criu, err := exec.Command(filepath.Join(tl.root, "hack/criu/install.sh")).Output()
	require.NoError(t, err, "CRIU 4.x for the agent's version gate: hack/criu/install.sh (`make criu`)")

	out := filepath.Join(t.TempDir(), "tls")
	o, err := exec.Command(tl.stasis, "certs", "--out-dir", out).CombinedOutput()
	require.NoError(t, err, "stasis certs: %s", o)
	serving := newSecretFiles(t)
	serving.write(t, readSecretDir(t, out, certs.AgentSecret))
	client := readSecretDir(t, out, certs.AgentClientSecret)

	port := freePort(t, "127.0.0.1")
	hport := freePort(t, "127.0.0.1")
	addr := "127.0.0.1:" + strconv.Itoa(port)
	cmd := exec.Command(tl.stasis, "agent")
	// The DaemonSet's configuration (env), with this host's addresses and no container runtime:
	// only the TLS side is exercised here.
	cmd.Env = append(os.Environ(),
		"NODE_NAME=deploy-test-node",
		"STASIS_NODE_NAME=deploy-test-node",
		"STASIS_LISTEN="+addr,
		"STASIS_HEALTH_LISTEN=127.0.0.1:"+strconv.Itoa(hport),
		"STASIS_TLS_CERT_FILE="+serving.path("tls.crt"),
		"STASIS_TLS_KEY_FILE="+serving.path("tls.key"),
		"STASIS_CLIENT_CA_FILE="+serving.path("ca.crt"),
		"STASIS_CRI_ENDPOINT=unix://"+filepath.Join(t.TempDir(), "no-runtime.sock"),
		"STASIS_CRIU_PATH="+strings.TrimSpace(string(criu)),
		"STASIS_SOCKET_DIR="+t.TempDir(),
	)
	agent := startProcess(t, "stasis agent", cmd)
	health := "http://127.0.0.1:" + strconv.Itoa(hport)
	agent.waitReady(t, health+"/healthz")
	// Live but not ready: /readyz reflects the parts, and no container runtime answers here.
	resp, err := http.Get(health + "/readyz")
	require.NoError(t, err)
	why, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "/readyz without a container runtime: %s", why)
	assert.Contains(t, string(why), "container runtime")
	assert.NotContains(t, string(why), "serving certificate", "the Secret's certificate is valid")

	roots := pool(t, client["ca.crt"])
	cert, err := tls.X509KeyPair(client["tls.crt"], client["tls.key"])
	require.NoError(t, err)
	base := "https://" + addr
	webhook := agentapi.NewClient(&tls.Config{RootCAs: roots, ServerName: agentapi.ServerName, Certificates: []tls.Certificate{cert}}, 10*time.Second)
	_, err = webhook.List(context.Background(), base)
	require.NoError(t, err, "the webhook's client certificate (Secret %s) must be accepted", certs.AgentClientSecret)

	anonymous := agentapi.NewClient(&tls.Config{RootCAs: roots, ServerName: agentapi.ServerName}, 10*time.Second)
	_, err = anonymous.List(context.Background(), base)
	require.Error(t, err, "a caller without a client certificate must be refused")
	var se *agentapi.StatusError
	if errors.As(err, &se) {
		assert.Equal(t, http.StatusUnauthorized, se.Code)
	}
	_, err = anonymous.Checkpoint(context.Background(), base, agentapi.CheckpointRequest{
		Pod: agentapi.PodRef{Namespace: "x", Name: "y", UID: "z"}, Containers: []agentapi.ContainerSpec{{Name: "c", Dir: "/d"}},
	})
	require.Error(t, err, "a caller without a client certificate must not start a dump")

	before, err := servedCert(addr, agentapi.ServerName, roots, &cert)
	require.NoError(t, err)
	// Renewal: same CA, new leaf, files swapped the way the kubelet updates a secret volume.
	o, err = exec.Command(tl.stasis, "certs", "--out-dir", out).CombinedOutput()
	require.NoError(t, err, "stasis certs: %s", o)
	renewed := readSecretDir(t, out, certs.AgentSecret)
	want := leafOf(t, renewed).SerialNumber
	require.NotEqual(t, 0, want.Cmp(before.SerialNumber))
	serving.write(t, renewed)
	eventually(t, time.Minute, "the agent serves the renewed certificate", func() error {
		got, err := servedCert(addr, agentapi.ServerName, roots, &cert)
		if err != nil {
			return err
		}
		if got.SerialNumber.Cmp(want) != 0 {
			return errf("serial %s, want %s", got.SerialNumber, want)
		}
		return nil
	})
	select {
	case <-agent.exited:
		t.Fatalf("the agent exited during the renewal: %v", agent.err)
	default:
	}
	_, err = webhook.List(context.Background(), base)
	require.NoError(t, err, "the webhook's client certificate still works after the renewal")
}

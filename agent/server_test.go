package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/tests/cluster"
)

// testCA is the integration tier's test PKI (tests/cluster), so that the agent's mTLS is tested
// with the same kind of certificates the other tiers use.
type testCA struct {
	*cluster.CA
	pem []byte
}

func newTestCA(t *testing.T) *testCA {
	ca, err := cluster.NewCA("stasis-test-ca")
	require.NoError(t, err)
	return &testCA{CA: ca, pem: ca.CertPEM}
}

// issue returns PEM cert and key for a leaf named cn (also its DNS SAN).
func (ca *testCA) issue(t *testing.T, cn string, usage x509.ExtKeyUsage) ([]byte, []byte) {
	crt, key, err := ca.Sign(cluster.CertRequest{CommonName: cn, DNSNames: []string{cn},
		Server: usage == x509.ExtKeyUsageServerAuth, Client: usage == x509.ExtKeyUsageClientAuth})
	require.NoError(t, err)
	return crt, key
}

// startAPI serves the agent API with real mTLS on a loopback port and returns its base URL.
func startAPI(t *testing.T, a *Agent, ca *testCA) string {
	dir := t.TempDir()
	crt, key := ca.issue(t, agentapi.ServerName, x509.ExtKeyUsageServerAuth)
	for n, b := range map[string][]byte{"tls.crt": crt, "tls.key": key, "ca.crt": ca.pem} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, n), b, 0o600))
	}
	tlsCfg, _, err := serverTLS(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt"))
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: Handler(a), TLSConfig: tlsCfg, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { _ = srv.Close() })
	return "https://" + ln.Addr().String()
}

func clientAs(t *testing.T, ca *testCA, cn string) *agentapi.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.pem)
	cfg := &tls.Config{RootCAs: pool, ServerName: agentapi.ServerName, MinVersion: tls.VersionTLS12}
	if cn != "" {
		crt, key := ca.issue(t, cn, x509.ExtKeyUsageClientAuth)
		pair, err := tls.X509KeyPair(crt, key)
		require.NoError(t, err)
		cfg.Certificates = []tls.Certificate{pair}
	}
	return agentapi.NewClient(cfg, 10*time.Second)
}

// Only the webhook's identity may start or delete dumps: no client certificate → 401, another
// identity → 403, a certificate from another CA → refused in the handshake.
func TestAPIAuthentication(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// No dump runs here: an empty folder stands for the CRIU bundle.
	a, err := New(ctx, Config{Finder: pidFinder{}, NodeName: "node-a", Criu: criurun.Bundle{Dir: t.TempDir()}, ManifestKey: testKey, Log: zerolog.New(zerolog.NewTestWriter(t))})
	require.NoError(t, err)
	ca := newTestCA(t)
	base := startAPI(t, a, ca)
	req := agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "ns", Name: "p", UID: "uid-x"},
		Containers: []agentapi.ContainerSpec{{Name: "app", Dir: "/stasis/checkpoints/x/app"}}}

	code := func(err error) int {
		var se *agentapi.StatusError
		if assert.ErrorAs(t, err, &se) {
			return se.Code
		}
		return 0
	}
	tests := []struct {
		name   string
		client *agentapi.Client
		call   func(c *agentapi.Client) error
		want   int
	}{
		{"no client cert: POST", clientAs(t, ca, ""), func(c *agentapi.Client) error { _, err := c.Checkpoint(ctx, base, req); return err }, 401},
		{"no client cert: GET", clientAs(t, ca, ""), func(c *agentapi.Client) error { _, err := c.List(ctx, base); return err }, 401},
		{"other identity: POST", clientAs(t, ca, "someone-else"), func(c *agentapi.Client) error { _, err := c.Checkpoint(ctx, base, req); return err }, 403},
		{"other identity: DELETE", clientAs(t, ca, "someone-else"), func(c *agentapi.Client) error { return c.Delete(ctx, base, "uid-x") }, 403},
		{"other identity: GET unknown", clientAs(t, ca, "someone-else"), func(c *agentapi.Client) error { _, err := c.Status(ctx, base, "nope"); return err }, 404},
		{"webhook: bad request names the field", clientAs(t, ca, agentapi.WebhookIdentity), func(c *agentapi.Client) error {
			_, err := c.Checkpoint(ctx, base, agentapi.CheckpointRequest{Pod: agentapi.PodRef{UID: "u"}, Containers: []agentapi.ContainerSpec{{Name: "app", Dir: "rel"}}})
			if err != nil {
				assert.Contains(t, err.Error(), "containers[0].dir")
			}
			return err
		}, 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, code(tt.call(tt.client)))
		})
	}

	// The webhook is accepted (the dump itself fails: no such container here).
	st, err := clientAs(t, ca, agentapi.WebhookIdentity).Checkpoint(ctx, base, req)
	require.NoError(t, err)
	assert.Equal(t, "uid-x", st.Pod.UID)
	final, err := a.Wait(ctx, "uid-x")
	require.NoError(t, err)
	assert.Equal(t, agentapi.PhaseFailed, final.Phase)
	assert.Contains(t, final.Message, `no such container "app"`)

	// A certificate from another CA does not get through the handshake.
	_, err = clientAs(t, newTestCA(t), agentapi.WebhookIdentity).Checkpoint(ctx, base, req)
	require.Error(t, err)
	var se *agentapi.StatusError
	assert.False(t, errors.As(err, &se), "refused in TLS, not by HTTP: %v", err)
}

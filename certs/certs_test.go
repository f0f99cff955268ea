package certs

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/yaml"

	"github.com/stasis-k8s/stasis/agentapi"
)

func mustIssue(t *testing.T) Bundle {
	t.Helper()
	ca, err := NewCA(time.Now(), 24*time.Hour)
	require.NoError(t, err)
	b, err := Issue(ca, Request{Validity: time.Hour})
	require.NoError(t, err)
	return b
}

func secret(t *testing.T, b Bundle, name string) Secret {
	t.Helper()
	for _, s := range b.Secrets {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("no Secret %s in the bundle", name)
	return Secret{}
}

func leaf(t *testing.T, s Secret) *x509.Certificate {
	t.Helper()
	blk, _ := pem.Decode(s.Data[KeyCert])
	require.NotNil(t, blk, "%s: tls.crt is not PEM", s.Name)
	c, err := x509.ParseCertificate(blk.Bytes)
	require.NoError(t, err)
	return c
}

func TestIssueCertificates(t *testing.T) {
	b := mustIssue(t)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(b.CABundle()))

	tests := []struct {
		secret string
		dns    string // verified name
		usage  x509.ExtKeyUsage
		cn     string
	}{
		{WebhookSecret, "stasis-webhook.stasis-system.svc", x509.ExtKeyUsageServerAuth, "stasis-webhook.stasis-system.svc"},
		{WebhookSecret, "stasis-webhook.stasis-system.svc.cluster.local", x509.ExtKeyUsageServerAuth, "stasis-webhook.stasis-system.svc"},
		{AgentSecret, agentapi.ServerName, x509.ExtKeyUsageServerAuth, agentapi.ServerName},
		{AgentClientSecret, agentapi.WebhookIdentity, x509.ExtKeyUsageClientAuth, agentapi.WebhookIdentity},
	}
	for _, tc := range tests {
		t.Run(tc.secret+"/"+tc.dns, func(t *testing.T) {
			s := secret(t, b, tc.secret)
			assert.Equal(t, b.CA.CertPEM, s.Data[KeyCA], "ca.crt must be the CA")
			_, err := tls.X509KeyPair(s.Data[KeyCert], s.Data[KeyKey])
			require.NoError(t, err, "tls.crt and tls.key must match")
			c := leaf(t, s)
			assert.Equal(t, tc.cn, c.Subject.CommonName)
			_, err = c.Verify(x509.VerifyOptions{DNSName: tc.dns, Roots: pool, KeyUsages: []x509.ExtKeyUsage{tc.usage}})
			assert.NoError(t, err)
			assert.False(t, c.IsCA)
		})
	}
	// A server certificate must not pass as a client certificate and vice versa.
	_, err := leaf(t, secret(t, b, AgentSecret)).Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	assert.Error(t, err)
	_, err = leaf(t, secret(t, b, AgentClientSecret)).Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	assert.Error(t, err)
}

func TestIssueErrors(t *testing.T) {
	ca, err := NewCA(time.Now(), time.Hour)
	require.NoError(t, err)
	other, err := NewCA(time.Now(), time.Hour)
	require.NoError(t, err)
	b := mustIssue(t)

	tests := []struct {
		name string
		ca   Pair
		req  Request
		want string
	}{
		{"leaf outlives CA", ca, Request{Validity: 2 * time.Hour}, "would expire after its CA"},
		{"mismatched key", Pair{CertPEM: ca.CertPEM, KeyPEM: other.KeyPEM}, Request{Validity: time.Minute}, "do not form a pair"},
		{"not a CA", Pair{CertPEM: secret(t, b, AgentSecret).Data[KeyCert], KeyPEM: secret(t, b, AgentSecret).Data[KeyKey]}, Request{Validity: time.Minute}, "not a CA"},
		{"garbage", Pair{CertPEM: []byte("x"), KeyPEM: []byte("y")}, Request{Validity: time.Minute}, "CA:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Issue(tc.ca, tc.req)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no output", Config{Validity: time.Hour, CAValidity: 2 * time.Hour}, "--out-dir"},
		{"zero validity", Config{OutDir: "x", CAValidity: time.Hour}, "--validity"},
		{"CA shorter than leaves", Config{OutDir: "x", Validity: 2 * time.Hour, CAValidity: time.Hour}, "--ca-validity"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.validate()
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

// The files `stasis certs --out-dir` writes are what the overlay's secretGenerator reads; a second
// run keeps the CA (so the caBundle stays valid) and renews the leaves.
func TestMakeOutDirReusesCA(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{OutDir: dir, Validity: time.Hour, CAValidity: 24 * time.Hour, Logger: zerolog.Nop()}
	require.NoError(t, Make(context.Background(), cfg))

	files := []string{"ca.crt", "ca.key", "secrets.yaml"}
	for _, s := range []string{WebhookSecret, AgentSecret, AgentClientSecret} {
		for _, k := range []string{KeyCert, KeyKey, KeyCA} {
			files = append(files, filepath.Join(s, k))
		}
	}
	for _, f := range files {
		st, err := os.Stat(filepath.Join(dir, f))
		require.NoError(t, err, f)
		if filepath.Base(f) == "tls.key" || f == "ca.key" || f == "secrets.yaml" {
			assert.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "%s holds a private key", f)
		}
	}
	ca1 := read(t, dir, "ca.crt")
	leaf1 := read(t, dir, WebhookSecret, KeyCert)

	require.NoError(t, Make(context.Background(), cfg))
	assert.Equal(t, ca1, read(t, dir, "ca.crt"), "the CA must be reused")
	assert.NotEqual(t, leaf1, read(t, dir, WebhookSecret, KeyCert), "the leaves must be renewed")
	assert.Equal(t, ca1, read(t, dir, AgentSecret, KeyCA))

	cfg.NewCA = true
	require.NoError(t, Make(context.Background(), cfg))
	assert.NotEqual(t, ca1, read(t, dir, "ca.crt"), "--new-ca must replace the CA")

	require.NoError(t, os.WriteFile(filepath.Join(dir, "ca.key"), []byte("junk"), 0o600))
	cfg.NewCA = false
	err := Make(context.Background(), cfg)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "--new-ca")
}

func read(t *testing.T, parts ...string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(parts...))
	require.NoError(t, err)
	return b
}

func TestSecretManifests(t *testing.T) {
	b := mustIssue(t)
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(SecretManifests("ns1", b.Secrets)), 4096)
	var got []corev1.Secret
	for {
		var s corev1.Secret
		err := dec.Decode(&s)
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		got = append(got, s)
	}
	require.Len(t, got, 3)
	for i, s := range got {
		assert.Equal(t, "Secret", s.Kind)
		assert.Equal(t, b.Secrets[i].Name, s.Name)
		assert.Equal(t, "ns1", s.Namespace)
		assert.Equal(t, corev1.SecretTypeTLS, s.Type)
		assert.Equal(t, b.Secrets[i].Data, s.Data)
	}
}

// The agent-API certificates work together the way the agent (server, requires a client
// certificate from the CA) and the webhook (client, verifies the fixed name stasis-agent) use them.
func TestAgentMutualTLS(t *testing.T) {
	b := mustIssue(t)
	srv := secret(t, b, AgentSecret)
	cli := secret(t, b, AgentClientSecret)
	srvCert, err := tls.X509KeyPair(srv.Data[KeyCert], srv.Data[KeyKey])
	require.NoError(t, err)
	clientCAs := x509.NewCertPool()
	require.True(t, clientCAs.AppendCertsFromPEM(srv.Data[KeyCA]))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	hs := &http.Server{
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, r.TLS.PeerCertificates[0].Subject.CommonName)
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{srvCert}, ClientCAs: clientCAs, ClientAuth: tls.RequireAndVerifyClientCert},
	}
	go func() { _ = hs.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { _ = hs.Close() })

	roots := x509.NewCertPool()
	require.True(t, roots.AppendCertsFromPEM(cli.Data[KeyCA]))
	cliCert, err := tls.X509KeyPair(cli.Data[KeyCert], cli.Data[KeyKey])
	require.NoError(t, err)
	get := func(cfg *tls.Config) (string, error) {
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 10 * time.Second}
		resp, err := c.Get("https://" + ln.Addr().String())
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return string(body), err
	}
	who, err := get(&tls.Config{RootCAs: roots, ServerName: agentapi.ServerName, Certificates: []tls.Certificate{cliCert}})
	require.NoError(t, err)
	assert.Equal(t, agentapi.WebhookIdentity, who)

	_, err = get(&tls.Config{RootCAs: roots, ServerName: agentapi.ServerName})
	assert.Error(t, err, "a caller without the client certificate must be refused")
}

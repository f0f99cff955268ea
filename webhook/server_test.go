package webhook

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// selfSigned writes a self-signed serving certificate for 127.0.0.1 and returns its PEM.
func selfSigned(t *testing.T, certFile, keyFile, cn string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"stasis-webhook.stasis-system.svc"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	// Write to a temp file and rename, as the kubelet's atomic writer swaps Secret files.
	for _, f := range []struct {
		path string
		data []byte
	}{{keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})}, {certFile, certPEM}} {
		require.NoError(t, os.WriteFile(f.path+".tmp", f.data, 0o600))
		require.NoError(t, os.Rename(f.path+".tmp", f.path))
	}
	return certPEM
}

// The real server: TLS admission endpoint with certificate reload, plain health and metrics,
// graceful shutdown.
func TestServe(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first := selfSigned(t, certFile, keyFile, "first")

	e := newEnv(t, Config{}, nil)
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	healthLn, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var ready atomic.Bool
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ServerConfig{CertFile: certFile, KeyFile: keyFile, CertReload: 20 * time.Millisecond,
			tlsListener: tlsLn, healthListener: healthLn}, e.srv.Config.Handler, e.reg, ready.Load, zerolog.Nop())
	}()

	client := func(caPEM []byte) *http.Client {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(caPEM)
		return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
	}
	base := "https://" + tlsLn.Addr().String()
	health := "http://" + healthLn.Addr().String()

	resp, err := client(first).Post(base+PathEviction, "application/json", bytes.NewReader(fixture(t, "eviction-v1.json")))
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.JSONEq(t, v1Response(evUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"pod is not checkpoint-enabled"}`), string(body))

	get := func(path string) (int, string) {
		r, err := http.Get(health + path)
		require.NoError(t, err)
		defer r.Body.Close()
		b, _ := io.ReadAll(r.Body)
		return r.StatusCode, string(b)
	}
	code, _ := get("/healthz")
	assert.Equal(t, 200, code)
	code, _ = get("/readyz")
	assert.Equal(t, 503, code, "not ready before the caches sync")
	ready.Store(true)
	code, _ = get("/readyz")
	assert.Equal(t, 200, code)
	resp, err = client(first).Post(base+PathMutatePod, "application/json", bytes.NewReader([]byte("{")))
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	code, metrics := get("/metrics")
	assert.Equal(t, 200, code)
	assert.Contains(t, metrics, `stasis_webhook_review_duration_seconds_count{allowed="true",code="200",namespace="default",outcome="decided",webhook="eviction"} 1`)
	assert.Contains(t, metrics, `stasis_webhook_bad_requests_total{webhook="pod"} 1`)

	// cert-manager rotates the certificate: the server picks it up without a restart.
	second := selfSigned(t, certFile, keyFile, "second")
	require.Eventually(t, func() bool {
		r, err := client(second).Post(base+PathEviction, "application/json", bytes.NewReader(fixture(t, "eviction-v1.json")))
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond, "the rotated certificate is served")

	cancel()
	require.NoError(t, <-done, "graceful shutdown")
}

// A stopping server serves on, not ready, for ShutdownDelay: a review the API server sends before
// it sees the endpoint gone is still answered (a refused connection fails the eviction with 500,
// and kubectl drain gives up).
func TestServeOnDuringShutdownDelay(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	ca := selfSigned(t, certFile, keyFile, "only")
	e := newEnv(t, Config{}, nil)
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	healthLn, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ServerConfig{CertFile: certFile, KeyFile: keyFile, ShutdownDelay: time.Second,
			tlsListener: tlsLn, healthListener: healthLn}, e.srv.Config.Handler, e.reg, func() bool { return true }, zerolog.Nop())
	}()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
	post := func() error {
		r, err := client.Post("https://"+tlsLn.Addr().String()+PathEviction, "application/json", bytes.NewReader(fixture(t, "eviction-v1.json")))
		if err == nil {
			r.Body.Close()
		}
		return err
	}
	require.Eventually(t, func() bool { return post() == nil }, 5*time.Second, 20*time.Millisecond)

	cancel()
	time.Sleep(100 * time.Millisecond)
	assert.NoError(t, post(), "answered during the delay")
	r, err := http.Get("http://" + healthLn.Addr().String() + "/readyz")
	require.NoError(t, err)
	r.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, r.StatusCode, "not ready while stopping")
	require.NoError(t, <-done)
	assert.Error(t, post(), "closed after the delay")
}

package serving

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// writePair writes a self-signed pair valid from notBefore for d, swapped in by rename as the
// kubelet's atomic writer does.
func writePair(t *testing.T, certFile, keyFile, cn string, notBefore time.Time, d time.Duration) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: notBefore, NotAfter: notBefore.Add(d), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	crt := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	for path, data := range map[string][]byte{keyFile: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), certFile: crt} {
		require.NoError(t, os.WriteFile(path+".tmp", data, 0o600))
		require.NoError(t, os.Rename(path+".tmp", path))
	}
	return crt
}

func TestCertSourceKeepsPairOnBrokenFiles(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writePair(t, certFile, keyFile, "a", time.Now().Add(-time.Hour), 2*time.Hour)
	s, err := NewCertSource(certFile, keyFile, "")
	require.NoError(t, err)
	before, _ := s.GetCertificate(nil)
	require.NoError(t, os.WriteFile(keyFile, []byte("half-written"), 0o600))
	changed, err := s.Reload()
	assert.False(t, changed)
	assert.ErrorContains(t, err, "loading TLS key pair")
	after, _ := s.GetCertificate(nil)
	assert.Same(t, before, after, "the previous pair stays in use")
	assert.NoError(t, s.Healthy(context.Background()), "a broken rotation does not take a replica out of service while the served pair is valid")

	_, err = NewCertSource(filepath.Join(dir, "missing.crt"), keyFile, "")
	assert.ErrorContains(t, err, "missing.crt")
	_, err = NewCertSource(certFile, keyFile, filepath.Join(dir, "tls.crt.tmp-none"))
	assert.ErrorContains(t, err, "tls.crt.tmp-none")
}

func TestCertSourceHealthyFollowsValidity(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writePair(t, certFile, keyFile, "old", time.Now().Add(-2*time.Hour), time.Hour)
	s, err := NewCertSource(certFile, keyFile, "")
	require.NoError(t, err)
	s.Every = time.Millisecond
	assert.ErrorContains(t, s.Healthy(context.Background()), "expired at")
	writePair(t, certFile, keyFile, "new", time.Now().Add(-time.Minute), time.Hour)
	time.Sleep(2 * time.Millisecond)
	assert.NoError(t, s.Healthy(context.Background()), "the renewed pair is picked up on use")
}

// mTLS through ServerConfig: a client certificate signed by the CA file is verified; the server
// certificate is rotated without a restart.
func TestCertSourceServesMTLSAndRotates(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, caFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt")
	first := writePair(t, certFile, keyFile, "first", time.Now().Add(-time.Hour), 2*time.Hour)
	clientCrt, clientKey := filepath.Join(dir, "c.crt"), filepath.Join(dir, "c.key")
	clientPEM := writePair(t, clientCrt, clientKey, "client", time.Now().Add(-time.Hour), 2*time.Hour)
	require.NoError(t, os.WriteFile(caFile, clientPEM, 0o600))
	s, err := NewCertSource(certFile, keyFile, caFile)
	require.NoError(t, err)
	s.Every = time.Millisecond
	client, err := NewCertSource(clientCrt, clientKey, "")
	require.NoError(t, err)

	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(r.TLS.PeerCertificates) == 0 {
			http.Error(w, "no client certificate", http.StatusUnauthorized)
			return
		}
		_, _ = w.Write([]byte(r.TLS.PeerCertificates[0].Subject.CommonName))
	}))
	srv.TLS = s.ServerConfig()
	srv.StartTLS()
	defer srv.Close()
	get := func(roots []byte, withCert bool) (int, error) {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(roots)
		tc := &tls.Config{RootCAs: pool}
		if withCert {
			tc.GetClientCertificate = client.GetClientCertificate
		}
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}}
		r, err := c.Get(srv.URL)
		if err != nil {
			return 0, err
		}
		r.Body.Close()
		return r.StatusCode, nil
	}
	code, err := get(first, true)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, code)
	code, err = get(first, false)
	require.NoError(t, err)
	assert.Equal(t, http.StatusUnauthorized, code, "no certificate reaches the handler, which says so")

	second := writePair(t, certFile, keyFile, "second", time.Now().Add(-time.Hour), 2*time.Hour)
	time.Sleep(2 * time.Millisecond)
	code, err = get(second, true)
	require.NoError(t, err, "the rotated certificate is served without a restart")
	assert.Equal(t, http.StatusOK, code)
}

// Group stops every server when one fails, calling Draining first.
func TestGroupStopsAllWhenOneFails(t *testing.T) {
	ok, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	broken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	broken.Close() // Serve fails at once
	drained := false
	err = Group{Servers: []Server{
		{Name: "health", HTTP: Health(prometheus.NewRegistry()), Ln: ok},
		{Name: "broken", HTTP: &http.Server{ReadHeaderTimeout: time.Second}, Ln: broken},
	}, Grace: time.Second, Draining: func() { drained = true }}.Run(context.Background())
	assert.ErrorContains(t, err, "broken server")
	assert.True(t, drained)
	_, err = http.Get("http://" + ok.Addr().String() + "/healthz")
	assert.Error(t, err, "the healthy server was shut down too")
}

func TestReadyNamesFailingChecks(t *testing.T) {
	h := Ready(Check{"a", func(context.Context) error { return nil }}, Check{"b", func(context.Context) error { return os.ErrNotExist }})
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	assert.Equal(t, http.StatusServiceUnavailable, w.Code)
	assert.Contains(t, w.Body.String(), "b: file does not exist")
	assert.NotContains(t, w.Body.String(), "a:")
}

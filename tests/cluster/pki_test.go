package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSignedCertificatesVerifyAgainstCA(t *testing.T) {
	ca, err := NewCA("test-ca")
	require.NoError(t, err)
	loaded, err := LoadCA(ca.CertPEM, ca.KeyPEM)
	require.NoError(t, err, "the pair Cluster.CA returns loads back")

	certPEM, keyPEM, err := loaded.Sign(CertRequest{CommonName: "webhook", DNSNames: []string{"svc.ns.svc"},
		IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true})
	require.NoError(t, err)
	_, err = tls.X509KeyPair(certPEM, keyPEM)
	require.NoError(t, err)

	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.CertPEM)
	_, err = cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: "svc.ns.svc", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	assert.NoError(t, err)
	_, err = cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: "127.0.0.1"})
	assert.NoError(t, err)
	_, err = cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	assert.Error(t, err, "a server certificate is not a client certificate")

	dir := t.TempDir()
	cf, kf, err := ca.SignFiles(dir, "client", CertRequest{CommonName: "admin", Organization: []string{"system:masters"}, Client: true})
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "client.crt"), cf)
	_, err = tls.LoadX509KeyPair(cf, kf)
	require.NoError(t, err)
	st, err := os.Stat(kf)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "keys are private")
}

func TestOptionsDefaultsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{}, "Options.Dir"},
		{Options{Dir: "d"}, "Options.BinDir"},
		{Options{Dir: "d", BinDir: "b", AdvertiseAddress: "nope"}, "Options.AdvertiseAddress"},
		{Options{Dir: "d", BinDir: "b", ServiceCIDR: "10.0.0.0"}, "Options.ServiceCIDR"},
		{Options{Dir: "d", BinDir: "b", HostPathProvisioner: true}, "Options.HostPathProvisioner"},
	} {
		err := tc.o.defaults()
		require.Error(t, err)
		assert.Contains(t, err.Error(), tc.want)
	}
	o := Options{Dir: "d", BinDir: "b"}
	require.NoError(t, o.defaults())
	assert.Equal(t, "127.0.0.1", o.AdvertiseAddress)
	assert.Equal(t, "10.0.0.0/24", o.ServiceCIDR)
}

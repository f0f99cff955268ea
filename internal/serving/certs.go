// Package serving is what the webhook and the agent share to serve HTTP: one certificate source
// that follows files rotated by cert-manager, readiness checks, and a run group that starts every
// server and stops them together.
package serving

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// CertSource serves a key pair (and optionally a client CA bundle) from files and picks up new
// ones when the files change: cert-manager rotates the Secret and the kubelet swaps the mounted
// files under a running process. A broken or half-written new pair keeps the current one in use.
// Files are re-read at most every Every, on use, so no goroutine is needed and an idle server
// reads nothing.
type CertSource struct {
	CertFile, KeyFile string
	// CAFile, when set, is the bundle client certificates are verified against (mTLS).
	CAFile string
	// Every bounds how often the files are compared with what is loaded (default 5 s).
	Every time.Duration

	mu      sync.Mutex
	checked time.Time
	pems    [][]byte // cert, key, CA as last loaded
	cert    *tls.Certificate
	pool    *x509.CertPool
}

// NewCertSource loads the files once; a pair that cannot be loaded at start is an error.
func NewCertSource(certFile, keyFile, caFile string) (*CertSource, error) {
	s := &CertSource{CertFile: certFile, KeyFile: keyFile, CAFile: caFile}
	if _, err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the files and swaps what is served when they changed.
func (s *CertSource) Reload() (changed bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reloadLocked()
}

func (s *CertSource) reloadLocked() (bool, error) {
	s.checked = time.Now()
	pems, err := s.read()
	if err == nil && s.pems != nil && equalAll(pems, s.pems) {
		return false, nil
	}
	var cert tls.Certificate
	var pool *x509.CertPool
	if err == nil {
		cert, pool, err = s.parse(pems)
	}
	if err != nil {
		return false, err
	}
	s.pems, s.cert, s.pool = pems, &cert, pool
	return true, nil
}

func (s *CertSource) read() ([][]byte, error) {
	files := []string{s.CertFile, s.KeyFile}
	if s.CAFile != "" {
		files = append(files, s.CAFile)
	}
	pems := make([][]byte, len(files))
	for i, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", f, err)
		}
		pems[i] = b
	}
	return pems, nil
}

func (s *CertSource) parse(pems [][]byte) (tls.Certificate, *x509.CertPool, error) {
	cert, err := tls.X509KeyPair(pems[0], pems[1])
	if err != nil {
		return cert, nil, fmt.Errorf("loading TLS key pair %s, %s: %w", s.CertFile, s.KeyFile, err)
	}
	if s.CAFile == "" {
		return cert, nil, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pems[2]) {
		return cert, nil, fmt.Errorf("client CA %s: no PEM certificate", s.CAFile)
	}
	return cert, pool, nil
}

func equalAll(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

// current returns what is served, re-reading the files when Every has passed.
func (s *CertSource) current() (*tls.Certificate, *x509.CertPool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	every := s.Every
	if every == 0 {
		every = 5 * time.Second
	}
	if time.Since(s.checked) >= every {
		_, _ = s.reloadLocked()
	}
	return s.cert, s.pool
}

// GetCertificate is for a server's tls.Config.
func (s *CertSource) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c, _ := s.current()
	return c, nil
}

// GetClientCertificate is for a client's tls.Config (the webhook's identity towards the agents).
func (s *CertSource) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c, _ := s.current()
	return c, nil
}

// ServerConfig is a server configuration that follows the files. With a CA file, client
// certificates are verified when given (VerifyClientCertIfGiven): a caller without one then gets
// an HTTP 401 with a message from the handler instead of a bare handshake failure.
func (s *CertSource) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			cert, pool := s.current()
			c := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*cert}}
			if pool != nil {
				c.ClientAuth, c.ClientCAs = tls.VerifyClientCertIfGiven, pool
			}
			return c, nil
		},
	}
}

// Healthy is a readiness check: the served certificate is valid now. A rotation that left the
// files broken does not make it fail while the previous pair is still valid: taking every
// replica out of service over it would fail every review instead of none.
func (s *CertSource) Healthy(context.Context) error {
	cert, _ := s.current()
	if cert == nil || cert.Leaf == nil {
		return errors.New("serving certificate: not loaded")
	}
	now := time.Now()
	if now.After(cert.Leaf.NotAfter) {
		return fmt.Errorf("serving certificate %s: expired at %s", s.CertFile, cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(cert.Leaf.NotBefore) {
		return fmt.Errorf("serving certificate %s: not valid before %s", s.CertFile, cert.Leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	return nil
}

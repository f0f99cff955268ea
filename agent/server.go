package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
)

// Handler is the agent's mTLS API (agentapi.PathCheckpoints). Authentication happened in the TLS
// handshake (client certificates signed by --client-ca-file); authorization is here: starting and
// deleting checkpoints is for agentapi.WebhookIdentity only.
func Handler(a *Agent) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+agentapi.PathCheckpoints, func(w http.ResponseWriter, r *http.Request) {
		if !authorize(w, r, true) {
			return
		}
		var req agentapi.CheckpointRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeError(w, http.StatusBadRequest, "request body: "+err.Error())
			return
		}
		st, err := a.Start(req)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("GET "+agentapi.PathCheckpoints, func(w http.ResponseWriter, r *http.Request) {
		if !authorize(w, r, false) {
			return
		}
		writeJSON(w, http.StatusOK, a.List())
	})
	mux.HandleFunc("GET "+agentapi.PathCheckpoints+"/{uid}", func(w http.ResponseWriter, r *http.Request) {
		if !authorize(w, r, false) {
			return
		}
		st, ok := a.Status(r.PathValue("uid"))
		if !ok {
			writeError(w, http.StatusNotFound, "no checkpoint operation for pod "+r.PathValue("uid"))
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("DELETE "+agentapi.PathCheckpoints+"/{uid}", func(w http.ResponseWriter, r *http.Request) {
		if !authorize(w, r, true) {
			return
		}
		if !a.Delete(r.PathValue("uid")) {
			writeError(w, http.StatusNotFound, "no checkpoint operation for pod "+r.PathValue("uid"))
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return mux
}

// authorize answers 401 to callers without a verified client certificate and, for mutations, 403
// to any identity but the webhook's.
func authorize(w http.ResponseWriter, r *http.Request, mutate bool) bool {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.PeerCertificates) == 0 {
		writeError(w, http.StatusUnauthorized, "a client certificate signed by the agent's client CA is required")
		return false
	}
	if mutate && !hasIdentity(r.TLS.PeerCertificates[0], agentapi.WebhookIdentity) {
		writeError(w, http.StatusForbidden, fmt.Sprintf("only %q may start or delete checkpoints", agentapi.WebhookIdentity))
		return false
	}
	return true
}

func hasIdentity(c *x509.Certificate, id string) bool {
	if c.Subject.CommonName == id {
		return true
	}
	for _, n := range c.DNSNames {
		if n == id {
			return true
		}
	}
	return false
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, agentapi.Error{Message: msg})
}

// certReloader serves the certificate and client CA from files, re-reading them when they change
// (cert-manager rotates the Secret; the kubelet updates the mounted files).
type certReloader struct {
	certFile, keyFile, caFile string

	mu      sync.Mutex
	checked time.Time
	stamp   string
	cert    *tls.Certificate
	pool    *x509.CertPool
}

func newCertReloader(certFile, keyFile, caFile string) (*certReloader, error) {
	c := &certReloader{certFile: certFile, keyFile: keyFile, caFile: caFile}
	if err := c.reload(true); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *certReloader) fileStamp() string {
	var b strings.Builder
	for _, f := range []string{c.certFile, c.keyFile, c.caFile} {
		if fi, err := os.Stat(f); err == nil {
			fmt.Fprintf(&b, "%s:%d:%d;", f, fi.Size(), fi.ModTime().UnixNano())
		}
	}
	return b.String()
}

// reload re-reads the files at most every few seconds, and only when they changed. A broken new
// pair keeps the old one in use.
func (c *certReloader) reload(force bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !force && time.Since(c.checked) < 5*time.Second {
		return nil
	}
	c.checked = time.Now()
	stamp := c.fileStamp()
	if !force && stamp == c.stamp {
		return nil
	}
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("--tls-cert-file/--tls-key-file: %w", err)
	}
	ca, err := os.ReadFile(c.caFile)
	if err != nil {
		return fmt.Errorf("--client-ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return fmt.Errorf("--client-ca-file %s: no PEM certificate", c.caFile)
	}
	c.cert, c.pool, c.stamp = &cert, pool, stamp
	return nil
}

// TLSConfig returns a server configuration that reloads the files. Client certificates are
// verified when given (VerifyClientCertIfGiven) so that a caller without one gets an HTTP 401
// with a message rather than a bare handshake failure.
func (c *certReloader) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			_ = c.reload(false)
			c.mu.Lock()
			defer c.mu.Unlock()
			cert, pool := c.cert, c.pool
			return &tls.Config{
				MinVersion:   tls.VersionTLS12,
				Certificates: []tls.Certificate{*cert},
				ClientAuth:   tls.VerifyClientCertIfGiven,
				ClientCAs:    pool,
			}, nil
		},
	}
}

// ServerTLSConfig loads the serving certificate and client CA from files and reloads them on change.
func ServerTLSConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	cfg, _, err := serverTLS(certFile, keyFile, caFile)
	return cfg, err
}

// serverTLS is ServerTLSConfig and the readiness check of its certificate.
func serverTLS(certFile, keyFile, caFile string) (*tls.Config, func(context.Context) error, error) {
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, nil, errors.New("--tls-cert-file, --tls-key-file and --client-ca-file are required (the agent API is mTLS only)")
	}
	r, err := newCertReloader(certFile, keyFile, caFile)
	if err != nil {
		return nil, nil, err
	}
	return r.TLSConfig(), r.Ready, nil
}

// Ready is a readiness check: a serving certificate is loaded (re-read if its files changed) and
// is valid now.
func (c *certReloader) Ready(context.Context) error {
	_ = c.reload(false)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cert == nil || c.cert.Leaf == nil {
		return errors.New("serving certificate: not loaded")
	}
	now := time.Now()
	if now.After(c.cert.Leaf.NotAfter) {
		return fmt.Errorf("serving certificate %s: expired at %s", c.certFile, c.cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(c.cert.Leaf.NotBefore) {
		return fmt.Errorf("serving certificate %s: not valid before %s", c.certFile, c.cert.Leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	return nil
}

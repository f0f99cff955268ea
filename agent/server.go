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

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/internal/serving"
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

// serverTLS is the agent API's mTLS configuration (files rotated by cert-manager are followed)
// and the readiness check of its certificate.
func serverTLS(certFile, keyFile, caFile string) (*tls.Config, func(context.Context) error, error) {
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, nil, errors.New("--tls-cert-file, --tls-key-file and --client-ca-file are required (the agent API is mTLS only)")
	}
	src, err := serving.NewCertSource(certFile, keyFile, caFile)
	if err != nil {
		return nil, nil, fmt.Errorf("--tls-cert-file/--tls-key-file/--client-ca-file: %w", err)
	}
	return src.ServerConfig(), src.Healthy, nil
}

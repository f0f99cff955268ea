// Package fakeagent is a FAKE node agent for the integration tier: a real HTTPS server with mutual
// TLS that speaks the agent API (agentapi) exactly as the webhook expects, but performs no CRIU dump.
// Each dump is scripted — how long it runs, how many bytes it reports, whether it fails — so that
// tests can drive the webhook through 429 sequences and failures inside a real API server. The real
// agent needs a running container (a kubelet and containerd), which only the e2e tier has.
package fakeagent

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
)

// Script is what one dump does.
type Script struct {
	// Duration is how long the dump runs before it finishes.
	Duration time.Duration
	// Fail, when set, makes the dump end Failed with this message.
	Fail string
	// Bytes is the image size reported at the end; progress grows linearly up to it.
	Bytes int64
}

// Config configures the fake agent.
type Config struct {
	// Addr to listen on; 127.0.0.1:0 by default.
	Addr string
	// Node is reported in every status (the fake stands for the agent of this node).
	Node string
	// ServerCertPEM/ServerKeyPEM: the serving certificate, which must name agentapi.ServerName.
	ServerCertPEM, ServerKeyPEM []byte
	// ClientCAPEM verifies client certificates; only agentapi.WebhookIdentity may use the API.
	ClientCAPEM []byte
	// Default is the script of pods without their own (SetScript).
	Default Script
}

func (c *Config) defaults() error {
	if c.Addr == "" {
		c.Addr = "127.0.0.1:0"
	}
	if c.Node == "" {
		c.Node = "fake-node"
	}
	if len(c.ServerCertPEM) == 0 || len(c.ServerKeyPEM) == 0 {
		return errors.New("fakeagent: Config.ServerCertPEM and ServerKeyPEM are required")
	}
	if len(c.ClientCAPEM) == 0 {
		return errors.New("fakeagent: Config.ClientCAPEM is required")
	}
	if c.Default.Bytes == 0 {
		c.Default.Bytes = 64 << 20
	}
	return nil
}

// Dump is one dump the fake agent started (a joined request does not start another).
type Dump struct {
	Request agentapi.CheckpointRequest
	Started time.Time
}

type operation struct {
	req     agentapi.CheckpointRequest
	script  Script
	started time.Time
	id      string
}

// Agent is a running fake agent.
type Agent struct {
	cfg Config
	srv *http.Server
	ln  net.Listener

	mu      sync.Mutex
	scripts map[string]Script // by namespace/name
	ops     map[string]*operation
	dumps   []Dump
	posts   int
	denied  int
	seq     int
}

// Start listens and serves until Close.
func Start(cfg Config) (*Agent, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(cfg.ServerCertPEM, cfg.ServerKeyPEM)
	if err != nil {
		return nil, fmt.Errorf("fakeagent: server key pair: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(cfg.ClientCAPEM) {
		return nil, errors.New("fakeagent: Config.ClientCAPEM holds no certificate")
	}
	a := &Agent{cfg: cfg, scripts: map[string]Script{}, ops: map[string]*operation{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+agentapi.PathCheckpoints, a.start)
	mux.HandleFunc("GET "+agentapi.PathCheckpoints, a.list)
	mux.HandleFunc("GET "+agentapi.PathCheckpoints+"/{uid}", a.get)
	mux.HandleFunc("DELETE "+agentapi.PathCheckpoints+"/{uid}", a.delete)
	a.srv = &http.Server{
		Handler:           a.authenticate(mux),
		ReadHeaderTimeout: 5 * time.Second,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			// Verified if given; a missing certificate gets 401 from authenticate, like the agent.
			ClientAuth: tls.VerifyClientCertIfGiven,
			ClientCAs:  pool,
			MinVersion: tls.VersionTLS12,
		},
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("fakeagent: %w", err)
	}
	a.ln = ln
	go func() { _ = a.srv.ServeTLS(ln, "", "") }()
	return a, nil
}

// URL is the agent's base URL (https://127.0.0.1:port), what the webhook's --agent-endpoint takes.
func (a *Agent) URL() string { return "https://" + a.ln.Addr().String() }

// Close stops the server.
func (a *Agent) Close() error { return a.srv.Close() }

// SetScript scripts the dumps of one pod (by namespace and name, so that tests can script a pod
// before it exists); it applies to dumps started afterwards.
func (a *Agent) SetScript(namespace, name string, s Script) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if s.Bytes == 0 {
		s.Bytes = a.cfg.Default.Bytes
	}
	a.scripts[namespace+"/"+name] = s
}

// Dumps returns every dump started so far, oldest first.
func (a *Agent) Dumps() []Dump {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]Dump(nil), a.dumps...)
}

// DumpsOf counts the dumps started for one pod (namespace/name), whatever its UID.
func (a *Agent) DumpsOf(namespace, name string) int {
	n := 0
	for _, d := range a.Dumps() {
		if d.Request.Pod.Namespace == namespace && d.Request.Pod.Name == name {
			n++
		}
	}
	return n
}

// DumpsIn counts the dumps started for pods of one namespace.
func (a *Agent) DumpsIn(namespace string) int {
	n := 0
	for _, d := range a.Dumps() {
		if d.Request.Pod.Namespace == namespace {
			n++
		}
	}
	return n
}

// Posts counts start-or-join requests (POST /v1/checkpoints), accepted ones only.
func (a *Agent) Posts() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.posts
}

// Denied counts requests refused for a missing or wrong client identity.
func (a *Agent) Denied() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.denied
}

func (a *Agent) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			a.countDenied()
			writeError(w, http.StatusUnauthorized, "a client certificate is required")
			return
		}
		c := r.TLS.PeerCertificates[0]
		ok := c.Subject.CommonName == agentapi.WebhookIdentity
		for _, n := range c.DNSNames {
			ok = ok || n == agentapi.WebhookIdentity
		}
		if !ok {
			a.countDenied()
			writeError(w, http.StatusForbidden, fmt.Sprintf("client %q may not use the agent API (only %q)", c.Subject.CommonName, agentapi.WebhookIdentity))
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (a *Agent) countDenied() {
	a.mu.Lock()
	a.denied++
	a.mu.Unlock()
}

func (a *Agent) start(w http.ResponseWriter, r *http.Request) {
	var req agentapi.CheckpointRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "request body: "+err.Error())
		return
	}
	var problems []string
	if req.Pod.UID == "" {
		problems = append(problems, "pod.uid is empty")
	}
	if req.Pod.Namespace == "" || req.Pod.Name == "" {
		problems = append(problems, "pod.namespace and pod.name are required")
	}
	if len(req.Containers) == 0 {
		problems = append(problems, "containers is empty")
	}
	for i, c := range req.Containers {
		if c.Name == "" || !strings.HasPrefix(c.Dir, "/") {
			problems = append(problems, fmt.Sprintf("containers[%d]: name and an absolute dir are required", i))
		}
	}
	if len(problems) > 0 {
		writeError(w, http.StatusBadRequest, strings.Join(problems, "; "))
		return
	}
	a.mu.Lock()
	a.posts++
	op, ok := a.ops[req.Pod.UID]
	if !ok {
		s, scripted := a.scripts[req.Pod.Namespace+"/"+req.Pod.Name]
		if !scripted {
			s = a.cfg.Default
		}
		a.seq++
		now := time.Now()
		op = &operation{req: req, script: s, started: now,
			id: fmt.Sprintf("%s-%03d", now.UTC().Format("20060102T150405Z"), a.seq)}
		a.ops[req.Pod.UID] = op
		a.dumps = append(a.dumps, Dump{Request: req, Started: now})
	}
	st := a.status(op)
	a.mu.Unlock()
	writeJSON(w, http.StatusOK, st)
}

func (a *Agent) get(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	op, ok := a.ops[r.PathValue("uid")]
	var st agentapi.CheckpointStatus
	if ok {
		st = a.status(op)
	}
	a.mu.Unlock()
	if !ok {
		writeError(w, http.StatusNotFound, "no checkpoint operation for pod UID "+r.PathValue("uid"))
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (a *Agent) list(w http.ResponseWriter, _ *http.Request) {
	a.mu.Lock()
	l := agentapi.CheckpointList{Items: []agentapi.CheckpointStatus{}}
	for _, op := range a.ops {
		l.Items = append(l.Items, a.status(op))
	}
	a.mu.Unlock()
	sort.Slice(l.Items, func(i, j int) bool { return l.Items[i].StartedAt.Before(l.Items[j].StartedAt) })
	writeJSON(w, http.StatusOK, l)
}

func (a *Agent) delete(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	_, ok := a.ops[r.PathValue("uid")]
	delete(a.ops, r.PathValue("uid"))
	a.mu.Unlock()
	if !ok {
		writeError(w, http.StatusNotFound, "no checkpoint operation for pod UID "+r.PathValue("uid"))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// status derives the operation's state from the clock and its script. Called with a.mu held.
func (a *Agent) status(op *operation) agentapi.CheckpointStatus {
	elapsed := time.Since(op.started)
	st := agentapi.CheckpointStatus{
		Pod:       op.req.Pod,
		Node:      a.cfg.Node,
		StartedAt: op.started,
	}
	if elapsed < op.script.Duration {
		st.Phase = agentapi.PhaseRunning
		st.Message = "dumping (fake agent)"
		st.BytesWritten = int64(float64(op.script.Bytes) * elapsed.Seconds() / op.script.Duration.Seconds())
		for _, c := range op.req.Containers {
			st.Containers = append(st.Containers, agentapi.ContainerResult{Name: c.Name, Phase: agentapi.PhaseRunning})
		}
		return st
	}
	finished := op.started.Add(op.script.Duration)
	st.FinishedAt = &finished
	per := op.script.Bytes / int64(len(op.req.Containers))
	if op.script.Fail != "" {
		st.Phase = agentapi.PhaseFailed
		st.Message = op.script.Fail
		st.BytesWritten = op.script.Bytes / 2
		for i, c := range op.req.Containers {
			r := agentapi.ContainerResult{Name: c.Name, Phase: agentapi.PhaseFailed, Message: op.script.Fail}
			if i > 0 { // the first container failed; the others were not finished either
				r.Message = "not checkpointed: another container of the pod failed"
			}
			st.Containers = append(st.Containers, r)
		}
		return st
	}
	st.Phase = agentapi.PhaseSucceeded
	st.BytesWritten = op.script.Bytes
	for _, c := range op.req.Containers {
		st.Containers = append(st.Containers, agentapi.ContainerResult{
			Name: c.Name, Phase: agentapi.PhaseSucceeded, CheckpointID: op.id, Bytes: per,
		})
	}
	return st
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, agentapi.Error{Message: msg})
}

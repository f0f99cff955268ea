// Package fakeagent is a FAKE Stasis node agent: it speaks the real agent API (package agentapi)
// exactly as the webhook expects, but performs no CRIU dump. It stands in for the real agent only
// where CRIU cannot run: the real agent needs a running container (a kubelet and containerd), which
// only the e2e tier has.
//
// Each dump is scripted per pod — how long it runs (Duration, for the integration tier inside a real
// API server) or how many status polls it takes (Polls, for deterministic unit tests), how many bytes
// it reports, whether it fails — so that tests can drive the webhook through 429 sequences and
// failures. Two ways to run it:
//   - New: a plain http.Handler without client authentication, for an httptest server (webhook unit
//     tests) or cmd/fakeagent;
//   - Start: a real HTTPS server with mutual TLS that admits only agentapi.WebhookIdentity, like the
//     agent (the integration tier).
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

// Script is what one dump does. The zero Script ends at once, successfully.
type Script struct {
	// Duration is how long the dump runs before it finishes.
	Duration time.Duration
	// Polls is the number of status requests answered Running before the dump may finish; 0 means
	// the start request may already answer the final phase. Negative: never finishes on its own
	// (see Agent.Finish). A dump with both Duration and Polls finishes when both are reached.
	Polls int
	// Fail, when set, makes the dump end Failed with this message.
	Fail string
	// Bytes is the image size of the pod reported at the end; while running, progress grows linearly
	// up to it with Duration, or is Bytes at once without one. 0 takes the default script's Bytes.
	Bytes int64
	// CheckpointID given to every container on success; default "ckpt-N", N counting the dumps
	// this agent started.
	CheckpointID string
	// OmitContainer leaves this container out of a successful result (a broken agent).
	OmitContainer string
}

// Config configures the fake agent served by Start.
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
	// polls counts the status requests answered while running.
	polls int
	// finished is set once the dump has ended; it never runs again.
	finished *time.Time
}

// Agent is a fake agent. The zero value is not usable; use New or Start.
type Agent struct {
	node string
	mux  *http.ServeMux
	srv  *http.Server
	ln   net.Listener

	mu       sync.Mutex
	def      Script
	scripts  map[string]Script     // by namespace/name
	ops      map[string]*operation // by pod UID
	dumps    []Dump
	requests []agentapi.CheckpointRequest
	posts    map[string]int // by pod UID
	deleted  []string
	denied   int
	seq      int
}

// New returns the fake agent of node as a plain http.Handler: no TLS and no client identity check.
// Its default script ends every dump at once (SetDefault changes it).
func New(node string) *Agent {
	if node == "" {
		node = "fake-node"
	}
	a := &Agent{node: node, scripts: map[string]Script{}, ops: map[string]*operation{}, posts: map[string]int{}}
	a.mux = http.NewServeMux()
	a.mux.HandleFunc("POST "+agentapi.PathCheckpoints, a.start)
	a.mux.HandleFunc("GET "+agentapi.PathCheckpoints, a.list)
	a.mux.HandleFunc("GET "+agentapi.PathCheckpoints+"/{uid}", a.get)
	a.mux.HandleFunc("DELETE "+agentapi.PathCheckpoints+"/{uid}", a.delete)
	return a
}

// Start listens and serves the agent API over mutual TLS until Close.
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
	a := New(cfg.Node)
	a.def = cfg.Default
	a.srv = &http.Server{
		Handler:           a.authenticate(a.mux),
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

// ServeHTTP serves the agent API without authentication (the handler of New).
func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// URL is the base URL (https://127.0.0.1:port) of an agent from Start, what the webhook's
// --agent-endpoint takes.
func (a *Agent) URL() string { return "https://" + a.ln.Addr().String() }

// Close stops the server of an agent from Start.
func (a *Agent) Close() error {
	if a.srv == nil {
		return nil
	}
	return a.srv.Close()
}

// SetDefault sets the script of pods without their own.
func (a *Agent) SetDefault(s Script) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.def = s
}

// SetScript scripts the dumps of one pod (by namespace and name, so that tests can script a pod
// before it exists); it applies to dumps started afterwards.
func (a *Agent) SetScript(namespace, name string, s Script) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if s.Bytes == 0 {
		s.Bytes = a.def.Bytes
	}
	a.scripts[namespace+"/"+name] = s
}

// Finish ends a pod UID's dump now with its script's final phase (a dump that never ends on its
// own, finished between two retries).
func (a *Agent) Finish(uid string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if op, ok := a.ops[uid]; ok && op.finished == nil {
		now := time.Now()
		op.finished = &now
	}
}

// Op returns the current status of a pod UID's operation (not counted as a poll).
func (a *Agent) Op(uid string) (agentapi.CheckpointStatus, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	op, ok := a.ops[uid]
	if !ok {
		return agentapi.CheckpointStatus{}, false
	}
	return a.status(op), true
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

// Requests returns every accepted start-or-join request, oldest first (a retry that joins a dump
// is here again).
func (a *Agent) Requests() []agentapi.CheckpointRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]agentapi.CheckpointRequest(nil), a.requests...)
}

// Posts counts start-or-join requests (POST /v1/checkpoints), accepted ones only.
func (a *Agent) Posts() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.requests)
}

// PostsFor counts the accepted start-or-join requests for one pod UID.
func (a *Agent) PostsFor(uid string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.posts[uid]
}

// Deleted returns the pod UIDs whose operation was deleted, in order.
func (a *Agent) Deleted() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.deleted...)
}

// Denied counts requests refused for a missing or wrong client identity (Start only).
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
	a.requests = append(a.requests, req)
	a.posts[req.Pod.UID]++
	op, ok := a.ops[req.Pod.UID]
	if !ok {
		s, scripted := a.scripts[req.Pod.Namespace+"/"+req.Pod.Name]
		if !scripted {
			s = a.def
		}
		a.seq++
		now := time.Now()
		op = &operation{req: req, script: s, started: now, id: fmt.Sprintf("ckpt-%d", a.seq)}
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
		if op.finished == nil {
			op.polls++
		}
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
	uid := r.PathValue("uid")
	a.mu.Lock()
	_, ok := a.ops[uid]
	if ok {
		delete(a.ops, uid)
		a.deleted = append(a.deleted, uid)
	}
	a.mu.Unlock()
	if !ok {
		writeError(w, http.StatusNotFound, "no checkpoint operation for pod UID "+uid)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// settle ends the dump once its script allows: its polls answered and its duration elapsed.
func (op *operation) settle(now time.Time) {
	if op.finished != nil || op.script.Polls < 0 || op.polls < op.script.Polls {
		return
	}
	end := op.started.Add(op.script.Duration)
	if now.Before(end) {
		return
	}
	if op.script.Polls > 0 {
		end = now // ended by this poll
	}
	op.finished = &end
}

// status derives the operation's state from its script, the polls and the clock. Called with a.mu held.
func (a *Agent) status(op *operation) agentapi.CheckpointStatus {
	now := time.Now()
	op.settle(now)
	st := agentapi.CheckpointStatus{
		Pod:       op.req.Pod,
		Node:      a.node,
		StartedAt: op.started,
	}
	if op.finished == nil {
		st.Phase = agentapi.PhaseRunning
		st.Message = "dumping (fake agent)"
		st.BytesWritten = op.script.Bytes
		if d := op.script.Duration; d > 0 && now.Sub(op.started) < d {
			st.BytesWritten = int64(float64(op.script.Bytes) * now.Sub(op.started).Seconds() / d.Seconds())
		}
		for _, c := range op.req.Containers {
			st.Containers = append(st.Containers, agentapi.ContainerResult{Name: c.Name, Phase: agentapi.PhaseRunning})
		}
		return st
	}
	finished := *op.finished
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
	id := op.script.CheckpointID
	if id == "" {
		id = op.id
	}
	st.Phase = agentapi.PhaseSucceeded
	st.BytesWritten = op.script.Bytes
	for _, c := range op.req.Containers {
		if c.Name == op.script.OmitContainer {
			continue
		}
		st.Containers = append(st.Containers, agentapi.ContainerResult{
			Name: c.Name, Phase: agentapi.PhaseSucceeded, CheckpointID: id, Bytes: per,
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

// Package fakeagent is a FAKE Stasis node agent: it speaks the real agent API (package agentapi)
// but dumps nothing. Tests of the webhook script it per pod: how many status polls a checkpoint
// takes (or never finishing), failures, progress bytes. It stands in for the real agent only where
// CRIU cannot run (webhook handler tests, the integration tier without kubelets).
package fakeagent

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
)

// Script is what happens to a checkpoint of one pod.
type Script struct {
	// Polls is the number of status requests answered Running before the final phase; 0 means the
	// POST already answers the final phase. Negative: never finishes.
	Polls int
	// Fail ends in PhaseFailed with Message.
	Fail    bool
	Message string
	// Bytes is the progress reported while running and the size of each container's checkpoint.
	Bytes int64
	// CheckpointID given to every container on success; default "ckpt-1".
	CheckpointID string
	// OmitContainer leaves this container out of a successful result (a broken agent).
	OmitContainer string
}

// Agent is the fake. The zero value is not usable; use New.
type Agent struct {
	mu       sync.Mutex
	scripts  map[string]Script // by pod name; "" is the default
	ops      map[string]*op    // by pod UID
	Node     string
	Requests []agentapi.CheckpointRequest
	Deleted  []string
	// Posts counts POSTs per pod UID (a retry joins the operation: same op, more posts).
	Posts map[string]int
}

type op struct {
	script Script
	polls  int
	status agentapi.CheckpointStatus
	req    agentapi.CheckpointRequest
}

// New returns a fake agent on node whose default script finishes at once.
func New(node string) *Agent {
	return &Agent{scripts: map[string]Script{}, ops: map[string]*op{}, Node: node, Posts: map[string]int{}}
}

// SetScript sets the script for checkpoints of the pod named pod ("" = every other pod).
func (a *Agent) SetScript(pod string, s Script) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.scripts[pod] = s
}

// Op returns the current status of a pod UID's operation.
func (a *Agent) Op(uid string) (agentapi.CheckpointStatus, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	o, ok := a.ops[uid]
	if !ok {
		return agentapi.CheckpointStatus{}, false
	}
	return o.status, true
}

func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	uid, hasUID := strings.CutPrefix(r.URL.Path, agentapi.PathCheckpoints+"/")
	switch {
	case r.URL.Path == agentapi.PathCheckpoints && r.Method == http.MethodPost:
		var req agentapi.CheckpointRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Pod.UID == "" || len(req.Containers) == 0 {
			writeErr(w, http.StatusBadRequest, fmt.Sprintf("bad checkpoint request: %v", err))
			return
		}
		a.Requests = append(a.Requests, req)
		a.Posts[req.Pod.UID]++
		o, ok := a.ops[req.Pod.UID]
		if !ok {
			s, ok := a.scripts[req.Pod.Name]
			if !ok {
				s = a.scripts[""]
			}
			o = &op{script: s, req: req, status: agentapi.CheckpointStatus{
				Pod: req.Pod, Node: a.Node, Phase: agentapi.PhaseRunning, StartedAt: time.Unix(1_700_000_000, 0).UTC(),
				BytesWritten: s.Bytes,
			}}
			a.ops[req.Pod.UID] = o
			if s.Polls == 0 {
				a.finish(o)
			}
		}
		writeJSON(w, http.StatusOK, o.status)
	case r.URL.Path == agentapi.PathCheckpoints && r.Method == http.MethodGet:
		var l agentapi.CheckpointList
		for _, o := range a.ops {
			l.Items = append(l.Items, o.status)
		}
		writeJSON(w, http.StatusOK, l)
	case hasUID && r.Method == http.MethodGet:
		o, ok := a.ops[uid]
		if !ok {
			writeErr(w, http.StatusNotFound, "no checkpoint operation for pod "+uid)
			return
		}
		if !o.status.Phase.Done() {
			o.polls++
			if o.script.Polls > 0 && o.polls >= o.script.Polls {
				a.finish(o)
			}
		}
		writeJSON(w, http.StatusOK, o.status)
	case hasUID && r.Method == http.MethodDelete:
		if _, ok := a.ops[uid]; !ok {
			writeErr(w, http.StatusNotFound, "no checkpoint operation for pod "+uid)
			return
		}
		delete(a.ops, uid)
		a.Deleted = append(a.Deleted, uid)
		w.WriteHeader(http.StatusNoContent)
	default:
		writeErr(w, http.StatusNotFound, "no such path "+r.Method+" "+r.URL.Path)
	}
}

func (a *Agent) finish(o *op) {
	fin := time.Unix(1_700_000_100, 0).UTC()
	o.status.FinishedAt = &fin
	if o.script.Fail {
		o.status.Phase = agentapi.PhaseFailed
		o.status.Message = o.script.Message
		for _, c := range o.req.Containers {
			o.status.Containers = append(o.status.Containers, agentapi.ContainerResult{Name: c.Name, Phase: agentapi.PhaseFailed, Message: o.script.Message})
		}
		return
	}
	id := o.script.CheckpointID
	if id == "" {
		id = "ckpt-1"
	}
	o.status.Phase = agentapi.PhaseSucceeded
	o.status.BytesWritten = o.script.Bytes * int64(len(o.req.Containers))
	for _, c := range o.req.Containers {
		if c.Name == o.script.OmitContainer {
			continue
		}
		o.status.Containers = append(o.status.Containers, agentapi.ContainerResult{Name: c.Name, Phase: agentapi.PhaseSucceeded, CheckpointID: id, Bytes: o.script.Bytes})
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, agentapi.Error{Message: msg})
}

// Finish ends a pod UID's operation now with its script's final phase (a dump that never ends on
// its own, finished between two retries).
func (a *Agent) Finish(uid string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if o, ok := a.ops[uid]; ok && !o.status.Phase.Done() {
		a.finish(o)
	}
}

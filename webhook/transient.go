package webhook

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
)

// Trouble that passes is no reason to refuse a drain. An agent being rolled out, restarting or not
// ready yet, or one that lost track of an operation when it restarted, is answered 429 like a dump
// in progress: kubectl drain, Karpenter and Cluster Autoscaler retry. Only after AgentRetryFor of
// such answers in a row for a pod does the failure policy apply. Real dump failures (a CRIU error,
// a full volume) apply it at once.

// errAgentUnavailable marks an error that retrying may cure.
var errAgentUnavailable = errors.New("agent unavailable")

// transient classifies an error of the agent client: unreachable (connection refused or reset, no
// route, a timeout of its own), overloaded or restarting (502, 503, 504), or an operation the agent
// no longer knows (404 on a poll: it restarted meanwhile).
func transient(err error) bool {
	var se *agentapi.StatusError
	if errors.As(err, &se) {
		switch se.Code {
		case http.StatusNotFound, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return true
		}
		return false
	}
	var ne net.Error
	return errors.Is(err, errAgentUnavailable) || errors.As(err, &ne) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EHOSTUNREACH)
}

// unavailability tracks, per pod UID, since when its agent has been unavailable.
type unavailability struct {
	mu    sync.Mutex
	since map[string]time.Time
}

// seen records an unavailable agent for uid and returns for how long it has been so.
func (u *unavailability) seen(uid string, now time.Time) time.Duration {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.since == nil {
		u.since = map[string]time.Time{}
	}
	first, ok := u.since[uid]
	if !ok {
		u.since[uid], first = now, now
	}
	for k, t := range u.since { // forget pods not asked about for long
		if now.Sub(t) > time.Hour {
			delete(u.since, k)
		}
	}
	return now.Sub(first)
}

// clear forgets uid's unavailability (its agent answered).
func (u *unavailability) clear(uid string) {
	u.mu.Lock()
	delete(u.since, uid)
	u.mu.Unlock()
}

// unavailableMessage is the 429's message for a pod whose agent is unavailable.
func unavailableMessage(o podOutcome, since, limit time.Duration) string {
	return fmt.Sprintf("agent for pod %s/%s unavailable for %s (the failure policy applies after %s): %v; retry",
		o.t.pod.Namespace, o.t.pod.Name, since.Round(time.Second), limit, o.err)
}

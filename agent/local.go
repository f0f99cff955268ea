package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"

	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/agentapi"
)

// EntrypointSource reads an image's ENTRYPOINT/CMD (the CRI client; nil: lookups answer 503).
type EntrypointSource interface {
	Entrypoint(ctx context.Context, podUID, container, image string) (agentapi.Entrypoint, error)
}

// LocalHandler serves the launchers of this node on the unix socket (agentapi.LocalPath*).
//
// Trust: the socket lives in a hostPath directory mounted only into wired pods; what it offers is
// harmless to a lying caller (an image config the runtime already holds; an Event on a pod).
func LocalHandler(a *Agent, eps EntrypointSource, log zerolog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+agentapi.LocalPathEntrypoint, func(w http.ResponseWriter, r *http.Request) {
		if eps == nil {
			writeError(w, http.StatusServiceUnavailable, "the agent has no container runtime connection (--cri-endpoint)")
			return
		}
		q := r.URL.Query()
		if q.Get("image") == "" && (q.Get("podUID") == "" || q.Get("container") == "") {
			writeError(w, http.StatusBadRequest, "give image= or podUID= and container=")
			return
		}
		ep, err := eps.Entrypoint(r.Context(), q.Get("podUID"), q.Get("container"), q.Get("image"))
		var nf errImageNotFound
		switch {
		case errors.As(err, &nf):
			writeError(w, http.StatusNotFound, err.Error())
		case err != nil:
			writeError(w, http.StatusBadGateway, err.Error())
		default:
			writeJSON(w, http.StatusOK, ep)
		}
	})
	mux.HandleFunc("POST "+agentapi.LocalPathRestoreResults, func(w http.ResponseWriter, r *http.Request) {
		var res agentapi.RestoreResult
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&res); err != nil {
			writeError(w, http.StatusBadRequest, "request body: "+err.Error())
			return
		}
		if res.Container == "" {
			writeError(w, http.StatusBadRequest, "container: required")
			return
		}
		a.RestoreResult(r.Context(), res)
		w.WriteHeader(http.StatusNoContent)
	})
	return mux
}

// RestoreResult records a launcher's report: log, metric, and an Event on the pod.
func (a *Agent) RestoreResult(ctx context.Context, res agentapi.RestoreResult) {
	result, reason, warn := "restored", "Restored", false
	if !res.Restored {
		result, reason, warn = "cold-start", "RestoreFailed", true
	}
	a.cfg.Metrics.RestoreResults.WithLabelValues(result).Inc()
	ev := a.cfg.Log.Info()
	if warn {
		ev = a.cfg.Log.Warn()
	}
	ev.Str("pod", res.Pod.Namespace+"/"+res.Pod.Name).Str("uid", res.Pod.UID).Str("container", res.Container).
		Str("checkpoint", res.CheckpointID).Bool("restored", res.Restored).Msg(res.Message)
	if a.cfg.Events != nil && res.Pod.Name != "" {
		msg := fmt.Sprintf("container %s: %s", res.Container, res.Message)
		if !res.Restored {
			msg = fmt.Sprintf("container %s: cold start instead of restoring checkpoint %s: %s", res.Container, res.CheckpointID, res.Message)
		}
		a.cfg.Events.PodEvent(ctx, res.Pod, warn, reason, msg)
	}
}

// ListenLocal creates the unix socket dir/name (replacing a stale one). Mode 0666: launchers run as
// the app's user.
func ListenLocal(dir, name string) (net.Listener, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("--socket-dir: %w", err)
	}
	p := filepath.Join(dir, name)
	_ = os.Remove(p)
	l, err := net.Listen("unix", p)
	if err != nil {
		return nil, fmt.Errorf("local socket %s: %w", p, err)
	}
	if err := os.Chmod(p, 0o666); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

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
	"golang.org/x/sys/unix"

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
	mux.HandleFunc("POST "+agentapi.LocalPathRestore, func(w http.ResponseWriter, r *http.Request) {
		pid, ok := PeerPID(r.Context())
		if !ok {
			writeError(w, http.StatusInternalServerError, "no peer credentials on this connection")
			return
		}
		var req agentapi.RestoreRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeError(w, http.StatusBadRequest, "request body: "+err.Error())
			return
		}
		if req.Pod.UID == "" || req.Container == "" {
			writeError(w, http.StatusBadRequest, "pod.uid and container: required")
			return
		}
		res, err := a.Restore(r.Context(), pid, req)
		if err != nil {
			log.Warn().Err(err).Int("caller", pid).Msg("restore request refused")
			writeError(w, http.StatusForbidden, err.Error())
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	return mux
}

type peerKey struct{}

// LocalConnContext records the peer's credentials (SO_PEERCRED) of each connection on the local
// socket, for PeerPID: the kernel's word on who is calling, not the caller's.
func LocalConnContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	_ = raw.Control(func(fd uintptr) {
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if err != nil || cred == nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, int(cred.Pid))
}

// PeerPID is the host PID of the process that opened the request's connection.
func PeerPID(ctx context.Context) (int, bool) {
	pid, ok := ctx.Value(peerKey{}).(int)
	return pid, ok && pid > 0
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

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
	"sync"
	"syscall"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
)

// EntrypointSource reads an image's ENTRYPOINT/CMD (the CRI client; nil: lookups answer 503).
type EntrypointSource interface {
	Entrypoint(ctx context.Context, podUID, container, image string) (agentapi.Entrypoint, error)
}

// PodDirectory tells which pods and containers the container runtime runs on this node (the CRI
// client): what a local caller's cgroup claims is checked against it.
type PodDirectory interface {
	// PodByUID returns the namespace and name of a pod running on this node.
	PodByUID(ctx context.Context, uid string) (agentapi.PodRef, error)
	// Container returns a started (or starting) container of that pod.
	Container(ctx context.Context, podUID, containerID string) (RuntimeContainer, error)
}

// RuntimeContainer is a container as the runtime knows it.
type RuntimeContainer struct {
	Name string
	// PID is the container's init PID in the agent's PID namespace.
	PID int
	// ImageRef is the image the runtime resolved for the container.
	ImageRef string
}

// Limits of the local channel: launchers make one or two small requests in their life.
const (
	localMaxBody          = 64 << 10
	localMaxHeader        = 16 << 10
	localLookupTimeout    = 10 * time.Second
	defaultMaxConnsPerPod = 8
	defaultMaxInFlight    = 4
)

// LocalConfig configures the launchers' channel.
type LocalConfig struct {
	// Pods checks callers against the container runtime; nil refuses every caller.
	Pods PodDirectory
	// Entrypoints answers entrypoint lookups; nil answers 503.
	Entrypoints EntrypointSource
	// MaxConnsPerPod bounds the open connections of one pod (more are closed at once);
	// MaxInFlightPerPod the requests one pod has in progress (more get 429).
	MaxConnsPerPod, MaxInFlightPerPod int
	// ProcRoot is /proc (the host's: the agent is hostPID).
	ProcRoot string
}

func (c *LocalConfig) defaults() {
	if c.MaxConnsPerPod <= 0 {
		c.MaxConnsPerPod = defaultMaxConnsPerPod
	}
	if c.MaxInFlightPerPod <= 0 {
		c.MaxInFlightPerPod = defaultMaxInFlight
	}
	if c.ProcRoot == "" {
		c.ProcRoot = "/proc"
	}
}

// Local serves the launchers of this node on the unix socket (agentapi.LocalPath*).
//
// Trust: the socket is reachable by every wired pod of the node (read-only hostPath), so no
// caller is believed about who it is. The kernel names the caller's process (SO_PEERCRED), the
// host's cgroup tree names its pod and container, the container runtime confirms that container
// and that the caller shares its PID namespace; the agent then answers only about that container,
// and records restore results only on that pod.
type Local struct {
	a        *Agent
	cfg      LocalConfig
	conns    podCounter
	inFlight podCounter
}

// NewLocal returns the launchers' channel of agent a.
func NewLocal(a *Agent, cfg LocalConfig) *Local {
	cfg.defaults()
	return &Local{a: a, cfg: cfg}
}

// Listener wraps the socket's listener: every accepted connection is identified (identifyPeer)
// and counted against its pod's connection cap; connections over the cap are closed.
func (l *Local) Listener(ln net.Listener) net.Listener { return &localListener{Listener: ln, l: l} }

// Server returns the HTTP server of the channel, to Serve on Listener(ln).
func (l *Local) Server() *http.Server {
	return &http.Server{
		Handler:           l.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      2*localLookupTimeout + 5*time.Second, // verify and the lookup are bounded by localLookupTimeout each
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    localMaxHeader,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if cc, ok := c.(*callerConn); ok {
				return context.WithValue(ctx, callerKey{}, cc.caller)
			}
			return ctx
		},
	}
}

// Handler routes the channel's requests; each is identified first (connections that did not come
// through Listener have no identity and are refused).
func (l *Local) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+agentapi.LocalPathEntrypoint, l.guard(l.entrypoint))
	mux.HandleFunc("POST "+agentapi.LocalPathRestore, l.guard(l.restore))
	mux.HandleFunc("POST "+agentapi.LocalPathCheckpoint, l.guard(l.checkpoint))
	mux.HandleFunc("POST "+agentapi.LocalPathConsumed, l.guard(l.consumed))
	mux.HandleFunc("GET "+agentapi.LocalPathRestoreOutcome, l.guard(l.restoreOutcome))
	return mux
}

// identity is a verified caller: a container of a pod on this node.
type identity struct {
	Caller
	Pod       agentapi.PodRef
	Container RuntimeContainer
}

type callerKey struct{}

// guard identifies the caller and holds one of its pod's in-flight slots for the request.
func (l *Local) guard(h func(http.ResponseWriter, *http.Request, identity)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		caller, ok := r.Context().Value(callerKey{}).(Caller)
		if !ok {
			caller = Caller{Err: errors.New("connection not identified")}
		}
		if caller.Err != nil {
			l.refuse(w, caller, http.StatusForbidden, "not-a-pod", "the agent answers containers of pods only: "+caller.Err.Error())
			return
		}
		if !l.inFlight.acquire(caller.PodUID, l.cfg.MaxInFlightPerPod) {
			l.refuse(w, caller, http.StatusTooManyRequests, "busy",
				fmt.Sprintf("pod %s has %d requests in progress already", caller.PodUID, l.cfg.MaxInFlightPerPod))
			return
		}
		defer l.inFlight.release(caller.PodUID)
		id, code, reason, msg := l.verify(r.Context(), caller)
		if code != 0 {
			l.refuse(w, caller, code, reason, msg)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, localMaxBody)
		h(w, r, id)
	}
}

// verify checks the caller's cgroup claim against the runtime: the pod runs here, the container
// is one of its started (or starting) containers, and the caller is in that container's PID
// namespace (a process that moved itself into another pod's cgroup stays in its own PID
// namespace; namespace inodes are unique on the one nsfs).
func (l *Local) verify(ctx context.Context, c Caller) (id identity, code int, reason, msg string) {
	if l.cfg.Pods == nil {
		return id, http.StatusServiceUnavailable, "no-runtime", "the agent has no container runtime connection to check callers against (--cri-endpoint)"
	}
	ctx, cancel := context.WithTimeout(ctx, localLookupTimeout)
	defer cancel()
	pod, err := l.cfg.Pods.PodByUID(ctx, c.PodUID)
	if err != nil {
		return id, lookupCode(err), "unknown-pod", "caller's pod: " + err.Error()
	}
	ctr, err := l.cfg.Pods.Container(ctx, c.PodUID, c.ContainerID)
	if err != nil {
		return id, lookupCode(err), "wrong-container", "caller's container: " + err.Error()
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("%s/%d/ns/pid", l.cfg.ProcRoot, ctr.PID), &st); err != nil {
		return id, http.StatusForbidden, "wrong-container", fmt.Sprintf("container %s init PID %d: %v", ctr.Name, ctr.PID, err)
	}
	if st.Ino != c.PidNS {
		return id, http.StatusForbidden, "wrong-container", fmt.Sprintf(
			"the caller (PID %d) is in cgroup of container %s of pod %s/%s but not in its PID namespace", c.PID, ctr.Name, pod.Namespace, pod.Name)
	}
	return identity{Caller: c, Pod: pod, Container: ctr}, 0, "", ""
}

// lookupCode is 403 for a claim the runtime contradicts, 502 when the runtime could not answer.
func lookupCode(err error) int {
	var nf errNotOnNode
	if errors.As(err, &nf) {
		return http.StatusForbidden
	}
	return http.StatusBadGateway
}

func (l *Local) refuse(w http.ResponseWriter, c Caller, code int, reason, msg string) {
	l.a.cfg.Metrics.LocalRefusals.WithLabelValues(reason).Inc()
	ev := l.a.cfg.Log.Warn().Int("pid", c.PID).Uint32("uid", c.UID).Str("reason", reason)
	if c.PodUID != "" {
		ev = ev.Str("podUID", c.PodUID).Str("containerID", c.ContainerID)
	}
	ev.Msg("local socket: refused: " + msg)
	if w != nil {
		writeError(w, code, msg)
	}
}

// entrypoint answers about the caller's own container only: podUID= and container= may be given
// (launchers do) but must name the caller; image= is ignored, the image is the one the runtime
// resolved for the caller's container.
func (l *Local) entrypoint(w http.ResponseWriter, r *http.Request, id identity) {
	q := r.URL.Query()
	if u := q.Get("podUID"); u != "" && u != id.Pod.UID {
		l.refuse(w, id.Caller, http.StatusForbidden, "other-pod", fmt.Sprintf("podUID %s: a container of pod %s may ask about its own pod only", u, id.Pod.UID))
		return
	}
	if c := q.Get("container"); c != "" && c != id.Container.Name {
		l.refuse(w, id.Caller, http.StatusForbidden, "other-container", fmt.Sprintf("container %s: container %s may ask about itself only", c, id.Container.Name))
		return
	}
	if l.cfg.Entrypoints == nil {
		writeError(w, http.StatusServiceUnavailable, "the agent has no container runtime connection (--cri-endpoint)")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), localLookupTimeout)
	defer cancel()
	ep, err := l.cfg.Entrypoints.Entrypoint(ctx, id.Pod.UID, id.Container.Name, id.Container.ImageRef)
	var nf errImageNotFound
	switch {
	case errors.As(err, &nf):
		writeError(w, http.StatusNotFound, err.Error())
	case err != nil:
		writeError(w, http.StatusBadGateway, err.Error())
	default:
		writeJSON(w, http.StatusOK, ep)
	}
}

// restore restores the caller's own container (Agent.Restore checks the caller is its PID 1):
// what the launcher says about its pod and container must agree with the runtime. It may take as
// long as the restore does (--restore-timeout), longer than the channel's usual write timeout.
func (l *Local) restore(w http.ResponseWriter, r *http.Request, id identity) {
	var req agentapi.RestoreRequest
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "request body: "+err.Error())
		return
	}
	if claimed := req.Pod; (claimed.UID != "" && claimed.UID != id.Pod.UID) || (claimed.Namespace != "" && claimed.Namespace != id.Pod.Namespace) ||
		(claimed.Name != "" && claimed.Name != id.Pod.Name) {
		l.refuse(w, id.Caller, http.StatusForbidden, "other-pod", fmt.Sprintf(
			"pod %s/%s (uid %s): a container of pod %s/%s may ask about its own pod only", claimed.Namespace, claimed.Name, claimed.UID, id.Pod.Namespace, id.Pod.Name))
		return
	}
	if req.Container != "" && req.Container != id.Container.Name {
		l.refuse(w, id.Caller, http.StatusForbidden, "other-container", fmt.Sprintf("container %s: container %s may ask about itself only", req.Container, id.Container.Name))
		return
	}
	req.Pod, req.Container = id.Pod, id.Container.Name
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(l.a.cfg.RestoreTimeout + time.Minute))
	res, err := l.a.Restore(r.Context(), id.PID, req)
	if err != nil {
		l.refuse(w, id.Caller, http.StatusForbidden, "not-pid-1", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// checkpoint checkpoints the caller's own pod on its termination (Agent.CheckpointOnTermination
// checks the caller is its container's PID 1). It may take as long as the dump does.
func (l *Local) checkpoint(w http.ResponseWriter, r *http.Request, id identity) {
	if _, err := io.Copy(io.Discard, r.Body); err != nil {
		writeError(w, http.StatusBadRequest, "request body: "+err.Error())
		return
	}
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(l.a.cfg.DumpTimeout + time.Minute))
	st, err := l.a.CheckpointOnTermination(r.Context(), id.PID, id.Pod, id.Container.Name)
	if err != nil {
		l.refuse(w, id.Caller, http.StatusForbidden, "not-pid-1", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// consumed removes the caller's container's checkpoints (Agent.Consume checks it is PID 1).
func (l *Local) consumed(w http.ResponseWriter, r *http.Request, id identity) {
	if _, err := l.a.Consume(r.Context(), id.PID, id.Pod, id.Container.Name); err != nil {
		if errors.Is(err, ErrNotCaller) {
			l.refuse(w, id.Caller, http.StatusForbidden, "not-pid-1", err.Error())
			return
		}
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// restoreOutcome tells the caller whether the agent killed the tree it restored under it.
func (l *Local) restoreOutcome(w http.ResponseWriter, r *http.Request, id identity) {
	ctx, cancel := context.WithTimeout(r.Context(), 20*time.Second)
	defer cancel()
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(30 * time.Second))
	o, err := l.a.TakeRestoreOutcome(ctx, id.PID)
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, o)
}

// localListener identifies each connection as it is accepted and enforces the per-pod
// connection cap (callers outside pods share one bucket; they are refused anyway).
type localListener struct {
	net.Listener
	l *Local
}

func (ll *localListener) Accept() (net.Conn, error) {
	for {
		c, err := ll.Listener.Accept()
		if err != nil {
			return nil, err
		}
		caller := identifyPeer(c, ll.l.cfg.ProcRoot)
		if !ll.l.conns.acquire(caller.PodUID, ll.l.cfg.MaxConnsPerPod) {
			ll.l.refuse(nil, caller, 0, "too-many-connections",
				fmt.Sprintf("pod %q has %d connections open already", caller.PodUID, ll.l.cfg.MaxConnsPerPod))
			c.Close()
			continue
		}
		return &callerConn{Conn: c, caller: caller, release: func() { ll.l.conns.release(caller.PodUID) }}, nil
	}
}

// callerConn carries the identity of its peer and gives its connection slot back once.
type callerConn struct {
	net.Conn
	caller  Caller
	once    sync.Once
	release func()
}

func (c *callerConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

// podCounter counts something per pod UID under a cap.
type podCounter struct {
	mu sync.Mutex
	n  map[string]int
}

func (p *podCounter) acquire(key string, max int) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n == nil {
		p.n = map[string]int{}
	}
	if p.n[key] >= max {
		return false
	}
	p.n[key]++
	return true
}

func (p *podCounter) release(key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n[key]--; p.n[key] <= 0 {
		delete(p.n, key)
	}
}

// ListenLocal creates the unix socket dir/name, replacing a stale socket. The directory is the
// agent's: root-owned, 0755, never a symlink (wired pods mount it read-only, so no pod can replace
// the socket or fill the host's /run). The socket is 0666: launchers run as the app's user, and
// who they are is checked per connection, not by file mode.
func ListenLocal(dir, name string) (net.Listener, error) {
	if err := prepareSocketDir(dir); err != nil {
		return nil, err
	}
	p := filepath.Join(dir, name)
	if fi, err := os.Lstat(p); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("local socket %s: exists and is not a socket (%s)", p, fi.Mode().Type())
		}
		if err := os.Remove(p); err != nil {
			return nil, fmt.Errorf("local socket %s: removing the stale socket: %w", p, err)
		}
	}
	l, err := net.Listen("unix", p)
	if err != nil {
		return nil, fmt.Errorf("local socket %s: %w", p, err)
	}
	if err := os.Chmod(p, 0o666); err != nil {
		l.Close()
		return nil, fmt.Errorf("local socket %s: %w", p, err)
	}
	return l, nil
}

// prepareSocketDir makes dir a root-owned 0755 directory (creating it when missing).
func prepareSocketDir(dir string) error {
	fi, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		if err = os.MkdirAll(dir, 0o755); err == nil {
			fi, err = os.Lstat(dir)
		}
	}
	if err != nil {
		return fmt.Errorf("--socket-dir %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("--socket-dir %s: not a directory (%s)", dir, fi.Mode().Type())
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(dir, 0, 0); err != nil {
			return fmt.Errorf("--socket-dir %s: %w", dir, err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return fmt.Errorf("--socket-dir %s: %w", dir, err)
	}
	return nil
}

// socketCheck is a readiness check: the socket at path is still the one the agent listens on
// (same inode), not removed or replaced.
func socketCheck(path string) (func(context.Context) error, error) {
	var want syscall.Stat_t
	if err := syscall.Lstat(path, &want); err != nil {
		return nil, fmt.Errorf("local socket %s: %w", path, err)
	}
	return func(context.Context) error {
		var st syscall.Stat_t
		if err := syscall.Lstat(path, &st); err != nil {
			return fmt.Errorf("local socket %s: %w", path, err)
		}
		if st.Ino != want.Ino || st.Dev != want.Dev {
			return fmt.Errorf("local socket %s: replaced since the agent created it", path)
		}
		return nil
	}, nil
}

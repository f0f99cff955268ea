package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/wiring"
)

// Sandbox is a wired pod's sandbox on this node, as the container runtime reports it.
type Sandbox struct {
	ID, PodUID string
	// PID is a process in the pod's network namespace (the sandbox's pause process).
	PID int
}

// SandboxLister lists the ready sandboxes of wired pods (the CRI client).
type SandboxLister interface {
	WiredSandboxes(ctx context.Context) ([]Sandbox, error)
}

// PodSockets serves the launchers' channel inside each wired pod's network namespace, as the
// abstract unix socket wiring.AgentSocket. Abstract sockets belong to a network namespace: a pod
// reaches only the listener the agent made in its own, through no volume (nothing for Pod
// Security to refuse, nothing a pod can replace for another), and the listener serves the same
// handler as the node socket, which identifies every caller from the kernel anyway. Pods sharing
// a network namespace (hostNetwork) share one listener.
type PodSockets struct {
	Local    *Local
	Lister   SandboxLister
	Interval time.Duration // how often sandboxes are listed (default 250ms)
	Log      zerolog.Logger

	mu        sync.Mutex
	listeners map[uint64]*podListener // by network namespace inode
	srv       *http.Server
}

type podListener struct {
	ln        net.Listener
	sandboxes map[string]bool
}

// Run keeps one listener per wired pod network namespace until ctx ends.
func (p *PodSockets) Run(ctx context.Context) error {
	if p.Interval <= 0 {
		p.Interval = 250 * time.Millisecond
	}
	p.listeners = map[uint64]*podListener{}
	p.srv = p.Local.Server()
	defer p.closeAll()
	tk := time.NewTicker(p.Interval)
	defer tk.Stop()
	for {
		if err := p.sync(ctx); err != nil {
			p.Log.Warn().Err(err).Msg("listing the wired pods' sandboxes")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tk.C:
		}
	}
}

// sync opens listeners for new sandboxes and closes those whose sandboxes are all gone.
func (p *PodSockets) sync(ctx context.Context) error {
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	sbs, err := p.Lister.WiredSandboxes(lctx)
	if err != nil {
		return err
	}
	seen := map[uint64]map[string]bool{}
	for _, sb := range sbs {
		ino, err := netnsInode(sb.PID)
		if err != nil {
			continue // the sandbox went away meanwhile
		}
		if seen[ino] == nil {
			seen[ino] = map[string]bool{}
		}
		seen[ino][sb.ID] = true
		p.mu.Lock()
		_, ok := p.listeners[ino]
		p.mu.Unlock()
		if ok {
			continue
		}
		ln, err := ListenInNetns(sb.PID, wiring.AgentSocket)
		if err != nil {
			p.Log.Warn().Err(err).Str("pod", sb.PodUID).Msg("cannot serve the launchers' channel in the pod's network namespace")
			continue
		}
		p.mu.Lock()
		p.listeners[ino] = &podListener{ln: ln}
		p.mu.Unlock()
		go func() { _ = p.srv.Serve(p.Local.Listener(ln)) }()
		p.Log.Debug().Str("pod", sb.PodUID).Uint64("netns", ino).Msg("launchers' channel open in the pod's network namespace")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for ino, l := range p.listeners {
		if seen[ino] == nil {
			l.ln.Close()
			delete(p.listeners, ino)
		}
	}
	return nil
}

// Open is the number of pod network namespaces served (for tests and metrics).
func (p *PodSockets) Open() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.listeners)
}

func (p *PodSockets) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for ino, l := range p.listeners {
		l.ln.Close()
		delete(p.listeners, ino)
	}
}

func netnsInode(pid int) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// ListenInNetns listens on the unix socket name (abstract when it starts with "@") inside the
// network namespace of process pid. A socket belongs to the namespace it was created in; the
// thread that creates it enters that namespace and comes back (a thread that cannot come back is
// never reused: it ends with its goroutine, locked).
func ListenInNetns(pid int, name string) (net.Listener, error) {
	target, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		return nil, fmt.Errorf("network namespace of process %d: %w", pid, err)
	}
	defer target.Close()
	type result struct {
		ln  net.Listener
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: err}
			return
		}
		defer self.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("entering the network namespace of process %d: %w", pid, err)}
			return
		}
		ln, lerr := net.Listen("unix", name)
		if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
			if ln != nil {
				ln.Close()
			}
			done <- result{err: errors.Join(lerr, fmt.Errorf("returning to the agent's network namespace: %w", err))}
			return // still locked: the runtime ends this thread with the goroutine
		}
		runtime.UnlockOSThread()
		done <- result{ln: ln, err: lerr}
	}()
	r := <-done
	return r.ln, r.err
}

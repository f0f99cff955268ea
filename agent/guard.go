package agent

// The lazy restore's guard: a process that outlives the agent. While a lazily restored app still
// misses memory, the only thing that keeps a fault on a missing page from completing with a zero
// page is an open userfaultfd: the agent's (its lazy-pages daemon's) and the guard's copies. If
// the agent dies (a DaemonSet rollout, an OOM kill, kill -9), its descriptors go with it; the
// guard's stay open, the app's faulting threads stay blocked, and the
// guard, seeing the agent's end of its control socket close without the "complete" byte, kills the
// restored tree before it closes them. It lives in the app container's cgroups, not the agent's:
// the teardown of the agent's container does not reach it, the app's does.
//
// The guard is the agent's own binary re-executed (GuardSubcommand); what it acts on comes from
// the agent only (arguments and inherited descriptors), never from the pod, and its only action
// is SIGKILL to the restored tree it was given: processes held by pidfds whose start times match
// what the agent recorded, and the processes below the container's launcher (held the same way).

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/criurun"
)

// GuardSubcommand is the hidden subcommand of the stasis binary that runs a lazy restore's guard.
const GuardSubcommand = "lazy-guard"

// Messages on the guard's control socket: guardComplete when every page is in (the guard exits
// quietly); guardHold with a userfaultfd (SCM_RIGHTS) the app's fork created during the transfer,
// for the guard to hold too.
const (
	guardComplete = 'c'
	guardHold     = 'u'
)

// Descriptors of the guard: its control socket, its ready pipe (write end), then the
// userfaultfds.
const (
	guardControlFD = 3
	guardReadyFD   = 4
	guardUffdFD    = 5
)

// guardBinary is the binary re-executed as the guard: the agent's own (the tests': the stasis
// binary they build). /proc/self/exe stays valid if the file on disk is replaced.
var guardBinary = "/proc/self/exe"

// lazyGuard is the agent's side of a running guard.
type lazyGuard struct {
	cmd     *exec.Cmd
	mu      sync.Mutex // control: hold (the daemon's goroutine) against complete and release
	control *os.File   // the agent's end of the guard's control socket (the only one)
	done    chan struct{}
}

// startLazyGuard starts the guard of the tree restored under launcher (root: the restored root's
// host PID), handing it dups of uffds, and waits until it holds them and sits in the app's
// cgroups. Called while the tree is still stopped.
func startLazyGuard(launcher, root int, uffds []*os.File) (*lazyGuard, error) {
	ls, err := criurun.StartTime(launcher)
	if err != nil {
		return nil, fmt.Errorf("the launcher (PID %d): %w", launcher, err)
	}
	rs, err := criurun.StartTime(root)
	if err != nil {
		return nil, fmt.Errorf("the restored root (PID %d): %w", root, err)
	}
	// A socket, not a pipe: it also carries the userfaultfds of children forked later (hold).
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	controlW, controlR := os.NewFile(uintptr(pair[0]), "guard-control"), os.NewFile(uintptr(pair[1]), "control")
	defer controlR.Close()
	readyR, readyW, err := os.Pipe()
	if err != nil {
		controlW.Close()
		return nil, err
	}
	defer readyR.Close()
	cmd := exec.Command(guardBinary, GuardSubcommand, "--launcher", fmt.Sprintf("%d:%d", launcher, ls),
		"--root", fmt.Sprintf("%d:%d", root, rs), "--uffds", strconv.Itoa(len(uffds)))
	cmd.ExtraFiles = append([]*os.File{controlR, readyW}, uffds...)
	cmd.Stderr = os.Stderr
	cmd.Env = []string{"GOMAXPROCS=1"} // few threads: they count against the app's pids limit
	// Its own session: no signal to the agent's process group reaches it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	readyW.Close()
	if err != nil {
		controlW.Close()
		return nil, fmt.Errorf("starting the lazy restore's guard: %w", err)
	}
	g := &lazyGuard{cmd: cmd, control: controlW, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(g.done) }()
	ready := make(chan error, 1)
	go func() {
		var b [1]byte
		_, err := readyR.Read(b[:]) // EOF: it exited before being ready (its stderr says why)
		ready <- err
	}()
	select {
	case err = <-ready:
	case <-time.After(10 * time.Second):
		err = errors.New("not ready after 10 s")
	}
	if err != nil {
		g.release()
		_ = cmd.Process.Kill()
		<-g.done
		return nil, fmt.Errorf("the lazy restore's guard did not start: %v (%s)", err, cmd.ProcessState)
	}
	return g, nil
}

// complete tells the guard every page is in: it exits without acting.
func (g *lazyGuard) complete() {
	g.mu.Lock()
	defer g.mu.Unlock()
	_, _ = g.control.Write([]byte{guardComplete})
	g.control.Close()
}

// hold hands the guard a userfaultfd of a child the app forked during the transfer. Best effort:
// a guard that cannot take it still kills the tree if the agent dies.
func (g *lazyGuard) hold(uffd int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if sc, err := g.control.SyscallConn(); err == nil {
		_ = sc.Control(func(fd uintptr) {
			_ = unix.Sendmsg(int(fd), []byte{guardHold}, unix.UnixRights(uffd), nil, 0)
		})
	}
}

// release closes the control socket without "complete": the guard kills the restored tree (what is
// left of it) and exits. The agent's own death does the same.
func (g *lazyGuard) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.control.Close()
}

// guardProc is a process the guard may kill: held by a pidfd opened while its start time matched.
type guardProc struct {
	pid int
	fd  int
}

// RunGuard is the guard (GuardSubcommand): see the top of this file.
func RunGuard(_ context.Context, args []string) error {
	// Not killed by accident: only SIGKILL ends it (the app's container teardown does).
	signal.Ignore(syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGPIPE)
	fs := flag.NewFlagSet(GuardSubcommand, flag.ContinueOnError)
	launcherArg := fs.String("launcher", "", "PID:start time of the container's launcher")
	rootArg := fs.String("root", "", "PID:start time of the restored root")
	nUffds := fs.Int("uffds", 0, "number of userfaultfds inherited from fd 5 on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	launcher, err := holdProc("--launcher", *launcherArg)
	if err != nil {
		return err
	}
	root, err := holdProc("--root", *rootArg)
	if err != nil {
		return err
	}
	for i := 0; i < *nUffds; i++ { // held, never read: they only keep the ranges registered
		if t, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", guardUffdFD+i)); err != nil || t != "anon_inode:[userfaultfd]" {
			return fmt.Errorf("fd %d: not a userfaultfd (%q, %v)", guardUffdFD+i, t, err)
		}
	}
	if err := joinCgroupsOf(launcher); err != nil {
		return err
	}
	// Out of the OOM killer's choices: the app's memory limit must not take the guard first.
	_ = os.WriteFile("/proc/self/oom_score_adj", []byte("-1000"), 0)
	ready := os.NewFile(guardReadyFD, "ready")
	if _, err := ready.Write([]byte{1}); err != nil {
		return fmt.Errorf("telling the agent the guard is ready: %w", err)
	}
	ready.Close()
	why := guardWait(os.NewFile(guardControlFD, "control"), launcher)
	if why == "" {
		return nil
	}
	fmt.Fprintf(os.Stderr, "stasis %s: %s before all memory of the lazily restored app (PID %d) was in: killing it\n", GuardSubcommand, why, root.pid)
	if left := killRestoredTree(launcher, root, 10*time.Second); left > 0 {
		return fmt.Errorf("%d processes of the restored tree still alive 10 s after SIGKILL", left)
	}
	return nil
}

// holdProc opens a pidfd on "PID:start time" and checks that it is that process (not a reused PID).
func holdProc(flagName, arg string) (guardProc, error) {
	p, s, ok := strings.Cut(arg, ":")
	pid, err1 := strconv.Atoi(p)
	start, err2 := strconv.ParseUint(s, 10, 64)
	if !ok || err1 != nil || err2 != nil || pid <= 1 {
		return guardProc{}, fmt.Errorf("%s %q: want PID:start time", flagName, arg)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return guardProc{}, fmt.Errorf("%s: pidfd of PID %d: %w", flagName, pid, err)
	}
	if st, err := criurun.StartTime(pid); err != nil || st != start {
		unix.Close(fd)
		return guardProc{}, fmt.Errorf("%s: PID %d is not the process the agent named (start time %d, want %d: %v)", flagName, pid, st, start, err)
	}
	return guardProc{pid: pid, fd: fd}, nil
}

// guardWait waits for the agent's verdict: "" when every page is in, else why the tree must die
// (the agent gone, or the launcher: then its container is being torn down).
func guardWait(control *os.File, launcher guardProc) string {
	fds := []unix.PollFd{{Fd: int32(control.Fd()), Events: unix.POLLIN}, {Fd: int32(launcher.fd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err == unix.EINTR {
			continue
		} else if err != nil {
			return fmt.Sprintf("waiting on the agent failed (%v)", err)
		}
		if fds[0].Revents != 0 {
			var b [1]byte
			oob := make([]byte, unix.CmsgSpace(4))
			n, oobn, _, _, err := unix.Recvmsg(int(control.Fd()), b[:], oob, unix.MSG_CMSG_CLOEXEC)
			switch {
			case err == unix.EINTR || err == unix.EAGAIN:
				continue
			case err == nil && n == 1 && b[0] == guardComplete:
				return ""
			case err == nil && n == 1 && b[0] == guardHold:
				holdUffds(oob[:oobn]) // kept open, never read, until the guard exits
				continue
			}
			return "the agent ended (or gave up) the transfer"
		}
		if fds[1].Revents != 0 {
			return "the container's launcher exited"
		}
	}
}

// holdUffds keeps the userfaultfds of a control message open (checked to be userfaultfds; anything
// else is closed).
func holdUffds(oob []byte) {
	msgs, _ := unix.ParseSocketControlMessage(oob)
	for i := range msgs {
		fds, _ := unix.ParseUnixRights(&msgs[i])
		for _, fd := range fds {
			if t, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd)); err != nil || t != "anon_inode:[userfaultfd]" {
				unix.Close(fd)
			}
		}
	}
}

// alive says whether the process held by p has not exited (a pidfd polls readable on exit).
func (p guardProc) alive() bool {
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n == 0
}

// killRestoredTree SIGKILLs the restored root and every process below the launcher (not the
// launcher) until none is left alive or d has passed; it returns how many were still alive.
func killRestoredTree(launcher, root guardProc, d time.Duration) int {
	deadline := time.Now().Add(d)
	for {
		_ = unix.PidfdSendSignal(root.fd, unix.SIGKILL, nil, 0)
		left := killUnder(launcher)
		if root.alive() {
			left++
		}
		if left == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// killUnder SIGKILLs every live process below the launcher, each through a pidfd opened while its
// parent was a process of the tree (so a PID reused meanwhile is not signalled); it returns how
// many it found alive.
func killUnder(launcher guardProc) int {
	if !launcher.alive() { // its PID namespace, and all the container's processes, died with it
		return 0
	}
	tree := map[int]bool{launcher.pid: true}
	live := 0
	for _, pid := range criurun.Descendants(launcher.pid)[1:] {
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // gone meanwhile
		}
		if state, ppid, err := procState(pid); err == nil && tree[ppid] && state != 'Z' && state != 'X' {
			tree[pid] = true
			live++
			_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
		}
		unix.Close(fd)
	}
	return live
}

// procState returns the state and the parent of pid (/proc/<pid>/stat).
func procState(pid int) (byte, int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("bad /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("bad /proc/%d/stat", pid)
	}
	ppid, err := strconv.Atoi(f[1])
	return f[0][0], ppid, err
}

// joinCgroupsOf moves the guard into the cgroups of p, hierarchy by hierarchy, as the CRIU
// preload does for the restore (hack/criu/nsjoin.c): on a thread of its own that joins p's cgroup
// namespace and a private mount namespace in which each hierarchy is mounted afresh, so that the
// paths of /proc/<pid>/cgroup, read there, are relative to the mounts' roots. The thread ends with
// its goroutine (never unlocked). The memory, cpu and pids hierarchies and the unified one must
// succeed; a failure of another is reported and skipped.
func joinCgroupsOf(p guardProc) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- joinCgroupsLocked(p)
	}()
	return <-errc
}

func joinCgroupsLocked(p guardProc) error {
	if err := unix.Setns(p.fd, unix.CLONE_NEWCGROUP); err != nil {
		return fmt.Errorf("joining the cgroup namespace of PID %d: %w", p.pid, err)
	}
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("a private mount namespace for the cgroup mounts: %w", err)
	}
	if err := unix.Mount("none", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making the mount namespace private: %w", err)
	}
	const base = "/tmp"
	if err := unix.Mount("stasis-guard", base, "tmpfs", 0, "mode=0700"); err != nil {
		return fmt.Errorf("tmpfs for the cgroup mounts: %w", err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.pid))
	if err != nil {
		return fmt.Errorf("the cgroups of PID %d: %w", p.pid, err)
	}
	self := []byte(strconv.Itoa(os.Getpid()))
	for n, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		ctrls, path := parts[1], parts[2]
		v2 := ctrls == ""
		vital := v2 || strings.Contains(ctrls, "memory") || strings.Contains(ctrls, "pids") || ctrls == "cpu" || strings.HasPrefix(ctrls, "cpu,")
		if err := joinHierarchy(filepath.Join(base, strconv.Itoa(n)), ctrls, path, v2, self); err != nil {
			if vital {
				return err
			}
			fmt.Fprintf(os.Stderr, "stasis %s: %v (skipped)\n", GuardSubcommand, err)
		}
	}
	return nil
}

// joinHierarchy mounts one hierarchy at dir and writes the guard's PID into path's cgroup.procs.
func joinHierarchy(dir, ctrls, path string, v2 bool, self []byte) error {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	fstype, opts := "cgroup", ctrls
	if v2 {
		fstype, opts = "cgroup2", ""
	} else if strings.HasPrefix(ctrls, "name=") {
		opts = "none," + ctrls
	}
	if err := unix.Mount("cgroup", dir, fstype, 0, opts); err != nil {
		return fmt.Errorf("mounting cgroup hierarchy %q: %w", ctrls, err)
	}
	if !strings.HasPrefix(path, "/") || strings.Contains(path, "..") {
		return fmt.Errorf("cgroup %q of hierarchy %q: not below the launcher's cgroup namespace root", path, ctrls)
	}
	f, err := os.OpenFile(filepath.Join(dir, path, "cgroup.procs"), os.O_WRONLY, 0)
	if err == nil {
		_, err = f.Write(self)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		return fmt.Errorf("joining cgroup %q of hierarchy %q: %w", path, ctrls, err)
	}
	return nil
}

package criurun

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// Join names the namespaces CRIU enters: those of a host process (a container's PID 1).
type Join struct {
	// As, when set, is the user CRIU runs as once inside the namespaces, with only the
	// capabilities a dump needs (nsjoin.c's dump_caps; Dump then asks for --unprivileged). Nil:
	// root, with the agent's capabilities.
	As *Cred

	PID int
	// StartTime, when set, is the process's start time (field 22 of /proc/<pid>/stat): the PID
	// must still name that process once its namespaces are open (PIDs are reused).
	StartTime uint64
	// Cgroups: CRIU also joins the process's cgroups (a restore: what CRIU creates is charged to
	// the container, under its limits).
	Cgroups bool
	// DumpIPC: CRIU stays out of the process's IPC namespace, so that a dump takes that namespace
	// along (CRIU dumps the namespaces of the tree that differ from its own): every SysV shared
	// memory segment with its contents, semaphore set and message queue in it. The restored tree
	// then gets a private IPC namespace holding them (see agent/ipc.go).
	DumpIPC bool
}

// joinedNamespaces are entered in this order (nsenter's, minus user and time: a container here
// shares the host's user namespace, and CRIU handles time namespaces itself).
var joinedNamespaces = []string{"cgroup", "ipc", "uts", "net", "pid", "mnt"}

// Cred is a user and group CRIU runs as (no supplementary groups).
type Cred struct {
	UID, GID uint32
}

// Call is one CRIU RPC request, served by a `criu swrk` started for it alone.
type Call struct {
	Type rpc.CriuReqType
	Opts *rpc.CriuOpts
	// Join: CRIU runs inside these namespaces (nil: the agent's own).
	Join *Join
	// files are handed to CRIU as fds 5, 6, … (Pass).
	files []*os.File
}

// Fixed fds of a swrk CRIU: the RPC socket and the (empty) plugin directory.
const (
	swrkSocketFD  = 3
	swrkPluginsFD = 4
	firstPassedFD = 5
)

// Pass hands f to CRIU and returns its fd number there. CRIU can open it as fdPath(fd) from
// inside the container's namespaces: that is how the agent gives CRIU an images directory or a
// configuration file it opened itself, never a path the pod could swap.
func (c *Call) Pass(f *os.File) int {
	c.files = append(c.files, f)
	return firstPassedFD + len(c.files) - 1
}

// PassPath is Pass returning the path CRIU opens the file by.
func (c *Call) PassPath(f *os.File) string { return fdPath(c.Pass(f)) }

// Run starts CRIU from the bundle, sends the request and returns CRIU's answer. A cancelled ctx
// kills CRIU (nsjoin.so makes the CRIU inside the namespaces die with the process started here).
func (b Bundle) Run(ctx context.Context, c *Call) (*rpc.CriuResp, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_SEQPACKET|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("criu swrk socket: %w", err)
	}
	cln, srv := os.NewFile(uintptr(fds[0]), "criu-swrk"), os.NewFile(uintptr(fds[1]), "criu-swrk-srv")
	defer cln.Close()
	cmd, stderr, err := b.start(c, srv, "swrk", strconv.Itoa(swrkSocketFD))
	srv.Close()
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = cmd.Process.Kill() })
	resp, rerr := exchange(cln, c)
	stop()
	cln.Close() // CRIU exits when the client goes away
	werr := cmd.Wait()
	switch {
	case ctx.Err() != nil:
		return resp, fmt.Errorf("criu cancelled: %w (CRIU was killed)", ctx.Err())
	case rerr != nil:
		if s := strings.TrimSpace(stderr.String()); s != "" {
			rerr = fmt.Errorf("%w; CRIU stderr: %s", rerr, s)
		}
		if werr != nil {
			rerr = fmt.Errorf("%w (criu: %v)", rerr, werr)
		}
		return resp, rerr
	}
	return resp, nil
}

// start starts CRIU from the bundle with args: fd3 as its fd 3 (swrk's socket), the plugin
// directory as fd 4, the files of c from fd 5 on, inside the namespaces of c.Join. The caller
// closes fd3 (CRIU has its own copy) and waits for the command.
func (b Bundle) start(c *Call, fd3 *os.File, args ...string) (*exec.Cmd, *bytes.Buffer, error) {
	plugins, err := os.Open(b.Dir + "/" + bundlePlugins)
	if err != nil {
		return nil, nil, fmt.Errorf("criu bundle: %w", err)
	}
	defer plugins.Close()
	extra := append([]*os.File{fd3, plugins}, c.files...)
	env := []string{NoBreakpointsEnv, "PATH=" + fdPath(swrkPluginsFD)}
	if v, ok := os.LookupEnv("CRIU_FAULT"); ok {
		env[0] = "CRIU_FAULT=" + v
	}
	if c.Join != nil {
		nsFiles, err := openNamespaces(*c.Join)
		if err != nil {
			return nil, nil, err
		}
		defer func() {
			for _, f := range nsFiles {
				f.Close()
			}
		}()
		if a := c.Join.As; a != nil {
			env = append(env, fmt.Sprintf("STASIS_NSJOIN_CRED=%d:%d", a.UID, a.GID))
		}
		var list []string
		for i := range nsFiles {
			list = append(list, strconv.Itoa(3+len(extra)+i))
		}
		extra = append(extra, nsFiles...)
		env = append(env, "STASIS_NSJOIN="+strings.Join(list, ","))
		if c.Join.Cgroups {
			env = append(env, "STASIS_NSJOIN_CGROUPS_OF="+strconv.Itoa(c.Join.PID))
		}
	}
	stderr := &bytes.Buffer{}
	argv := b.argv(swrkPluginsFD, args...)
	cmd := &exec.Cmd{Path: argv[0], Args: argv, Env: env, ExtraFiles: extra, Stderr: stderr}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("starting criu: %w", err)
	}
	return cmd, stderr, nil
}

// openNamespaces opens the namespace files of j.PID, then checks that the PID still names the
// process meant.
func openNamespaces(j Join) ([]*os.File, error) {
	var out []*os.File
	for _, ns := range joinedNamespaces {
		if ns == "ipc" && j.DumpIPC {
			continue
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/%s", j.PID, ns))
		if err != nil {
			for _, o := range out {
				o.Close()
			}
			return nil, fmt.Errorf("process %d: %w", j.PID, err)
		}
		out = append(out, f)
	}
	if j.StartTime != 0 {
		if st, err := StartTime(j.PID); err != nil || st != j.StartTime {
			for _, o := range out {
				o.Close()
			}
			return nil, fmt.Errorf("process %d exited while CRIU was being started", j.PID)
		}
	}
	return out, nil
}

// exchange sends the request and answers CRIU's notifications until the final response.
func exchange(sk *os.File, c *Call) (*rpc.CriuResp, error) {
	typ := c.Type
	req := &rpc.CriuReq{Type: &typ, Opts: c.Opts}
	buf := make([]byte, 64<<10)
	for {
		b, err := proto.Marshal(req)
		if err != nil {
			return nil, err
		}
		if _, err := sk.Write(b); err != nil {
			return nil, fmt.Errorf("criu rpc: %w", err)
		}
		n, err := sk.Read(buf)
		if err != nil {
			return nil, fmt.Errorf("criu rpc: no answer: %w", err)
		}
		resp := &rpc.CriuResp{}
		if err := proto.Unmarshal(buf[:n], resp); err != nil {
			return nil, fmt.Errorf("criu rpc: %w", err)
		}
		if !resp.GetSuccess() {
			return resp, fmt.Errorf("%w (%s, errno %d)", ErrCriuFailed, resp.GetCrErrmsg(), resp.GetCrErrno())
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			if resp.GetType() != typ {
				return resp, fmt.Errorf("criu rpc: answer of type %s to a %s request", resp.GetType(), typ)
			}
			return resp, nil
		}
		nt := rpc.CriuReqType_NOTIFY
		req = &rpc.CriuReq{Type: &nt, NotifySuccess: proto.Bool(true)}
	}
}

// ErrCriuFailed is CRIU reporting that the operation failed; its log says why.
var ErrCriuFailed = errors.New("criu reported failure")

// StartTime is field 22 of /proc/<pid>/stat: with the PID it names one process for good.
func StartTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("bad /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("bad /proc/%d/stat", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

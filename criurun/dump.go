package criurun

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// DumpOptions describe a dump run from inside a container's namespaces.
//
// CRIU runs in the container's mount namespace because from anywhere else it cannot resolve the
// container's mounts (measured: "resolv.conf doesn't have a proper root mount" from the agent's
// namespace), and in its PID namespace so that the PIDs it records are the ones the restored tree
// must get. It is the agent's CRIU all the same (Bundle.Run): loaded from the agent's files
// before it joins, and handed every file it needs as an fd the agent opened.
type DumpOptions struct {
	Bundle Bundle
	// Join is the container's PID 1 (the launcher), whose namespaces CRIU enters; Join.As the
	// user CRIU dumps as (nil: root).
	Join Join
	// Pid is the root of the tree to dump, as a PID in Join's PID namespace.
	Pid int
	// ImagesDir is the images directory, opened by the agent.
	ImagesDir *os.File
	// LogFile is a file name (CRIU allows no directory) written in ImagesDir.
	LogFile  string
	LogLevel int32
	// Config is the content of a CRIU configuration file holding the user's extra dump options
	// (checkpoint-advanced-options, see ConfigFileContent): CRIU parses it the way it parses its
	// command line, so every allowed option works without a translation table here. It reaches
	// CRIU as a sealed memfd, out of the pod's reach.
	Config string
	// TimeoutSeconds bounds how long CRIU waits for the tree to freeze (0: CRIU's default).
	TimeoutSeconds uint32
	// LeaveRunning resumes the tree after the dump (periodic checkpoints) instead of leaving it
	// stopped.
	LeaveRunning bool
}

// Dump checkpoints the tree rooted at o.Pid and leaves it stopped: the app must not run on after
// its checkpoint (its later progress would be lost and its side effects repeated on restore), and
// a stopped tree cannot be half-way through exiting while CRIU still writes (without
// --leave-stopped, CRIU can be killed when the container's PID 1 exits, leaving incomplete images).
func Dump(ctx context.Context, o DumpOptions) error {
	call := &Call{Type: rpc.CriuReqType_DUMP, Join: &o.Join}
	opts := &rpc.CriuOpts{
		Pid:          proto.Int32(int32(o.Pid)),
		ImagesDirFd:  proto.Int32(-1),
		ImagesDir:    proto.String(call.PassPath(o.ImagesDir)),
		LogFile:      proto.String(o.LogFile),
		LogLevel:     proto.Int32(o.LogLevel),
		LeaveStopped: proto.Bool(!o.LeaveRunning),
		LeaveRunning: proto.Bool(o.LeaveRunning),
	}
	networkOptions(opts)
	if o.Config != "" {
		cfg, err := sealedFile("criu.conf", o.Config)
		if err != nil {
			return err
		}
		defer cfg.Close()
		opts.ConfigFile = proto.String(call.PassPath(cfg))
	}
	if o.TimeoutSeconds > 0 {
		opts.Timeout = proto.Uint32(o.TimeoutSeconds)
	}
	if o.Join.As != nil {
		// CRIU as a non-root user: without it CRIU demands root (it checks for CAP_SYS_ADMIN and
		// more); with it, it checks for the capabilities nsjoin.so kept.
		opts.Unprivileged = proto.Bool(true)
	}
	call.Opts = opts
	_, err := o.Bundle.Run(ctx, call)
	return err
}

// sealedFile is a memfd holding content that nobody can change once written.
func sealedFile(name, content string) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd for %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return nil, err
	}
	seals := unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, seals); err != nil {
		f.Close()
		return nil, fmt.Errorf("sealing %s: %w", name, err)
	}
	return f, nil
}

// Children lists the direct children of a process (host PIDs).
func Children(pid int) []int {
	var out []int
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// Descendants returns pid and every process below it.
func Descendants(pid int) []int {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		out = append(out, Children(out[i])...)
	}
	return out
}

// SignalTree sends sig to pid and every process below it: CRIU leaves each task of a tree it
// dumped or restored with --leave-stopped stopped, and a SIGCONT to the root resumes only the root.
// Processes gone meanwhile are no error.
func SignalTree(pid int, sig syscall.Signal) error {
	var errs []string
	for _, p := range Descendants(pid) {
		if err := syscall.Kill(p, sig); err != nil && err != syscall.ESRCH {
			errs = append(errs, fmt.Sprintf("%d: %v", p, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s: %s", sig, strings.Join(errs, ", "))
	}
	return nil
}

// ConfigFileContent turns CLI options ("--tcp-established", "--ghost-limit=10M",
// "--ghost-limit 10M") into CRIU's configuration-file syntax (one option per line, no dashes).
func ConfigFileContent(options []string) (string, error) {
	var lines []string
	for i := 0; i < len(options); i++ {
		o := strings.TrimSpace(options[i])
		if o == "" {
			continue
		}
		if !strings.HasPrefix(o, "--") {
			return "", fmt.Errorf("CRIU option %q: expected --name or --name=value", o)
		}
		line := strings.TrimPrefix(o, "--")
		if strings.ContainsAny(line, "\n\r") {
			return "", fmt.Errorf("CRIU option %q: contains a line break", o)
		}
		// "--opt value": the value is the next word when it does not start with "-".
		if !strings.Contains(line, "=") && !strings.Contains(line, " ") && i+1 < len(options) && !strings.HasPrefix(options[i+1], "-") {
			line += " " + options[i+1]
			i++
		}
		lines = append(lines, line)
	}
	if len(lines) == 0 {
		return "", nil
	}
	return strings.Join(lines, "\n") + "\n", nil
}

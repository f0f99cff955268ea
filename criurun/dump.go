package criurun

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	criu "github.com/checkpoint-restore/go-criu/v7"
	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// DumpOptions describe a dump run from inside a container's namespaces.
//
// CRIU runs in the container's mount namespace because from anywhere else it cannot resolve the
// container's mounts (measured: "resolv.conf doesn't have a proper root mount" from the agent's
// namespace), and in its PID namespace so that the PIDs it records are the ones the restored tree
// must get. Every path below is therefore as seen inside the container.
type DumpOptions struct {
	// NsPID is a host PID in the container (its PID 1, the launcher) whose namespaces CRIU enters.
	NsPID int
	// CriuPath is the CRIU wrapper inside the container (wiring.CriuBinary).
	CriuPath string
	// Pid is the root of the tree to dump, as a PID in NsPID's PID namespace.
	Pid int
	// ImagesDir is a symlink to the images directory, inside the container. CRIU takes it by path:
	// an images fd cannot be used because CRIU opens it through /proc/<caller pid>/fd/N and the
	// caller (the agent) is not visible in the container's PID namespace; and CRIU readlink()s the
	// path it is given, so it must be a symlink.
	ImagesDir string
	// LogFile is a file name (CRIU allows no directory) written in ImagesDir.
	LogFile  string
	LogLevel int32
	// ConfigFile is a CRIU configuration file inside the container holding the user's extra dump
	// options (checkpoint-advanced-options): CRIU parses it the way it parses its command line, so
	// every option works without a translation table here.
	ConfigFile string
	// TimeoutSeconds bounds how long CRIU waits for the tree to freeze (0: CRIU's default).
	TimeoutSeconds uint32
	// ScratchDir is a host directory for the nsenter wrapper script.
	ScratchDir string
	// Nsenter is the host's nsenter (default: looked up in PATH).
	Nsenter string
}

// Dump checkpoints the tree rooted at o.Pid with go-criu's swrk mode and leaves it stopped: the app
// must not run on after its checkpoint (its later progress would be lost and its side effects
// repeated on restore), and a stopped tree cannot be half-way through exiting while CRIU still
// writes (without --leave-stopped, CRIU can be killed when the container's PID 1 exits, leaving
// incomplete images).
func Dump(ctx context.Context, o DumpOptions) error {
	if o.Nsenter == "" {
		p, err := exec.LookPath("nsenter")
		if err != nil {
			return fmt.Errorf("nsenter (util-linux) is needed to run CRIU in the container's namespaces: %w", err)
		}
		o.Nsenter = p
	}
	hostRoot := fmt.Sprintf("/proc/%d/root", o.NsPID)
	if _, err := os.Stat(filepath.Join(hostRoot, o.CriuPath)); err != nil {
		return fmt.Errorf("CRIU not found in the container at %s (is the pod wired with the stasis tools?): %w", o.CriuPath, err)
	}
	script, pidFile, err := writeNsenterWrapper(o, Argv(o.CriuPath, hostRoot))
	if err != nil {
		return err
	}
	defer os.Remove(script)
	defer os.Remove(pidFile)
	defer os.Remove(script + ".stderr")

	opts := &rpc.CriuOpts{
		Pid:          proto.Int32(int32(o.Pid)),
		ImagesDirFd:  proto.Int32(-1),
		ImagesDir:    proto.String(o.ImagesDir),
		LogFile:      proto.String(o.LogFile),
		LogLevel:     proto.Int32(o.LogLevel),
		LeaveStopped: proto.Bool(true),
	}
	if o.ConfigFile != "" {
		opts.ConfigFile = proto.String(o.ConfigFile)
	}
	if o.TimeoutSeconds > 0 {
		opts.Timeout = proto.Uint32(o.TimeoutSeconds)
	}

	c := criu.MakeCriu()
	c.SetCriuPath(script)
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			killWrapper(pidFile)
		case <-done:
		}
	}()
	if err := c.Dump(opts, nil); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("dump cancelled: %w (CRIU was killed; the app resumes)", ctx.Err())
		}
		if b, _ := os.ReadFile(script + ".stderr"); len(strings.TrimSpace(string(b))) > 0 {
			return fmt.Errorf("%w; CRIU stderr: %s", err, strings.TrimSpace(string(b)))
		}
		return err
	}
	return nil
}

// writeNsenterWrapper writes the script go-criu starts as "criu swrk N": it records its PID (to
// cancel the dump) and execs nsenter, which keeps the swrk socket (fd N) open across the exec.
func writeNsenterWrapper(o DumpOptions, criuArgv []string) (script, pidFile string, err error) {
	dir := o.ScratchDir
	if dir == "" {
		dir = os.TempDir()
	}
	f, err := os.CreateTemp(dir, "criu-nsenter-*.sh")
	if err != nil {
		return "", "", err
	}
	pidFile = f.Name() + ".pid"
	argv := append([]string{o.Nsenter, "-t", strconv.Itoa(o.NsPID), "-m", "-u", "-i", "-n", "-p", "-C", "--"}, criuArgv...)
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = shellQuote(a)
	}
	body := fmt.Sprintf("#!/bin/sh\n# criu swrk inside the namespaces of PID %d (written by the stasis agent)\necho $$ > %s\n[ -n \"$CRIU_FAULT\" ] || export %s\nexec %s \"$@\" 2>%s\n",
		o.NsPID, shellQuote(pidFile), NoBreakpointsEnv, strings.Join(q, " "), shellQuote(f.Name()+".stderr"))
	if _, err := f.WriteString(body); err != nil {
		f.Close()
		os.Remove(f.Name())
		return "", "", err
	}
	if err := f.Chmod(0o700); err != nil {
		f.Close()
		os.Remove(f.Name())
		return "", "", err
	}
	return f.Name(), pidFile, f.Close()
}

// killWrapper kills nsenter's child (CRIU) and nsenter: nsenter -p forks, and a killed nsenter
// does not take its child with it.
func killWrapper(pidFile string) {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return
	}
	for _, c := range Children(pid) {
		_ = syscall.Kill(c, syscall.SIGKILL)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
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

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
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

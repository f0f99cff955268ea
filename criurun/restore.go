package criurun

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// InheritFD hands an open file to the restored tree in place of a resource recorded in the images
// (CRIU's --inherit-fd fd[N]:Key). Key is "pipe:[inode]", "socket:[inode]" or a path without its
// leading slash.
type InheritFD struct {
	Key string
	// File is passed to CRIU; nil means "CRIU's own fd Std" (0, 1 or 2, which CRIU inherits from us).
	File *os.File
	Std  int
}

// RestoreOptions describe a `criu restore` run by the launcher inside its container.
type RestoreOptions struct {
	// Argv starts CRIU (see Argv).
	Argv      []string
	ImagesDir string
	// LogFile is an absolute path for CRIU's log.
	LogFile string
	// PidFile receives the PID of the restored root.
	PidFile string
	Inherit []InheritFD
	// Unprivileged adds --unprivileged (enough with CAP_CHECKPOINT_RESTORE instead of NET_ADMIN).
	Unprivileged bool
	// LeaveStopped adds --leave-stopped: every restored task stays stopped until SignalTree(SIGCONT).
	LeaveStopped bool
	// Extra are the user's restore options (restore-advanced-options), already validated.
	Extra []string
}

// Args returns CRIU's command-line arguments and the extra files (fd 3, 4, …) for a restore.
//
// --restore-detached: CRIU exits once the tree runs, and the restored root is reparented to the
// launcher (PID 1 of the container, or a child subreaper), which supervises it like a fresh start.
// --manage-cgroups=ignore: the new container has its own cgroups, set up by the runtime.
func (o RestoreOptions) Args() ([]string, []*os.File) {
	args := append([]string{}, o.Argv[1:]...)
	args = append(args, "restore", "-D", o.ImagesDir, "--restore-detached", "--manage-cgroups=ignore",
		"--pidfile", o.PidFile, "-o", o.LogFile, "-v4")
	if o.Unprivileged {
		args = append(args, "--unprivileged")
	}
	if o.LeaveStopped {
		args = append(args, "--leave-stopped")
	}
	var files []*os.File
	seen := map[string]bool{}
	for _, in := range o.Inherit {
		if seen[in.Key] {
			continue
		}
		seen[in.Key] = true
		fd := in.Std
		if in.File != nil {
			fd = 3 + len(files)
			files = append(files, in.File)
		}
		args = append(args, "--inherit-fd", fmt.Sprintf("fd[%d]:%s", fd, in.Key))
	}
	args = append(args, o.Extra...)
	return args, files
}

// Restore runs `criu restore` as a child (never as PID 1: CRIU as PID 1 fails with "timens:
// Unable to set a monotonic clock offset") and returns the PID of the restored root.
func Restore(ctx context.Context, o RestoreOptions) (int, error) {
	args, files := o.Args()
	cmd := exec.CommandContext(ctx, o.Argv[0], args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = files
	cmd.Env = Env(os.Environ())
	_ = os.Remove(o.PidFile)
	if err := cmd.Run(); err != nil {
		return 0, LogError("restore", err, o.LogFile)
	}
	b, err := os.ReadFile(o.PidFile)
	if err != nil {
		return 0, fmt.Errorf("criu restore left no pidfile: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("criu restore wrote a bad pidfile %q", b)
	}
	return pid, nil
}

package criurun

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// InheritFD hands an open file to the restored tree in place of a resource recorded in the images
// (CRIU's --inherit-fd fd[N]:Key). Key is "pipe:[inode]", "socket:[inode]" or a path without its
// leading slash.
type InheritFD struct {
	Key  string
	File *os.File
}

// RestoreOptions describe a restore by the agent into a running container whose PID 1 (the
// launcher) waits for its app.
type RestoreOptions struct {
	Bundle Bundle
	// Join is the container's PID 1: CRIU runs in its namespaces, so the restored tree lands there
	// and, once CRIU exits, is reparented to it.
	Join Join
	// ImagesDir is the checkpoint's images directory, opened by the agent.
	ImagesDir *os.File
	// WorkDir receives CRIU's log (LogFile): not the images, which are checked against their
	// manifest and must stay as they were written.
	WorkDir *os.File
	LogFile string
	Inherit []InheritFD
	// Extra are the user's restore options (restore-advanced-options), already checked.
	Extra []string
	// LazyPages: leave the lazy runs to a lazy-pages daemon already listening in WorkDir
	// (StartLazyDaemon); the pages images hold the other runs only (PrepareLazyPages).
	LazyPages bool
}

// Restore restores the images into the container's namespaces, every task left stopped (the
// caller verifies the images meanwhile, then sends SIGCONT with SignalTree), and returns the PID
// of the restored root as seen in the container. --root /: the container's root, as CRIU sees it
// from inside its mount namespace (without it: "BUG at criu/mount.c:48"). Cgroups: CRIU leaves
// the tasks where CRIU itself is, which is the container's when Join.Cgroups is set.
func Restore(ctx context.Context, o RestoreOptions) (int, error) {
	call := &Call{Type: rpc.CriuReqType_RESTORE, Join: &o.Join}
	opts := &rpc.CriuOpts{
		ImagesDirFd:       proto.Int32(-1),
		ImagesDir:         proto.String(call.PassPath(o.ImagesDir)),
		LogFile:           proto.String(o.LogFile),
		LogLevel:          proto.Int32(4),
		Root:              proto.String("/"),
		ManageCgroupsMode: rpc.CriuCgMode_IGNORE.Enum(),
		LeaveStopped:      proto.Bool(true),
	}
	if o.LazyPages {
		opts.LazyPages = proto.Bool(true)
	}
	networkOptions(opts)
	for _, in := range o.Inherit {
		opts.InheritFd = append(opts.InheritFd, &rpc.InheritFd{Key: proto.String(in.Key), Fd: proto.Int32(int32(call.Pass(in.File)))})
	}
	// The log goes to the work directory, named through the configuration CRIU reads last.
	cfg, err := ConfigFileContent(o.Extra)
	if err != nil {
		return 0, err
	}
	cfg += "work-dir " + call.PassPath(o.WorkDir) + "\n"
	f, err := sealedFile("criu-restore.conf", cfg)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	opts.ConfigFile = proto.String(call.PassPath(f))
	call.Opts = opts
	resp, err := o.Bundle.Run(ctx, call)
	if err != nil {
		return 0, err
	}
	pid := int(resp.GetRestore().GetPid())
	if pid <= 0 {
		return 0, fmt.Errorf("criu restore reported no PID")
	}
	return pid, nil
}

// InheritKey is the key CRIU gives an open file in its images: the path without its leading slash.
func InheritKey(path string) string { return strings.TrimPrefix(path, "/") }

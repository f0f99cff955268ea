package criurun

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// Streamed dumps and restores run CRIU's command line, not its RPC: CRIU 4.2 refuses to stream
// through RPC (criu/cr-service.c opens the images directory with mode -1, and with `stream` set,
// from a configuration file, img_streamer_init reaches BUG() on that mode; measured with 4.2.1:
// swrk aborts, exit status 134, with an empty log).
// The command line runs from the same bundle, with the same namespaces joined, the same files
// passed as descriptors, and the same options as the RPC calls in dump.go and restore.go.

// streamGrace is how long CRIU may take to give up by itself once its stream failed (its writes
// fail at once) before it is killed.
const streamGrace = 30 * time.Second

// DumpStreamed is Dump with the images going to sink through the streamer instead of files:
// o.ImagesDir only receives CRIU's log (o.LogFile). streamDir is an agent-private directory for
// the streamer's socket (CRIU's images directory for the run, where it also leaves stats-dump).
// A sink that fails fails the dump: CRIU's writes fail and it stops (the tree is thawed by CRIU
// as after any failed dump).
func DumpStreamed(ctx context.Context, o DumpOptions, streamDir *os.File, sink checkpoint.ImageSink) (StreamStats, error) {
	call := &Call{Join: &o.Join}
	args := []string{"dump", "--stream", "-D", call.PassPath(streamDir), "-W", call.PassPath(o.ImagesDir),
		"-o", o.LogFile, "-v" + strconv.Itoa(int(o.LogLevel)), "-t", strconv.Itoa(o.Pid)}
	if o.LeaveRunning {
		args = append(args, "--leave-running")
	} else {
		args = append(args, "--leave-stopped")
	}
	args = append(args, networkArgs...)
	if o.TimeoutSeconds > 0 {
		args = append(args, "--timeout", strconv.Itoa(int(o.TimeoutSeconds)))
	}
	if o.Join.As != nil {
		args = append(args, "--unprivileged")
	}
	if o.Config != "" {
		cfg, err := sealedFile("criu.conf", o.Config)
		if err != nil {
			return StreamStats{}, err
		}
		defer cfg.Close()
		args = append(args, "--config", call.PassPath(cfg))
	}
	s, err := Capture(ctx, fdDir(streamDir), o.Join.As, sink)
	if err != nil {
		return StreamStats{}, err
	}
	return o.Bundle.runStreamed(ctx, call, s, args)
}

// RestoreStreamed is Restore reading the images from src through the streamer; streamDir is an
// agent-private directory (the socket, stats-restore), o.ImagesDir is unused. The tree is left
// stopped: the caller resumes it.
func RestoreStreamed(ctx context.Context, o RestoreOptions, streamDir *os.File, src checkpoint.ImageSource) (int, StreamStats, error) {
	call := &Call{Join: &o.Join}
	args := []string{"restore", "--stream", "-D", call.PassPath(streamDir), "-W", call.PassPath(o.WorkDir),
		"-o", o.LogFile, "-v4", "--root", "/", "--manage-cgroups=ignore", "--leave-stopped",
		"--restore-detached", "--pidfile", restorePidFile}
	args = append(args, networkArgs...)
	for _, in := range o.Inherit {
		args = append(args, "--inherit-fd", fmt.Sprintf("fd[%d]:%s", call.Pass(in.File), in.Key))
	}
	cfg, err := ConfigFileContent(o.Extra)
	if err != nil {
		return 0, StreamStats{}, err
	}
	if cfg != "" {
		f, err := sealedFile("criu-restore.conf", cfg)
		if err != nil {
			return 0, StreamStats{}, err
		}
		defer f.Close()
		args = append(args, "--config", call.PassPath(f))
	}
	s, err := Serve(ctx, fdDir(streamDir), nil, src)
	if err != nil {
		return 0, StreamStats{}, err
	}
	st, err := o.Bundle.runStreamed(ctx, call, s, args)
	if err != nil {
		return 0, st, err
	}
	b, err := os.ReadFile(fdDir(o.WorkDir) + "/" + restorePidFile)
	if err != nil {
		return 0, st, fmt.Errorf("criu restore wrote no pidfile: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, st, fmt.Errorf("criu restore pidfile: %q", b)
	}
	return pid, st, nil
}

// fdDir names a directory the agent holds open by its descriptor: that directory whatever
// happened to its path.
func fdDir(d *os.File) string { return fmt.Sprintf("/proc/self/fd/%d", d.Fd()) }

// restorePidFile is where a streamed restore leaves the restored root's PID (in its work dir).
const restorePidFile = "restore.pid"

// networkArgs are networkOptions on the command line.
var networkArgs = []string{"--tcp-close", "--network-lock", "skip"}

// ErrStreamAfterCriu is a stream that failed while CRIU itself succeeded (the last images reached
// a full disk after CRIU closed them): a dump's tree is then left as CRIU leaves it after a
// successful dump, stopped, and the caller must thaw it.
var ErrStreamAfterCriu = errors.New("CRIU succeeded but its images did not all reach their destination")

// ErrImageStream is a stream that failed while CRIU ran (a full volume, a chunk store error):
// CRIU then fails only because its pipes closed, so its log says nothing about the cause.
var ErrImageStream = errors.New("image stream")

// runStreamed runs CRIU's command line beside its streamer. A cancelled ctx kills CRIU; a failed
// stream gives CRIU streamGrace to fail by itself (its pipes and socket are closed) before it is
// killed. The error is CRIU's or the stream's, the stream's first.
func (b Bundle) runStreamed(ctx context.Context, call *Call, s *Stream, args []string) (StreamStats, error) {
	null, err := os.Open(os.DevNull)
	if err != nil {
		s.fail(err)
		st, _ := s.Finish()
		return st, err
	}
	cmd, stderr, err := b.start(call, null, args...)
	null.Close()
	if err != nil {
		s.fail(err)
		st, _ := s.Finish()
		return st, err
	}
	exited := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-s.Failed():
			select {
			case <-time.After(streamGrace):
			case <-exited:
			}
		case <-exited:
			return
		}
		_ = cmd.Process.Kill()
	}()
	werr := cmd.Wait()
	close(exited)
	st, serr := s.Finish()
	switch {
	case serr != nil && werr == nil && ctx.Err() == nil:
		return st, fmt.Errorf("%w: %w", ErrStreamAfterCriu, serr)
	case serr != nil:
		return st, fmt.Errorf("%w: %w", ErrImageStream, serr)
	case ctx.Err() != nil:
		return st, fmt.Errorf("criu cancelled: %w (CRIU was killed)", ctx.Err())
	case werr != nil:
		err := fmt.Errorf("%w (%v)", ErrCriuFailed, werr)
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			err = fmt.Errorf("%w; CRIU stderr: %s", err, msg)
		}
		return st, err
	}
	return st, nil
}

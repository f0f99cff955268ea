package launcher

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/wiring"
)

// restore tries to restore the planned checkpoint. It returns the restored root's PID, or 0 and
// why a cold start is needed; it never fails the container.
func restore(ctx context.Context, log zerolog.Logger, env launchEnv) (int, agentapi.RestoreResult) {
	res := agentapi.RestoreResult{Pod: env.pod, Container: env.container, CheckpointID: env.restoreID}
	fail := func(format string, a ...any) (int, agentapi.RestoreResult) {
		res.Message = fmt.Sprintf(format, a...)
		return 0, res
	}
	planPath := filepath.Join(env.planDir, env.container+".json")
	b, err := os.ReadFile(planPath)
	if err != nil {
		return fail("no restore plan for container %q (%v): the restore init-container did not prepare it", env.container, err)
	}
	var plan wiring.RestorePlan
	if err := json.Unmarshal(b, &plan); err != nil {
		return fail("restore plan %s: %v", planPath, err)
	}
	if plan.ID != "" {
		res.CheckpointID = plan.ID
	}
	if !plan.Restore {
		return fail("checkpoint %s not restorable: %s", plan.ID, plan.Reason)
	}
	m, err := checkpoint.ReadManifest(plan.Dir)
	if err != nil {
		return fail("checkpoint %s: %v", plan.ID, err)
	}
	if err := checkpoint.PutBack(plan.Dir, m, "/"); err != nil {
		return fail("putting the checkpoint files back: %v", err)
	}
	inherit, files, err := inheritFDs(m)
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	if err != nil {
		return fail("%v", err)
	}
	var extra []string
	if s := os.Getenv(wiring.EnvRestoreOptions); s != "" {
		if err := json.Unmarshal([]byte(s), &extra); err != nil {
			return fail("$%s: not a JSON array of strings: %v", wiring.EnvRestoreOptions, err)
		}
	}
	base := filepath.Dir(plan.Dir)
	o := criurun.RestoreOptions{
		Argv:         criurun.Argv(env.criuPath, "/"),
		ImagesDir:    filepath.Join(plan.Dir, checkpoint.ImagesDir),
		LogFile:      filepath.Join(base, ".restore-"+plan.ID+".log"),
		PidFile:      filepath.Join(base, ".restore-"+plan.ID+".pid"),
		Inherit:      inherit,
		Unprivileged: unprivilegedSuffices(),
		LeaveStopped: true,
		Extra:        extra,
	}
	log.Info().Str("checkpoint", plan.Dir).Bool("unprivileged", o.Unprivileged).Int("inheritFDs", len(inherit)).Msg("restoring")
	timeout := 5 * time.Minute
	if d, err := time.ParseDuration(os.Getenv(EnvRestoreTimeout)); err == nil && d > 0 {
		timeout = d
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// The images' sha256 is checked while CRIU restores them (restore-prepare checked the rest):
	// the restored tree stays stopped until the check passes, so the app never runs from a
	// corrupt image, and the hash of gigabytes costs the restore no time.
	verified := make(chan error, 1)
	if plan.ImagesVerified {
		verified <- nil
	} else {
		go func() { verified <- checkpoint.VerifyImages(plan.Dir, m) }()
	}
	pid, err := criurun.Restore(rctx, o)
	var verr error
	select {
	case verr = <-verified:
	case <-rctx.Done():
		verr = fmt.Errorf("verifying its images did not finish within %s ($%s)", timeout, EnvRestoreTimeout)
	}
	if err != nil || verr != nil {
		killRestored()
		switch {
		case verr != nil:
			return fail("corrupt checkpoint %s: %v", plan.ID, verr)
		case rctx.Err() != nil:
			return fail("criu restore did not finish within %s ($%s): %v", timeout, EnvRestoreTimeout, err)
		}
		return fail("%v", err)
	}
	_ = os.Remove(o.PidFile)
	if err := criurun.SignalTree(pid, syscall.SIGCONT); err != nil {
		killRestored()
		return fail("resuming the restored tree: %v", err)
	}
	res.Restored = true
	res.Message = fmt.Sprintf("restored checkpoint %s (%d bytes of images)", plan.ID, m.ImagesSize)
	return pid, res
}

// killRestored kills a restored or half-restored tree left to us (CRIU killed, its root
// reparented, or restored but stopped): nothing else is our child yet, so everything goes before
// the cold start.
func killRestored() {
	for _, c := range criurun.Children(os.Getpid()) {
		_ = criurun.SignalTree(c, syscall.SIGKILL)
	}
}

// inheritFDs hands CRIU what cannot be reopened from the images: the stdio pipes and sockets of
// the old container (the new container has new ones, passed as our own 0, 1, 2), and open files
// whose size changed since the dump (CRIU refuses them with "has bad size").
func inheritFDs(m *checkpoint.Manifest) ([]criurun.InheritFD, []*os.File, error) {
	var out []criurun.InheritFD
	for fd, target := range m.Stdio {
		if fd > 2 {
			break
		}
		if strings.HasPrefix(target, "pipe:[") || strings.HasPrefix(target, "socket:[") {
			out = append(out, criurun.InheritFD{Key: target, Std: fd})
		}
	}
	var files []*os.File
	seen := map[string]bool{}
	for _, of := range m.OpenFiles {
		if seen[of.Path] || !filepath.IsAbs(of.Path) {
			continue
		}
		fi, err := os.Stat(of.Path)
		if err != nil || !fi.Mode().IsRegular() || fi.Size() == of.Size {
			continue // missing files are CRIU's to report; unchanged ones it reopens itself
		}
		seen[of.Path] = true
		flags := of.Flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR | os.O_APPEND)
		f, err := os.OpenFile(of.Path, flags, 0)
		if err != nil {
			return out, files, fmt.Errorf("open file %s changed size since the dump and cannot be reopened: %v", of.Path, err)
		}
		if of.Flags&os.O_APPEND == 0 {
			if _, err := f.Seek(of.Pos, 0); err != nil {
				f.Close()
				return out, files, fmt.Errorf("seek %s: %v", of.Path, err)
			}
		}
		files = append(files, f)
		out = append(out, criurun.InheritFD{Key: strings.TrimPrefix(of.Path, "/"), File: f})
	}
	return out, files, nil
}

// unprivilegedSuffices: CRIU's --unprivileged mode works with CAP_CHECKPOINT_RESTORE instead of
// NET_ADMIN (measured: SYS_ADMIN + SYS_TIME + CHECKPOINT_RESTORE). Use it when we lack NET_ADMIN.
func unprivilegedSuffices() bool {
	eff := effectiveCaps()
	return eff&(1<<unix.CAP_NET_ADMIN) == 0 && eff&(1<<unix.CAP_CHECKPOINT_RESTORE) != 0
}

func effectiveCaps() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			var n uint64
			fmt.Sscanf(strings.TrimSpace(v), "%x", &n)
			return n
		}
	}
	return 0
}

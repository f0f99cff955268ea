package agent

// Lazy restore (issue 16): the app resumes before all its memory is back. CRIU restores every
// task with its anonymous private memory left to the agent's lazy-pages daemon (criurun/uffd.go),
// which fills each page the app faults on and, in the background, all the others. It reads them
// from the checkpoint through an ImageReaderAt (criurun/pageserver.go), which verifies every chunk
// before returning it: no page the agent did not verify is ever mapped. A chunk that does not
// verify leaves the app's faulting thread blocked and the agent kills the restored tree: it never
// runs on wrong (or zero) memory.

import (
	"context"
	"errors"
	"fmt"
	"io"
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
	"github.com/stasis-k8s/stasis/internal/confine"
)

// Lazy restore settings (--lazy-restore).
const (
	LazyRestoreAuto = "auto" // when `criu check --feature uffd-noncoop` passes at start
	LazyRestoreOff  = "off"
)

// errLazyUnavailable marks a lazy restore that failed before the app resumed for a reason other
// than the checkpoint's integrity: a full restore follows.
var errLazyUnavailable = errors.New("lazy restore not possible")

// lazyDecision checks once, at start, whether restores may be lazy; it returns why not (nil: yes).
func lazyDecision(ctx context.Context, cfg *Config) error {
	switch cfg.LazyRestore {
	case LazyRestoreOff:
		return errors.New("--lazy-restore=off")
	case "", LazyRestoreAuto:
	default:
		return fmt.Errorf("--lazy-restore=%q: want auto or off", cfg.LazyRestore)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return cfg.Criu.CheckLazyPages(cctx)
}

// openImages gives random, verified access to a checkpoint's images: the pack's reader, whose
// chunks are checked one by one as they are read. The test of an unverifiable chunk replaces it.
var openImages = func(dir *os.File, m *checkpoint.Manifest, ring *checkpoint.KeyRing) (checkpoint.ImageReaderAt, func(), error) {
	if m.Pack == nil {
		return nil, nil, fmt.Errorf("%w: checkpoint %s has no pack", errLazyUnavailable, m.ID)
	}
	// The pack's chunk store sits beside the checkpoints of the container. A pod could move the
	// checkpoint directory under another parent, but chunks are named and sealed under the
	// agent's keys: no store it builds serves a chunk that verifies.
	fd, err := unix.Openat(int(dir.Fd()), "..", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("the checkpoint's container directory: %w", err)
	}
	parent := os.NewFile(uintptr(fd), "..")
	defer parent.Close()
	pr, err := checkpoint.OpenPack(parent, m, ring)
	if err != nil {
		return nil, nil, err
	}
	return pr, func() { pr.Close() }, nil
}

// restoreLazily restores the container lazily and resumes it; the rest of its memory arrives in
// the background (finishLazy). An error wrapping errLazyUnavailable: nothing was resumed, the
// caller restores fully instead.
func (a *Agent) restoreLazily(ctx context.Context, log zerolog.Logger, t Target, plan *restorePlan, inherit []criurun.InheritFD, req agentapi.RestoreRequest) (int, error) {
	options := req.Options
	start := time.Now()
	work, err := os.MkdirTemp(a.cfg.RestoreDir, "stasis-lazy-")
	if err != nil {
		return 0, fmt.Errorf("%w: %v", errLazyUnavailable, err)
	}
	l := &lazyRestore{a: a, log: log, work: work, start: start, m: plan.m, req: req, dead: make(chan struct{})}
	if fd, err := unix.Dup(int(plan.cdir.Fd())); err == nil {
		l.cdir = os.NewFile(uintptr(fd), plan.cdir.Name())
	}
	defer func() {
		if !l.handedOver {
			l.teardown()
		}
	}()
	ring, err := a.keyRing()
	if err != nil {
		return 0, fmt.Errorf("%w: %v", errLazyUnavailable, err)
	}
	src, closeSrc, err := openImages(plan.dir, plan.m, ring)
	if err != nil {
		return 0, fmt.Errorf("checkpoint %s: %w", plan.m.ID, err)
	}
	l.closeSrc = closeSrc
	if err := l.prepare(src); err != nil {
		return 0, err
	}
	pid, host, err := l.run(ctx, t, src, inherit, options)
	if err != nil {
		killChildren(t.PID)
		if errors.Is(err, errLazyUnavailable) {
			err = noChildrenLeft(t.PID, err) // the full restore reuses the tree's PIDs
		}
		return 0, err
	}
	// The guard before the resume: from then on the app must not outlive an agent that dies
	// before every page is in. Without it, no lazy restore.
	if l.guard, err = startGuard(t.PID, host, l.uffds); err != nil {
		killChildren(t.PID)
		return 0, noChildrenLeft(t.PID, fmt.Errorf("%w: %v", errLazyUnavailable, err))
	}
	l.daemon.OnFork(l.guard.hold) // a child forked during the transfer is guarded too
	if err := criurun.SignalTree(host, syscall.SIGCONT); err != nil {
		_ = criurun.SignalTree(host, syscall.SIGKILL)
		return 0, fmt.Errorf("resuming the restored tree: %w", err)
	}
	resumed := time.Since(start)
	a.cfg.Metrics.RestoreSeconds.WithLabelValues("resumed").Observe(resumed.Seconds())
	log.Info().Str("checkpoint", plan.m.ID).Float64("resumedSeconds", resumed.Seconds()).Msg("restored lazily: the app runs, its memory arrives in the background")
	l.handedOver = true
	lazyResumed(l)
	l.ended = a.lazyStarted(t.PID)
	go func() {
		l.finish(host)
		l.teardown()
		close(l.ended.done)
	}()
	return pid, nil
}

// noChildrenLeft waits until the killed half-restored tree is gone from under the launcher (it
// reaps it); err is returned as it is, or made final when the tree stays.
func noChildrenLeft(launcher int, err error) error {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if len(criurun.Children(launcher)) == 0 {
			return err
		}
	}
	return fmt.Errorf("the half-restored tree of a failed lazy restore is still there: %v", err)
}

// observeFullRestore records a full restore: resumed and complete are the same moment.
func (a *Agent) observeFullRestore(d time.Duration) {
	a.cfg.Metrics.RestoreSeconds.WithLabelValues("resumed").Observe(d.Seconds())
	a.cfg.Metrics.RestoreSeconds.WithLabelValues("complete").Observe(d.Seconds())
}

// lazyRestore is one lazy restore's resources: they live until all pages are in (or it fails).
type lazyRestore struct {
	a     *Agent
	req   agentapi.RestoreRequest
	ended *lazyRun // how it ended, for the container's launcher
	// cdir is the container's checkpoint directory (a descriptor of the agent's own), where a
	// checkpoint whose pages fail their check is quarantined.
	cdir       *os.File
	log        zerolog.Logger
	m          *checkpoint.Manifest
	work       string
	start      time.Time
	images, wd *os.File
	tasks      map[uint64]*criurun.Pagemap
	daemon     *criurun.LazyDaemon
	ps         *criurun.PageServer
	closeSrc   func()
	uffds      []*os.File // copies for the guard
	guard      *lazyGuard // kills the app if the agent dies before every page is in (guard.go)
	handedOver bool
	dead       chan struct{} // closed by a test playing the agent's death: it does nothing more
}

// startGuard is startLazyGuard; a test replaces it to show what happens without a guard.
var startGuard = startLazyGuard

// lazyResumed is a test's hook: called with a lazy restore whose app has just resumed.
var lazyResumed = func(*lazyRestore) {}

// vanished says whether a test played the agent's death (a dead agent does nothing more).
func (l *lazyRestore) vanished() bool {
	select {
	case <-l.dead:
		return true
	default:
		return false
	}
}

// prepare writes the private images directory: every image verified, the tasks' pages images
// sparse (their lazy runs stay with the lazy-pages daemon).
func (l *lazyRestore) prepare(src checkpoint.ImageReaderAt) error {
	dir := filepath.Join(l.work, checkpoint.ImagesDir)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("%w: %v", errLazyUnavailable, err)
	}
	var err error
	if l.wd, err = os.Open(l.work); err == nil {
		l.images, err = os.Open(dir)
	}
	if err != nil {
		return fmt.Errorf("%w: %v", errLazyUnavailable, err)
	}
	pages := map[string]bool{}
	for _, name := range imageNames(l.m) {
		if strings.HasPrefix(name, "pages-") {
			pages[name] = true
			continue
		}
		if name == filesImage {
			continue // copyFixedFiles
		}
		if err := copyImage(src, l.images, name); err != nil {
			return fmt.Errorf("corrupt checkpoint %s: %w", l.m.ID, err)
		}
	}
	tasks, written, err := criurun.PrepareLazyPages(src, l.images)
	if errors.Is(err, criurun.ErrPagesUnverified) {
		return fmt.Errorf("corrupt checkpoint %s: %w", l.m.ID, err)
	} else if err != nil {
		return fmt.Errorf("%w: checkpoint %s: %v", errLazyUnavailable, l.m.ID, err)
	}
	l.tasks = tasks
	for name := range pages {
		if !written[name] { // shared memory's: restored by CRIU itself
			if err := copyImage(src, l.images, name); err != nil {
				return fmt.Errorf("corrupt checkpoint %s: %w", l.m.ID, err)
			}
		}
	}
	fx, err := copyFixedFiles(src, l.images)
	if err != nil {
		return fmt.Errorf("corrupt checkpoint %s: %w", l.m.ID, err)
	}
	if fx != (criurun.Fixes{}) {
		l.log.Info().Int("timerfds-rearmed", fx.Timers).Int("udp-rebound", fx.UDP).Msg("images adapted to the new pod")
	}
	return nil
}

const filesImage = "files.img"

// copyFixedFiles copies files.img adapted to the pod it is restored into, as the streamed full
// restore serves it (criurun.FixingSource).
func copyFixedFiles(src checkpoint.ImageReaderAt, dir *os.File) (criurun.Fixes, error) {
	fs := &criurun.FixingSource{ImageSource: atSource{src}}
	r, err := fs.Open(filesImage)
	if errors.Is(err, os.ErrNotExist) {
		return criurun.Fixes{}, nil
	}
	if err != nil {
		return criurun.Fixes{}, err
	}
	defer r.Close()
	out, err := confine.CreateEntry(dir, filesImage, 0o600)
	if err != nil {
		return criurun.Fixes{}, fmt.Errorf("%s: %w", filesImage, err)
	}
	defer out.Close()
	if _, err := io.Copy(out, r); err != nil {
		return criurun.Fixes{}, fmt.Errorf("%s: %w", filesImage, err)
	}
	return fs.Fixes(), nil
}

// atSource reads a whole image through an ImageReaderAt.
type atSource struct{ checkpoint.ImageReaderAt }

func (s atSource) Open(name string) (io.ReadCloser, error) {
	in, size, err := s.OpenAt(name)
	if err != nil {
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{io.NewSectionReader(in, 0, size), in}, nil
}

func (atSource) Names() []string { return nil }

// imageNames lists the checkpoint's CRIU images: its pack's, or its image files'.
func imageNames(m *checkpoint.Manifest) []string {
	var out []string
	if m.Pack != nil {
		for _, img := range m.Pack.Images {
			out = append(out, img.Name)
		}
		return out
	}
	for _, f := range m.Files {
		if name, ok := strings.CutPrefix(f.Path, checkpoint.ImagesDir+"/"); ok && !strings.Contains(name, "/") {
			out = append(out, name)
		}
	}
	return out
}

// run starts the lazy-pages daemon and restores; it returns the restored root's PID in
// the container and on the host, still stopped.
func (l *lazyRestore) run(ctx context.Context, t Target, src checkpoint.ImageReaderAt, inherit []criurun.InheritFD, options []string) (int, int, error) {
	var err error
	l.ps = criurun.NewPageServer(l.tasks, src)
	if l.daemon, err = criurun.StartLazyDaemon(l.work, l.ps); err != nil {
		return 0, 0, fmt.Errorf("%w: %v", errLazyUnavailable, err)
	}
	st, _ := criurun.StartTime(t.PID)
	pid, err := criurun.Restore(ctx, criurun.RestoreOptions{
		Bundle: l.a.cfg.Criu, Join: criurun.Join{PID: t.PID, StartTime: st, Cgroups: true},
		ImagesDir: l.images, WorkDir: l.wd, LogFile: "restore.log", Inherit: inherit, Extra: options, LazyPages: true,
	})
	if err != nil {
		err = criurun.LogError("restore (lazy)", err, l.work+"/restore.log")
		if !l.pagesFailed() {
			err = fmt.Errorf("%w: %v", errLazyUnavailable, err)
		}
		return 0, 0, err
	}
	// What the restored tree is checked against is final: no second, full restore of the same
	// images.
	host, err := hostPID(t.PID, pid)
	if err == nil {
		err = noMoreThanItsContainer(host, t.PID)
	}
	if err != nil {
		return 0, 0, criurun.LogError("restore", err, l.work+"/restore.log")
	}
	select { // sent before the restore returns
	case <-l.daemon.Restored():
	case <-time.After(5 * time.Second):
		return 0, 0, fmt.Errorf("%w: the restore did not hand over all its tasks", errLazyUnavailable)
	}
	if l.uffds, err = l.daemon.Userfaultfds(); err != nil {
		return 0, 0, fmt.Errorf("%w: %v", errLazyUnavailable, err)
	}
	return pid, host, nil
}

// pagesFailed says whether the daemon stopped on pages it could not verify.
func (l *lazyRestore) pagesFailed() bool {
	select {
	case <-l.daemon.Done():
		return errors.Is(l.daemon.Err(), criurun.ErrPagesUnverified)
	default:
		return false
	}
}

// finish waits until every page is in, then tells the guard and stops the daemon. A page that
// does not verify, a userfaultfd that fails or a transfer that outlasts the restore timeout kills
// the restored tree: a task faulting on a page never delivered stays blocked, and memory never
// filled would read as zeros once the userfaultfds are gone. An app that exits meanwhile (its pod
// deleted) ends the transfer too.
func (l *lazyRestore) finish(host int) {
	exited := watchExit(host)
	timeout := time.NewTimer(l.a.cfg.RestoreTimeout)
	defer timeout.Stop()
	var err error
	select {
	case <-l.daemon.Complete():
	case <-l.daemon.Done():
		err = fmt.Errorf("the lazy-pages daemon stopped before every page was in: %w", l.daemon.Err())
	case <-exited:
		l.log.Info().Str("checkpoint", l.m.ID).Msg("the lazily restored app exited before all its memory was in")
		return
	case <-timeout.C:
		err = fmt.Errorf("not all memory was in after %s (--restore-timeout)", l.a.cfg.RestoreTimeout)
	case <-l.guard.done:
		// Killed by someone: the app would not survive the agent's death. Not a risk to take.
		err = fmt.Errorf("the lazy restore's guard exited (%s)", l.guard.cmd.ProcessState)
	}
	if l.vanished() {
		return
	}
	if err != nil {
		beforeLazyKill()
		l.ended.outcome = agentapi.RestoreOutcome{Killed: true, CheckpointID: l.m.ID, Message: err.Error()} // read after done
		_ = criurun.SignalTree(host, syscall.SIGKILL)
		l.a.cfg.Metrics.RestoreResults.WithLabelValues("killed-lazy").Inc()
		if (errors.Is(err, criurun.ErrPagesUnverified) || l.pagesFailed()) && l.cdir != nil {
			if qerr := checkpoint.Quarantine(l.cdir, l.m.ID); qerr != nil {
				l.log.Warn().Err(qerr).Msg("could not take the corrupt checkpoint out of the candidates for restore")
			} else {
				l.log.Warn().Str("checkpoint", l.m.ID).Msg("corrupt checkpoint quarantined: the next start of this identity does not restore it")
			}
		}
		l.log.Error().Err(err).Str("checkpoint", l.m.ID).
			Msg("lazy restore failed after the app resumed: the app was killed (it must not run on memory that is not its own); its launcher starts it afresh")
		if l.a.cfg.Events != nil && l.req.Pod.Name != "" {
			l.a.cfg.Events.PodEvent(context.Background(), l.req.Pod, true, "RestoreFailed", fmt.Sprintf(
				"container %s: checkpoint %s: the lazy restore failed after the app resumed (%v): the app was killed before it could run on memory that is not its own and starts afresh; the checkpoint is set aside", l.req.Container, l.m.ID, err))
		}
		return
	}
	// The guard closes its copies of the userfaultfds and exits; the daemon answers faults until
	// then (a copy nobody reads would leave a fault unanswered).
	l.guard.complete()
	select {
	case <-l.guard.done:
	case <-time.After(10 * time.Second):
		l.log.Warn().Msg("the lazy restore's guard did not exit after the last page")
	}
	done := time.Since(l.start)
	l.a.cfg.Metrics.RestoreSeconds.WithLabelValues("complete").Observe(done.Seconds())
	bytes, faults, zeros, reading := l.daemon.Stats()
	l.log.Info().Str("checkpoint", l.m.ID).Float64("completeSeconds", done.Seconds()).Int64("lazyBytes", bytes).
		Int64("faults", faults).Int64("zeroPages", zeros).Float64("readSeconds", reading.Seconds()).
		Msg("lazy restore complete: all memory present")
}

// launcherKey is a process, its PID and start time: a reused PID is another key.
type launcherKey struct {
	pid   int
	start uint64
}

// lazyRun is a lazy restore as its container's launcher may ask about it: done is closed after
// its teardown (the guard has killed what was left of the tree), outcome is final by then.
type lazyRun struct {
	done    chan struct{}
	outcome agentapi.RestoreOutcome
}

// lazyStarted registers a lazy restore under launcher, dropping those of launchers gone since.
func (a *Agent) lazyStarted(launcher int) *lazyRun {
	st, _ := criurun.StartTime(launcher)
	run := &lazyRun{done: make(chan struct{})}
	a.mu.Lock()
	defer a.mu.Unlock()
	for k := range a.lazyRuns {
		if s, err := criurun.StartTime(k.pid); err != nil || s != k.start {
			delete(a.lazyRuns, k)
		}
	}
	if a.lazyRuns == nil {
		a.lazyRuns = map[launcherKey]*lazyRun{}
	}
	a.lazyRuns[launcherKey{launcher, st}] = run
	return run
}

// TakeRestoreOutcome returns (once) what became of the tree restored under the caller: killed by
// the agent, or not. A lazy restore still tearing down (its guard killing what is left of the
// tree) is waited for, within ctx: the caller may start the app afresh once it has the answer.
func (a *Agent) TakeRestoreOutcome(ctx context.Context, callerPID int) (agentapi.RestoreOutcome, error) {
	st, err := criurun.StartTime(callerPID)
	if err != nil {
		return agentapi.RestoreOutcome{}, nil
	}
	k := launcherKey{callerPID, st}
	a.mu.Lock()
	run := a.lazyRuns[k]
	a.mu.Unlock()
	if run == nil {
		return agentapi.RestoreOutcome{}, nil
	}
	select {
	case <-run.done:
	case <-ctx.Done():
		return agentapi.RestoreOutcome{}, fmt.Errorf("the lazy restore is still ending: %w", ctx.Err())
	}
	a.mu.Lock()
	delete(a.lazyRuns, k)
	a.mu.Unlock()
	return run.outcome, nil
}

// beforeLazyKill is a test's hook: it widens the moment between a failure (the daemon's death) and
// the kill, to show that the app does not run on meanwhile.
var beforeLazyKill = func() {}

// teardown stops the daemon, closes the pages and removes the private images.
func (l *lazyRestore) teardown() {
	if l.cdir != nil {
		l.cdir.Close()
	}
	if l.guard != nil {
		l.guard.release() // after complete: nothing; else the guard kills what is left of the tree
		if l.guard.cmd != nil && !l.vanished() {
			// Before the launcher may start the app afresh (TakeRestoreOutcome waits for this):
			// the guard kills every process below the launcher.
			select {
			case <-l.guard.done:
			case <-time.After(15 * time.Second):
			}
		}
	}
	for _, f := range l.uffds {
		f.Close()
	}
	if l.daemon != nil {
		l.daemon.Stop()
	}
	if l.ps != nil {
		l.ps.Close()
	}
	if l.closeSrc != nil {
		l.closeSrc()
	}
	for _, f := range []*os.File{l.images, l.wd} {
		if f != nil {
			f.Close()
		}
	}
	os.RemoveAll(l.work)
}

// watchExit returns a channel closed when process pid has exited.
func watchExit(pid int) <-chan struct{} {
	ch := make(chan struct{})
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		close(ch) // already gone
		return ch
	}
	go func() {
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err != unix.EINTR {
				break
			}
		}
		close(ch)
	}()
	return ch
}

// copyImage copies image name from src (verified) into dir.
func copyImage(src checkpoint.ImageReaderAt, dir *os.File, name string) error {
	in, size, err := src.OpenAt(name)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := confine.CreateEntry(dir, name, 0o600)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer out.Close()
	if _, err := io.CopyBuffer(out, io.NewSectionReader(in, 0, size), make([]byte, 1<<20)); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

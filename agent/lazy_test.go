package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
)

// dumpHeap starts the counter with a touched heap of mib MiB under the launcher, checkpoints it
// with the agent and stops its container; it returns the checkpoint and the counter's file.
func dumpHeap(t *testing.T, r *rig, mib int) (id, out string, cmd []string) {
	t.Helper()
	out = filepath.Join(t.TempDir(), "counter.txt")
	cmd = []string{counterBin, "-touch-mib", fmt.Sprint(mib), "-tick", "100ms", out}
	c := startContainer(t, r.env("app"), append([]string{"--"}, cmd...)...)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 2)
	st := r.checkpoint("uid-lazy", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	assert.Equal(t, 143, c.stop())
	return st.Containers[0].CheckpointID, out, cmd
}

// waitFor waits until cond holds, failing with what after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func histCount(t *testing.T, h *prometheus.HistogramVec, phase string) uint64 {
	t.Helper()
	var m dto.Metric
	require.NoError(t, h.WithLabelValues(phase).(prometheus.Histogram).Write(&m))
	return m.GetHistogram().GetSampleCount()
}

// A 512 MiB heap restored lazily: the app resumes, checks every byte of its heap while pages are
// still arriving (its faults are served first) and again once the agent reports all memory
// present; both checks pass and the counter continues. The daemon and the private images are gone
// afterwards.
func TestLazyRestoreHeapIntact(t *testing.T) {
	restoreDir := t.TempDir()
	r := newRig(t, Config{FreezeTimeout: time.Hour, RestoreDir: restoreDir})
	require.NoError(t, r.agent.noLazy, "this kernel offers uffd-noncoop: restores must be lazy")
	r.serveLocal()
	id, out, cmd := dumpHeap(t, r, 512)
	dumped := readCounts(t, out)

	c := r.restoreContainer("app", id, cmd...)
	c.waitOutput("restored; supervising the restored tree")
	root, err := appRoot(c.launcherPID())
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(root, syscall.SIGUSR1)) // at once: most pages are not in yet
	c.waitOutput("ballast ")
	assert.Contains(t, c.out.String(), "ballast ok 512 MiB")
	assert.NotContains(t, c.out.String(), "ballast BAD")

	waitFor(t, time.Minute, "all memory present", func() bool { return strings.Contains(r.logs.String(), "lazy restore complete") })
	assert.Contains(t, r.logs.String(), "restored lazily")
	assert.Equal(t, uint64(1), histCount(t, r.agent.cfg.Metrics.RestoreSeconds, "resumed"))
	assert.Equal(t, uint64(1), histCount(t, r.agent.cfg.Metrics.RestoreSeconds, "complete"))
	require.NoError(t, syscall.Kill(root, syscall.SIGUSR1))
	waitFor(t, 30*time.Second, "the second check", func() bool { return strings.Count(c.out.String(), "ballast ") >= 2 })
	assert.Equal(t, 2, strings.Count(c.out.String(), "ballast ok 512 MiB"), c.out.String())

	got := waitCount(t, c, out, len(dumped)+3)
	assert.True(t, isSequence(got), "the lazily restored counter continues: %v", got)
	waitFor(t, 10*time.Second, "the lazy restore's teardown", func() bool {
		left, _ := filepath.Glob(filepath.Join(restoreDir, "stasis-lazy-*"))
		return len(left) == 0
	})
	assert.Empty(t, userfaultfds(t), "the agent holds no userfaultfd after the restore")
	waitFor(t, 10*time.Second, "the guard's exit: none outlives a complete lazy restore", func() bool { return len(lazyGuards(t)) == 0 })
	assert.Equal(t, 128+15, c.stop())
}

// userfaultfds lists the userfaultfds open in this process (the agent's).
func userfaultfds(t *testing.T) []string {
	var out []string
	fds, _ := filepath.Glob("/proc/self/fd/*")
	for _, fd := range fds {
		if target, err := os.Readlink(fd); err == nil && target == "anon_inode:[userfaultfd]" {
			out = append(out, fd)
		}
	}
	return out
}

// failingChunk is the store's pack as the page server sees it when a chunk of the pages does not
// verify: every read overlapping the chunk fails (the pack returns an error, never data).
type failingChunk struct {
	checkpoint.ImageReaderAt
	from, to int64
}

func (f failingChunk) OpenAt(name string) (checkpoint.ReaderAtCloser, int64, error) {
	ra, size, err := f.ImageReaderAt.OpenAt(name)
	if err != nil || !strings.HasPrefix(name, "pages-") {
		return ra, size, err
	}
	return failingReader{ra, f}, size, nil
}

type failingReader struct {
	checkpoint.ReaderAtCloser
	f failingChunk
}

func (r failingReader) ReadAt(b []byte, off int64) (int, error) {
	if off < r.f.to && off+int64(len(b)) > r.f.from {
		return 0, errors.New("chunk sha256 mismatch (corrupt)")
	}
	return r.ReaderAtCloser.ReadAt(b, off)
}

// A chunk of the heap that does not verify while the app already runs: the daemon never copies
// it, the agent kills the app before any check of its heap can finish, says so and sets the
// checkpoint aside; the launcher, told why its app died, starts it afresh in the same container
// (exiting 137 would fail a Job's pod).
func TestLazyRestoreUnverifiedChunkKillsApp(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	require.NoError(t, r.agent.noLazy)
	r.serveLocal()
	id, out, cmd := dumpHeap(t, r, 256)
	orig := openImages
	openImages = func(d *os.File, m *checkpoint.Manifest, k *checkpoint.KeyRing) (checkpoint.ImageReaderAt, func(), error) {
		src, done, err := orig(d, m, k)
		// The chunk: 1 MiB in the middle of the largest pages image (the heap).
		var size int64
		for _, img := range m.Pack.Images {
			if strings.HasPrefix(img.Name, "pages-") && img.Size > size {
				size = img.Size
			}
		}
		return failingChunk{src, size / 2, size/2 + 1<<20}, done, err
	}
	t.Cleanup(func() { openImages = orig })

	c := r.restoreContainer("app", id, cmd...)
	waitFor(t, time.Minute, "the launcher's cold start after the kill", func() bool {
		return strings.Contains(c.out.String(), "COLD START: the agent killed the restored app")
	})
	assert.Contains(t, r.logs.String(), "the app was killed")
	counts := readCounts(t, out)
	waitFor(t, 30*time.Second, "the fresh app's first counts", func() bool { return len(readCounts(t, out)) >= len(counts)+2 })
	fresh := readCounts(t, out)[len(counts)]
	assert.Less(t, fresh, counts[len(counts)-1], "the app starts afresh, from its own beginning")
	select {
	case <-c.done:
		t.Fatalf("the container exited: %s", c.out.String())
	default:
	}
	assert.Contains(t, r.logs.String(), "lazy pages could not be served")
	assert.NotContains(t, c.out.String(), "ballast ok")
	assert.NotContains(t, c.out.String(), "ballast BAD", "the app never reads memory that is not its own")
	assert.Equal(t, 1.0, counterValue(t, r.agent.cfg.Metrics.RestoreResults.WithLabelValues("killed-lazy")))
	// Quarantined: the next start of the identity does not restore it again (and get killed again).
	waitFor(t, 10*time.Second, "the checkpoint quarantined", func() bool {
		_, err := os.Stat(filepath.Join(r.dir("app"), ".failed-"+id))
		return err == nil
	})
	left, err := checkpoint.List(r.dir("app"))
	require.NoError(t, err)
	for _, e := range left {
		assert.NotEqual(t, id, e.ID, "no longer a candidate for restore")
	}
	assert.Equal(t, uint64(0), histCount(t, r.agent.cfg.Metrics.RestoreSeconds, "complete"))
	waitFor(t, 10*time.Second, "the daemon's userfaultfds closed", func() bool { return len(userfaultfds(t)) == 0 })
	assert.Equal(t, 143, c.stop())
}

// A page the restore itself reads (the first chunk of each pages image: stacks and other non-lazy
// runs) flipped in the chunk store is found before CRIU starts: no resume, a cold start, no
// fallback to a full restore of the same corrupt images. (A flipped lazy page is found when it is
// served: TestLazyRestoreUnverifiedChunkKillsApp.)
func TestLazyRestoreCorruptPagesColdStarts(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	id, _, cmd := dumpHeap(t, r, 64)
	m, err := checkpoint.ReadManifest(filepath.Join(r.dir("app"), id))
	require.NoError(t, err)
	require.NotNil(t, m.Pack, "a streamed dump writes a pack")
	flipped := 0
	for _, img := range m.Pack.Images {
		if !strings.HasPrefix(img.Name, "pages-") || len(img.Chunks) == 0 || img.Chunks[0].Name == "" {
			continue
		}
		ref := img.Chunks[0]
		f, err := os.OpenFile(filepath.Join(r.dir("app"), ".chunks", ref.Pack+".pack"), os.O_RDWR, 0)
		require.NoError(t, err)
		b := make([]byte, 1)
		_, err = f.ReadAt(b, ref.Off+ref.Stored/2)
		require.NoError(t, err)
		b[0] ^= 0xff
		_, err = f.WriteAt(b, ref.Off+ref.Stored/2)
		require.NoError(t, err)
		f.Close()
		flipped++
	}
	require.NotZero(t, flipped)
	c := r.restoreContainer("app", id, cmd...)
	c.waitOutput("COLD START")
	assert.Contains(t, r.logs.String(), "corrupt")
	assert.NotContains(t, r.logs.String(), "restoring fully", "a corrupt checkpoint is not retried as a full restore")
	c.stop()
}

// The decision path: --lazy-restore=off, an unknown value, and a CRIU whose feature check fails
// (a kernel or pod without userfaultfd) all give full restores, and say why.
func TestLazyRestoreDecision(t *testing.T) {
	r := newRig(t, Config{LazyRestore: LazyRestoreOff})
	assert.ErrorContains(t, r.agent.noLazy, "--lazy-restore=off")
	r2 := newRig(t, Config{LazyRestore: "sometimes"})
	assert.ErrorContains(t, r2.agent.noLazy, "want auto or off")

	cfg := Config{Criu: r.agent.cfg.Criu}
	cfg.Criu.Dir = t.TempDir() // no CRIU there: the check fails as on a kernel without uffd
	assert.Error(t, lazyDecision(t.Context(), &cfg))
}

// With lazy restore off, a restore is full and still correct (the fallback path end to end).
func TestFullRestoreWhenLazyOff(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour, LazyRestore: LazyRestoreOff})
	r.serveLocal()
	id, out, cmd := dumpHeap(t, r, 64)
	dumped := readCounts(t, out)
	c := r.restoreContainer("app", id, cmd...)
	c.waitOutput("restored; supervising the restored tree")
	got := waitCount(t, c, out, len(dumped)+2)
	assert.True(t, isSequence(got), "%v", got)
	assert.NotContains(t, r.logs.String(), "restored lazily")
	assert.Equal(t, uint64(1), histCount(t, r.agent.cfg.Metrics.RestoreSeconds, "resumed"))
	assert.Equal(t, uint64(1), histCount(t, r.agent.cfg.Metrics.RestoreSeconds, "complete"), "a full restore is complete when it resumes")
	assert.Equal(t, 128+15, c.stop())
}

// With encryption off, the checkpoint's chunks are stored in the clear (no data key in the
// manifest) and still restore, lazily, verified.
func TestPlainCheckpointRestores(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour, PlainCheckpoints: true})
	r.serveLocal()
	id, out, cmd := dumpHeap(t, r, 16)
	m, err := checkpoint.ReadManifest(filepath.Join(r.dir("app"), id))
	require.NoError(t, err)
	require.NotNil(t, m.Pack)
	assert.Empty(t, m.Pack.Keys, "no data key: the chunks are not encrypted")
	dumped := readCounts(t, out)
	c := r.restoreContainer("app", id, cmd...)
	c.waitOutput("restored; supervising the restored tree")
	got := waitCount(t, c, out, len(dumped)+2)
	assert.True(t, isSequence(got), "%v", got)
	assert.Equal(t, 128+15, c.stop())
}

// repack rewrites checkpoint id of the rig's container as a pack (the store's format: chunks
// compressed, encrypted and checked one by one), under a new ID, as a streamed dump will write it.
func repack(t testing.TB, r *rig, id string) string {
	t.Helper()
	src := filepath.Join(r.dir("app"), id)
	m, err := checkpoint.ReadManifest(src)
	require.NoError(t, err)
	w, err := checkpoint.Begin(r.dir("app"), checkpoint.NewID(time.Now()))
	require.NoError(t, err)
	w.Key = testKey
	ring, err := checkpoint.NewKeyRing(testKey, nil)
	require.NoError(t, err)
	sink, err := w.Pack(ring, m.Pod.Namespace, checkpoint.PackOptions{})
	require.NoError(t, err)
	for _, f := range m.Files {
		name, ok := strings.CutPrefix(f.Path, checkpoint.ImagesDir+"/")
		if !ok { // carried and checkpoint-files: as they were
			data, err := os.ReadFile(filepath.Join(src, f.Path))
			require.NoError(t, err)
			require.NoError(t, os.MkdirAll(filepath.Join(w.Path(), filepath.Dir(f.Path)), 0o700))
			require.NoError(t, w.WriteFile(f.Path, data))
			st, err := os.Stat(filepath.Join(src, f.Path))
			require.NoError(t, err)
			require.NoError(t, os.Chmod(filepath.Join(w.Path(), f.Path), st.Mode()))
			continue
		}
		in, err := os.Open(filepath.Join(src, f.Path))
		require.NoError(t, err)
		wc, err := sink.Create(name)
		require.NoError(t, err)
		_, err = io.Copy(wc, in)
		require.NoError(t, err)
		require.NoError(t, wc.Close())
		in.Close()
	}
	m.Files, m.Pack = nil, nil
	require.NoError(t, w.Commit(m))
	require.NoError(t, w.Close())
	return filepath.Base(w.Final())
}

// The same heap from a pack: each page the daemon asks for is read from a chunk decrypted and
// checked on demand; the app's own check of every byte passes.
func TestLazyRestoreFromPack(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	require.NoError(t, r.agent.noLazy)
	r.serveLocal()
	id, out, cmd := dumpHeap(t, r, 256)
	packed := id // a streamed dump writes a pack; an older one of image files is repacked
	if m, err := checkpoint.ReadManifest(filepath.Join(r.dir("app"), id)); err == nil && m.Pack == nil {
		packed = repack(t, r, id)
	}
	dumped := readCounts(t, out)
	c := r.restoreContainer("app", packed, cmd...)
	c.waitOutput("restored; supervising the restored tree")
	waitFor(t, time.Minute, "all memory present", func() bool { return strings.Contains(r.logs.String(), "lazy restore complete") })
	root, err := appRoot(c.launcherPID())
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(root, syscall.SIGUSR1))
	c.waitOutput("ballast ")
	assert.Contains(t, c.out.String(), "ballast ok 256 MiB")
	got := waitCount(t, c, out, len(dumped)+2)
	assert.True(t, isSequence(got), "%v", got)
	assert.Equal(t, 128+15, c.stop())
}

// stallingChunk holds every read overlapping its chunk until release is closed: pages the daemon
// waits for while the test kills it.
type stallingChunk struct {
	checkpoint.ImageReaderAt
	from, to int64
	release  chan struct{}
}

func (s stallingChunk) OpenAt(name string) (checkpoint.ReaderAtCloser, int64, error) {
	ra, size, err := s.ImageReaderAt.OpenAt(name)
	if err != nil || !strings.HasPrefix(name, "pages-") {
		return ra, size, err
	}
	return stallingReader{ra, s}, size, nil
}

type stallingReader struct {
	checkpoint.ReaderAtCloser
	s stallingChunk
}

func (r stallingReader) ReadAt(b []byte, off int64) (int, error) {
	if off < r.s.to && off+int64(len(b)) > r.s.from {
		<-r.s.release
	}
	return r.ReaderAtCloser.ReadAt(b, off)
}

// lazyGuards lists the running lazy restore guards started by this test process.
func lazyGuards(t *testing.T) []int {
	var out []int
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range cmdlines {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), "\x00"+GuardSubcommand+"\x00") {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(p, "/proc/%d/cmdline", &pid); err != nil {
			continue
		}
		if _, ppid, err := procState(pid); err == nil && ppid == os.Getpid() {
			out = append(out, pid)
		}
	}
	return out
}

// noGuard plays a lazy restore without a guard (STASIS_TEST_NO_GUARD=1): the agent-death test
// must then fail, which shows that it is the guard that saves the app.
func noGuard(int, int, []*os.File) (*lazyGuard, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	r.Close()
	return &lazyGuard{control: w, done: make(chan struct{})}, nil
}

// vanish plays the agent's death during the transfer: its daemon (and the userfaultfds it holds)
// and its page source stop, and it does nothing more; hold later, the guard's control pipe
// closes as the agent's last descriptor goes (hold widens the moment in which the app, were its
// missing ranges no longer registered, would read zeros).
func (l *lazyRestore) vanish(hold time.Duration) {
	close(l.dead)
	for _, f := range l.uffds {
		f.Close()
	}
	l.daemon.Stop()
	l.ps.Close()
	time.Sleep(hold)
	l.guard.control.Close()
}

// The agent dies (kill -9, OOM, a DaemonSet rollout) while the app reads its heap and pages are
// missing: the guard, which lives in the app container's cgroups and still holds the
// userfaultfds, kills the app; the app never reads a zero page in place of its own. Run with
// STASIS_TEST_NO_GUARD=1 it fails: the app runs on over zero pages.
func TestLazyRestoreAgentDeathKillsApp(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	require.NoError(t, r.agent.noLazy)
	r.serveLocal()
	id, _, cmd := dumpHeap(t, r, 128)
	release := make(chan struct{})
	defer close(release)
	orig := openImages
	openImages = func(d *os.File, m *checkpoint.Manifest, k *checkpoint.KeyRing) (checkpoint.ImageReaderAt, func(), error) {
		src, done, err := orig(d, m, k)
		return stallingChunk{src, 32 << 20, 96 << 20, release}, done, err
	}
	resumed := make(chan *lazyRestore, 1)
	lazyResumed = func(l *lazyRestore) { resumed <- l }
	if os.Getenv("STASIS_TEST_NO_GUARD") == "1" {
		startGuard = noGuard
	}
	t.Cleanup(func() { openImages, lazyResumed, startGuard = orig, func(*lazyRestore) {}, startLazyGuard })

	c := r.restoreContainer("app", id, cmd...)
	c.waitOutput("restored; supervising the restored tree")
	l := <-resumed
	if l.guard.cmd != nil {
		// In the app container's cgroups (its own pids cgroup here), not the agent's.
		assert.Equal(t, cgroups(t, c.launcherPID()), cgroups(t, l.guard.cmd.Process.Pid))
		assert.NotEqual(t, cgroups(t, os.Getpid()), cgroups(t, l.guard.cmd.Process.Pid))
	}
	root, err := appRoot(c.launcherPID())
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(root, syscall.SIGUSR1)) // reads the whole heap: blocks on the stalled pages
	time.Sleep(200 * time.Millisecond)
	l.vanish(time.Second)
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the app was not killed: %s", c.out.String())
	}
	assert.NotContains(t, c.out.String(), "ballast BAD", "the app never read a zero page in place of its own")
	assert.NotContains(t, c.out.String(), "ballast ok")
	assert.NotContains(t, r.logs.String(), "the app was killed", "the dead agent did not kill it: the guard did")
	// Without the guard the app crashes on its own (a Go runtime reading zeros where its heap
	// was: "unexpected signal during runtime execution", exit 2): it ran on wrong memory.
	assert.Equal(t, 128+int(syscall.SIGKILL), c.status.ExitStatus(), "the app was SIGKILLed before it could run on wrong memory")
	assert.False(t, strings.Contains(c.out.String(), "unexpected signal"), "the app crashed on zero pages")
	waitFor(t, 10*time.Second, "the guard's exit", func() bool { return len(lazyGuards(t)) == 0 })
}

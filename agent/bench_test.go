package agent

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
)

// BenchmarkDataPath measures the checkpoint data path on two heaps: 1 GiB of random bytes
// (incompressible) and a realistic heap (a Python process holding JSON documents, parsed and as
// text). For each, in the same run, with the whole page cache dropped before every timed step:
//   - the agent's complete first dump (the container's checkpoints removed before it: nothing to
//     dedupe against; CRIU streaming into the agent, named, compressed, encrypted, fsynced,
//     committed) against the raw `criu dump` CLI in the same namespaces plus an fsync of its
//     images;
//   - the same first dump with encryption off: what encryption costs;
//   - bytes on disk of that checkpoint against the app's resident memory;
//   - a repeat dump of the unchanged heap right after it: its time, and the bytes it added to the
//     volume against the first's;
//   - the restore, from the new container's start to the app resumed (CRIU returned, the tree
//     continued), against the raw `criu restore` CLI of the raw images.
//
// Each figure is a mean of the -benchtime count (make bench: 3).
func BenchmarkDataPath(b *testing.B) {
	py, err := exec.LookPath("python3")
	require.NoError(b, err)
	if real, err := exec.Command(py, "-c", "import sys; print(sys.executable)").Output(); err == nil {
		py = strings.TrimSpace(string(real))
	}
	heapPy, err := filepath.Abs("testdata/heap/heap.py")
	require.NoError(b, err)
	b.Run("random-1GiB", func(b *testing.B) {
		benchHeap(b, func(out string) []string {
			return []string{counterBin, "-touch-mib", "1024", "-random", "-tick", "1h", out}
		})
	})
	b.Run("python-json-768MiB", func(b *testing.B) {
		benchHeap(b, func(out string) []string { return []string{py, heapPy, "768", out} })
	})
}

// benchRuns is how many times each step runs: b.N, except in the first call Go makes with b.N=1
// before the requested -benchtime=Nx (it would double the time for nothing).
func benchRuns(b *testing.B) int {
	if b.N == 1 {
		if f := flag.Lookup("test.benchtime"); f != nil && f.Value.String() != "1x" && strings.HasSuffix(f.Value.String(), "x") {
			return 0
		}
	}
	return b.N
}

// benchFigures are one heap's sums (divided by the number of runs when printed).
type benchFigures struct {
	// firstDump: a dump with nothing to dedupe against (the container's checkpoints removed
	// first); repeatDump: the next dump of the unchanged heap; rawDump, rawSync: the raw CLI's
	// dump and that plus fsync.
	firstDump, repeatDump, rawDump, rawSync, agentRestore, rawRestore time.Duration
	plainFirstDump                                                    time.Duration // a first dump with encryption off
	disk, imageBytes, rss                                             int64
	firstAdded, repeatAdded                                           int64 // bytes added to the volume
}

func benchHeap(b *testing.B, app func(out string) []string) {
	runs := benchRuns(b)
	if runs == 0 {
		return
	}
	r := newRig(b, Config{FreezeTimeout: time.Hour, KeepOlder: 100, DumpTimeout: 10 * time.Minute})
	r.serveLocal()
	dir := r.dir("app")
	base := b.TempDir()
	out := filepath.Join(base, "counter.txt")
	cmd := app(out)
	c := startContainer(b, r.env("app"), append([]string{"--"}, cmd...)...)
	r.finder["app"] = c.launcherPID()
	waitCountFor(b, c, out, 1, 5*time.Minute)
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("\n== %s: load average at start %s", b.Name(), load)

	var f benchFigures
	var raw string
	b.ResetTimer()
	for i := 0; i < runs; i++ {
		// A first dump: every chunk written. Then a repeat of the unchanged heap.
		require.NoError(b, os.RemoveAll(dir))
		id, first, added := benchAgentDump(b, r, fmt.Sprintf("bench-%d-first", i))
		m, err := checkpoint.ReadManifest(filepath.Join(dir, id))
		require.NoError(b, err)
		// On disk: the checkpoint's files and every chunk its pack references (in the container's
		// chunk store, shared with the other checkpoints).
		disk := m.Size
		if m.Pack != nil {
			disk += m.Pack.Stored
		}
		f.firstDump, f.firstAdded, f.disk, f.imageBytes = f.firstDump+first, f.firstAdded+added, f.disk+disk, f.imageBytes+m.ImagesSize
		_, repeat, repeated := benchAgentDump(b, r, fmt.Sprintf("bench-%d-repeat", i))
		f.repeatDump, f.repeatAdded = f.repeatDump+repeat, f.repeatAdded+repeated
		// The same first dump with encryption off (--encrypt-checkpoints=false): its cost.
		require.NoError(b, os.RemoveAll(dir))
		r.agent.cfg.PlainCheckpoints = true
		_, plain, _ := benchAgentDump(b, r, fmt.Sprintf("bench-%d-plain", i))
		r.agent.cfg.PlainCheckpoints = false
		f.plainFirstDump += plain
		if raw != "" {
			require.NoError(b, os.RemoveAll(raw))
		}
		raw = filepath.Join(base, fmt.Sprintf("raw-%d", i))
		rD, rS, rss := benchRawDump(b, r, raw)
		f.rawDump, f.rawSync, f.rss = f.rawDump+rD, f.rawSync+rS, rss
		fmt.Printf("  run #%d: agent first dump %.2f s (%d MiB on disk; not encrypted %.2f s), repeat %.2f s (%d MiB added to the volume); raw %.2f s, +fsync %.2f s\n",
			i, first.Seconds(), disk>>20, plain.Seconds(), repeat.Seconds(), repeated>>20, rD.Seconds(), rS.Seconds())
	}
	// Restores: leave the app frozen by a last dump (as an eviction does), stop it, then restore
	// the agent's checkpoint and the raw images alternately.
	lastID, _, _ := benchAgentDump(b, r, "final", true)
	c.stop()
	for i := 0; i < runs; i++ {
		var aR, rR time.Duration
		if i%2 == 0 {
			aR, rR = benchAgentRestore(b, r, lastID, cmd), benchRawRestore(b, r, raw)
		} else {
			rR, aR = benchRawRestore(b, r, raw), benchAgentRestore(b, r, lastID, cmd)
		}
		f.agentRestore, f.rawRestore = f.agentRestore+aR, f.rawRestore+rR
		fmt.Printf("  restore #%d: agent %.2f s; raw %.2f s\n", i, aR.Seconds(), rR.Seconds())
	}
	b.StopTimer()
	f.print(b, runs)
}

func (f benchFigures) print(b *testing.B, runs int) {
	n := float64(runs)
	mean := func(d time.Duration) float64 { return d.Seconds() / n }
	touched := float64(f.rss)
	fmt.Printf("%s (mean of %d, page cache dropped before each step):\n", b.Name(), runs)
	fmt.Printf("  touched memory (RSS): %.0f MiB\n", touched/(1<<20))
	fmt.Printf("  first dump (nothing to dedupe against): agent %.2f s; raw criu %.2f s; raw criu + fsync %.2f s; agent against raw+fsync: %.2f x throughput\n",
		mean(f.firstDump), mean(f.rawDump), mean(f.rawSync), mean(f.rawSync)/mean(f.firstDump))
	fmt.Printf("  encryption: first dump %.2f s encrypted, %.2f s not: costs %+.0f %%\n",
		mean(f.firstDump), mean(f.plainFirstDump), 100*(mean(f.firstDump)/mean(f.plainFirstDump)-1))
	fmt.Printf("  repeat dump of the unchanged heap (unchanged chunks not written again): agent %.2f s; %.2f x raw+fsync throughput\n",
		mean(f.repeatDump), mean(f.rawSync)/mean(f.repeatDump))
	fmt.Printf("  bytes on disk: %.0f MiB (images %.0f MiB) = %.2f x touched memory\n",
		float64(f.disk)/n/(1<<20), float64(f.imageBytes)/n/(1<<20), float64(f.disk)/n/touched)
	fmt.Printf("  repeat dump: %.1f MiB added to the volume, %.3f x the first (%.0f MiB)\n",
		float64(f.repeatAdded)/n/(1<<20), float64(f.repeatAdded)/float64(max(f.firstAdded, 1)), float64(f.firstAdded)/n/(1<<20))
	fmt.Printf("  restore to app resumed: agent %.2f s; raw criu restore %.2f s; agent/raw %.2f\n",
		mean(f.agentRestore), mean(f.rawRestore), mean(f.agentRestore)/mean(f.rawRestore))
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("  load average at the end: %s", load)
	b.ReportMetric(mean(f.firstDump), "first-dump-s")
	b.ReportMetric(mean(f.repeatDump), "repeat-dump-s")
	b.ReportMetric(mean(f.rawSync), "raw+fsync-dump-s")
	b.ReportMetric(float64(f.disk)/n/touched, "disk/touched")
	b.ReportMetric(mean(f.agentRestore), "agent-restore-s")
	b.ReportMetric(mean(f.rawRestore), "raw-restore-s")
}

// benchAgentDump drops the page cache, checkpoints the app through the agent and thaws it (unless
// frozen is given), and returns the checkpoint, the time to the complete checkpoint and the bytes
// it added to the volume.
func benchAgentDump(b *testing.B, r *rig, uid string, frozen ...bool) (string, time.Duration, int64) {
	dropAllCaches(b)
	before := diskUsage(b, r.root)
	t0 := time.Now()
	_, err := r.agent.Start(agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "default", Name: "counter", UID: uid}, Containers: []agentapi.ContainerSpec{{Name: "app", Dir: r.dir("app")}}})
	require.NoError(b, err)
	st, err := r.agent.Wait(context.Background(), uid)
	require.NoError(b, err)
	d := time.Since(t0)
	require.Equal(b, agentapi.PhaseSucceeded, st.Phase, st.Message)
	if len(frozen) == 0 {
		require.True(b, r.agent.Delete(uid)) // thaw
	}
	return st.Containers[0].CheckpointID, d, diskUsage(b, r.root) - before
}

// benchRawDump drops the page cache, dumps the app with the raw CLI into raw (left stopped),
// fsyncs the images, thaws the app, and returns both times and the app's resident memory.
func benchRawDump(b *testing.B, r *rig, raw string) (dump, synced time.Duration, rss int64) {
	dropAllCaches(b)
	l := r.finder["app"]
	rootPid, err := appRoot(l)
	require.NoError(b, err)
	inCtr, err := pidIn(rootPid, l)
	require.NoError(b, err)
	rss = vmRSS(b, rootPid)
	require.NoError(b, os.MkdirAll(raw, 0o700))
	t1 := time.Now()
	cmd := exec.Command("nsenter", "-t", strconv.Itoa(l), "-m", "-u", "-i", "-n", "-p", "-C", "--",
		r.criu, "dump", "-t", strconv.Itoa(inCtr), "-D", raw, "-o", "dump.log", "--leave-stopped")
	outb, err := cmd.CombinedOutput()
	require.NoError(b, err, "raw criu dump: %s", outb)
	dump = time.Since(t1)
	require.NoError(b, fsyncAll(raw))
	synced = time.Since(t1)
	_, err = newFrozenTree(rootPid).thaw()
	require.NoError(b, err)
	return dump, synced, rss
}

// benchAgentRestore restores checkpoint id into a new container through the launcher and the
// agent: the time from the container's start to the launcher reporting the app resumed.
func benchAgentRestore(b *testing.B, r *rig, id string, cmd []string) time.Duration {
	dropAllCaches(b)
	t := time.Now()
	c := r.restoreContainer("app", id, cmd...)
	for !strings.Contains(c.out.String(), "restored; supervising") {
		if strings.Contains(c.out.String(), "COLD START") {
			b.Fatalf("the agent did not restore: %s", c.out.String())
		}
		select {
		case <-c.done:
			b.Fatalf("restore container exited: %s", c.out.String())
		case <-time.After(5 * time.Millisecond):
		}
	}
	total := time.Since(t)
	c.stop()
	return total
}

// benchRawRestore restores the raw images with `criu restore` as a child of a shell that is PID 1
// of new namespaces (as the launcher is), until CRIU returned with the app running.
func benchRawRestore(b *testing.B, r *rig, raw string) time.Duration {
	dropAllCaches(b)
	t := time.Now()
	script := fmt.Sprintf("rm -f %[2]s/pid && %[1]s restore -D %[2]s -o restore.log --restore-detached --manage-cgroups=ignore --pidfile %[2]s/pid && echo restored && kill -KILL $(cat %[2]s/pid) && wait", r.criu, raw)
	rout, err := exec.Command("unshare", "--mount", "--pid", "--uts", "--ipc", "--fork", "--mount-proc", "--", "sh", "-c", script).CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(raw, "restore.log"))
		b.Fatalf("raw restore: %v: %s\n%s", err, rout, log[max(0, len(log)-3000):])
	}
	return time.Since(t)
}

// dropAllCaches empties the page cache (the dumps and restores then read and write the disk, not
// memory); it needs root, as the bench does.
func dropAllCaches(b *testing.B) {
	unix.Sync()
	require.NoError(b, os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200))
}

// diskUsage is the space the files below dir take on disk (allocated blocks; a file linked
// several times counts once).
func diskUsage(b *testing.B, dir string) int64 {
	seen := map[uint64]bool{}
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return nil
		}
		if !seen[st.Ino] {
			seen[st.Ino] = true
			n += st.Blocks * 512
		}
		return nil
	})
	require.NoError(b, err)
	return n
}

// vmRSS is a process's resident memory in bytes.
func vmRSS(b *testing.B, pid int) int64 {
	st, err := procStatus(strconv.Itoa(pid))
	require.NoError(b, err)
	kb, err := strconv.ParseInt(strings.Fields(st["VmRSS"])[0], 10, 64)
	require.NoError(b, err)
	return kb << 10
}

// dropCache drops the page cache of the (synced) files below dir. On this VM the first use of
// guest memory costs a fault in the host: a dump whose page cache lands on never-used memory took
// 3.7 s instead of 0.6 s, so which of the two dumps reused the memory freed last decided the
// comparison. Dropping each dump's cache after it is timed lets the next one reuse those pages.
func dropCache(dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
	})
}

// fsyncAll fsyncs every file in dir.
func fsyncAll(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// waitCountFor is waitCount with its own limit (building a large heap takes a while).
func waitCountFor(t testing.TB, c *container, path string, n int, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for len(readCounts(t, path)) < n {
		select {
		case <-c.done:
			t.Fatalf("container exited (status %v) before counting to %d; output:\n%s", c.status, n, c.out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not reach %d numbers within %s; output:\n%s", path, n, limit, c.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

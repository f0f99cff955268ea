package agent

import (
	"context"
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

// BenchmarkDump1GiB dumps one process with 1 GiB of touched memory, in the same run, through the
// agent's path (its CRIU's RPC inside the container's namespaces, checksums and fsync beside it,
// commit)
// and through the raw `criu dump` CLI in the same namespaces; then restores each: the agent's
// checkpoint through the launcher asking the agent, the raw images with the raw `criu restore` CLI.
// It prints both times, the throughput ratio (goal: agent >= 0.95 x raw) and the image size.
func BenchmarkDump1GiB(b *testing.B) {
	// Keep every checkpoint: the agent prunes in the background after a result, which would slow
	// the raw dump that follows it.
	r := newRig(b, Config{FreezeTimeout: time.Hour, KeepOlder: 100})
	r.serveLocal()
	criu, a, finder, dir := r.criu, r.agent, r.finder, r.dir("app")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	base := b.TempDir()

	out := filepath.Join(base, "counter.txt")
	// One number after the ballast is filled, then nothing: the open file keeps its size, so the
	// raw images stay restorable after the process ran on.
	counter := []string{counterBin, "-touch-mib", "1024", "-tick", "1h", out}
	c := startContainer(b, r.env("app"), append([]string{"--"}, counter...)...)
	finder["app"] = c.launcherPID()
	waitCount(b, c, out, 1)

	var agentDump, agentCriu, rawDump, rawSync time.Duration
	var imageBytes int64
	var lastID string
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// Agent path.
		uid := "bench-" + strconv.Itoa(i)
		t0 := time.Now()
		_, err := a.Start(agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "default", Name: "counter", UID: uid}, Containers: []agentapi.ContainerSpec{{Name: "app", Dir: dir}}})
		require.NoError(b, err)
		st, err := a.Wait(ctx, uid)
		require.NoError(b, err)
		aD := time.Since(t0)
		agentDump += aD
		require.Equal(b, agentapi.PhaseSucceeded, st.Phase, st.Message)
		lastID = st.Containers[0].CheckpointID
		m, err := checkpoint.ReadManifest(filepath.Join(dir, lastID))
		require.NoError(b, err)
		aC := m.Dumped.Sub(m.Started)
		agentCriu += aC
		imageBytes = m.ImagesSize
		require.True(b, a.Delete(uid)) // thaw
		// Both dumps must find equally warm memory for their page cache (see dropCache).
		require.NoError(b, dropCache(filepath.Join(dir, lastID)))

		// Raw CLI on the same process, same namespaces.
		l := finder["app"]
		rootPid, err := appRoot(l)
		require.NoError(b, err)
		inCtr, err := pidIn(rootPid, l)
		require.NoError(b, err)
		raw := filepath.Join(base, fmt.Sprintf("raw-%d", i))
		require.NoError(b, os.MkdirAll(raw, 0o700))
		t1 := time.Now()
		cmd := exec.Command("nsenter", "-t", strconv.Itoa(l), "-m", "-u", "-i", "-n", "-p", "-C", "--",
			criu, "dump", "-t", strconv.Itoa(inCtr), "-D", raw, "-o", "dump.log", "--leave-stopped")
		outb, err := cmd.CombinedOutput()
		require.NoError(b, err, "raw criu dump: %s", outb)
		rD := time.Since(t1)
		rawDump += rD
		// The same durability as the agent's checkpoint: every image on disk.
		require.NoError(b, fsyncAll(raw))
		rS := time.Since(t1)
		rawSync += rS
		fmt.Printf("  #%d: agent %.2f s (CRIU step %.2f s); raw %.2f s, +fsync %.2f s\n", i, aD.Seconds(), aC.Seconds(), rD.Seconds(), rS.Seconds())
		_, err = newFrozenTree(rootPid).thaw()
		require.NoError(b, err)
		if i < b.N-1 {
			require.NoError(b, dropCache(raw))
			require.NoError(b, os.RemoveAll(raw))
		}
	}
	b.StopTimer()
	n := float64(b.N)
	agentS, agentCriuS, rawS, rawSyncS := agentDump.Seconds()/n, agentCriu.Seconds()/n, rawDump.Seconds()/n, rawSync.Seconds()/n
	gib := float64(imageBytes) / (1 << 30)
	b.ReportMetric(agentS, "agent-dump-s")
	b.ReportMetric(rawS, "raw-dump-s")
	b.ReportMetric(rawS/agentS, "agent/raw-throughput")
	b.ReportMetric(float64(imageBytes)/(1<<20), "image-MiB")
	fmt.Printf("\ndump of 1 GiB touched memory (mean of %d):\n", b.N)
	fmt.Printf("  raw criu dump CLI:        %6.2f s  (%.2f GiB/s)\n", rawS, gib/rawS)
	fmt.Printf("  raw criu dump CLI, then fsync of its images: %6.2f s  (%.2f GiB/s)\n", rawSyncS, gib/rawSyncS)
	fmt.Printf("  agent, CRIU step only:    %6.2f s  (%.2f GiB/s)  ratio %.2f\n", agentCriuS, gib/agentCriuS, rawS/agentCriuS)
	fmt.Printf("  agent, complete (+sha256, fsync, commit): %6.2f s  (%.2f GiB/s)  ratio %.2f (goal >= 0.95), %.2f against raw+fsync\n", agentS, gib/agentS, rawS/agentS, rawSyncS/agentS)
	fmt.Printf("  image size: %.1f MiB\n", float64(imageBytes)/(1<<20))

	// Restores: kill the app (pod deletion), then each restore in a new container.
	require.Equal(b, 143, func() int {
		// Leave it frozen first, as after an eviction.
		_, err := a.Start(agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "default", Name: "counter", UID: "final"}, Containers: []agentapi.ContainerSpec{{Name: "app", Dir: dir}}})
		require.NoError(b, err)
		st, err := a.Wait(ctx, "final")
		require.NoError(b, err)
		require.Equal(b, agentapi.PhaseSucceeded, st.Phase, st.Message)
		lastID = st.Containers[0].CheckpointID
		return c.stop()
	}())
	agentRestore := func() time.Duration {
		t := time.Now()
		c := r.restoreContainer("app", lastID, counter...)
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
	// Raw restore of the raw images: `criu restore` as a child of a shell that is PID 1 of new
	// namespaces (as the launcher is), until the restored process is stopped again.
	raw := filepath.Join(base, fmt.Sprintf("raw-%d", b.N-1))
	rawRestore := func() time.Duration {
		t := time.Now()
		script := fmt.Sprintf("rm -f %[2]s/pid && %[1]s restore -D %[2]s -o restore.log --restore-detached --manage-cgroups=ignore --pidfile %[2]s/pid && echo restored && kill -TERM $(cat %[2]s/pid) && wait", criu, raw)
		rout, err := exec.Command("unshare", "--mount", "--pid", "--uts", "--ipc", "--fork", "--mount-proc", "--", "sh", "-c", script).CombinedOutput()
		if err != nil {
			log, _ := os.ReadFile(filepath.Join(raw, "restore.log"))
			b.Fatalf("raw restore: %v: %s\n%s", err, rout, log[max(0, len(log)-3000):])
		}
		return time.Since(t)
	}
	fmt.Printf("restore of the same process (mean of %d, alternating which goes first):\n", b.N)
	var agentR, rawR time.Duration
	for i := 0; i < b.N; i++ {
		var aR, rR time.Duration
		if i%2 == 0 {
			aR = agentRestore()
			rR = rawRestore()
		} else {
			rR = rawRestore()
			aR = agentRestore()
		}
		agentR, rawR = agentR+aR, rawR+rR
		fmt.Printf("  #%d: agent %.2f s; raw %.2f s\n", i, aR.Seconds(), rR.Seconds())
	}
	agentRS, rawRS := agentR.Seconds()/n, rawR.Seconds()/n
	fmt.Printf("  raw criu restore CLI (incl. namespace setup and stop): %6.2f s\n", rawRS)
	fmt.Printf("  agent path: new container → launcher asks → agent checks, copies and verifies the images, CRIU restores → resumed: %6.2f s  ratio %.2f (goal >= 0.95)\n", agentRS, rawRS/agentRS)
	b.ReportMetric(rawRS, "raw-restore-s")
	b.ReportMetric(agentRS, "agent-restore-s")
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

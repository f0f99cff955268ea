package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

// BenchmarkLazyRestore1GiB restores one process with 1 GiB of touched, realistic heap (JSON
// documents) four ways, page cache of the images dropped before each: raw `criu restore` of raw
// `criu dump` images (the reference), the agent's full restore (--lazy-restore=off, image files),
// and the agent's lazy restore from image files (interim: each file hashed whole first) and from
// the store's pack (chunks checked as they are served), timed to the app resumed and to all
// memory present. Goal (issue 16): resumed <= 0.3 x raw.
func BenchmarkLazyRestore1GiB(b *testing.B) {
	r := newRig(b, Config{FreezeTimeout: time.Hour, KeepOlder: 100})
	if r.agent.noLazy != nil {
		b.Fatalf("lazy restore unavailable here: %v", r.agent.noLazy)
	}
	r.serveLocal()
	base := b.TempDir()
	out := filepath.Join(base, "counter.txt")
	counter := []string{counterBin, "-touch-mib", "1024", "-heap", "json", "-tick", "1h", out}
	c := startContainer(b, r.env("app"), append([]string{"--"}, counter...)...)
	r.finder["app"] = c.launcherPID()
	waitCount(b, c, out, 1)

	// Raw images of the same process, then the agent's checkpoint (which leaves it frozen).
	raw := filepath.Join(base, "raw")
	require.NoError(b, os.MkdirAll(raw, 0o700))
	rootPid, err := appRoot(c.launcherPID())
	require.NoError(b, err)
	inCtr, err := pidIn(rootPid, c.launcherPID())
	require.NoError(b, err)
	dump := exec.Command("nsenter", "-t", strconv.Itoa(c.launcherPID()), "-m", "-u", "-i", "-n", "-p", "-C", "--",
		r.criu, "dump", "-t", strconv.Itoa(inCtr), "-D", raw, "-o", "dump.log", "--leave-stopped")
	o, err := dump.CombinedOutput()
	require.NoError(b, err, "raw criu dump: %s", o)
	_, err = newFrozenTree(rootPid).thaw()
	require.NoError(b, err)
	_, err = r.agent.Start(agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "default", Name: "counter", UID: "lazy"}, Containers: []agentapi.ContainerSpec{{Name: "app", Dir: r.dir("app")}}})
	require.NoError(b, err)
	st, err := r.agent.Wait(context.Background(), "lazy")
	require.NoError(b, err)
	require.Equal(b, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	c.stop()

	rawRestore := func() time.Duration {
		t := time.Now()
		script := fmt.Sprintf("rm -f %[2]s/pid && %[1]s restore -D %[2]s -o restore.log --restore-detached --manage-cgroups=ignore --pidfile %[2]s/pid && kill -TERM $(cat %[2]s/pid) && wait", r.criu, raw)
		o, err := exec.Command("unshare", "--mount", "--pid", "--uts", "--ipc", "--fork", "--mount-proc", "--", "sh", "-c", script).CombinedOutput()
		require.NoError(b, err, "raw restore: %s", o)
		return time.Since(t)
	}
	agentRestore := func(id string, lazy bool) (resumed, complete time.Duration) {
		r.agent.noLazy = nil
		if !lazy {
			r.agent.noLazy = errors.New("bench: full restore")
		}
		before := strings.Count(r.logs.String(), "lazy restore complete")
		t := time.Now()
		c := r.restoreContainer("app", id, counter...)
		for !strings.Contains(c.out.String(), "restored; supervising") {
			if strings.Contains(c.out.String(), "COLD START") {
				b.Fatalf("the agent did not restore: %s", c.out.String())
			}
			time.Sleep(2 * time.Millisecond)
		}
		resumed, complete = time.Since(t), time.Since(t)
		for lazy && strings.Count(r.logs.String(), "lazy restore complete") == before {
			if time.Since(t) > 2*time.Minute || strings.Count(r.logs.String(), "the app was killed") > 0 {
				b.Fatalf("lazy restore did not complete: %s", r.logs.String())
			}
			time.Sleep(2 * time.Millisecond)
		}
		if lazy {
			complete = time.Since(t)
		}
		c.stop()
		return resumed, complete
	}
	drop := func() {
		require.NoError(b, dropCache(r.dir("app"))) // both checkpoints and the chunk store
		require.NoError(b, dropCache(raw))
	}
	var rawT, fullT, packRes, packDone time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		drop()
		rR := rawRestore()
		drop()
		fR, _ := agentRestore(id, false)
		drop()
		pR, pC := agentRestore(id, true)
		rawT, fullT, packRes, packDone = rawT+rR, fullT+fR, packRes+pR, packDone+pC
		fmt.Printf("  #%d: raw %.2f s; agent full (streamed from the pack) %.2f s; lazy from the pack: resumed %.2f s, complete %.2f s\n",
			i, rR.Seconds(), fR.Seconds(), pR.Seconds(), pC.Seconds())
	}
	b.StopTimer()
	n := float64(b.N)
	rawS := rawT.Seconds() / n
	line := func(what string, d time.Duration, goal string) float64 {
		s := d.Seconds() / n
		fmt.Printf("  %-46s %6.2f s  (%.2f x raw%s)\n", what, s, s/rawS, goal)
		return s
	}
	fmt.Printf("restore of 1 GiB touched JSON heap, page cache dropped before each (mean of %d):\n", b.N)
	fmt.Printf("  %-46s %6.2f s\n", "raw criu restore CLI:", rawS)
	line("agent, full restore (streamed from the pack):", fullT, "")
	resS := line("agent, lazy from the pack: app resumed:", packRes, "; goal <= 0.3")
	doneS := line("agent, lazy from the pack: all memory:", packDone, "")
	b.ReportMetric(rawS, "raw-restore-s")
	b.ReportMetric(resS, "lazy-resumed-s")
	b.ReportMetric(doneS, "lazy-complete-s")
	b.ReportMetric(resS/rawS, "resumed/raw")
}

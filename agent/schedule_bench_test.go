package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

// BenchmarkDrainDumps is a node's drain in miniature, with real CRIU: N containers with 256 MiB
// of touched memory each are asked to checkpoint at once (as kubectl drain evicts every pod at
// once), under each dump-concurrency policy. It prints the drain's total time, each dump's freeze
// (CRIU's time with the app stopped) and each dump's own time (freeze plus checksums, fsync and
// commit), against the time to write and fsync the same bytes with nothing else running.
// STASIS_BENCH_PODS (default 8) and STASIS_BENCH_MIB (default 256) change the load;
// `make bench-dumps` runs it.
func BenchmarkDrainDumps(b *testing.B) {
	pods := envInt("STASIS_BENCH_PODS", 8)
	mib := envInt("STASIS_BENCH_MIB", 256)
	r := newRig(b, Config{FreezeTimeout: time.Hour})
	names := make([]string, pods)
	for i := range names {
		names[i] = "app" + strconv.Itoa(i)
		out := filepath.Join(b.TempDir(), "counter.txt")
		c := startContainer(b, r.env(names[i]), "--", counterBin, "-touch-mib", strconv.Itoa(mib), "-tick", "1h", out)
		r.finder[names[i]] = c.launcherPID()
		waitCount(b, c, out, 1)
	}
	for _, p := range benchPolicies() {
		b.Run(p.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				// The disk's time for one dump's bytes, measured right before (the machine is shared).
				disk := diskWrite(b, filepath.Join(r.root, "dd"), int64(mib)<<20)
				b.StartTimer()
				r.agent.sched = newScheduler(p.cfg)
				res := drainOnce(b, r, names, fmt.Sprintf("%s-%d", p.name, i))
				b.Logf("%s; dumps at once at the end: %d", res.summary(disk, pods, mib), r.agent.sched.limit)
			}
		})
	}
}

type benchPolicy struct {
	name string
	cfg  schedConfig
}

func benchPolicies() []benchPolicy {
	var out []benchPolicy
	for _, n := range []int{8, 4, 2, 1} {
		out = append(out, benchPolicy{name: "fixed-" + strconv.Itoa(n), cfg: schedConfig{Max: n, Min: n}})
	}
	return append(out, benchPolicy{name: "adaptive", cfg: defaultSchedConfig()})
}

// drainResult is one drain: the wall time and each dump's freeze and own time.
type drainResult struct {
	total          time.Duration
	freeze, dumped []time.Duration
}

func (d drainResult) summary(disk time.Duration, pods, mib int) string {
	med := func(v []time.Duration) time.Duration {
		s := append([]time.Duration(nil), v...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2]
	}
	var sumDump time.Duration
	for _, x := range d.dumped {
		sumDump += x
	}
	floor := time.Duration(int64(disk) * int64(pods))
	return fmt.Sprintf("disk %.0f MiB/s; %d × %d MiB: drain %.2fs (%.2f× the disk's time for the bytes, %.2f× the sum of the dumps' own times %.2fs); freeze median %.2fs max %.2fs; dump median %.2fs max %.2fs",
		float64(mib)/disk.Seconds(), pods, mib, d.total.Seconds(), d.total.Seconds()/floor.Seconds(), d.total.Seconds()/sumDump.Seconds(), sumDump.Seconds(),
		med(d.freeze).Seconds(), slicesMax(d.freeze).Seconds(), med(d.dumped).Seconds(), slicesMax(d.dumped).Seconds())
}

func slicesMax(v []time.Duration) time.Duration {
	var m time.Duration
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

// drainOnce asks for every container's checkpoint at once, waits for all, then thaws them and
// removes the checkpoints so that the next round starts alike.
func drainOnce(b *testing.B, r *rig, names []string, round string) drainResult {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	res := drainResult{freeze: make([]time.Duration, len(names)), dumped: make([]time.Duration, len(names))}
	t0 := time.Now()
	var wg sync.WaitGroup
	for i, n := range names {
		uid := round + "-" + n
		_, err := r.agent.Start(agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "default", Name: n, UID: uid}, Containers: []agentapi.ContainerSpec{{Name: n, Dir: r.dir(n)}}, Reason: "eviction"})
		require.NoError(b, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := r.agent.Wait(ctx, uid)
			require.NoError(b, err)
			require.Equal(b, agentapi.PhaseSucceeded, st.Phase, st.Message)
			var criu, total float64
			_, err = fmt.Sscanf(st.Containers[0].Message, "dump %fs, total %fs", &criu, &total)
			require.NoError(b, err, st.Containers[0].Message)
			res.freeze[i] = time.Duration(criu * float64(time.Second))
			res.dumped[i] = time.Duration(total * float64(time.Second))
		}()
	}
	wg.Wait()
	res.total = time.Since(t0)
	b.StopTimer()
	for _, n := range names {
		require.True(b, r.agent.Delete(round+"-"+n))
		require.NoError(b, os.RemoveAll(r.dir(n)))
	}
	b.StartTimer()
	return res
}

// diskWrite writes n bytes to path with fsync, as a dump's images are written: the disk's own
// time for what one dump writes.
func diskWrite(b *testing.B, path string, n int64) time.Duration {
	require.NoError(b, os.MkdirAll(filepath.Dir(path), 0o700))
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + i>>12)
	}
	f, err := os.Create(path)
	require.NoError(b, err)
	defer os.Remove(path)
	defer f.Close()
	t0 := time.Now()
	for w := int64(0); w < n; w += int64(len(buf)) {
		_, err := f.Write(buf)
		require.NoError(b, err)
	}
	require.NoError(b, f.Sync())
	return time.Since(t0)
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

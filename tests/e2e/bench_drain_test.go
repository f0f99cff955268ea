//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

// TestBenchDrain (issue 13) drains one node of 1, 4 and 16 checkpoint-enabled pods (256 MiB of
// touched memory each, one-completion Indexed Jobs pinned to the node) with `kubectl drain`, and
// prints the drain's time against the sum of the pods' own dump times (from their manifests:
// CRIU's part, and the agent's whole per-dump time with checksums, fsync and commit) and against
// the disk's time for the same bytes (written and fsynced on the checkpoint volumes' filesystem
// in the same run, right before the drain). Only with STASIS_BENCH_DRAIN=1 (`make bench-drain`);
// STASIS_BENCH_DRAIN_PODS ("1,4,16") and STASIS_BENCH_DRAIN_MIB (256) change the load.
func TestBenchDrain(t *testing.T) {
	if os.Getenv("STASIS_BENCH_DRAIN") != "1" {
		t.Skip("a benchmark: STASIS_BENCH_DRAIN=1 (make bench-drain)")
	}
	mib := 256
	if v, err := strconv.Atoi(os.Getenv("STASIS_BENCH_DRAIN_MIB")); err == nil && v > 0 {
		mib = v
	}
	counts := []int{1, 4, 16}
	if v := os.Getenv("STASIS_BENCH_DRAIN_PODS"); v != "" {
		counts = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(f)
			require.NoError(t, err, "STASIS_BENCH_DRAIN_PODS")
			counts = append(counts, n)
		}
	}
	ctx := context.Background()
	nodes, err := env.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	require.NotEmpty(t, nodes.Items)
	node := nodes.Items[0].Name
	var lines []string
	for _, n := range counts {
		r := benchDrainOnce(t, node, n, mib)
		lines = append(lines, r)
		t.Log(r)
	}
	fmt.Printf("== bench-drain (%d MiB per pod, node %s)\n%s\n", mib, node, strings.Join(lines, "\n"))
}

// benchDrainOnce runs one drain of n pods and returns its line of figures.
func benchDrainOnce(t *testing.T, node string, n, mib int) string {
	ctx := context.Background()
	ns := newNamespace(t, fmt.Sprintf("bench-drain-%d", n))
	pods := startBenchPods(t, ns, node, n, mib)

	dir, err := env.CheckpointDir(ctx, pods[0])
	require.NoError(t, err)
	disk := ddFsync(t, filepath.Dir(dir), int64(n*mib)<<20)

	t.Cleanup(func() { _ = env.Uncordon(context.Background(), node) })
	took, out, err := env.Drain(ctx, node, "stasis-bench=drain", 10*time.Minute)
	require.NoError(t, err, out)
	require.NoError(t, env.Uncordon(ctx, node))
	var criuSum, dumpSum time.Duration
	var bytes int64
	freezes := make([]time.Duration, 0, n)
	for _, p := range pods {
		m, err := env.LatestManifest(ctx, p)
		require.NoError(t, err, "pod %s", p.Name)
		criuSum += m.Dumped.Sub(m.Started)
		dumpSum += m.Created.Sub(m.Started)
		bytes += m.Size
		freezes = append(freezes, m.Dumped.Sub(m.Started))
	}
	slices.Sort(freezes)
	sched := agentScheduler(ctx, t, node)
	// The Jobs go (with their PVCs, which they own) before their replacements restore (the Job
	// controller's back-off holds them ~10 s): the next round must not share the machine with n
	// restores.
	_, _ = env.Run(ctx, "-n", ns, "delete", "jobs", "--all", "--wait=false")
	progress := 0
	var sample string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "queued:") || strings.Contains(l, "dumping:") {
			progress++
			if sample == "" {
				sample = strings.TrimSpace(l)
			}
		}
	}
	t.Logf("drain of %d pods: %d progress lines; e.g. %s", n, progress, sample)
	return fmt.Sprintf("pods %2d: drain %6.2fs | sum of dumps %6.2fs (CRIU %6.2fs) → drain/sum %.2f | %4d MiB written, disk dd+fsync %5.2fs (%4.0f MiB/s) → drain/disk %.2f | freeze median %.2fs max %.2fs | 429 progress lines %d | agent: %s",
		n, took.Seconds(), dumpSum.Seconds(), criuSum.Seconds(), took.Seconds()/dumpSum.Seconds(),
		bytes>>20, disk.Seconds(), float64(n*mib)/disk.Seconds(), took.Seconds()/disk.Seconds(),
		freezes[len(freezes)/2].Seconds(), freezes[len(freezes)-1].Seconds(), progress, sched)
}

// startBenchPods creates n one-pod Indexed Jobs on node, each touching mib MiB, and waits until
// every pod has touched its memory and counted.
func startBenchPods(t *testing.T, ns, node string, n, mib int) []*corev1.Pod {
	ctx := context.Background()
	for i := 0; i < n; i++ {
		_, err := env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "c" + strconv.Itoa(i), Checkpoint: true, Indexed: true, NodeName: node,
			Labels: map[string]string{"stasis-bench": "drain"}, Args: []string{"--interval=500ms", "--touch-mib=" + strconv.Itoa(mib)}})
		require.NoError(t, err)
	}
	pods := make([]*corev1.Pod, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			job := "c" + strconv.Itoa(i)
			if pods[i], errs[i] = env.WaitJobPod(ctx, ns, job, 5*time.Minute); errs[i] == nil {
				_, errs[i] = env.WaitCount(ctx, ns, pods[i].Name, 2, 3*time.Minute)
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "job c%d", i)
	}
	return pods
}

// ddFsync writes n bytes to a new file in dir and fsyncs it: the disk's time for what the drain
// writes, on the checkpoint volumes' filesystem, in the same run.
func ddFsync(t *testing.T, dir string, n int64) time.Duration {
	f, err := os.CreateTemp(dir, "bench-dd-")
	require.NoError(t, err)
	defer os.Remove(f.Name())
	defer f.Close()
	buf := make([]byte, 4<<20)
	for i := range buf {
		buf[i] = byte(i*7 + i>>12)
	}
	t0 := time.Now()
	for w := int64(0); w < n; w += int64(len(buf)) {
		_, err := f.Write(buf)
		require.NoError(t, err)
	}
	require.NoError(t, f.Sync())
	return time.Since(t0)
}

// agentScheduler reads the dump scheduler's gauges from the node's agent (its /metrics, through
// the API server's pod proxy): how many dumps at once it settled on, and the throughput it measured.
func agentScheduler(ctx context.Context, t *testing.T, node string) string {
	agents, err := env.Client.CoreV1().Pods(harness.StasisNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=stasis-agent"})
	require.NoError(t, err)
	for _, a := range agents.Items {
		if a.Spec.NodeName != node {
			continue
		}
		out, err := env.Run(ctx, "get", "--raw", "/api/v1/namespaces/"+a.Namespace+"/pods/"+a.Name+":8081/proxy/metrics")
		if err != nil {
			return "metrics unavailable: " + strings.TrimSpace(out)
		}
		var got []string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "stasis_agent_dump_slots ") || strings.HasPrefix(l, "stasis_agent_dump_throughput_bytes_per_second ") {
				got = append(got, strings.TrimPrefix(l, "stasis_agent_"))
			}
		}
		return strings.Join(got, ", ")
	}
	return "no agent on " + node
}

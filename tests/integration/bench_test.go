//go:build integration

package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestBenchWebhook is `make bench-webhook` (skipped otherwise): floods of checkpoint-enabled pod
// creations (server-side dry run) through the real API server and the real webhook binary at each
// rate of STASIS_BENCH_RATES (default 50,200,1000 per second) for STASIS_BENCH_SECONDS (default
// 20), with an eviction during each flood. Per rate it prints: admission latency p50/p99/max from
// the API server's own apiserver_admission_webhook_admission_duration_seconds (pods.stasis.dev),
// the same from the webhook's own finer histogram and from the client, the error count, and the
// eviction latency during and right after the flood against the same without flood (ratios).
func TestBenchWebhook(t *testing.T) {
	if os.Getenv("STASIS_BENCH_WEBHOOK") == "" {
		t.Skip("benchmark: run with `make bench-webhook` (STASIS_BENCH_WEBHOOK=1)")
	}
	rates := []int{50, 200, 1000}
	if v := os.Getenv("STASIS_BENCH_RATES"); v != "" {
		rates = nil
		for _, f := range strings.Split(v, ",") {
			r, err := strconv.Atoi(strings.TrimSpace(f))
			require.NoError(t, err, "STASIS_BENCH_RATES")
			rates = append(rates, r)
		}
	}
	dur := 20 * time.Second
	if v := os.Getenv("STASIS_BENCH_SECONDS"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, "STASIS_BENCH_SECONDS")
		dur = time.Duration(n) * time.Second
	}
	s := newScenario(t, "bench-webhook", "a")
	s.createPVC("checkpointing-volume")
	c, err := floodClient()
	require.NoError(t, err)
	var lines []string
	for _, rate := range rates {
		evictee := func(stage string) string {
			name := fmt.Sprintf("ev-%d-%s", rate, stage)
			s.createPod(name, podOpts{node: s.nodes[0], pvc: "checkpointing-volume", labels: enabled(storageLabel, "checkpointing")})
			return name
		}
		base, during, after := evictee("base"), evictee("during"), evictee("after")
		tBase, err := s.timedEviction(base)
		require.NoError(t, err)

		apiBefore, err := apiserverAdmission(s.ctx, "pods.stasis.dev")
		require.NoError(t, err)
		whBefore, err := webhookReviews("pod")
		require.NoError(t, err)
		shedBefore, err := webhookShed()
		require.NoError(t, err)
		whCPU0, apiCPU0, clientCPU0, err := cpuSeconds(s.ctx)
		require.NoError(t, err)
		statsc := make(chan floodStats, 1)
		go func() { statsc <- flood(s.ctx, c, s.ns, rate, dur, true, s.floodPod) }()
		time.Sleep(dur / 3)
		tDuring, errDuring := s.timedEviction(during)
		st := <-statsc
		whCPU1, apiCPU1, clientCPU1, err := cpuSeconds(s.ctx)
		require.NoError(t, err)
		tAfter, errAfter := s.timedEviction(after)
		apiAfter, err := apiserverAdmission(s.ctx, "pods.stasis.dev")
		require.NoError(t, err)
		whAfter, err := webhookReviews("pod")
		require.NoError(t, err)
		shedAfter, err := webhookShed()
		require.NoError(t, err)
		api, wh := apiAfter.minus(apiBefore), whAfter.minus(whBefore)

		line := fmt.Sprintf("rate %4d/s (sent at %.0f/s, %d in %s, last answer after %s): apiserver admission pods.stasis.dev n=%d p50 %.1fms p99 %.1fms max %s | "+
			"webhook review n=%d p50 %.2fms p99 %.2fms max %s, shed/deadline 429 %d | client p50 %s p99 %s max %s | ok %d, errors %d (webhook failures %d, other %v), 429 seen by client %d, API throttled %d | "+
			"eviction: no flood %s, during %s (%.2fx, err %v), after %s (%.2fx, err %v) | "+
			"CPU during the flood (cores): webhook %.2f (%.0f µs/review), kube-apiserver %.2f, test process (flood client, fake agent) %.2f",
			rate, st.achievedRate, st.sent, dur, st.doneIn.Round(100*time.Millisecond), api.count(), api.quantile(.5)*1000, api.quantile(.99)*1000, api.maxBound(),
			wh.count(), wh.quantile(.5)*1000, wh.quantile(.99)*1000, wh.maxBound(), shedAfter-shedBefore,
			quantile(st.latencies, .5).Round(100*time.Microsecond), quantile(st.latencies, .99).Round(100*time.Microsecond), quantile(st.latencies, 1).Round(100*time.Microsecond),
			st.ok, st.errors(), st.webhookFailures, st.other, st.shed, st.apiThrottled,
			tBase.Round(time.Millisecond), tDuring.Round(time.Millisecond), tDuring.Seconds()/tBase.Seconds(), errDuring,
			tAfter.Round(time.Millisecond), tAfter.Seconds()/tBase.Seconds(), errAfter,
			(whCPU1-whCPU0)/st.doneIn.Seconds(), (whCPU1-whCPU0)/float64(max(wh.count(), 1))*1e6, (apiCPU1-apiCPU0)/st.doneIn.Seconds(), (clientCPU1-clientCPU0)/st.doneIn.Seconds())
		t.Log(line)
		lines = append(lines, line)
		time.Sleep(3 * time.Second) // let the control plane settle between rates
	}
	fmt.Println("\n== bench-webhook ==")
	for _, l := range lines {
		fmt.Println(l)
	}
}

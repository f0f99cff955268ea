package agent

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

// Dumps that find the node's slots taken wait in arrival order and say where they are; a running
// dump says how far it is against the estimate of its size. Real CRIU, two 128 MiB apps, one
// dump at a time, the slot first held by the test (as a long dump would hold it).
func TestQueuedDumpsReportTheirPlaceAndProgress(t *testing.T) {
	r := newRig(t, Config{MaxConcurrentDumps: 1, FreezeTimeout: time.Hour})
	names := []string{"app0", "app1"}
	for _, n := range names {
		out := filepath.Join(t.TempDir(), "counter.txt")
		c := startContainer(t, r.env(n), "--", counterBin, "-touch-mib", "128", "-tick", "1h", out)
		r.finder[n] = c.launcherPID()
		waitCount(t, c, out, 1)
	}
	hold := r.agent.sched.enqueue(urgencyEviction)
	release, err := r.agent.sched.acquire(context.Background(), hold)
	require.NoError(t, err)
	for _, n := range names {
		_, err := r.agent.Start(agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "default", Name: n, UID: "uid-" + n}, Containers: []agentapi.ContainerSpec{{Name: n, Dir: r.dir(n)}}, Reason: "eviction"})
		require.NoError(t, err)
	}
	for i, n := range names {
		st := waitStatus(t, r.agent, "uid-"+n, func(s agentapi.CheckpointStatus) bool { return s.Ahead > 0 })
		assert.Equal(t, agentapi.PhasePending, st.Phase)
		assert.Equal(t, i+1, st.Ahead, "%s: the held slot and the dumps asked before it", n)
		assert.Equal(t, "queued on node node-a: "+strconv.Itoa(i+1)+" dump(s) ahead (1 running, 1 at once now)", st.Message)
	}
	release(0, 0)

	// The first runs; the second moves up to 1 ahead (the running one), then runs itself.
	var sawProgress string
	st := waitStatus(t, r.agent, "uid-app1", func(s agentapi.CheckpointStatus) bool {
		if s.Phase == agentapi.PhaseRunning && strings.Contains(s.Message, " of ~") {
			sawProgress = s.Message
		}
		return s.Phase.Done()
	})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	assert.Regexp(t, `^dumping: [0-9.]+ (B|[KMG]iB) of ~1[23][0-9]\.[0-9] MiB$`, sawProgress, "a running dump's progress against its estimate")
	for _, n := range names {
		st, ok := r.agent.Status("uid-" + n)
		require.True(t, ok)
		require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
		got, want := float64(st.ExpectedBytes), float64(st.Containers[0].ImageBytes)
		assert.InDelta(t, 1, got/want, 0.2, "%s: estimate %d bytes against %d written", n, st.ExpectedBytes, st.Containers[0].Bytes)
	}
}

// waitStatus polls an operation every 5 ms until ok (bounded: a stuck dump fails the test).
func waitStatus(t *testing.T, a *Agent, uid string, ok func(agentapi.CheckpointStatus) bool) agentapi.CheckpointStatus {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st, found := a.Status(uid)
		require.True(t, found, uid)
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("operation %s: last status %+v", uid, st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

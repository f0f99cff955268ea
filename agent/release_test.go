package agent

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/launcher"
)

// apiPods is the API server's stand-in for one pod's deletion state (the unit tier runs no API
// server; the real lookup is a GET of the pod, kubeEvents.Deleting).
type apiPods struct {
	deleting atomic.Bool
	asked    atomic.Int32
}

func (p *apiPods) Deleting(context.Context, agentapi.PodRef) (bool, error) {
	p.asked.Add(1)
	return p.deleting.Load(), nil
}

// An eviction allowed by the webhook and then refused by the API server (a PodDisruptionBudget):
// nobody asks about the checkpoint any more and the pod is not being deleted, so the app is
// thawed within seconds, not after --freeze-timeout; while the webhook still asks, it stays
// frozen. A pod whose deletion has started is never thawed.
func TestFrozenAppReleasedWhenPodNotDeleted(t *testing.T) {
	for _, deleting := range []bool{false, true} {
		name := map[bool]string{false: "eviction refused after the dump", true: "pod being deleted"}[deleting]
		t.Run(name, func(t *testing.T) {
			pods := &apiPods{}
			pods.deleting.Store(deleting)
			state := t.TempDir()
			r := newRig(t, Config{FreezeTimeout: time.Hour, ReleaseAfter: 2 * time.Second, Pods: pods, StateDir: state})
			out := filepath.Join(t.TempDir(), "counter.txt")
			c := startContainer(t, r.env("app"), "--", counterBin, out)
			r.finder["app"] = c.launcherPID()
			waitCount(t, c, out, 3)
			st := r.checkpoint("uid-r", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
			require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
			dumped := readCounts(t, out)
			root, err := appRoot(r.finder["app"])
			require.NoError(t, err)

			// The webhook still holding the eviction asks every second: the app stays frozen.
			for i := 0; i < 4; i++ {
				_, ok := r.agent.Status("uid-r")
				require.True(t, ok)
				time.Sleep(time.Second)
			}
			assert.True(t, launcher.Stopped(root), "frozen while the webhook asks")
			assert.Equal(t, dumped, readCounts(t, out))

			if !deleting {
				got := waitCount(t, c, out, len(dumped)+3)
				assert.True(t, isSequence(got), "the released app runs on: %v", got)
				_, known := r.agent.Status("uid-r")
				assert.False(t, known, "a released operation is forgotten: the next eviction dumps again")
				assert.Contains(t, r.logs.String(), "the pod was not deleted within 2s")
				assert.Equal(t, 128+15, c.stop())
				return
			}
			time.Sleep(4 * time.Second)
			assert.True(t, launcher.Stopped(root), "a pod being deleted keeps its app frozen")
			assert.Equal(t, dumped, readCounts(t, out))
			assert.Positive(t, pods.asked.Load(), "the pod's state was read")
			assert.Equal(t, 143, c.stop(), "the launcher kills the frozen app on SIGTERM")
			require.Eventually(t, func() bool {
				entries, _ := filepath.Glob(filepath.Join(state, "node-a", "*"))
				return len(entries) == 0
			}, 10*time.Second, 100*time.Millisecond, "the record goes once the app is gone")
		})
	}
}

// The agent restarts (a DaemonSet rollout) while an app is frozen after its dump: the new agent
// adopts the operation from the node's record, answers the webhook's next question with the
// checkpoint it was waiting for, and thaws the app as soon as it is clear that the pod stays.
func TestRestartedAgentAdoptsFrozenApp(t *testing.T) {
	state := t.TempDir()
	r := newRig(t, Config{FreezeTimeout: time.Hour, StateDir: state})
	out := filepath.Join(t.TempDir(), "counter.txt")
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 3)
	st := r.checkpoint("uid-a", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	dumped := readCounts(t, out)
	root, err := appRoot(r.finder["app"])
	require.NoError(t, err)

	// The new agent of the node (the old one's operations die with it: nothing would thaw them).
	pods := &apiPods{}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	b, err := New(ctx, Config{NodeName: "node-a", Criu: r.agent.cfg.Criu, ManifestKey: testKey, Finder: rigFinder{r},
		FreezeTimeout: time.Hour, ReleaseAfter: 2 * time.Second, Pods: pods, StateDir: state})
	require.NoError(t, err)
	adopted, ok := b.Status("uid-a")
	require.True(t, ok, "the new agent knows the operation")
	assert.Equal(t, agentapi.PhaseSucceeded, adopted.Phase)
	require.Len(t, adopted.Containers, 1)
	assert.Equal(t, st.Containers[0].CheckpointID, adopted.Containers[0].CheckpointID, "the webhook gets the checkpoint it waited for")
	assert.True(t, launcher.Stopped(root), "still frozen right after the restart")

	got := waitCount(t, c, out, len(dumped)+3)
	assert.True(t, isSequence(got), "thawed by the new agent, the app runs on: %v", got)
	entries, _ := filepath.Glob(filepath.Join(state, "node-a", "*"))
	assert.Empty(t, entries, "the record goes with the thaw")

	// Another restart finds nothing to adopt.
	b2, err := New(ctx, Config{NodeName: "node-a", Criu: r.agent.cfg.Criu, ManifestKey: testKey, Finder: rigFinder{r}, StateDir: state})
	require.NoError(t, err)
	_, ok = b2.Status("uid-a")
	assert.False(t, ok)
	assert.Equal(t, 128+15, c.stop())
}

// A restored container that restarts in place (crash, OOM kill, liveness probe) is not restored
// again from the checkpoint its pod was created for: that checkpoint was for its first start.
// The restart starts afresh, and nothing of the checkpoint is put back over its newer files.
func TestInPlaceRestartDoesNotRestoreAgain(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	out := filepath.Join(t.TempDir(), "counter.txt")
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 5)
	st := r.checkpoint("uid-ip", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app"), Files: []string{out}})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	assert.Equal(t, 143, c.stop())
	require.NoError(t, os.WriteFile(out, []byte("1\n2\n"), 0o644)) // what the restarted container wrote since

	r.attempt = 1
	c2 := r.restoreContainer("app", id, counterBin, out)
	c2.waitOutput("COLD START")
	assert.Contains(t, c2.out.String(), "restarted in place (restart 1)")
	got := waitCount(t, c2, out, 5)
	assert.Equal(t, []int{1, 2, 1, 2, 3}, got[:5], "the file is the restarted container's own, appended to by a fresh start")
	assert.Equal(t, 1.0, counterValue(t, r.agent.cfg.Metrics.RestoreResults.WithLabelValues("cold-start")))
}

package agent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/wiring"
)

// withTerminationSpec writes the pod's checkpoint spec as the webhook does at wiring.
func (r *rig) withTerminationSpec(containers ...string) {
	req := agentapi.CheckpointRequest{}
	for _, c := range containers {
		req.Containers = append(req.Containers, agentapi.ContainerSpec{Name: c, Dir: r.dir(c)})
	}
	b, err := json.Marshal(req)
	require.NoError(r.t, err)
	r.mu.Lock()
	r.restore[wiring.AnnotationCheckpoint] = string(b)
	r.mu.Unlock()
}

// A pod deleted (kubectl delete, preemption, scale-down: no admission review the webhook sees):
// its launcher gets SIGTERM while the app runs, the agent checkpoints the pod before the app ends,
// and the next pod of the identity, created without any record of that checkpoint, finds it on
// the volume and continues. A first start finds nothing and starts at once.
func TestTerminationCheckpointIsFoundByTheNextPod(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	r.withTerminationSpec("app")
	out := filepath.Join(t.TempDir(), "counter.txt")
	c := r.startPod("", map[string][]string{"app": {counterBin, out}})["app"]
	got := waitCount(t, c, out, 10)
	assert.Equal(t, 1, got[0], "a first start: nothing to continue")
	assert.Equal(t, 1.0, counterValue(t, r.agent.cfg.Metrics.RestoreResults.WithLabelValues("none")))

	assert.Equal(t, 143, c.stop(), "checkpointed on SIGTERM, the frozen app is killed: never 'Succeeded'")
	c.waitOutput("checkpointed on termination")
	dumped := readCounts(t, out)
	ids, err := checkpoint.List(r.dir("app"))
	require.NoError(t, err)
	require.Len(t, ids, 1, "one complete checkpoint")
	m, err := checkpoint.ReadManifest(ids[0].Path)
	require.NoError(t, err)
	assert.Equal(t, ReasonTermination, m.Reason)

	require.NoError(t, os.Remove(out))
	c2 := r.startPod("", map[string][]string{"app": {counterBin, out}})["app"]
	c2.waitOutput("restored; supervising the restored tree")
	again := waitCount(t, c2, out, len(dumped)+3)
	assert.True(t, isSequence(again), "the next pod continues from %d: %v", len(dumped), again)
	assert.Equal(t, 1.0, counterValue(t, r.agent.cfg.Metrics.RestoreResults.WithLabelValues("restored")))
	r.mu.Lock()
	delete(r.restore, wiring.AnnotationCheckpoint) // the next SIGTERM ends the app the plain way
	r.mu.Unlock()
	assert.Equal(t, 143, c2.stop())
}

// The webhook's record names the checkpoint of the last eviction; the pod was deleted later and
// checkpointed on termination. The next pod continues from the newer one, not the recorded one.
func TestNewerTerminationCheckpointWinsOverTheRecord(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	c, out := r.startCounter()
	evicted, _, _ := r.dumpFrozen("uid-e", out)
	require.True(t, r.agent.Delete("uid-e")) // the eviction was refused after all: the app runs on
	c.stop()
	_ = c

	r.withTerminationSpec("app")
	pod := r.restorePod(evicted.Containers[0].CheckpointID, map[string][]string{"app": {counterBin, out}})["app"]
	pod.waitOutput("restored; supervising the restored tree")
	waitCount(t, pod, out, len(readCounts(t, out))+5)
	assert.Equal(t, 143, pod.stop(), "checkpointed on termination")
	pod.waitOutput("checkpointed on termination")
	dumped := readCounts(t, out)

	require.NoError(t, os.Remove(out))
	next := r.restorePod(evicted.Containers[0].CheckpointID, map[string][]string{"app": {counterBin, out}})["app"]
	next.waitOutput("restored; supervising the restored tree")
	again := waitCount(t, next, out, len(dumped)+3)
	assert.True(t, isSequence(again), "continues from the termination checkpoint (%d), not the recorded one: %v", len(dumped), again)
	r.mu.Lock()
	delete(r.restore, wiring.AnnotationCheckpoint)
	r.mu.Unlock()
	assert.Equal(t, 143, next.stop())
}

// The same as above on a node whose clock was set back an hour after the eviction: the
// termination checkpoint's ID says it is an hour older than the recorded one. The generation
// (one more per commit on the volume) still makes it the newest, and the next pod continues from
// it instead of going back to the eviction's state.
func TestNewerCheckpointWinsWhenTheClockWasSetBack(t *testing.T) {
	var offset atomic.Int64
	r := newRig(t, Config{FreezeTimeout: time.Hour, Now: func() time.Time {
		return time.Now().Add(time.Duration(offset.Load()))
	}})
	r.serveLocal()
	c, out := r.startCounter()
	evicted, _, _ := r.dumpFrozen("uid-e", out)
	require.True(t, r.agent.Delete("uid-e"))
	c.stop()

	offset.Store(int64(-time.Hour))
	r.withTerminationSpec("app")
	recorded := evicted.Containers[0].CheckpointID
	pod := r.restorePod(recorded, map[string][]string{"app": {counterBin, out}})["app"]
	pod.waitOutput("restored; supervising the restored tree")
	waitCount(t, pod, out, len(readCounts(t, out))+5)
	assert.Equal(t, 143, pod.stop(), "checkpointed on termination")
	pod.waitOutput("checkpointed on termination")
	dumped := readCounts(t, out)
	l, err := checkpoint.List(r.dir("app"))
	require.NoError(t, err)
	require.Len(t, l, 2)
	require.Less(t, l[0].ID, recorded, "the termination checkpoint's ID sorts before the recorded one")
	m, err := checkpoint.ReadManifest(l[0].Path)
	require.NoError(t, err)
	assert.Equal(t, ReasonTermination, m.Reason, "listed first: its generation is higher")
	assert.Equal(t, uint64(2), m.Generation)

	require.NoError(t, os.Remove(out))
	next := r.restorePod(recorded, map[string][]string{"app": {counterBin, out}})["app"]
	next.waitOutput("restored; supervising the restored tree")
	again := waitCount(t, next, out, len(dumped)+3)
	assert.True(t, isSequence(again), "continues from the termination checkpoint (%d), not the recorded one: %v", len(dumped), again)
	assert.Contains(t, next.out.String(), `"checkpoint":"`+l[0].ID+`"`, "restored the termination checkpoint, never back to the eviction's")
	r.mu.Lock()
	delete(r.restore, wiring.AnnotationCheckpoint)
	r.mu.Unlock()
	assert.Equal(t, 143, next.stop())
}

func TestPickNewer(t *testing.T) {
	common := []checkpoint.Rank{{Generation: 3, ID: "20260101T000000.000Z-aa"}, {Generation: 2, ID: "20260101T100000.000Z-bb"}}
	assert.Equal(t, "20260101T000000.000Z-aa", pickNewer("20260101T100000.000Z-bb", common),
		"the recorded one is on the volume: the generation decides, not the later clock")
	assert.Equal(t, "20260101T000000.000Z-aa", pickNewer("", common), "no record: the newest on the volume")
	assert.Equal(t, "20270101T000000.000Z-cc", pickNewer("20270101T000000.000Z-cc", common),
		"a recorded ID missing from the volume has no generation: the time decides")
	assert.Equal(t, "20260101T000000.000Z-aa", pickNewer("20250101T000000.000Z-dd", common))
	assert.Equal(t, "x", pickNewer("x", nil))
	assert.Equal(t, "", pickNewer("", nil))
}

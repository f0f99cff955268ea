package agent

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/launcher"
	"github.com/stasis-k8s/stasis/wiring"
)

// nodePods is the container runtime's stand-in listing the node's wired pods (the unit tier runs
// no runtime; the real list is CRI ListPodSandbox, CRI.WiredPods).
type nodePods []WiredPod

func (n nodePods) WiredPods(context.Context) ([]WiredPod, error) { return n, nil }

// A pod that asks for periodic checkpoints is dumped on its schedule with the app left running;
// each dump's pause is measured. An eviction meanwhile does not join a periodic dump (the app
// would run on past its checkpoint): it dumps anew and leaves the app frozen.
func TestPeriodicCheckpointsLeaveTheAppRunning(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour, KeepOlder: 5})
	c, out := r.startCounter()
	spec := agentapi.CheckpointRequest{Interval: "1s", Containers: []agentapi.ContainerSpec{{Name: "app", Dir: r.dir("app")}}}
	b, err := json.Marshal(spec)
	require.NoError(t, err)
	pod := agentapi.PodRef{Namespace: "default", Name: "counter", UID: "uid-periodic"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.agent.RunPeriodic(ctx, nodePods{{Pod: pod, Annotations: map[string]string{wiring.AnnotationCheckpoint: string(b)}}}, 100*time.Millisecond)

	require.Eventually(t, func() bool {
		l, _ := checkpoint.List(r.dir("app"))
		return len(l) >= 2
	}, time.Minute, 100*time.Millisecond, "two periodic checkpoints")
	cancel()
	n := len(readCounts(t, out))
	waitCount(t, c, out, n+5) // it runs on
	root, err := appRoot(r.finder["app"])
	require.NoError(t, err)
	assert.False(t, launcher.Stopped(root))
	l, err := checkpoint.List(r.dir("app"))
	require.NoError(t, err)
	m, err := checkpoint.ReadManifest(l[0].Path)
	require.NoError(t, err)
	assert.Equal(t, ReasonPeriodic, m.Reason)
	assert.GreaterOrEqual(t, histogramCount(t, r.agent.cfg.Metrics.FreezeSeconds), uint64(2), "each dump's pause is measured")

	st := r.checkpoint(pod.UID, agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	assert.True(t, launcher.Stopped(root), "the eviction's checkpoint leaves the app frozen")
	assert.Equal(t, 143, c.stop())
}

func histogramCount(t *testing.T, h prometheus.Histogram) uint64 {
	var m dto.Metric
	require.NoError(t, h.Write(&m))
	return m.GetHistogram().GetSampleCount()
}

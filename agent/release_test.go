package agent

import (
	"context"
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
			r := newRig(t, Config{FreezeTimeout: time.Hour, ReleaseAfter: 2 * time.Second, Pods: pods})
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
		})
	}
}

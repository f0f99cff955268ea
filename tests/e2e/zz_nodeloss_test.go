//go:build e2e

package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/stasis-k8s/stasis/agent"
	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

// Node loss (issue 15), the last test of the tier (this file sorts last): it kills a node for
// good. An Indexed Job asks for periodic checkpoints; after two of them its node's kubelet,
// containerd, shims and containers are SIGKILLed together (no drain, no SIGTERM) and the Node is
// deleted, as a cloud node controller does. The replacement on the other node continues from the
// last periodic checkpoint found on the volume.
func TestZNodeLossRestoresPeriodicCheckpoint(t *testing.T) {
	ctx := context.Background()
	require.NotNil(t, env.Local, "needs the local cluster (it kills a node)")
	ns := newNamespace(t, "loss")
	_, err := env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, Indexed: true,
		Labels: map[string]string{"memverge.ai/checkpoint-interval": "10s"}, Args: []string{"--interval=300ms"}})
	require.NoError(t, err)
	pod, err := env.WaitJobPod(ctx, ns, "counter", 2*time.Minute)
	require.NoError(t, err)
	// Two periodic checkpoints (10 s apart) are complete once the pod has run 25 s.
	require.NoError(t, wait.PollUntilContextTimeout(ctx, time.Second, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		m, err := env.LatestManifest(ctx, pod)
		return err == nil && m.Reason == agent.ReasonPeriodic && time.Since(pod.CreationTimestamp.Time) > 25*time.Second, nil
	}), "periodic checkpoints of the running pod")
	before, err := env.Logs(ctx, ns, pod.Name)
	require.NoError(t, err)
	last, err := env.LatestManifest(ctx, pod)
	require.NoError(t, err)

	lost := pod.Spec.NodeName
	t0 := time.Now()
	for _, nd := range env.Local.Nodes {
		if nd.Name == lost {
			require.NoError(t, nd.Stop(), "kill node %s", lost)
		}
	}
	require.NoError(t, env.Client.CoreV1().Nodes().Delete(ctx, lost, metav1.DeleteOptions{}))
	next, err := env.WaitJobPod(ctx, ns, "counter", 4*time.Minute, pod)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, next.Name, 3, 2*time.Minute)
	require.NoError(t, err)
	t.Logf("node %s lost with the pod at %d; last periodic checkpoint %s (taken %s); replacement %s on %s printed %d first, %s after the loss",
		lost, before.Last(), last.ID, last.Dumped.Format(time.RFC3339), next.Name, next.Spec.NodeName, after.First(), time.Since(t0).Round(time.Second))
	assert.NotEqual(t, lost, next.Spec.NodeName)
	assert.Zero(t, after.FreshStarts, "continued from a periodic checkpoint, not started afresh")
	assert.Greater(t, after.First(), 10, "from a checkpoint taken after the app had run a while")
	assert.LessOrEqual(t, after.First(), before.Last()+1, "work since the last checkpoint is redone, none invented")
}

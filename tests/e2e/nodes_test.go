//go:build e2e

package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

// TestNodesRunLocalImages: the foundation of every scenario. Each node runs a pod from an image built
// on this machine (no registry), the pod becomes Ready and its app prints its numbers, and the
// pods of the two nodes live in the two nodes' pod subnets.
func TestNodesRunLocalImages(t *testing.T) {
	ns := newNamespace(t, "nodes")
	ctx := context.Background()
	for _, node := range env.Local.Nodes {
		t.Run(node.Name, func(t *testing.T) {
			name := "counter-" + node.Name
			t0 := time.Now()
			_, err := env.CreateCounterPod(ctx, ns, harness.CounterSpec{Name: name, NodeName: node.Name, Args: []string{"--interval=100ms"}})
			require.NoError(t, err)
			p, err := env.WaitPodReady(ctx, ns, name, 2*time.Minute)
			require.NoError(t, err)
			t.Logf("pod on %s Ready %s after creation, IP %s", node.Name, time.Since(t0).Round(time.Millisecond), p.Status.PodIP)
			assert.Equal(t, node.Name, p.Spec.NodeName)
			assert.True(t, inCIDR(p.Status.PodIP, node.PodCIDR), "pod IP %s outside %s", p.Status.PodIP, node.PodCIDR)
			out, err := env.WaitCount(ctx, ns, name, 3, time.Minute)
			require.NoError(t, err)
			assert.Equal(t, 0, out.First(), "a fresh counter starts at 0")
			assert.Equal(t, 1, out.FreshStarts)
		})
	}
}

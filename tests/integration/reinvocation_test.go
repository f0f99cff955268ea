//go:build integration

package integration

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/wiring"
)

// The real API server reviews a checkpoint-enabled pod with the pod webhook once, not twice
// (issue 13): the ServiceAccount plugin's pass after our webhook finds the token mount already on
// Stasis' init-container, so nothing changed after us and the API server does not reinvoke
// pods.stasis.dev (reinvocationPolicy IfNeeded). The stored pod has the token mounted exactly once
// in every container, as the plugin alone would have left it.
func TestOneReviewPerPod_NoKubelet(t *testing.T) {
	s := newScenario(t, "s-reinvoke", "a")
	pvc, pod := plainPodExample(t, s.nodes[0])
	_, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Create(s.ctx, pvc, metav1.CreateOptions{})
	require.NoError(t, err)
	before, err := webhookReviews("pod")
	require.NoError(t, err)
	created, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	require.NoError(t, err)
	after, err := webhookReviews("pod")
	require.NoError(t, err)
	assert.Equal(t, 1, after.minus(before).count(), "pod webhook reviews for one pod creation")

	require.NotEmpty(t, created.Spec.InitContainers)
	require.Equal(t, wiring.ToolsInitContainer, created.Spec.InitContainers[0].Name)
	for _, c := range append(created.Spec.InitContainers, created.Spec.Containers...) {
		n := 0
		for _, m := range c.VolumeMounts {
			if m.MountPath == "/var/run/secrets/kubernetes.io/serviceaccount" {
				n++
			}
		}
		assert.Equal(t, 1, n, "container %s: the API token mounted once", c.Name)
	}
}

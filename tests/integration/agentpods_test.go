//go:build integration

package integration

import (
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/stasis-k8s/stasis/agent"
	"github.com/stasis-k8s/stasis/agentapi"
)

// The agent's view of whether a frozen app's pod is being deleted (it thaws the app when not),
// against the real API server: a pod that stays, a pod whose deletion started (a finalizer holds
// it), a pod gone, and a new pod under the old name.
func TestAgentSeesPodDeletion_NoKubelet(t *testing.T) {
	s := newScenario(t, "agent-pods")
	ev, err := agent.NewKubeEvents(env.cluster.Kubeconfig(), "node-a", zerolog.Nop())
	require.NoError(t, err)
	pods, ok := ev.(agent.PodStates)
	require.True(t, ok, "the agent's API client answers pod states")

	create := func() *corev1.Pod {
		p, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "app", Finalizers: []string{"stasis.dev/test-hold"}},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "busybox"}}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		return p
	}
	deleting := func(p *corev1.Pod) bool {
		d, err := pods.Deleting(s.ctx, agentapi.PodRef{Namespace: p.Namespace, Name: p.Name, UID: string(p.UID)})
		require.NoError(t, err)
		return d
	}
	release := func(p *corev1.Pod) {
		patch := []byte(`{"metadata":{"finalizers":null}}`)
		_, err := s.c.CoreV1().Pods(s.ns).Patch(s.ctx, p.Name, types.MergePatchType, patch, metav1.PatchOptions{})
		require.NoError(t, err)
	}

	p := create()
	assert.False(t, deleting(p), "a pod that stays")
	require.NoError(t, s.c.CoreV1().Pods(s.ns).Delete(s.ctx, p.Name, metav1.DeleteOptions{}))
	assert.True(t, deleting(p), "deletion started (deletionTimestamp set, a finalizer holds it)")
	release(p)
	s.waitGone(p.Name, string(p.UID))
	assert.True(t, deleting(p), "the pod is gone")

	p2 := create()
	t.Cleanup(func() { release(p2) })
	assert.True(t, deleting(p), "the old pod's name belongs to a new pod now")
	assert.False(t, deleting(p2), "the new pod stays")
}

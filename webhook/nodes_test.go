package webhook

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	corev1listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/stasis-k8s/stasis/tests/fakeagent"
)

func node(name string, ready corev1.ConditionStatus) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if ready != "" {
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: ready, Reason: "NodeStatusUnknown", Message: "Kubelet stopped posting node status."}}
	}
	return n
}

// An eviction from a NotReady or gone node is allowed at once, without asking the agent, with a
// warning and an Event that say the pod continues from its last checkpoint; a Ready node, and a
// node not in the cache that a live read finds, are checkpointed as usual.
func TestEvictionFromNotReadyNode(t *testing.T) {
	tests := []struct {
		name      string
		cached    *corev1.Node // in the Node cache
		live      *corev1.Node // only in the API server
		wantAllow bool         // allowed without a dump
		warning   string
	}{
		{name: "Ready: dumped", cached: node("node-1", corev1.ConditionTrue)},
		{name: "NotReady (Unknown): allowed with an Event", cached: node("node-1", corev1.ConditionUnknown), wantAllow: true, warning: "node node-1 is NotReady since"},
		{name: "NotReady (False): allowed with an Event", cached: node("node-1", corev1.ConditionFalse), wantAllow: true, warning: "node node-1 is NotReady since"},
		{name: "gone: allowed with an Event", wantAllow: true, warning: "node node-1 is gone"},
		{name: "not cached yet, Ready in the API server: dumped", live: node("node-1", corev1.ConditionTrue)},
		{name: "no Ready condition yet (registering): dumped", cached: node("node-1", "")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nodes := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
			if tt.cached != nil {
				require.NoError(t, nodes.Add(tt.cached))
			}
			objs := []runtime.Object{userPVC("ckpt-pvc")}
			if tt.live != nil {
				objs = append(objs, tt.live)
			}
			e := newEnv(t, Config{WaitBudget: 10e9}, objs, func(_ *Config, d *Deps) { d.Nodes = corev1listers.NewNodeLister(nodes) })
			e.addPods(runningPod())
			e.agent.SetScript("default", "app", fakeagent.Script{Polls: 1, Bytes: 1 << 20})
			code, body := e.post(PathEviction, fixture(t, "eviction-v1.json"))
			require.Equal(t, http.StatusOK, code)
			assert.Contains(t, body, `"allowed":true`)
			if !tt.wantAllow {
				assert.Len(t, e.agent.Requests(), 1, "the agent is asked")
				return
			}
			assert.Empty(t, e.agent.Requests(), "a NotReady node's agent is not asked")
			assert.Contains(t, body, tt.warning)
			assert.Contains(t, body, "evicted without checkpoint; the replacement continues from the last complete checkpoint")
			assert.True(t, containsEvent(e.drainEvents(), "Warning "+ReasonNodeNotReady+" evicted without checkpoint: "+tt.warning), "%v", e.events)
		})
	}
}

package webhook

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/stasis-k8s/stasis/agentapi"
)

func TestPodLocator(t *testing.T) {
	agent := func(name, node, ip string, ready bool, mod ...func(*corev1.Pod)) *corev1.Pod {
		st := corev1.ConditionFalse
		if ready {
			st = corev1.ConditionTrue
		}
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "stasis-system", Labels: map[string]string{"app": "stasis-agent"}},
			Spec: corev1.PodSpec{NodeName: node},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip,
				Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: st}}}}
		for _, m := range mod {
			m(p)
		}
		return p
	}
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, p := range []*corev1.Pod{
		agent("a1", "node-1", "10.0.0.5", true),
		agent("a2", "node-2", "10.0.1.5", false),
		agent("a3", "node-3", "fd00::7", true),
		agent("a4", "node-4", "10.0.3.5", true, func(p *corev1.Pod) { p.Labels = map[string]string{"app": "other"} }),
		agent("a5", "node-5", "10.0.4.5", true, func(p *corev1.Pod) { p.DeletionTimestamp = &metav1.Time{} }),
	} {
		require.NoError(t, idx.Add(p))
	}
	l := PodLocator{Pods: corev1listers.NewPodLister(idx).Pods("stasis-system"), Selector: mustSelector("app=stasis-agent"), Port: 9443}
	tests := []struct{ node, url, err string }{
		{"node-1", "https://10.0.0.5:9443", ""},
		{"node-2", "", "no ready Stasis agent on node node-2 (selector app=stasis-agent)"},
		{"node-3", "https://[fd00::7]:9443", ""},
		{"node-4", "", "no ready Stasis agent on node node-4"},
		{"node-5", "", "no ready Stasis agent on node node-5"},
		{"", "", "pod is not scheduled to a node"},
	}
	for _, tt := range tests {
		u, err := l.URL(tt.node)
		if tt.err != "" {
			assert.ErrorContains(t, err, tt.err, tt.node)
			continue
		}
		require.NoError(t, err)
		assert.Equal(t, tt.url, u)
	}
	u, _ := StaticLocator("https://127.0.0.1:1").URL("any")
	assert.Equal(t, "https://127.0.0.1:1", u)
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1288490189: "1.2 GiB", 3 << 20: "3.0 MiB", 5 << 40: "5.0 TiB"} {
		assert.Equal(t, want, agentapi.HumanBytes(n))
	}
}

package webhook

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	klabels "k8s.io/apimachinery/pkg/labels"
	corev1listers "k8s.io/client-go/listers/core/v1"

	"github.com/stasis-k8s/stasis/webhook/catalog"
)

// countingPods counts the passes over a namespace's pods.
type countingPods struct {
	corev1listers.PodLister
	lists int
}

func (c *countingPods) Pods(ns string) corev1listers.PodNamespaceLister {
	return countingNS{c.PodLister.Pods(ns), c}
}

type countingNS struct {
	corev1listers.PodNamespaceLister
	c *countingPods
}

func (n countingNS) List(s klabels.Selector) ([]*corev1.Pod, error) {
	n.c.lists++
	return n.PodNamespaceLister.List(s)
}

// The holders of a claim are read in one pass over the namespace's pods, whatever the number of
// slots asked about; a succeeded pod is told apart from a live and a failed one.
func TestClaimHoldersOnePass(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	pod := func(i int, phase corev1.PodPhase) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("p%d", i), Namespace: "ns",
			Annotations: map[string]string{catalog.AnnotationClaim: fmt.Sprintf("t%d", i)}}, Status: corev1.PodStatus{Phase: phase}}
	}
	for i := range 300 {
		e.addPods(pod(i, corev1.PodRunning))
	}
	e.addPods(pod(1000, corev1.PodSucceeded), pod(1001, corev1.PodFailed))
	counting := &countingPods{PodLister: e.wh.d.Pods}
	e.wh.d.Pods = counting
	h := newClaimHolders(e.wh)
	for i := range 300 {
		assert.Equal(t, catalog.Holder{Live: true, Seen: true}, h.Holder("ns", fmt.Sprintf("t%d", i)))
	}
	assert.Equal(t, catalog.Holder{Seen: true, Succeeded: true}, h.Holder("ns", "t1000"))
	assert.Equal(t, catalog.Holder{Seen: true}, h.Holder("ns", "t1001"))
	assert.Equal(t, catalog.Holder{}, h.Holder("ns", "unknown"), "not seen: maybe still in admission")
	assert.Equal(t, 1, counting.lists, "one pass for 303 questions")
}

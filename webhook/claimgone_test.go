package webhook

import (
	"testing"

	"github.com/stretchr/testify/assert"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/stasis-k8s/stasis/webhook/catalog"
)

// A NonIndexed Job pod deleted (kubectl delete, checkpointed on SIGTERM): its token is known gone
// at once, so its replacement takes its slot (and checkpoint) instead of waiting out the claim
// grace that covers pods still in admission.
func TestGoneClaims(t *testing.T) {
	var g goneClaims
	h := g.Handler()
	pod := func(token string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{catalog.AnnotationClaim: token}}}
	}
	h.OnDelete(pod("tok-1"))
	h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/p", Obj: pod("tok-2")})
	h.OnDelete(&corev1.Pod{}) // no claim
	assert.True(t, g.gone("tok-1"))
	assert.True(t, g.gone("tok-2"), "a deletion the informer missed is still seen")
	assert.False(t, g.gone("tok-3"), "a pod never seen deleted may still be in admission")
}

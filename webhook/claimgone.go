package webhook

import (
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/stasis-k8s/stasis/webhook/catalog"
)

// goneClaims remembers the claim tokens of pods the informer saw deleted. A NonIndexed Job's
// replacement is admitted once its predecessor is gone from the API; without this, the gone pod's
// claim would look like one whose pod is still in admission (not seen yet) and keep the slot, and
// its checkpoint, from the replacement until the claim grace ran out.
type goneClaims struct {
	mu     sync.Mutex
	tokens map[string]time.Time // token → when its pod was deleted
}

// goneClaimsFor is how long a token is remembered: longer than any claim grace.
const goneClaimsFor = 10 * time.Minute

// Handler records the claim token of every pod deleted (add it to the pod informer).
func (g *goneClaims) Handler() cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{DeleteFunc: func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		p, ok := obj.(*corev1.Pod)
		if !ok || p.Annotations[catalog.AnnotationClaim] == "" {
			return
		}
		g.mu.Lock()
		defer g.mu.Unlock()
		if g.tokens == nil {
			g.tokens = map[string]time.Time{}
		}
		now := time.Now()
		g.tokens[p.Annotations[catalog.AnnotationClaim]] = now
		for tok, at := range g.tokens {
			if now.Sub(at) > goneClaimsFor {
				delete(g.tokens, tok)
			}
		}
	}}
}

// gone reports whether the pod holding token was seen deleted.
func (g *goneClaims) gone(token string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	_, ok := g.tokens[token]
	return ok
}

package webhook

import (
	"context"
	"fmt"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/webhook/inject"
)

// The Job controller marks each pod of an Indexed Job with its completion index (annotation
// always, label since Kubernetes 1.28).
const jobCompletionIndex = "batch.kubernetes.io/job-completion-index"

// identity is the key of a pod's checkpoints, stable across re-creation of the pod.
type identity struct {
	// Key is the identity; empty when Claim is set.
	Key string
	// ClaimBase is set for NonIndexed Job pods: the identity is a slot claimed under it.
	ClaimBase string
	// Owner is the controller that owns Stasis-created PVCs; nil for plain pods.
	Owner *metav1.OwnerReference
	// What describes the workload for messages ("Job ns/name index 3").
	What string
}

// unsupportedError is a pod whose owner Stasis cannot give a stable identity.
type unsupportedError struct{ msg string }

func (e *unsupportedError) Error() string { return e.msg }

func unsupported(format string, a ...any) error {
	return &unsupportedError{msg: fmt.Sprintf(format, a...) +
		"; Stasis supports plain pods, Jobs, StatefulSets and single-replica Deployments/ReplicaSets"}
}

// resolveIdentity decides a pod's checkpoint identity from its controller:
//
//	plain pod                    pod/<ns>/<name>          (the re-created pod must use the same name)
//	Indexed Job                  job/<ns>/<job>/<index>
//	NonIndexed Job               job/<ns>/<job>/slot/<name>  (claimed: see catalog.Claim)
//	StatefulSet                  sts/<ns>/<pod name>      (pod names are stable ordinals)
//	Deployment with 1 replica    deploy/<ns>/<name>
//	ReplicaSet with 1 replica    rs/<ns>/<name>           (not owned by a Deployment)
//
// The same function decides the identity at creation and re-derives it at eviction and suspend
// (checkpointIdentity): nothing a pod says about its own identity is trusted.
func (w *Webhook) resolveIdentity(ctx context.Context, ns string, pod *corev1.Pod) (identity, error) {
	return w.deriveIdentity(ctx, w.pod, ns, pod, true)
}

// deriveIdentity is resolveIdentity; admission (creating) also refuses owners whose pods have no
// stable identity (replica counts). A running pod keeps the identity it was created with even if
// its Deployment is being scaled.
func (w *Webhook) deriveIdentity(ctx context.Context, l lane, ns string, pod *corev1.Pod, creating bool) (identity, error) {
	ref := metav1.GetControllerOf(pod)
	if ref == nil {
		if pod.Name == "" {
			return identity{}, unsupported("pod without a controller has no metadata.name (only generateName): a re-created pod could never find its checkpoint")
		}
		return identity{Key: fmt.Sprintf("pod/%s/%s", ns, pod.Name), What: fmt.Sprintf("pod %s/%s", ns, pod.Name)}, nil
	}
	owner := *ref
	switch {
	case ref.Kind == "Job" && isGroup(ref.APIVersion, "batch"):
		idx := pod.Annotations[jobCompletionIndex]
		if idx == "" {
			idx = pod.Labels[jobCompletionIndex]
		}
		if idx != "" {
			return identity{Key: fmt.Sprintf("job/%s/%s/%s", ns, ref.Name, idx), Owner: &owner,
				What: fmt.Sprintf("Job %s/%s index %s", ns, ref.Name, idx)}, nil
		}
		return identity{ClaimBase: fmt.Sprintf("job/%s/%s/slot", ns, ref.Name), Owner: &owner,
			What: fmt.Sprintf("Job %s/%s", ns, ref.Name)}, nil
	case ref.Kind == "StatefulSet" && isGroup(ref.APIVersion, "apps"):
		if pod.Name == "" {
			return identity{}, unsupported("StatefulSet %s pod has no name", ref.Name)
		}
		return identity{Key: fmt.Sprintf("sts/%s/%s", ns, pod.Name), Owner: &owner,
			What: fmt.Sprintf("StatefulSet %s/%s pod %s", ns, ref.Name, pod.Name)}, nil
	case ref.Kind == "ReplicaSet" && isGroup(ref.APIVersion, "apps"):
		rs, err := l.replicaSet(ctx, ns, ref.Name)
		if err != nil {
			return identity{}, fmt.Errorf("reading ReplicaSet %s/%s: %w", ns, ref.Name, err)
		}
		if r := replicas(rs.Spec.Replicas); creating && r != 1 {
			return identity{}, unsupported("ReplicaSet %s/%s has %d replicas: its pods have no stable identity", ns, ref.Name, r)
		}
		if dref := metav1.GetControllerOf(rs); dref != nil && dref.Kind == "Deployment" {
			d, err := l.deployment(ctx, ns, dref.Name)
			if err != nil {
				return identity{}, fmt.Errorf("reading Deployment %s/%s: %w", ns, dref.Name, err)
			}
			if r := replicas(d.Spec.Replicas); creating && r != 1 {
				return identity{}, unsupported("Deployment %s/%s has %d replicas: its pods have no stable identity", ns, d.Name, r)
			}
			downer := *dref
			return identity{Key: fmt.Sprintf("deploy/%s/%s", ns, d.Name), Owner: &downer,
				What: fmt.Sprintf("Deployment %s/%s", ns, d.Name)}, nil
		}
		return identity{Key: fmt.Sprintf("rs/%s/%s", ns, ref.Name), Owner: &owner,
			What: fmt.Sprintf("ReplicaSet %s/%s", ns, ref.Name)}, nil
	default:
		return identity{}, unsupported("pods owned by %s %s are not supported", ref.Kind, ref.Name)
	}
}

// checkpointIdentity is the identity under which a running pod is checkpointed (eviction, Job
// suspend). It is re-derived from the owner chain with the function used at creation, and must equal
// the identity the webhook wrote into the pod's (immutable) spec then: an owner reference, completion
// index or name changed since (metadata is mutable) would otherwise redirect the checkpoint to
// another identity. A NonIndexed Job slot is the result of a claim, not derivable: it must be a
// slot of the pod's Job, and the catalog's claim on it must carry the pod's token.
func (w *Webhook) checkpointIdentity(ctx context.Context, pod *corev1.Pod, cfg *labels.Config) (string, error) {
	spec := inject.SpecIdentity(pod, cfg)
	id, err := w.deriveIdentity(ctx, w.evict, pod.Namespace, pod, false)
	if err != nil {
		return "", fmt.Errorf("deriving the checkpoint identity of pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	if id.ClaimBase == "" {
		if spec != id.Key {
			return "", fmt.Errorf("pod %s/%s was wired as %q but its owner and name now give %q (metadata changed since creation); not checkpointed",
				pod.Namespace, pod.Name, spec, id.Key)
		}
		return id.Key, nil
	}
	if !strings.HasPrefix(spec, id.ClaimBase+"/") {
		return "", fmt.Errorf("pod %s/%s was wired as %q, which is not a slot of %s; not checkpointed", pod.Namespace, pod.Name, spec, id.What)
	}
	pvc, err := checkpointPVC(pod, cfg)
	if err != nil {
		return "", err
	}
	if err := w.verifyClaim(ctx, pod.Namespace, pvc, spec, pod.Annotations[catalog.AnnotationClaim]); err != nil {
		return "", fmt.Errorf("pod %s/%s: %w; not checkpointed", pod.Namespace, pod.Name, err)
	}
	return spec, nil
}

// verifyClaim checks that the catalog's claim on slot (on PVC ns/pvc) carries token: from the
// cache, and live (once) when the cache disagrees, since the claim may have been written by the
// PVC controller a moment ago.
func (w *Webhook) verifyClaim(ctx context.Context, ns, pvc, slot, token string) error {
	var err error
	for _, live := range []bool{false, true} {
		var p *corev1.PersistentVolumeClaim
		if p, err = w.evict.store.PVC(ctx, ns, pvc, live); err != nil {
			err = fmt.Errorf("reading the claim on %s from PVC %s/%s: %w", slot, ns, pvc, err)
			continue
		}
		if c, ok := catalog.ClaimOf(p, slot); ok && token != "" && c.Token == token {
			return nil
		}
		err = fmt.Errorf("%s: the catalog's claim on %s (PVC %s/%s) is not this pod's", catalog.AnnotationClaim, slot, ns, pvc)
	}
	return err
}

func replicas(r *int32) int32 {
	if r == nil {
		return 1
	}
	return *r
}

func isGroup(apiVersion, group string) bool {
	return len(apiVersion) > len(group) && apiVersion[:len(group)+1] == group+"/"
}

// claimHolders answers catalog.Holders from the pod informer: one pass over a namespace's pods,
// made when first asked, answers every slot of a claim (a pass per slot would cost slots × pods
// for a Job of thousands of pods).
type claimHolders struct {
	w    *Webhook
	mu   sync.Mutex
	byNS map[string]map[string]catalog.Holder // namespace → token → holder
}

func newClaimHolders(w *Webhook) *claimHolders { return &claimHolders{w: w} }

func (h *claimHolders) Holder(ns, token string) catalog.Holder {
	h.mu.Lock()
	defer h.mu.Unlock()
	idx, ok := h.byNS[ns]
	if !ok {
		idx = h.index(ns)
		if h.byNS == nil {
			h.byNS = map[string]map[string]catalog.Holder{}
		}
		h.byNS[ns] = idx
	}
	got := idx[token]
	// A pod the informer saw deleted is no pod in admission: its slot is free now.
	got.Seen = got.Seen || h.w.gone.gone(token)
	return got
}

// index maps every claim token in ns to what its pods say.
func (h *claimHolders) index(ns string) map[string]catalog.Holder {
	idx := map[string]catalog.Holder{}
	pods, err := h.w.d.Pods.Pods(ns).List(everything())
	if err != nil {
		return idx
	}
	for _, p := range pods {
		token := p.Annotations[catalog.AnnotationClaim]
		if token == "" {
			continue
		}
		got := idx[token]
		got.Seen = true
		switch {
		case p.Status.Phase == corev1.PodSucceeded:
			got.Succeeded = true
		case p.DeletionTimestamp == nil && p.Status.Phase != corev1.PodFailed:
			got.Live = true
		}
		idx[token] = got
	}
	return idx
}

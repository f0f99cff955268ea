package webhook

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	klabels "k8s.io/apimachinery/pkg/labels"
)

// Skipping the dump is right only when the API server will certainly refuse the eviction after
// the webhooks: then a dump would freeze the app for nothing. When it might allow it, skipping
// would lose the app's progress, so the webhook dumps (and the agent thaws the app soon after if
// the eviction is refused in the end). The decision mirrors the eviction subresource
// (pkg/registry/core/pod/storage/eviction.go) on budgets read fresh from the API server, not
// from the cache, whose status may lag.

// certainRefusal names why the API server will refuse evicting pod ("" when it may allow it).
func certainRefusal(pod *corev1.Pod, pdbs []policyv1.PodDisruptionBudget) string {
	var matching []policyv1.PodDisruptionBudget
	for _, pdb := range pdbs {
		if pdb.Spec.Selector == nil {
			continue
		}
		sel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
		if err == nil && !sel.Empty() && sel.Matches(klabels.Set(pod.Labels)) {
			matching = append(matching, pdb)
		}
	}
	switch {
	case len(matching) == 0:
		return ""
	case len(matching) > 1:
		return fmt.Sprintf("%d PodDisruptionBudgets select the pod (the eviction API refuses that)", len(matching))
	}
	pdb := matching[0]
	switch {
	case pdb.Status.ObservedGeneration < pdb.Generation:
		return fmt.Sprintf("PodDisruptionBudget %s is still being processed", pdb.Name)
	case !podIsReady(pod):
		// An unhealthy pod: AlwaysAllow evicts it whatever the budget; IfHealthyBudget when the
		// budget is healthy.
		policy := pdb.Spec.UnhealthyPodEvictionPolicy
		if (policy != nil && *policy == policyv1.AlwaysAllow) || pdb.Status.CurrentHealthy >= pdb.Status.DesiredHealthy {
			return ""
		}
		return fmt.Sprintf("PodDisruptionBudget %s is unhealthy (%d of %d healthy) and the pod is not ready", pdb.Name, pdb.Status.CurrentHealthy, pdb.Status.DesiredHealthy)
	case pdb.Status.DisruptionsAllowed <= 0:
		return fmt.Sprintf("PodDisruptionBudget %s allows no disruption", pdb.Name)
	}
	return ""
}

func podIsReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// refusedByBudget reads the pod's budgets: from the cache first (no budget selecting the pod: no
// call), then fresh, once, under the review's deadline. A failed read is no certainty: dump.
func (w *Webhook) refusedByBudget(ctx context.Context, pod *corev1.Pod) string {
	cached, err := w.d.PDBs.PodDisruptionBudgets(pod.Namespace).List(klabels.Everything())
	if err != nil {
		return ""
	}
	var maybe []policyv1.PodDisruptionBudget
	for _, p := range cached {
		maybe = append(maybe, *p)
	}
	if len(maybe) == 0 {
		return ""
	}
	fresh, err := w.evict.client.PolicyV1().PodDisruptionBudgets(pod.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return ""
	}
	return certainRefusal(pod, fresh.Items)
}

package webhook

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A node that is NotReady (its kubelet stopped posting status: the node is down, partitioned or
// its kubelet dead) or gone cannot be checkpointed: nothing on it can be reached, or what can be
// reached (an agent still running behind a dead kubelet) cannot be relied on to stop the app the
// kubelet no longer manages. Holding the eviction would only stall the drain, and Cluster
// Autoscaler or the node lifecycle controller would delete the pod anyway. The eviction is
// allowed with a Warning Event: the pod's replacement continues from its last complete
// checkpoint (periodic, or an earlier eviction's), and the progress since then is lost.
// Documented in docs/webhook.md ("Nodes that are NotReady or gone").

// ReasonNodeNotReady is the Event of an eviction allowed without a checkpoint because the pod's
// node is NotReady or gone.
const ReasonNodeNotReady = "CheckpointNodeNotReady"

// nodeLost reports why the pod's node cannot be checkpointed ("" when it can, or when the
// webhook has no node cache). Read from the Node informer: no API call in the review.
func (w *Webhook) nodeLost(ctx context.Context, pod *corev1.Pod) string {
	if w.d.Nodes == nil || pod.Spec.NodeName == "" {
		return ""
	}
	n, err := w.d.Nodes.Get(pod.Spec.NodeName)
	if apierrors.IsNotFound(err) {
		// Not in the cache: gone, or registered a moment ago. One live read tells.
		n, err = w.evict.client.CoreV1().Nodes().Get(ctx, pod.Spec.NodeName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return fmt.Sprintf("node %s is gone", pod.Spec.NodeName)
		}
	}
	if err != nil {
		return "" // unknown: ask the agent, whose answer (or absence) decides
	}
	for _, c := range n.Status.Conditions {
		if c.Type != corev1.NodeReady {
			continue
		}
		if c.Status == corev1.ConditionTrue {
			return ""
		}
		return fmt.Sprintf("node %s is NotReady since %s (%s: %s)", n.Name, c.LastTransitionTime.UTC().Format(time.RFC3339), c.Reason, c.Message)
	}
	return "" // no Ready condition yet: a node just registering; ask its agent
}

// withoutLostNodes drops the targets on NotReady or gone nodes, with an Event on each: a suspend
// is not held for pods that cannot be checkpointed, as an eviction is not (nodeLost).
func (w *Webhook) withoutLostNodes(ctx context.Context, targets []target) []target {
	out := targets[:0:0]
	for _, t := range targets {
		if why := w.nodeLost(ctx, t.pod); why != "" {
			w.d.Events.Eventf(t.pod, corev1.EventTypeWarning, ReasonNodeNotReady,
				"not checkpointed: %s, the pod cannot be checkpointed; its replacement continues from its last complete checkpoint", why)
			continue
		}
		out = append(out, t)
	}
	return out
}

package webhook

import (
	"fmt"
	"net/http"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/wiring"
)

// ReasonWaitingForPreviousPod is the Event of a ReplicaSet whose new pod waits for the previous
// pod of its identity to end.
const ReasonWaitingForPreviousPod = "WaitingForPreviousPod"

// terminationSlack is how long after its grace period a terminating pod is still waited for: the
// kubelet kills it at the end of the grace period, and its status takes a moment to arrive. A pod
// older than that is on a node that is gone or not reporting: nothing of it can be saved any more,
// and waiting would hold its replacement for as long as the node stays away.
const terminationSlack = 10 * time.Second

// previousCopy holds the creation of a ReplicaSet's pod (a one-replica Deployment or ReplicaSet)
// while the previous pod of the same identity is still terminating: answered 429 with a
// Retry-After, which the ReplicaSet controller's client retries. A ReplicaSet replaces a deleted
// pod at once (`kubectl delete pod`, an eviction, a node drain), without waiting for its end,
// unlike a Job (podReplacementPolicy Failed, set by the Job webhook) or a StatefulSet (same pod
// name). The old pod's checkpoint on SIGTERM is still being written then: a replacement started
// meanwhile would restore an older checkpoint, or none, and run beside the old copy on one volume.
// A rollout is covered by the Recreate strategy (deploymutate.go); this covers the rest.
//
// Only a terminating pod within its grace period (plus terminationSlack) is waited for: a pod not
// being deleted is never another copy of a one-replica ReplicaSet (a surge would be, but refusing
// it would stall the rollout), and one past its grace period is lost with its node.
func (w *Webhook) previousCopy(ns string, pod *corev1.Pod, id identity) *verdict {
	if !strings.HasPrefix(id.Key, "deploy/") && !strings.HasPrefix(id.Key, "rs/") {
		return nil
	}
	pods, err := w.d.Pods.Pods(ns).List(everything())
	if err != nil {
		return nil
	}
	now := w.d.Now()
	for _, p := range pods {
		if p.Annotations[wiring.AnnotationIdentity] != id.Key || p.DeletionTimestamp == nil ||
			p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		// DeletionTimestamp is the end of the pod's grace period, set when its deletion began.
		if now.After(p.DeletionTimestamp.Add(terminationSlack)) {
			continue
		}
		left := max(p.DeletionTimestamp.Sub(now), 0)
		msg := fmt.Sprintf("the previous pod %s of %s is still terminating (its checkpoint on termination is being taken; grace period ends in %s): "+
			"this pod is created once it has ended, so that it continues from that checkpoint and never runs beside it",
			p.Name, id.What, left.Round(time.Second))
		w.podEvent(ns, pod, corev1.EventTypeNormal, ReasonWaitingForPreviousPod, "%s", msg)
		v := deny(http.StatusTooManyRequests, metav1.StatusReasonTooManyRequests, "stasis: %s", msg)
		v.RetryAfter = 1
		return &v
	}
	return nil
}

package webhook

import (
	"context"
	"fmt"
	"slices"

	"github.com/slok/kubewebhook/v2/pkg/model"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/inject"
)

// validateEviction is CREATE pods/eviction (policy/v1 and policy/v1beta1 Evictions decode into
// the same struct). The request carries the Eviction, not the pod: the pod comes from the
// informer cache.
func (w *Webhook) validateEviction(ctx context.Context, rv *review) verdict {
	return w.evictionVerdict(ctx, &rv.AdmissionReview, rv.obj.(*policyv1.Eviction))
}

// DryRunEviction: `kubectl drain --dry-run=server` sends request.dryRun=false and puts the dry
// run in the Eviction's deleteOptions; both mean "trigger nothing".
func DryRunEviction(requestDryRun bool, ev *policyv1.Eviction) bool {
	return requestDryRun || (ev != nil && ev.DeleteOptions != nil && slices.Contains(ev.DeleteOptions.DryRun, metav1.DryRunAll))
}

func (w *Webhook) evictionVerdict(ctx context.Context, ar *model.AdmissionReview, ev *policyv1.Eviction) verdict {
	ns, name := ar.Namespace, ar.Name
	if ev != nil {
		if name == "" {
			name = ev.Name
		}
		if ns == "" {
			ns = ev.Namespace
		}
	}
	pod, err := w.d.Pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return allow("pod is not checkpoint-enabled")
	}
	if err != nil {
		return allow("", fmt.Sprintf("stasis: pod %s/%s not readable from cache: %v; not checkpointed", ns, name, err))
	}
	if !labels.Enabled(w.cfg.LabelPrefix, pod.Labels, pod.Annotations) {
		return allow("pod is not checkpoint-enabled")
	}
	if pod.DeletionTimestamp != nil || pod.Status.Phase != corev1.PodRunning {
		return allow(fmt.Sprintf("pod is %s: nothing to checkpoint", podState(pod)))
	}
	cfg, err := labels.ParsePod(w.cfg.LabelPrefix, pod)
	if err != nil {
		return w.failed(pod, "eviction", fmt.Sprintf("checkpoint configuration of pod %s/%s is invalid: %v", ns, name, err))
	}
	// Wired or not is read from the spec (immutable, written by the pod webhook), never from the
	// annotations anyone who may patch the pod can change.
	if inject.SpecIdentity(pod, cfg) == "" {
		w.d.Events.Eventf(pod, corev1.EventTypeWarning, ReasonCheckpointSkipped,
			"evicted without checkpoint: the pod was not wired by Stasis at creation (created before the webhook was installed?)")
		return allow("", "stasis: pod was not wired at creation; evicted without checkpoint")
	}
	identity, err := w.checkpointIdentity(ctx, pod, cfg)
	if err != nil {
		return w.failed(pod, "eviction", err.Error())
	}
	if DryRunEviction(ar.DryRun, ev) {
		return allow("dry run: no checkpoint taken")
	}
	if why := w.nodeLost(ctx, pod); why != "" {
		w.d.Events.Eventf(pod, corev1.EventTypeWarning, ReasonNodeNotReady,
			"evicted without checkpoint: %s, the pod cannot be checkpointed; its replacement continues from its last complete checkpoint", why)
		return allow("", fmt.Sprintf("stasis: %s: evicted without checkpoint; the replacement continues from the last complete checkpoint", why))
	}
	if why := w.refusedByBudget(ctx, pod); why != "" {
		// The API server refuses this eviction itself (429): freezing the pod for a dump that
		// cannot lead to an eviction would only stall it.
		w.d.Events.Eventf(pod, corev1.EventTypeNormal, ReasonCheckpointSkipped, "eviction not checkpointed: %s", why)
		return allow(why + "; left to the API server")
	}
	return w.checkpointAll(ctx, "eviction", "eviction", nil, ns+"/"+name, []target{{pod: pod, cfg: cfg, identity: identity}})
}

// failed applies the failure policy to a problem found before asking an agent.
func (w *Webhook) failed(pod *corev1.Pod, what, msg string) verdict {
	w.metrics.failures.WithLabelValues(what, w.cfg.FailurePolicy).Inc()
	if w.cfg.FailurePolicy == FailOpen {
		w.d.Events.Eventf(pod, corev1.EventTypeWarning, ReasonCheckpointFailed, "%s; allowed (%s): progress will be lost", msg, FailOpen)
		return allow("", msg+"; allowed by failure policy fail-open: progress will be lost")
	}
	w.d.Events.Eventf(pod, corev1.EventTypeWarning, ReasonCheckpointFailed, "%s; %s refused (%s)", msg, what, FailClosed)
	return deny(403, metav1.StatusReasonForbidden, "%s (failure policy %s)", msg, FailClosed)
}

func podState(pod *corev1.Pod) string {
	if pod.DeletionTimestamp != nil {
		return "terminating"
	}
	if pod.Status.Phase == "" {
		return "not yet running"
	}
	return string(pod.Status.Phase)
}

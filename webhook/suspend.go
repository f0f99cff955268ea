package webhook

import (
	"context"
	"fmt"

	"github.com/slok/kubewebhook/v2/pkg/model"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/inject"
)

// validateJobSuspend is UPDATE jobs. The configuration's matchConditions already limit calls to
// spec.suspend turning true on Jobs with a checkpoint-enabled template; the same test is repeated
// here so that a configuration without them stays correct.
func (w *Webhook) validateJobSuspend(ctx context.Context, rv *review) verdict {
	return w.suspendVerdict(ctx, &rv.AdmissionReview, rv.old.(*batchv1.Job), rv.obj.(*batchv1.Job))
}

// SuspendTransition reports whether an update suspends a running Job.
func SuspendTransition(old, job *batchv1.Job) bool {
	return job.Spec.Suspend != nil && *job.Spec.Suspend && (old.Spec.Suspend == nil || !*old.Spec.Suspend)
}

func (w *Webhook) suspendVerdict(ctx context.Context, ar *model.AdmissionReview, old, job *batchv1.Job) verdict {
	if job == nil || !SuspendTransition(old, job) {
		return allow("not a suspend")
	}
	tmpl := job.Spec.Template.ObjectMeta
	if !labels.Enabled(w.cfg.LabelPrefix, tmpl.Labels, tmpl.Annotations) {
		return allow("pod template is not checkpoint-enabled")
	}
	if ar.DryRun {
		return allow("dry run: no checkpoint taken")
	}
	ns := job.Namespace
	if ns == "" {
		ns = ar.Namespace
	}
	targets, err := w.activePods(ctx, ns, job)
	if err != nil {
		w.d.Events.Eventf(job, corev1.EventTypeWarning, ReasonCheckpointFailed, "listing the Job's pods: %v", err)
		return deny(500, metav1.StatusReasonInternalError, "listing the pods of Job %s/%s: %v", ns, job.Name, err)
	}
	targets = w.withoutLostNodes(ctx, targets)
	if len(targets) == 0 {
		return allow("no running checkpoint-enabled pod")
	}
	return w.checkpointAll(ctx, "job-suspend", "job-suspend", job, fmt.Sprintf("Job %s/%s", ns, job.Name), targets)
}

// activePods are the Job's running, wired, checkpoint-enabled pods.
func (w *Webhook) activePods(ctx context.Context, ns string, job *batchv1.Job) ([]target, error) {
	if job.Spec.Selector == nil {
		return nil, nil
	}
	sel, err := metav1.LabelSelectorAsSelector(job.Spec.Selector)
	if err != nil {
		return nil, err
	}
	pods, err := w.d.Pods.Pods(ns).List(sel)
	if err != nil {
		return nil, err
	}
	var out []target
	for _, p := range pods {
		if ref := metav1.GetControllerOf(p); ref == nil || ref.UID != job.UID {
			continue
		}
		if p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning {
			continue
		}
		cfg, err := labels.ParsePod(w.cfg.LabelPrefix, p)
		if err != nil || !cfg.Enabled {
			w.d.Events.Eventf(p, corev1.EventTypeWarning, ReasonCheckpointSkipped, "Job suspended without checkpointing this pod: %v", err)
			continue
		}
		if inject.SpecIdentity(p, cfg) == "" {
			w.d.Events.Eventf(p, corev1.EventTypeWarning, ReasonCheckpointSkipped, "Job suspended without checkpointing this pod: it was not wired by Stasis at creation")
			continue
		}
		// Re-derived as at creation, never read back from the pod's annotations.
		identity, err := w.checkpointIdentity(ctx, p, cfg)
		if err != nil {
			w.d.Events.Eventf(p, corev1.EventTypeWarning, ReasonCheckpointSkipped, "Job suspended without checkpointing this pod: %v", err)
			continue
		}
		out = append(out, target{pod: p, cfg: cfg, identity: identity})
	}
	return out, nil
}

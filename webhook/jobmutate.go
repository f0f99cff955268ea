package webhook

import (
	"context"
	"slices"

	"github.com/slok/kubewebhook/v2/pkg/model"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/labels"
)

// IgnoreDisruptionRule is the podFailurePolicy rule added to checkpointed Jobs: a pod that failed
// because it was disrupted (evicted, preempted, deleted by the Job's suspend — all set the
// DisruptionTarget condition) is not counted against backoffLimit, and the Job controller
// re-creates it, which restores it from its checkpoint.
var IgnoreDisruptionRule = batchv1.PodFailurePolicyRule{
	Action: batchv1.PodFailurePolicyActionIgnore,
	OnPodConditions: []batchv1.PodFailurePolicyOnPodConditionsPattern{
		{Type: corev1.DisruptionTarget, Status: corev1.ConditionTrue},
	},
}

// IgnoreTerminatedRule is the second rule: a pod that ended with 143, the launcher's exit once
// it has ended an app checkpointed on SIGTERM (or an app ended by SIGTERM), was terminated from
// outside — kubectl delete, preemption, scale-down — none of which sets DisruptionTarget on a
// plain delete. Its replacement continues from the checkpoint; it is no failure of the work.
var IgnoreTerminatedRule = batchv1.PodFailurePolicyRule{
	Action: batchv1.PodFailurePolicyActionIgnore,
	OnExitCodes: &batchv1.PodFailurePolicyOnExitCodesRequirement{
		Operator: batchv1.PodFailurePolicyOnExitCodesOpIn, Values: []int32{128 + 15},
	},
}

// mutateJob is CREATE jobs whose template is checkpoint-enabled (matchConditions).
func (w *Webhook) mutateJob(_ context.Context, rv *review) verdict {
	job := rv.obj.(*batchv1.Job)
	msg, changed := AddIgnoreDisruption(w.cfg.LabelPrefix, job)
	if msg != "" {
		w.jobEvent(&rv.AdmissionReview, job, changed, msg)
	}
	v := verdict{Allowed: true, Unchanged: !changed}
	if !changed && msg != "" {
		v.Warnings = []string{"stasis: " + msg}
	}
	v.Warnings = append(v.Warnings, w.templateGraceWarning(&job.Spec.Template)...)
	return v
}

// AddIgnoreDisruption adds IgnoreDisruptionRule and IgnoreTerminatedRule first in the Job's podFailurePolicy (rules are
// evaluated in order, the first match wins). It returns what it did, or why it did nothing.
func AddIgnoreDisruption(prefix string, job *batchv1.Job) (msg string, changed bool) {
	tmpl := job.Spec.Template.ObjectMeta
	if !labels.Enabled(prefix, tmpl.Labels, tmpl.Annotations) {
		return "", false
	}
	if job.Spec.PodFailurePolicy != nil && slices.ContainsFunc(job.Spec.PodFailurePolicy.Rules, isIgnoreDisruption) {
		return "", false
	}
	if job.Spec.Template.Spec.RestartPolicy != corev1.RestartPolicyNever {
		// The API server accepts a podFailurePolicy only with restartPolicy Never.
		return "podFailurePolicy not added: it needs restartPolicy Never; evicted or suspended pods will count against backoffLimit", false
	}
	if job.Spec.PodFailurePolicy == nil {
		job.Spec.PodFailurePolicy = &batchv1.PodFailurePolicy{}
		// The API server defaults podReplacementPolicy to TerminatingOrFailed before admission and
		// refuses a podFailurePolicy with anything but Failed (found by the integration tier).
		failed := batchv1.Failed
		job.Spec.PodReplacementPolicy = &failed
	}
	job.Spec.PodFailurePolicy.Rules = append([]batchv1.PodFailurePolicyRule{IgnoreDisruptionRule, IgnoreTerminatedRule}, job.Spec.PodFailurePolicy.Rules...)
	return "added podFailurePolicy rules Ignore on DisruptionTarget and on exit code 143: checkpointed pods that are evicted or deleted do not count against backoffLimit", true
}

func isIgnoreDisruption(r batchv1.PodFailurePolicyRule) bool {
	return r.Action == batchv1.PodFailurePolicyActionIgnore && slices.ContainsFunc(r.OnPodConditions,
		func(p batchv1.PodFailurePolicyOnPodConditionsPattern) bool {
			return p.Type == corev1.DisruptionTarget && (p.Status == "" || p.Status == corev1.ConditionTrue)
		})
}

func (w *Webhook) jobEvent(ar *model.AdmissionReview, job *batchv1.Job, changed bool, msg string) {
	if job.Name == "" {
		return // generateName: no object to attach the Event to yet
	}
	ns := job.Namespace
	if ns == "" {
		ns = ar.Namespace
	}
	typ, reason := corev1.EventTypeNormal, ReasonPodFailurePolicy
	if !changed {
		typ, reason = corev1.EventTypeWarning, ReasonNoPodFailurePolicy
	}
	ref := &metav1.PartialObjectMetadata{
		TypeMeta:   metav1.TypeMeta{APIVersion: "batch/v1", Kind: "Job"},
		ObjectMeta: metav1.ObjectMeta{Name: job.Name, Namespace: ns},
	}
	w.d.Events.Eventf(ref, typ, reason, "%s", msg)
}

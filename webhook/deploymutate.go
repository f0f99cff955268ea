package webhook

import (
	"context"

	appsv1 "k8s.io/api/apps/v1"

	"github.com/stasis-k8s/stasis/labels"
)

// mutateDeployment is CREATE and UPDATE deployments whose template is checkpoint-enabled
// (matchConditions). A checkpointed Deployment has one replica whose checkpoints live on one
// volume under one identity (deploy/<ns>/<name>). The default RollingUpdate strategy surges: the
// new ReplicaSet's pod starts while the old one still runs, two copies on one volume, and the old
// pod's checkpoint on termination lands beside (and prunes) the new pod's. maxSurge 0 is not
// enough either: the controller does not wait for the old pod's termination (its dump) before it
// creates the new one. Recreate does (it waits until no old pod runs), so Stasis sets it, with a
// warning that says so. The new ReplicaSet's pod then starts fresh when the template changed (the
// checkpoint's incarnation is the ReplicaSet, agent/restore.go bound), and continues when only
// the replica count moved (scale to 0 and back).
//
// It also warns when the template's grace period cannot fit a dump of its memory (graceWarning).
func (w *Webhook) mutateDeployment(_ context.Context, rv *review) verdict {
	d := rv.obj.(*appsv1.Deployment)
	v := verdict{Allowed: true, Unchanged: true}
	if msg := SetRecreate(w.cfg.LabelPrefix, d); msg != "" {
		v.Unchanged, v.Warnings = false, []string{"stasis: " + msg}
	}
	v.Warnings = append(v.Warnings, w.templateGraceWarning(&d.Spec.Template)...)
	return v
}

// SetRecreate sets the Recreate strategy on a Deployment whose pods are checkpointed, and says
// what it replaced; empty when nothing changed.
func SetRecreate(prefix string, d *appsv1.Deployment) string {
	tmpl := d.Spec.Template.ObjectMeta
	if !labels.Enabled(prefix, tmpl.Labels, tmpl.Annotations) || d.Spec.Strategy.Type == appsv1.RecreateDeploymentStrategyType {
		return ""
	}
	was := string(d.Spec.Strategy.Type)
	if was == "" {
		was = string(appsv1.RollingUpdateDeploymentStrategyType)
	}
	d.Spec.Strategy = appsv1.DeploymentStrategy{Type: appsv1.RecreateDeploymentStrategyType}
	return "spec.strategy set to Recreate (was " + was + "): the pods of a checkpointed Deployment share one checkpoint volume, " +
		"and a rolling update would run the new pod beside the old one before the old one's checkpoint on termination is done"
}

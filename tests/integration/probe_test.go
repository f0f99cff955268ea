//go:build integration

package integration

import (
	"context"
	"fmt"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/stasis-k8s/stasis/wiring"
)

const probeNS = "stasis-probe"

// waitWebhooksEffective returns once the API server calls each of the four webhooks: a new
// webhook configuration takes effect a few seconds after creation. Every probe is a dry run (or
// touches only the probe namespace), so nothing is checkpointed; the namespace is removed after.
func waitWebhooksEffective(ctx context.Context, e *environment) error {
	c := e.cluster.Client()
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: probeNS}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	node := "probe-node"
	if err := e.kubelet.addNode(ctx, node, nil); err != nil {
		return err
	}
	defer func() {
		c2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel2()
		_ = c.CoreV1().Namespaces().Delete(c2, probeNS, metav1.DeleteOptions{})
		e.kubelet.removeNode(c2, node)
	}()
	poll := func(what string, f func() (bool, error)) error {
		var last error
		for {
			ok, err := f()
			if ok {
				return nil
			}
			if err != nil {
				last = err
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("webhook configuration not effective: %s (last error: %v); last lines of %s:\n%s",
					what, last, e.webhook.logPath, tail(e.webhook.logPath, 20))
			case <-time.After(250 * time.Millisecond):
			}
		}
	}
	if err := poll("default ServiceAccount", func() (bool, error) {
		_, err := c.CoreV1().ServiceAccounts(probeNS).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, err
	}); err != nil {
		return err
	}
	dryRun := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}

	// Pod creation (mutating): a dry-run create of an enabled plain pod comes back wired.
	sc := "integration-none"
	if _, err := c.CoreV1().PersistentVolumeClaims(probeNS).Create(ctx, &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "probe"},
		Spec: corev1.PersistentVolumeClaimSpec{AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}, StorageClassName: &sc,
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}}},
	}, metav1.CreateOptions{}); err != nil {
		return err
	}
	probePod := func(name string, labels map[string]string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "probe", Command: []string{"/probe"}}},
				Volumes: []corev1.Volume{{Name: "checkpointing", VolumeSource: corev1.VolumeSource{
					PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "probe"}}}}},
		}
	}
	if err := poll("pod creation is wired (mutating webhook pods.stasis.dev)", func() (bool, error) {
		p, err := c.CoreV1().Pods(probeNS).Create(ctx, probePod("probe-enabled",
			map[string]string{modeLabel: "true", storageLabel: "checkpointing"}), dryRun)
		return err == nil && p.Annotations[wiring.AnnotationWired] == "true", err
	}); err != nil {
		return err
	}

	// Evictions (validating): any eviction reaches the webhook; a dry run triggers nothing.
	if _, err := c.CoreV1().Pods(probeNS).Create(ctx, probePod("probe-plain", nil), metav1.CreateOptions{}); err != nil {
		return err
	}
	if err := poll("evictions reach the webhook (evictions.stasis.dev)", func() (bool, error) {
		err := c.CoreV1().Pods(probeNS).EvictV1(ctx, &policyv1.Eviction{
			ObjectMeta:    metav1.ObjectMeta{Name: "probe-plain", Namespace: probeNS},
			DeleteOptions: &metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}},
		})
		if err != nil {
			return false, err
		}
		n, err := e.webhook.reviews(probeNS, "eviction")
		return n > 0, err
	}); err != nil {
		return err
	}

	// Job creation (mutating) and Job suspension (validating, only enabled Jobs turning suspended).
	zero := int32(0)
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: "probe"},
		Spec: batchv1.JobSpec{
			Parallelism: &zero, // no pods
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{modeLabel: "true"}},
				Spec: corev1.PodSpec{RestartPolicy: corev1.RestartPolicyNever,
					Containers: []corev1.Container{{Name: "app", Image: "probe", Command: []string{"/probe"}}}},
			},
		},
	}
	if err := poll("Job creation reaches the webhook (jobs.stasis.dev)", func() (bool, error) {
		if _, err := c.BatchV1().Jobs(probeNS).Create(ctx, job, dryRun); err != nil {
			return false, err
		}
		n, err := e.webhook.reviews(probeNS, "job")
		return n > 0, err
	}); err != nil {
		return err
	}
	if _, err := c.BatchV1().Jobs(probeNS).Create(ctx, job, metav1.CreateOptions{}); err != nil {
		return err
	}
	if err := poll("Job suspension reaches the webhook (job-suspends.stasis.dev)", func() (bool, error) {
		_, err := c.BatchV1().Jobs(probeNS).Patch(ctx, "probe", types.MergePatchType, []byte(`{"spec":{"suspend":true}}`),
			metav1.PatchOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil {
			return false, err
		}
		n, err := e.webhook.reviews(probeNS, "job-suspend")
		return n > 0, err
	}); err != nil {
		return err
	}
	return nil
}

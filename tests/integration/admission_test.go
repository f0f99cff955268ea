//go:build integration

package integration

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/wiring"
)

// Issue 11: a wired pod that a later admission step rejects (here Pod Security `restricted`, which
// runs after the mutating webhooks) leaves nothing behind: the pod webhook only names PVCs, and a
// NonIndexed Job's new slots are named by their claim token, not written. The Job controller keeps
// retrying, the webhook wires every attempt, and still no PVC and no claim appear.
func TestPodSecurityRejectedWiredPodsLeaveNoPVCOrClaim_NoKubelet(t *testing.T) {
	s := newScenario(t, "s11-restricted", "a")
	ns, err := s.c.CoreV1().Namespaces().Get(s.ctx, s.ns, metav1.GetOptions{})
	require.NoError(t, err)
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels["pod-security.kubernetes.io/enforce"] = "restricted"
	_, err = s.c.CoreV1().Namespaces().Update(s.ctx, ns, metav1.UpdateOptions{})
	require.NoError(t, err)

	// Pod Security is enforced once the plugin sees the label: probe with a plain pod first.
	s.eventually("Pod Security restricted enforced in "+s.ns, func() (bool, error) {
		_, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, s.podObject("probe", podOpts{node: s.nodes[0]}), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return apierrors.IsForbidden(err), nil
	})

	before := s.reviews("pod")
	_, err = s.c.BatchV1().Jobs(s.ns).Create(s.ctx, s.jobObject("indexed", s.nodes[0], enabled(), true, 2), metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = s.c.BatchV1().Jobs(s.ns).Create(s.ctx, s.jobObject("pool", s.nodes[0], enabled(), false, 2), metav1.CreateOptions{})
	require.NoError(t, err)
	for _, job := range []string{"indexed", "pool"} {
		ev := s.waitEvent("Job", job, "violates PodSecurity")
		t.Logf("Job %s: %s", job, ev.Message)
	}
	// Several attempts of each Job were wired by the webhook (and then rejected).
	s.eventually("the webhook wired at least 6 rejected attempts", func() (bool, error) { return s.reviews("pod")-before >= 6, nil })
	time.Sleep(2 * time.Second) // give the PVC controller every chance to act on a pod that does not exist

	pods, err := s.c.CoreV1().Pods(s.ns).List(s.ctx, metav1.ListOptions{})
	require.NoError(t, err)
	assert.Empty(t, pods.Items, "every attempt was rejected")
	pvcs, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).List(s.ctx, metav1.ListOptions{})
	require.NoError(t, err)
	assert.Empty(t, pvcs.Items, "no PVC (and so no claim) left behind by %d rejected, wired attempts", s.reviews("pod")-before)
	t.Logf("%d wired attempts rejected by Pod Security, %d PVCs left", s.reviews("pod")-before, len(pvcs.Items))
}

// timeline records when a pod and a PVC of a namespace first reached each state, from watches.
type timeline struct {
	mu sync.Mutex
	at map[string]time.Time
}

func (tl *timeline) mark(what string) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	if _, ok := tl.at[what]; !ok {
		tl.at[what] = time.Now()
	}
}

func (tl *timeline) get(what string) (time.Time, bool) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	t, ok := tl.at[what]
	return t, ok
}

// watchTimeline follows one Job's pods and one PVC: "pod", "scheduled", "running", "pvc", "bound".
func (s *scenario) watchTimeline(ctx context.Context, job, pvc string) *timeline {
	s.t.Helper()
	tl := &timeline{at: map[string]time.Time{}}
	pw, err := s.c.CoreV1().Pods(s.ns).Watch(ctx, metav1.ListOptions{LabelSelector: "batch.kubernetes.io/job-name=" + job})
	require.NoError(s.t, err)
	vw, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + pvc})
	require.NoError(s.t, err)
	follow := func(w watch.Interface) {
		defer w.Stop()
		for ev := range w.ResultChan() {
			switch o := ev.Object.(type) {
			case *corev1.Pod:
				tl.mark("pod")
				if o.Spec.NodeName != "" {
					tl.mark("scheduled")
				}
				if o.Status.Phase == corev1.PodRunning {
					tl.mark("running")
				}
			case *corev1.PersistentVolumeClaim:
				tl.mark("pvc")
				if o.Status.Phase == corev1.ClaimBound {
					tl.mark("bound")
				}
			}
		}
	}
	go follow(pw)
	go follow(vw)
	return tl
}

// Issue 11: an accepted pod names its checkpoint PVC; the webhook's PVC controller creates it once
// the pod exists (owned by the Job, Event on the pod), the PVC binds, and the scheduler places the
// pod, which was Pending meanwhile. The test measures what creating the PVC after admission adds
// to scheduling, against a Job whose PVC exists beforehand (logged; no timing assertion).
func TestAcceptedPodGetsPVCFromControllerAndSchedules_NoKubelet(t *testing.T) {
	s := newScenario(t, "s11-pvc", "a")
	run := func(job string, precreatePVC bool) (time.Duration, time.Duration) {
		identity := "job/" + s.ns + "/" + job + "/0"
		pvcName := catalog.PVCName(identity)
		s.precreatePV(pvcName)
		if precreatePVC {
			_, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Create(s.ctx, catalog.NewPVC(catalog.PVCSpec{
				Namespace: s.ns, Name: pvcName, Identity: identity, Size: resource.MustParse("1Gi")}), metav1.CreateOptions{})
			require.NoError(t, err)
			s.eventually("pre-created PVC bound", func() (bool, error) {
				p, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Get(s.ctx, pvcName, metav1.GetOptions{})
				return err == nil && p.Status.Phase == corev1.ClaimBound, err
			})
		}
		wctx, cancel := context.WithCancel(s.ctx)
		defer cancel()
		j := s.jobObject(job, "", enabled(), true, 1)
		j.Spec.Template.Spec.NodeSelector = map[string]string{nodeGroupLabel: s.ns}
		tl := s.watchTimeline(wctx, job, pvcName)
		created, err := s.c.BatchV1().Jobs(s.ns).Create(s.ctx, j, metav1.CreateOptions{})
		require.NoError(t, err)
		var pod corev1.Pod
		s.eventually("Job "+job+"'s pod scheduled and running", func() (bool, error) {
			ps := s.jobPods(job)
			if len(ps) == 1 && ps[0].Status.Phase == corev1.PodRunning {
				pod = ps[0]
				return true, nil
			}
			return false, nil
		})
		s.eventually("timeline complete", func() (bool, error) {
			_, ok := tl.get("running")
			return ok, nil
		})
		assert.Equal(t, identity, pod.Annotations[wiring.AnnotationIdentity])
		pvc, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Get(s.ctx, pvcName, metav1.GetOptions{})
		require.NoError(t, err)
		if !precreatePVC {
			require.Len(t, pvc.OwnerReferences, 1)
			assert.Equal(t, created.UID, pvc.OwnerReferences[0].UID, "owned by the Job, as before")
			s.waitEvent("Pod", pod.Name, "created checkpoint PVC "+pvcName)
			tPod, _ := tl.get("pod")
			tPVC, _ := tl.get("pvc")
			tBound, _ := tl.get("bound")
			assert.False(t, tPVC.Before(tPod), "the PVC is created after the pod exists")
			t.Logf("PVC by the controller: pod → PVC created %v → bound %v", tPVC.Sub(tPod), tBound.Sub(tPod))
		}
		tPod, _ := tl.get("pod")
		tSched, _ := tl.get("scheduled")
		tRun, _ := tl.get("running")
		return tSched.Sub(tPod), tRun.Sub(tPod)
	}
	base, baseRun := run("pre", true)
	late, lateRun := run("late", false)
	t.Logf("pod created → scheduled: %v with the PVC there beforehand, %v with the PVC created by the controller (adds %v); → Running %v vs %v",
		base, late, late-base, baseRun, lateRun)

	// What the API server stored (with every default and admission plugin applied) fed back to the
	// webhook, as a reinvocation or a copied YAML is: accepted unchanged. The same with a forged
	// identity: refused, naming the annotation.
	stored := s.jobPods("late")[0]
	again := stored.DeepCopy()
	again.ObjectMeta = metav1.ObjectMeta{GenerateName: "late-0-", Namespace: s.ns, Labels: stored.Labels, Annotations: stored.Annotations,
		OwnerReferences: stored.OwnerReferences}
	again.Status = corev1.PodStatus{}
	out, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, again, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	require.NoError(t, err, "a stored wired pod fed back is accepted")
	assert.Equal(t, stored.Annotations, out.Annotations)
	assert.Equal(t, stored.Spec.InitContainers, out.Spec.InitContainers)
	assert.Equal(t, stored.Spec.Volumes, out.Spec.Volumes)

	forged := again.DeepCopy()
	forged.Annotations = map[string]string{}
	for k, v := range again.Annotations {
		forged.Annotations[k] = v
	}
	forged.Annotations[wiring.AnnotationIdentity] = "job/" + s.ns + "/pre/0"
	_, err = s.c.CoreV1().Pods(s.ns).Create(s.ctx, forged, metav1.CreateOptions{})
	require.Error(t, err, "a forged identity is refused")
	assert.Contains(t, err.Error(), `metadata.annotations[stasis.dev/identity]: "job/`+s.ns+`/pre/0" is not what Stasis derives for this pod`)
	t.Logf("forged identity: %v", err)
}

// A checkpoint-enabled pod sharing its process namespace cannot be restored (the pause process,
// not the launcher, would be PID 1): the real API server relays the webhook's refusal naming the
// field, for a plain pod and for a Job's pods (the Job's FailedCreate Event carries it); the same
// plain pod without the field is admitted.
func TestSharedProcessNamespaceRefused_NoKubelet(t *testing.T) {
	s := newScenario(t, "s-sharedpid", "a")
	yes := true
	pvc, pod := plainPodExample(t, s.nodes[0])
	_, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Create(s.ctx, pvc, metav1.CreateOptions{})
	require.NoError(t, err)
	pod.Spec.ShareProcessNamespace = &yes
	_, err = s.c.CoreV1().Pods(s.ns).Create(s.ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	require.Error(t, err, "a checkpoint-enabled pod with shareProcessNamespace is refused")
	assert.Contains(t, err.Error(), "spec.shareProcessNamespace: true is not supported for a checkpoint-enabled pod")
	t.Logf("refusal: %v", err)

	pod.Spec.ShareProcessNamespace = nil
	_, err = s.c.CoreV1().Pods(s.ns).Create(s.ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	require.NoError(t, err, "the same pod without the field is admitted")

	job := s.jobObject("shared-pid", s.nodes[0], enabled(), true, 1)
	job.Spec.Template.Spec.ShareProcessNamespace = &yes
	_, err = s.c.BatchV1().Jobs(s.ns).Create(s.ctx, job, metav1.CreateOptions{})
	require.NoError(t, err)
	ev := s.waitEvent("Job", "shared-pid", "spec.shareProcessNamespace")
	t.Logf("Job %s: %s", job.Name, ev.Message)
	pods, err := s.c.CoreV1().Pods(s.ns).List(s.ctx, metav1.ListOptions{})
	require.NoError(t, err)
	assert.Empty(t, pods.Items, "no pod of the Job was admitted")
}

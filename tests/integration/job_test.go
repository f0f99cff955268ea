//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/tests/fakeagent"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/wiring"
)

// jobObject is a checkpoint-enabled (or not) Job whose pods are bound to node by the template
// (no scheduler decision: its PVCs are never bound here, which would hold scheduling).
func (s *scenario) jobObject(name, node string, labels map[string]string, indexed bool, n int32) *batchv1.Job {
	backoff := int32(1)
	grace := int64(30)
	j := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: s.ns},
		Spec: batchv1.JobSpec{
			Completions: &n, Parallelism: &n, BackoffLimit: &backoff,
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					NodeName: node, RestartPolicy: corev1.RestartPolicyNever, TerminationGracePeriodSeconds: &grace,
					Containers: []corev1.Container{{Name: "train", Image: "counter:integration", ImagePullPolicy: corev1.PullNever,
						Command: []string{"/counter", "--interval=1s"}}},
				},
			},
		},
	}
	if indexed {
		mode := batchv1.IndexedCompletion
		j.Spec.CompletionMode = &mode
	}
	return j
}

// Scenario 3: `kubectl patch job … suspend:true` on a checkpoint-enabled Job with running pods: the
// webhook checkpoints every active pod before the patch is accepted (429 while the dumps run), the
// Job controller then deletes them; `suspend:false` creates new pods that carry the restore wiring
// and the checkpoint annotation; backoffLimit is not consumed.
func TestJobSuspendCheckpointsThenResumeRestores_NoKubelet(t *testing.T) {
	s := newScenario(t, "s3-suspend", "a")
	node := s.nodes[0]
	job := s.jobObject("train", node, enabled(), true, 2)
	_, err := s.c.BatchV1().Jobs(s.ns).Create(s.ctx, job, metav1.CreateOptions{})
	require.NoError(t, err)

	// The Job mutation added the rule that keeps checkpointed pods off backoffLimit.
	created := s.job("train")
	require.NotNil(t, created.Spec.PodFailurePolicy, "the jobs webhook adds a podFailurePolicy")
	assert.Equal(t, batchv1.PodFailurePolicyActionIgnore, created.Spec.PodFailurePolicy.Rules[0].Action)

	var first []corev1.Pod
	s.eventually("2 running, wired Job pods", func() (bool, error) {
		first = s.jobPods("train")
		running := 0
		for _, p := range first {
			if p.Status.Phase == corev1.PodRunning && p.Annotations[wiring.AnnotationWired] == "true" {
				running++
			}
		}
		return running == 2, nil
	})
	for _, p := range first {
		assert.Empty(t, p.Annotations[wiring.AnnotationRestore], "first pods have nothing to restore")
		// Script each dump longer than the wait budget: the first suspend attempt is held.
		env.agent.SetScript(s.ns, p.Name, fakeagent.Script{Duration: 2 * waitBudget, Bytes: 512 << 20})
	}

	// kubectl patch does not retry a 429 the way drain does: the operator (here, the test) repeats it.
	out, err := s.kubectl("-n", s.ns, "patch", "job", "train", "-p", `{"spec":{"suspend":true}}`)
	require.Error(t, err, "the first suspend is held while the dumps run:\n%s", out)
	assert.Contains(t, out, "in progress", out)
	held := s.job("train").Spec.Suspend
	require.True(t, held == nil || !*held, "the held patch was not applied")
	s.eventually("suspend accepted", func() (bool, error) {
		out, err = s.kubectl("-n", s.ns, "patch", "job", "train", "-p", `{"spec":{"suspend":true}}`)
		if err != nil && !strings.Contains(out, "in progress") {
			return false, fmt.Errorf("suspend refused: %s", out)
		}
		return err == nil, nil
	})
	t.Logf("kubectl patch: %s", out)
	for _, p := range first {
		assert.Equal(t, 1, env.agent.DumpsOf(s.ns, p.Name), "pod %s checkpointed once before the suspend was accepted", p.Name)
	}
	s.eventually("the Job controller deleted the suspended pods", func() (bool, error) {
		l, err := s.c.CoreV1().Pods(s.ns).List(s.ctx, metav1.ListOptions{})
		return err == nil && len(l.Items) == 0, err
	})

	out, err = s.kubectl("-n", s.ns, "patch", "job", "train", "-p", `{"spec":{"suspend":false}}`)
	require.NoError(t, err, out)
	var second []corev1.Pod
	s.eventually("2 new running Job pods", func() (bool, error) {
		second = s.jobPods("train")
		running := 0
		for _, p := range second {
			if p.Status.Phase == corev1.PodRunning {
				running++
			}
		}
		return running == 2, nil
	})
	for _, p := range second {
		raw := p.Annotations[wiring.AnnotationRestore]
		require.NotEmpty(t, raw, "pod %s carries the checkpoint annotation", p.Name)
		var ref wiring.RestoreRef
		require.NoError(t, json.Unmarshal([]byte(raw), &ref), raw)
		assert.NotEmpty(t, ref.ID)
		assert.EqualValues(t, 512<<20, ref.Size)
		assert.NotEmpty(t, ref.Containers, "pod %s names the containers that restore together", p.Name)
		assert.True(t, hasEnv(p, wiring.EnvRestoreID), "pod %s tells the launcher what to restore", p.Name)
	}
	j := s.job("train")
	assert.EqualValues(t, 0, j.Status.Failed, "suspending checkpointed pods consumed no backoffLimit")
}

func hasInitContainer(p corev1.Pod, name string) bool {
	for _, c := range p.Spec.InitContainers {
		if c.Name == name {
			return true
		}
	}
	return false
}

func hasEnv(p corev1.Pod, name string) bool {
	for _, cs := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for _, c := range cs {
			for _, e := range c.Env {
				if e.Name == name && (e.Value != "" || e.ValueFrom != nil) {
					return true
				}
			}
		}
	}
	return false
}

// Scenario 5: a controller-owned pod without a storage label gets a PVC created and owned by the
// controller; deleting the Job garbage-collects it. A dry-run pod create creates nothing.
func TestControllerPodGetsOwnedPVCGarbageCollected_NoKubelet(t *testing.T) {
	s := newScenario(t, "s5-pvc", "a")
	node := s.nodes[0]
	created, err := s.c.BatchV1().Jobs(s.ns).Create(s.ctx, s.jobObject("gc", node, enabled(), true, 1), metav1.CreateOptions{})
	require.NoError(t, err)

	var pvcName string
	s.eventually("the checkpoint PVC of Job gc", func() (bool, error) {
		l, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).List(s.ctx, metav1.ListOptions{LabelSelector: "stasis.dev/managed=true"})
		if err != nil || len(l.Items) == 0 {
			return false, err
		}
		require.Len(t, l.Items, 1)
		pvc := l.Items[0]
		pvcName = pvc.Name
		require.Len(t, pvc.OwnerReferences, 1)
		o := pvc.OwnerReferences[0]
		assert.Equal(t, "Job", o.Kind)
		assert.Equal(t, "gc", o.Name)
		assert.Equal(t, created.UID, o.UID)
		return true, nil
	})
	s.eventually("the Job pod mounts the PVC", func() (bool, error) {
		for _, p := range s.jobPods("gc") {
			for _, v := range p.Spec.Volumes {
				if v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ClaimName == pvcName {
					return true, nil
				}
			}
		}
		return false, nil
	})

	// Dry run: a pod of an Indexed Job (index 7 has no PVC yet) comes back wired, nothing created.
	pvcsBefore, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).List(s.ctx, metav1.ListOptions{})
	require.NoError(t, err)
	ctrl := true
	dry := s.podObject("", podOpts{node: node, labels: enabled()})
	dry.GenerateName = "gc-"
	dry.Annotations = map[string]string{"batch.kubernetes.io/job-completion-index": "7"}
	dry.OwnerReferences = []metav1.OwnerReference{{APIVersion: "batch/v1", Kind: "Job", Name: "gc", UID: created.UID, Controller: &ctrl}}
	out, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, dry, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	require.NoError(t, err)
	assert.Equal(t, "true", out.Annotations[wiring.AnnotationWired])
	pvcsAfter, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).List(s.ctx, metav1.ListOptions{})
	require.NoError(t, err)
	assert.Len(t, pvcsAfter.Items, len(pvcsBefore.Items), "a dry-run create creates no PVC")

	// Deleting the Job: its pods go, then the garbage collector removes the PVC.
	out2, err := s.kubectl("-n", s.ns, "delete", "job", "gc", "--wait=false")
	require.NoError(t, err, out2)
	s.eventually("PVC "+pvcName+" garbage-collected", func() (bool, error) {
		_, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Get(s.ctx, pvcName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return false, err
	})
}

// Scenario 6: unlabeled pods and Jobs are never sent to the webhook (objectSelector and
// matchConditions in the configuration): its review counter for the namespace stays at 0 across
// creates, a suspend and a resume. Evictions cannot be filtered by labels (the request carries an
// Eviction): they reach the webhook, which answers at once without asking an agent. Admission
// latency is unchanged because the API server makes no call; the test logs the measured create
// latency with the webhook configured for comparison, and asserts no call (no timing asserts).
func TestUnlabeledPodsAndJobsNeverReachWebhook_NoKubelet(t *testing.T) {
	s := newScenario(t, "s6-unlabeled", "a")
	node := s.nodes[0]
	postsBefore := env.agent.Posts()

	t0 := time.Now()
	for i := 0; i < 10; i++ {
		s.createPod(fmt.Sprintf("plain-%d", i), podOpts{node: node, labels: map[string]string{"app": "plain"}})
	}
	t.Logf("10 unlabeled pods created and running in %v (no webhook call)", time.Since(t0))

	_, err := s.c.BatchV1().Jobs(s.ns).Create(s.ctx, s.jobObject("plain", node, map[string]string{"app": "plain"}, false, 1), metav1.CreateOptions{})
	require.NoError(t, err)
	s.eventually("the unlabeled Job's pod running", func() (bool, error) {
		ps := s.jobPods("plain")
		return len(ps) == 1 && ps[0].Status.Phase == corev1.PodRunning, nil
	})
	out, err := s.kubectl("-n", s.ns, "patch", "job", "plain", "-p", `{"spec":{"suspend":true}}`)
	require.NoError(t, err, out)
	out, err = s.kubectl("-n", s.ns, "patch", "job", "plain", "-p", `{"spec":{"suspend":false}}`)
	require.NoError(t, err, out)
	s.eventually("the unlabeled Job's pod running again", func() (bool, error) {
		ps := s.jobPods("plain")
		return len(ps) == 1 && ps[0].Status.Phase == corev1.PodRunning, nil
	})

	for _, id := range []string{"pod", "job", "job-suspend"} {
		assert.Equal(t, 0, s.reviews(id), "webhook %s was called for unlabeled objects", id)
	}

	// Evictions of unlabeled pods do reach the webhook, which allows them without an agent call.
	require.NoError(t, s.evict("plain-0", false))
	assert.Equal(t, 1, s.reviews("eviction"))
	assert.Equal(t, postsBefore, env.agent.Posts(), "no agent call for unlabeled pods")
	assert.Equal(t, 0, env.agent.DumpsIn(s.ns))
}

// A NonIndexed Job's pods are interchangeable: each pod claims a checkpoint slot. Suspended and
// resumed, every new pod restores a different one of the checkpoints (no slot taken twice).
func TestNonIndexedJobResumeClaimsEachCheckpointOnce_NoKubelet(t *testing.T) {
	s := newScenario(t, "s3-nonindexed", "a")
	node := s.nodes[0]
	_, err := s.c.BatchV1().Jobs(s.ns).Create(s.ctx, s.jobObject("pool", node, enabled(), false, 2), metav1.CreateOptions{})
	require.NoError(t, err)
	var first []corev1.Pod
	s.eventually("2 running, wired Job pods", func() (bool, error) {
		first = s.jobPods("pool")
		n := 0
		for _, p := range first {
			if p.Status.Phase == corev1.PodRunning && p.Annotations[wiring.AnnotationWired] == "true" {
				n++
			}
		}
		return n == 2, nil
	})
	assert.NotEqual(t, first[0].Annotations[wiring.AnnotationIdentity], first[1].Annotations[wiring.AnnotationIdentity],
		"each pod claimed its own slot")

	s.eventually("suspend accepted", func() (bool, error) {
		out, err := s.kubectl("-n", s.ns, "patch", "job", "pool", "-p", `{"spec":{"suspend":true}}`)
		if err != nil && !strings.Contains(out, "in progress") {
			return false, fmt.Errorf("suspend refused: %s", out)
		}
		return err == nil, nil
	})
	s.eventually("the suspended pods deleted", func() (bool, error) {
		l, err := s.c.CoreV1().Pods(s.ns).List(s.ctx, metav1.ListOptions{})
		return err == nil && len(l.Items) == 0, err
	})
	out, err := s.kubectl("-n", s.ns, "patch", "job", "pool", "-p", `{"spec":{"suspend":false}}`)
	require.NoError(t, err, out)

	var second []corev1.Pod
	s.eventually("2 new running Job pods", func() (bool, error) {
		second = s.jobPods("pool")
		return len(second) == 2 && second[0].Status.Phase == corev1.PodRunning && second[1].Status.Phase == corev1.PodRunning, nil
	})
	ids := map[string]bool{}
	restored := map[string]bool{}
	for _, p := range second {
		ids[p.Annotations[wiring.AnnotationIdentity]] = true
		var ref wiring.RestoreRef
		require.NoError(t, json.Unmarshal([]byte(p.Annotations[wiring.AnnotationRestore]), &ref), "pod %s restores", p.Name)
		restored[ref.ID] = true
	}
	assert.Len(t, ids, 2, "two distinct slots")
	assert.Len(t, restored, 2, "two distinct checkpoints restored")
	assert.EqualValues(t, 0, s.job("pool").Status.Failed)
}

// The drain path of a Job pod through the Job controller and the scheduler: its checkpoint PVC is
// bound to a pre-created PV (nothing provisions here), the pod is scheduled, its node drained
// (429 until the dump is done), the eviction marks it DisruptionTarget, the Job controller
// replaces it without counting a failure (the podFailurePolicy the jobs webhook added), and the
// scheduler puts the replacement on the other node, where it restores.
func TestDrainedJobPodReplacedOnOtherNodeRestoresNoBackoff_NoKubelet(t *testing.T) {
	s := newScenario(t, "s1-job", "a", "b")
	identity := "job/" + s.ns + "/worker/0"
	s.precreatePV(catalog.PVCName(identity))
	job := s.jobObject("worker", "", enabled(), true, 1)
	job.Spec.Template.Spec.NodeSelector = map[string]string{nodeGroupLabel: s.ns}
	_, err := s.c.BatchV1().Jobs(s.ns).Create(s.ctx, job, metav1.CreateOptions{})
	require.NoError(t, err)

	var first corev1.Pod
	s.eventually("the Job pod scheduled and running", func() (bool, error) {
		ps := s.jobPods("worker")
		if len(ps) == 1 && ps[0].Status.Phase == corev1.PodRunning {
			first = ps[0]
			return true, nil
		}
		return false, nil
	})
	assert.Equal(t, identity, first.Annotations[wiring.AnnotationIdentity])
	env.agent.SetScript(s.ns, first.Name, fakeagent.Script{Duration: 3 * waitBudget, Bytes: 700 << 20})

	out, err := s.kubectl(drainArgs(first.Spec.NodeName)...)
	require.NoError(t, err, "drain:\n%s", out)
	t.Logf("kubectl drain:\n%s", out)
	assert.Contains(t, out, "will retry after 5s")
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, first.Name))

	var second corev1.Pod
	s.eventually("the replacement pod running", func() (bool, error) {
		ps := s.jobPods("worker")
		if len(ps) == 1 && ps[0].UID != first.UID && ps[0].Status.Phase == corev1.PodRunning {
			second = ps[0]
			return true, nil
		}
		return false, nil
	})
	assert.NotEqual(t, first.Spec.NodeName, second.Spec.NodeName, "replaced on the other node")
	var ref wiring.RestoreRef
	require.NoError(t, json.Unmarshal([]byte(second.Annotations[wiring.AnnotationRestore]), &ref), "the replacement restores")
	assert.EqualValues(t, 700<<20, ref.Size)
	j := s.job("worker")
	assert.EqualValues(t, 0, j.Status.Failed, "the evicted, checkpointed pod consumed no backoffLimit")
}

// precreatePV creates a PV pre-bound (claimRef) to the PVC Stasis will create, so that the PVC
// binds and the scheduler can place its pod. No kubelet mounts it: the path is never touched.
func (s *scenario) precreatePV(pvcName string) {
	s.t.Helper()
	name := s.ns + "-" + pvcName
	if len(name) > 63 {
		name = name[:63]
	}
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("100Gi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			ClaimRef:                      &corev1.ObjectReference{Namespace: s.ns, Name: pvcName},
			PersistentVolumeSource: corev1.PersistentVolumeSource{
				HostPath: &corev1.HostPathVolumeSource{Path: "/nonexistent/stasis-integration/" + name},
			},
		},
	}
	_, err := s.c.CoreV1().PersistentVolumes().Create(s.ctx, pv, metav1.CreateOptions{})
	require.NoError(s.t, err)
	s.t.Cleanup(func() {
		_ = s.c.CoreV1().PersistentVolumes().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

// A NonIndexed Job's pod that restored a slot's checkpoint then ran to completion (Succeeded):
// its slot is free, and the next pod the Job controller creates for the remaining completion
// must not restore that slot's last checkpoint, which would redo finished work. It starts fresh,
// and the record is gone from the slot's PVC.
func TestNonIndexedJobSlotOfASucceededPodStartsFresh_NoKubelet(t *testing.T) {
	s := newScenario(t, "s3-succeeded", "a")
	job := s.jobObject("pool", s.nodes[0], enabled(), false, 1)
	two := int32(2)
	job.Spec.Completions = &two
	_, err := s.c.BatchV1().Jobs(s.ns).Create(s.ctx, job, metav1.CreateOptions{})
	require.NoError(t, err)
	s.eventually("a running, wired Job pod", func() (bool, error) {
		ps := s.jobPods("pool")
		return len(ps) == 1 && ps[0].Status.Phase == corev1.PodRunning && ps[0].Annotations[wiring.AnnotationWired] == "true", nil
	})
	s.eventually("suspend accepted", func() (bool, error) {
		out, err := s.kubectl("-n", s.ns, "patch", "job", "pool", "-p", `{"spec":{"suspend":true}}`)
		if err != nil && !strings.Contains(out, "in progress") {
			return false, fmt.Errorf("suspend refused: %s", out)
		}
		return err == nil, nil
	})
	s.eventually("the suspended pod deleted", func() (bool, error) {
		l, err := s.c.CoreV1().Pods(s.ns).List(s.ctx, metav1.ListOptions{})
		return err == nil && len(l.Items) == 0, err
	})
	out, err := s.kubectl("-n", s.ns, "patch", "job", "pool", "-p", `{"spec":{"suspend":false}}`)
	require.NoError(t, err, out)

	var restored corev1.Pod
	s.eventually("the resumed pod running", func() (bool, error) {
		ps := s.jobPods("pool")
		if len(ps) == 1 && ps[0].Status.Phase == corev1.PodRunning {
			restored = ps[0]
			return true, nil
		}
		return false, nil
	})
	slot := restored.Annotations[wiring.AnnotationIdentity]
	require.Contains(t, restored.Annotations, wiring.AnnotationRestore, "the resumed pod restores its slot's checkpoint")
	pvc, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Get(s.ctx, catalog.PVCName(slot), metav1.GetOptions{})
	require.NoError(t, err)
	_, recorded := catalog.RecordOf(pvc, slot)
	require.True(t, recorded)

	// The app finishes its work: exit 0, the pod Succeeded (what a kubelet reports).
	now := metav1.Now()
	restored.Status.Phase = corev1.PodSucceeded
	for i := range restored.Status.ContainerStatuses {
		cs := &restored.Status.ContainerStatuses[i]
		cs.Ready = false
		cs.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed", FinishedAt: now}}
	}
	for i := range restored.Status.Conditions {
		if c := &restored.Status.Conditions[i]; c.Type == corev1.PodReady || c.Type == corev1.ContainersReady {
			c.Status = corev1.ConditionFalse
		}
	}
	_, err = s.c.CoreV1().Pods(s.ns).UpdateStatus(s.ctx, &restored, metav1.UpdateOptions{})
	require.NoError(t, err)

	var next corev1.Pod
	s.eventually("the pod for the second completion running", func() (bool, error) {
		for _, p := range s.jobPods("pool") {
			if p.UID != restored.UID && p.Status.Phase == corev1.PodRunning {
				next = p
				return true, nil
			}
		}
		return false, nil
	})
	assert.NotContains(t, next.Annotations, wiring.AnnotationRestore, "the finished slot's checkpoint is not restored")
	if next.Annotations[wiring.AnnotationIdentity] == slot {
		pvc, err = s.c.CoreV1().PersistentVolumeClaims(s.ns).Get(s.ctx, catalog.PVCName(slot), metav1.GetOptions{})
		require.NoError(t, err)
		_, recorded = catalog.RecordOf(pvc, slot)
		assert.False(t, recorded, "the finished slot's record was dropped when it was claimed again")
	}
	assert.EqualValues(t, 1, s.job("pool").Status.Succeeded)
}

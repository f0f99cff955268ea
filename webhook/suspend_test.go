package webhook

import (
	"context"
	"fmt"
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/stasis-k8s/stasis/tests/fakeagent"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/wiring"
)

// jobPod is a wired, running pod of the Indexed Job default/train (uid job-uid-1).
func jobPod(index int, mod ...func(*corev1.Pod)) *corev1.Pod {
	id := fmt.Sprintf("job/default/train/%d", index)
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("train-%d-abcde", index), Namespace: "default", UID: types.UID(fmt.Sprintf("uid-train-%d", index)),
			Labels: map[string]string{"memverge.ai/checkpoint-mode": "true", "batch.kubernetes.io/controller-uid": "job-uid-1"},
			Annotations: map[string]string{wiring.AnnotationIdentity: id, wiring.AnnotationWired: "true",
				"batch.kubernetes.io/job-completion-index": fmt.Sprint(index)},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "batch/v1", Kind: "Job", Name: "train", UID: "job-uid-1", Controller: ptr.To(true)}},
		},
		Spec: corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "worker", Image: "busybox"}},
			Volumes: []corev1.Volume{{Name: wiring.CheckpointVolume, VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: catalog.PVCName(id)}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning},
	}
	wireSpec(p, id)
	for _, m := range mod {
		m(p)
	}
	return p
}

func jobPVC(index int) *corev1.PersistentVolumeClaim {
	id := fmt.Sprintf("job/default/train/%d", index)
	return catalog.NewPVC(catalog.PVCSpec{Namespace: "default", Name: catalog.PVCName(id), Identity: id,
		Owner: &metav1.OwnerReference{APIVersion: "batch/v1", Kind: "Job", Name: "train", UID: "job-uid-1"}})
}

const jsUID = "a5b0c6d2-0000-4000-8000-000000000001"

func TestJobSuspendHandler(t *testing.T) {
	other := jobPod(5, func(p *corev1.Pod) {
		p.Name, p.UID = "other-job-pod", "uid-other"
		p.OwnerReferences[0].UID = "job-uid-2"
	})
	pending := jobPod(3, func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending })
	tests := []struct {
		name    string
		pods    []*corev1.Pod
		scripts map[string]fakeagent.Script
		budget  float64
		review  func([]byte) []byte
		want    string
		posts   []string // pod UIDs the agent was asked about
		records []int    // indices recorded
		event   string
	}{
		{
			name:    "all active pods checkpointed: allowed, recorded on each PVC",
			pods:    []*corev1.Pod{jobPod(0), jobPod(1), other, pending},
			scripts: map[string]fakeagent.Script{"train-0-abcde": {Polls: 2, Bytes: 100}, "train-1-abcde": {Polls: 4, Bytes: 200}},
			want:    v1Response(jsUID, `"allowed":true`),
			posts:   []string{"uid-train-0", "uid-train-1"}, records: []int{0, 1},
			event: "Normal Checkpointed checkpointed 2 pods for job-suspend",
		},
		{
			name: "one pod still dumping: 429 with progress of the Job",
			pods: []*corev1.Pod{jobPod(0), jobPod(1)}, budget: 50e6,
			scripts: map[string]fakeagent.Script{"train-0-abcde": {Bytes: 1024}, "train-1-abcde": {Polls: -1, Bytes: 3 << 20}},
			want: v1Response(jsUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"TooManyRequests","code":429,`+
				`"message":"checkpoint of 2 pods of Job default/train in progress (1 of 2 done): 3.0 MiB written, retry"}`),
			posts: []string{"uid-train-0", "uid-train-1"}, records: []int{0},
		},
		{
			name:    "one pod failed: denied (fail-closed)",
			pods:    []*corev1.Pod{jobPod(0), jobPod(1)},
			scripts: map[string]fakeagent.Script{"train-1-abcde": {Fail: "criu: can't dump"}},
			want: v1Response(jsUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403,`+
				`"message":"checkpoint of pod default/train-1-abcde failed: criu: can't dump (failure policy fail-closed)"}`),
			posts: []string{"uid-train-0", "uid-train-1"}, records: []int{0},
			event: "Warning CheckpointFailed",
		},
		{
			// Pod 0 claims pod 1's identity by annotation: ignored (re-derived from its index);
			// pod 1 had its completion index changed after creation: not checkpointed (Event),
			// never under index 0's identity.
			name: "forged identity annotation ignored; changed index skipped",
			pods: []*corev1.Pod{
				jobPod(0, func(p *corev1.Pod) { p.Annotations[wiring.AnnotationIdentity] = "job/default/train/1" }),
				jobPod(1, func(p *corev1.Pod) { p.Annotations["batch.kubernetes.io/job-completion-index"] = "0" }),
			},
			scripts: map[string]fakeagent.Script{"train-0-abcde": {Polls: 1, Bytes: 100}},
			want:    v1Response(jsUID, `"allowed":true`),
			posts:   []string{"uid-train-0"}, records: []int{0},
			event: `Warning CheckpointSkipped Job suspended without checkpointing this pod: pod default/train-1-abcde was wired as "job/default/train/1" but its owner and name now give "job/default/train/0"`,
		},
		{
			name: "no running pod: allowed at once",
			pods: []*corev1.Pod{pending, other},
			want: v1Response(jsUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"no running checkpoint-enabled pod"}`),
		},
		{
			name: "already suspended: not a suspend transition",
			pods: []*corev1.Pod{jobPod(0)},
			review: func(b []byte) []byte {
				return []byte(replaceOnce(string(b), `"suspend": false`, `"suspend": true`))
			},
			want: v1Response(jsUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"not a suspend"}`),
		},
		{
			name: "dry run: nothing triggered",
			pods: []*corev1.Pod{jobPod(0)},
			review: func(b []byte) []byte {
				return []byte(replaceOnce(string(b), `"dryRun": false`, `"dryRun": true`))
			},
			want: v1Response(jsUID, `"allowed":true,"status":{"metadata":{},"status":"Success","message":"dry run: no checkpoint taken"}`),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{WaitBudget: 10e9}
			if tt.budget != 0 {
				cfg.WaitBudget = 50e6
			}
			e := newEnv(t, cfg, []runtime.Object{jobPVC(0), jobPVC(1)})
			e.addPods(tt.pods...)
			for n, s := range tt.scripts {
				e.agent.SetScript("default", n, s)
			}
			body := fixture(t, "job-suspend.json")
			if tt.review != nil {
				body = tt.review(body)
			}
			code, resp := e.post(PathJobSuspend, body)
			assert.Equal(t, http.StatusOK, code)
			assert.JSONEq(t, tt.want, resp)
			var posted []string
			for _, r := range e.agent.Requests() {
				posted = append(posted, r.Pod.UID)
				assert.Equal(t, "job-suspend", r.Reason)
			}
			assert.ElementsMatch(t, tt.posts, posted)
			for i := 0; i < 2; i++ {
				id := fmt.Sprintf("job/default/train/%d", i)
				pvc, err := e.client.CoreV1().PersistentVolumeClaims("default").Get(context.Background(), catalog.PVCName(id), metav1.GetOptions{})
				require.NoError(t, err)
				_, ok := catalog.RecordOf(pvc, id)
				assert.Equal(t, contains(tt.records, i), ok, "record for index %d", i)
			}
			if tt.event != "" {
				assert.True(t, containsEvent(e.drainEvents(), tt.event), "event %q", tt.event)
			}
		})
	}
}

func TestSuspendTransition(t *testing.T) {
	job := func(s *bool) *batchv1.Job { return &batchv1.Job{Spec: batchv1.JobSpec{Suspend: s}} }
	tests := []struct {
		old, new *bool
		want     bool
	}{
		{nil, ptr.To(true), true},
		{ptr.To(false), ptr.To(true), true},
		{ptr.To(true), ptr.To(true), false},
		{ptr.To(true), ptr.To(false), false},
		{nil, nil, false},
		{ptr.To(false), nil, false},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, SuspendTransition(job(tt.old), job(tt.new)), "old %v new %v", tt.old, tt.new)
	}
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func replaceOnce(s, old, new string) string {
	for i := 0; i+len(old) <= len(s); i++ {
		if s[i:i+len(old)] == old {
			return s[:i] + new + s[i+len(old):]
		}
	}
	panic("not found: " + old)
}

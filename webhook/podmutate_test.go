package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	admissionv1 "k8s.io/api/admission/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"

	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/wiring"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

// admit posts a review and decodes the response; for allowed mutations it applies the JSON patch
// to the review's object and returns the patched object.
func (e *testEnv) admit(path string, review []byte) (*admissionv1.AdmissionResponse, []byte) {
	e.t.Helper()
	code, body := e.post(path, review)
	require.Equal(e.t, http.StatusOK, code, body)
	var out admissionv1.AdmissionReview
	require.NoError(e.t, json.Unmarshal([]byte(body), &out))
	require.NotNil(e.t, out.Response)
	var in admissionv1.AdmissionReview
	require.NoError(e.t, json.Unmarshal(review, &in))
	assert.Equal(e.t, in.Request.UID, out.Response.UID)
	if !out.Response.Allowed || len(out.Response.Patch) == 0 {
		return out.Response, nil
	}
	require.Equal(e.t, admissionv1.PatchTypeJSONPatch, *out.Response.PatchType)
	p, err := jsonpatch.DecodePatch(out.Response.Patch)
	require.NoError(e.t, err)
	patched, err := p.Apply(in.Request.Object.Raw)
	require.NoError(e.t, err)
	return out.Response, patched
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	var v any
	require.NoError(t, json.Unmarshal(got, &v))
	pretty, _ := json.MarshalIndent(v, "", "  ")
	path := filepath.Join("testdata", "golden", name)
	if *update {
		require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
		require.NoError(t, os.WriteFile(path, append(pretty, '\n'), 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "golden file missing: run go test ./webhook -run %s -update", t.Name())
	assert.JSONEq(t, string(want), string(pretty))
}

func podReview(t *testing.T, pod *corev1.Pod, dryRun bool) []byte {
	t.Helper()
	raw, err := json.Marshal(pod)
	require.NoError(t, err)
	// A pod being created has no status; the typed pod encodes an empty one, which the API
	// server's request would not carry (and the patch leaves alone).
	raw = bytes.Replace(raw, []byte(`,"status":{}`), nil, 1)
	r := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID: "c0c0c0c0-0000-4000-8000-000000000001", Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource: metav1.GroupVersionResource{Version: "v1", Resource: "pods"}, Name: pod.Name, Namespace: "default",
			Operation: admissionv1.Create, Object: runtime.RawExtension{Raw: raw}, DryRun: ptr.To(dryRun),
		},
	}
	b, err := json.Marshal(r)
	require.NoError(t, err)
	return b
}

func reviewObject[T any](t *testing.T, review []byte) *T {
	var r admissionv1.AdmissionReview
	require.NoError(t, json.Unmarshal(review, &r))
	var obj T
	require.NoError(t, json.Unmarshal(r.Request.Object.Raw, &obj))
	return &obj
}

func recordOn(pvc *corev1.PersistentVolumeClaim, rec catalog.Record) *corev1.PersistentVolumeClaim {
	raw, _ := json.Marshal(rec)
	if pvc.Annotations == nil {
		pvc.Annotations = map[string]string{}
	}
	pvc.Annotations[catalog.RecordKey(rec.Identity)] = string(raw)
	return pvc
}

var recTime = time.Date(2026, 11, 28, 9, 30, 0, 0, time.UTC)

func TestPodMutateHandler(t *testing.T) {
	jobID := "job/default/train/1"
	plainID := "pod/default/my-checkpointed-pod"
	tests := []struct {
		name    string
		review  func(t *testing.T) []byte
		objs    []runtime.Object
		golden  string // patched pod
		refused string // exact denial message
		code    int32
		pvc     string // the PVC the controller creates once the pod exists (size checked); never admission
		size    string
		noPVC   bool // Stasis must not create a PVC, neither at admission nor by the controller
		event   string
	}{
		{
			name:   "Indexed Job pod with command: wired, PVC named, created by the controller once the pod exists",
			review: func(t *testing.T) []byte { return fixture(t, "pod-create-job-command.json") },
			golden: "pod-job-command.json", pvc: catalog.PVCName(jobID), size: "1Gi", // 512Mi limit: newest + the one being written
			event: "Normal CheckpointWired wired for checkpointing as job/default/train/1",
		},
		{
			name:   "Indexed Job pod with a complete checkpoint: restore",
			review: func(t *testing.T) []byte { return fixture(t, "pod-create-job-command.json") },
			objs: []runtime.Object{recordOn(jobPVC(1), catalog.Record{Identity: jobID, ID: "ckpt-7", Node: "node-2", Time: recTime,
				Size: 734003200, Containers: map[string]string{"worker": "ckpt-7"}})},
			golden: "pod-job-restore.json",
			event:  "Normal Restoring restoring job/default/train/1 (containers [worker]) from checkpoint ckpt-7 taken on node node-2",
		},
		{
			name:   "plain pod without command, user volume: wired, launcher resolves the entrypoint",
			review: func(t *testing.T) []byte { return fixture(t, "pod-create-plain-nocommand.json") },
			objs:   []runtime.Object{userPVC("checkpointing-volume")},
			golden: "pod-plain-nocommand.json", noPVC: true,
		},
		{
			name:   "plain pod with a checkpoint on its volume: restore",
			review: func(t *testing.T) []byte { return fixture(t, "pod-create-plain-nocommand.json") },
			objs: []runtime.Object{recordOn(userPVC("checkpointing-volume"), catalog.Record{Identity: plainID, ID: "ckpt-3", Node: "node-1", Time: recTime,
				Size: 4096, Containers: map[string]string{"my-container": "ckpt-3"}})},
			golden: "pod-plain-restore.json", noPVC: true,
		},
		{
			name: "dry run: wired, but no PVC created",
			review: func(t *testing.T) []byte {
				p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
				return podReview(t, p, true)
			},
			golden: "pod-job-command.json", noPVC: true,
		},
		{
			name: "storage class and size labels shape the PVC",
			review: func(t *testing.T) []byte {
				p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
				p.Labels["memverge.ai/checkpoint-volume-size"] = "3Gi"
				p.Labels["memverge.ai/checkpoint-storage-class"] = "fast"
				return podReview(t, p, false)
			},
			pvc: catalog.PVCName(jobID), size: "3Gi",
		},
		{
			name: "plain pod without storage volume: refused",
			review: func(t *testing.T) []byte {
				p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-plain-nocommand.json"))
				delete(p.Labels, "memverge.ai/checkpoint-storage-volume")
				return podReview(t, p, false)
			},
			refused: "stasis: memverge.ai/checkpoint-storage-volume: required for a pod without a controller: name a persistentVolumeClaim volume of the pod that holds its checkpoints (Stasis creates PVCs only for Jobs, StatefulSets, Deployments and ReplicaSets)",
			code:    400,
		},
		{
			name: "storage volume that is not a PVC: refused",
			review: func(t *testing.T) []byte {
				p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-plain-nocommand.json"))
				p.Spec.Volumes[0].VolumeSource = corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}
				return podReview(t, p, false)
			},
			refused: `stasis: memverge.ai/checkpoint-storage-volume: checkpoint volume "checkpointing" of pod default/my-checkpointed-pod is not a persistentVolumeClaim (the checkpoint record is kept on the PVC)`,
			code:    400,
		},
		{
			name: "unknown container label: refused naming the label",
			review: func(t *testing.T) []byte {
				p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-plain-nocommand.json"))
				p.Labels["memverge.ai/checkpoint-containers"] = "sidecar"
				return podReview(t, p, false)
			},
			refused: `stasis: memverge.ai/checkpoint-containers: container "sidecar" is not in the pod`,
			code:    400, event: "Warning CheckpointConfigRefused",
		},
		{
			name: "unparsable size: refused",
			review: func(t *testing.T) []byte {
				p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
				p.Labels["memverge.ai/checkpoint-volume-size"] = "lots"
				return podReview(t, p, false)
			},
			refused: `stasis: memverge.ai/checkpoint-volume-size: "lots" is not a size (use e.g. 2Gi or 500Mi)`,
			code:    400,
		},
		{
			name: "DaemonSet pod: refused",
			review: func(t *testing.T) []byte {
				p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
				p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "ds", UID: "ds-uid", Controller: ptr.To(true)}}
				return podReview(t, p, false)
			},
			refused: "stasis: pods owned by DaemonSet ds are not supported; Stasis supports plain pods, Jobs, StatefulSets and single-replica Deployments/ReplicaSets",
			code:    400,
		},
		{
			name: "Deployment with 3 replicas: refused",
			review: func(t *testing.T) []byte {
				p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
				p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "web-5d8f", UID: "rs-uid", Controller: ptr.To(true)}}
				return podReview(t, p, false)
			},
			objs: []runtime.Object{
				&appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Name: "web-5d8f", Namespace: "default",
					OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "Deployment", Name: "web", UID: "d-uid", Controller: ptr.To(true)}}},
					Spec: appsv1.ReplicaSetSpec{Replicas: ptr.To[int32](1)}},
				&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default", UID: "d-uid"}, Spec: appsv1.DeploymentSpec{Replicas: ptr.To[int32](3)}},
			},
			refused: "stasis: Deployment default/web has 3 replicas: its pods have no stable identity; Stasis supports plain pods, Jobs, StatefulSets and single-replica Deployments/ReplicaSets",
			code:    400,
		},
		{
			name: "PVC left by an earlier Job of the same name: refused",
			review: func(t *testing.T) []byte {
				return fixture(t, "pod-create-job-command.json")
			},
			objs: []runtime.Object{catalog.NewPVC(catalog.PVCSpec{Namespace: "default", Name: catalog.PVCName(jobID), Identity: jobID,
				Owner: &metav1.OwnerReference{APIVersion: "batch/v1", Kind: "Job", Name: "train", UID: "old-job-uid"}})},
			refused: "stasis: checkpoint PVC default/" + catalog.PVCName(jobID) + " belongs to an earlier Job train (uid old-job-uid); wait until it is garbage-collected",
			code:    400,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{DefaultVolumeSize: resource.MustParse("10Gi")}, tt.objs)
			review := tt.review(t)
			resp, patched := e.admit(PathMutatePod, review)
			userPVCs := 0
			for _, o := range tt.objs {
				if _, ok := o.(*corev1.PersistentVolumeClaim); ok {
					userPVCs++
				}
			}
			if tt.refused != "" {
				assert.False(t, resp.Allowed)
				require.NotNil(t, resp.Result)
				assert.Equal(t, tt.refused, resp.Result.Message)
				assert.Equal(t, tt.code, resp.Result.Code)
				assert.Empty(t, resp.Patch)
			} else {
				assert.True(t, resp.Allowed, "%+v", resp.Result)
				require.NotNil(t, patched)
				if tt.golden != "" {
					golden(t, tt.golden, patched)
				}
			}
			pvcs, err := e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
			require.NoError(t, err)
			assert.Len(t, pvcs.Items, userPVCs, "admission creates no PVC")
			var ar admissionv1.AdmissionReview
			require.NoError(t, json.Unmarshal(review, &ar))
			if patched != nil && (ar.Request.DryRun == nil || !*ar.Request.DryRun) {
				// The pod now exists: the controller creates what it names.
				var pod corev1.Pod
				require.NoError(t, json.Unmarshal(patched, &pod))
				e.syncPVCs(&pod)
			}
			if tt.pvc != "" {
				pvc, err := e.client.CoreV1().PersistentVolumeClaims("default").Get(context.Background(), tt.pvc, metav1.GetOptions{})
				require.NoError(t, err)
				q := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
				assert.Equal(t, tt.size, q.String())
				require.Len(t, pvc.OwnerReferences, 1)
				assert.Equal(t, "Job", pvc.OwnerReferences[0].Kind)
				assert.Equal(t, "job-uid-1", string(pvc.OwnerReferences[0].UID))
				assert.Equal(t, jobID, pvc.Annotations[catalog.AnnotationIdentity])
				assert.True(t, containsEvent(e.drainEvents(), "Normal CheckpointPVCCreated created checkpoint PVC "+tt.pvc), "Event on the pod")
			}
			if tt.noPVC {
				pvcs, err := e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
				require.NoError(t, err)
				assert.Len(t, pvcs.Items, userPVCs, "no PVC may be created")
			}
			if tt.event != "" {
				assert.True(t, containsEvent(e.drainEvents(), tt.event), "event %q", tt.event)
			}
		})
	}
}

// Reinvocation (reinvocationPolicy IfNeeded) and retries see an already wired pod: no change.
func TestPodMutateIdempotent(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	_, patched := e.admit(PathMutatePod, fixture(t, "pod-create-job-command.json"))
	require.NotNil(t, patched)
	var pod corev1.Pod
	require.NoError(t, json.Unmarshal(patched, &pod))
	resp, again := e.admit(PathMutatePod, podReview(t, &pod, false))
	assert.True(t, resp.Allowed)
	assert.Nil(t, again, "a wired pod gets no patch, got %s", again)
	assert.Empty(t, resp.Patch)
}

// NonIndexed Job pods claim slots: two pods created together get different (new) slots and
// admission writes nothing for them; once they exist the PVC controller creates their PVCs with
// their claims; a pod created after one was evicted takes over the evicted pod's checkpointed slot.
func TestPodMutateNonIndexedClaims(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	base := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
	delete(base.Annotations, "batch.kubernetes.io/job-completion-index")
	delete(base.Labels, "batch.kubernetes.io/job-completion-index")

	var pods []*corev1.Pod
	for i := 0; i < 2; i++ {
		_, patched := e.admit(PathMutatePod, podReview(t, base, false))
		require.NotNil(t, patched)
		var p corev1.Pod
		require.NoError(t, json.Unmarshal(patched, &p))
		pods = append(pods, &p)
	}
	a, b := pods[0].Annotations[wiring.AnnotationIdentity], pods[1].Annotations[wiring.AnnotationIdentity]
	assert.NotEqual(t, a, b, "distinct slots")
	assert.Regexp(t, `^job/default/train/slot/[0-9a-f]{10}$`, a)
	l, err := e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
	require.NoError(t, err)
	assert.Empty(t, l.Items, "admission creates nothing for new slots")

	// Both pods are created and run (the informer sees them): the controller creates their PVCs.
	for i, p := range pods {
		p.Name, p.Namespace = fmt.Sprintf("train-%d", i), "default"
		p.Status.Phase = corev1.PodRunning
		e.syncPVCs(p)
	}
	for _, p := range pods {
		id := p.Annotations[wiring.AnnotationIdentity]
		pvc, err := e.client.CoreV1().PersistentVolumeClaims("default").Get(context.Background(), catalog.PVCName(id), metav1.GetOptions{})
		require.NoError(t, err)
		c, ok := catalog.ClaimOf(pvc, id)
		require.True(t, ok)
		assert.Equal(t, p.Annotations[catalog.AnnotationClaim], c.Token, "the PVC carries the pod's claim")
	}
	require.NoError(t, e.wh.ctrl.store.Save(context.Background(), "default", catalog.PVCName(a), catalog.Record{
		Identity: a, ID: "ckpt-9", Node: "node-1", Time: recTime, Containers: map[string]string{"worker": "ckpt-9"}}))
	evicted := pods[0].DeepCopy()
	evicted.DeletionTimestamp = &metav1.Time{Time: recTime}
	require.NoError(t, e.pods.Update(evicted))

	resp, patched := e.admit(PathMutatePod, podReview(t, base, false))
	require.True(t, resp.Allowed)
	var p corev1.Pod
	require.NoError(t, json.Unmarshal(patched, &p))
	assert.Equal(t, a, p.Annotations[wiring.AnnotationIdentity], "the replacement takes the checkpointed slot")
	assert.Contains(t, p.Annotations[wiring.AnnotationRestore], `"id":"ckpt-9"`)

	// A third pod while both slots are held: a new slot.
	_, patched = e.admit(PathMutatePod, podReview(t, base, false))
	require.NoError(t, json.Unmarshal(patched, &p))
	assert.NotContains(t, []string{a, b}, p.Annotations[wiring.AnnotationIdentity])
}

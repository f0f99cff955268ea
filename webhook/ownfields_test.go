package webhook

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/wiring"
)

// wired admits a pod and returns the wired pod the API server would store.
func (e *testEnv) wired(t *testing.T, review []byte) *corev1.Pod {
	t.Helper()
	resp, patched := e.admit(PathMutatePod, review)
	require.True(t, resp.Allowed, "%+v", resp.Result)
	require.NotNil(t, patched)
	var p corev1.Pod
	require.NoError(t, json.Unmarshal(patched, &p))
	return &p
}

// Attacks on Stasis' own fields: each pod tries to steer where its checkpoints are written or read,
// take another identity, or skip the wiring; each must be refused, naming the field, and must
// leave nothing behind (no PVC, no claim).
func TestPodMutateRefusesStasisFields(t *testing.T) {
	plain := func(t *testing.T) *corev1.Pod {
		return reviewObject[corev1.Pod](t, fixture(t, "pod-create-plain-nocommand.json"))
	}
	job := func(t *testing.T) *corev1.Pod {
		return reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
	}
	tests := []struct {
		name string
		pod  func(t *testing.T, e *testEnv) *corev1.Pod
		want []string // fragments of the denial
	}{
		{
			name: "forged stasis.dev/identity (another pod's checkpoints)",
			pod: func(t *testing.T, _ *testEnv) *corev1.Pod {
				p := job(t)
				p.Annotations[wiring.AnnotationIdentity] = "job/default/other/0"
				return p
			},
			want: []string{`metadata.annotations[stasis.dev/identity]: "job/default/other/0" is not what Stasis derives for this pod ("job/default/train/1")`},
		},
		{
			name: "forged identity on a copy of a wired pod",
			pod: func(t *testing.T, e *testEnv) *corev1.Pod {
				p := e.wired(t, fixture(t, "pod-create-job-command.json"))
				p.Annotations[wiring.AnnotationIdentity] = "job/default/train/7"
				return p
			},
			want: []string{`metadata.annotations[stasis.dev/identity]: "job/default/train/7" is not what Stasis derives`, "copied from a wired pod, or forged"},
		},
		{
			name: "forged stasis.dev/wired to skip the wiring",
			pod: func(t *testing.T, _ *testEnv) *corev1.Pod {
				p := job(t)
				p.Annotations[wiring.AnnotationWired] = "true"
				return p
			},
			want: []string{"the pod sets stasis.dev/wired but is not what Stasis wires for it", "metadata.annotations[stasis.dev/identity]: missing"},
		},
		{
			name: "user volume named like Stasis' checkpoint volume",
			pod: func(t *testing.T, _ *testEnv) *corev1.Pod {
				p := job(t)
				p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: wiring.CheckpointVolume,
					VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "victims-pvc"}}})
				return p
			},
			want: []string{`spec.volumes[0].name: "stasis-checkpoints": names starting with "stasis-" are reserved for Stasis' volumes`},
		},
		{
			name: "user mount under /stasis in a second container",
			pod: func(t *testing.T, _ *testEnv) *corev1.Pod {
				p := plain(t)
				p.Spec.Containers[1].VolumeMounts = []corev1.VolumeMount{{Name: "checkpointing", MountPath: "/stasis/checkpoints"}}
				return p
			},
			want: []string{`spec.containers[1].volumeMounts[0].mountPath: "/stasis/checkpoints": mounts at or under /stasis are reserved for Stasis`},
		},
		{
			name: "user mount over /stasis itself, spelled sideways",
			pod: func(t *testing.T, _ *testEnv) *corev1.Pod {
				p := plain(t)
				p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "checkpointing", MountPath: "//stasis/../stasis/"}}
				return p
			},
			want: []string{`spec.containers[0].volumeMounts[0].mountPath: "//stasis/../stasis/": mounts at or under /stasis are reserved`},
		},
		{
			name: "user init-container mounting Stasis' tools volume elsewhere",
			pod: func(t *testing.T, _ *testEnv) *corev1.Pod {
				p := plain(t)
				p.Spec.InitContainers = []corev1.Container{{Name: "peek", Image: "busybox",
					VolumeMounts: []corev1.VolumeMount{{Name: wiring.ToolsVolume, MountPath: "/run/x"}}}}
				return p
			},
			want: []string{`spec.initContainers[0].volumeMounts[0].name: "stasis-tools" is Stasis' volume: only Stasis mounts it`},
		},
		{
			name: "user init-container named like Stasis' restore",
			pod: func(t *testing.T, _ *testEnv) *corev1.Pod {
				p := plain(t)
				p.Spec.InitContainers = []corev1.Container{{Name: "stasis-restore", Image: "evil"}}
				return p
			},
			want: []string{`spec.initContainers[0].name: "stasis-restore": names starting with "stasis-" are reserved for Stasis' containers`},
		},
		{
			name: "reinvoked pod whose checkpoint volume was re-pointed",
			pod: func(t *testing.T, e *testEnv) *corev1.Pod {
				p := e.wired(t, fixture(t, "pod-create-job-command.json"))
				for i := range p.Spec.Volumes {
					if p.Spec.Volumes[i].Name == wiring.CheckpointVolume {
						p.Spec.Volumes[i].PersistentVolumeClaim.ClaimName = "victims-pvc"
					}
				}
				return p
			},
			want: []string{`spec.volumes[1].name: differs from what Stasis sets there for this pod`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{}, []runtime.Object{userPVC("checkpointing-volume")})
			p := tt.pod(t, e)
			before, err := e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
			require.NoError(t, err)
			resp, patched := e.admit(PathMutatePod, podReview(t, p, false))
			require.False(t, resp.Allowed, "must be refused; got patch %s", patched)
			assert.EqualValues(t, 400, resp.Result.Code)
			for _, w := range tt.want {
				assert.Contains(t, resp.Result.Message, w)
			}
			t.Logf("refusal: %s", resp.Result.Message)
			after, err := e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
			require.NoError(t, err)
			assert.Equal(t, before.Items, after.Items, "a refused pod leaves no PVC and no claim")
			assert.True(t, containsEvent(e.drainEvents(), "Warning CheckpointConfigRefused"))
		})
	}
}

// The restore decision is made anew at every invocation: a record that reached the webhook's
// cache between the first invocation and the reinvocation (or since a copy of a wired pod was
// made) is taken, not refused as a forgery; the agent checks whatever is restored.
func TestPodMutateRestoreDecidedAnew(t *testing.T) {
	e := newEnv(t, Config{}, []runtime.Object{userPVC("checkpointing-volume")})
	p := e.wired(t, fixture(t, "pod-create-plain-nocommand.json"))
	require.Empty(t, p.Annotations[wiring.AnnotationRestore])
	require.NoError(t, e.wh.ctrl.store.Save(context.Background(), "default", "checkpointing-volume", catalog.Record{
		Identity: "pod/default/my-checkpointed-pod", ID: "ckpt-3", Node: "node-1", Time: recTime, Containers: map[string]string{"my-container": "ckpt-3"}}))
	resp, patched := e.admit(PathMutatePod, podReview(t, p, false))
	require.True(t, resp.Allowed, "%+v", resp.Result)
	var again corev1.Pod
	require.NoError(t, json.Unmarshal(patched, &again))
	assert.Contains(t, again.Annotations[wiring.AnnotationRestore], `"id":"ckpt-3"`)
	assert.Contains(t, again.Spec.Containers[0].Env, corev1.EnvVar{Name: wiring.EnvRestoreID, Value: "ckpt-3"})
}

// Our own reinvocation (reinvocationPolicy IfNeeded: the API server calls the webhook again when a
// later webhook changed the pod) is accepted and produces the same pod, also after another webhook
// added a sidecar (not checkpointed by default), a volume, a securityContext, a proxy variable and
// the ServiceAccount token mount to Stasis' init-containers.
func TestPodMutateReinvocationAccepted(t *testing.T) {
	for _, name := range []string{"pod-create-job-command.json", "pod-create-plain-nocommand.json"} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, Config{}, []runtime.Object{userPVC("checkpointing-volume")})
			p := e.wired(t, fixture(t, name))
			resp, again := e.admit(PathMutatePod, podReview(t, p, false))
			require.True(t, resp.Allowed, "%+v", resp.Result)
			assert.Nil(t, again, "the same pod: no patch")

			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "nginx-proxy", Image: "proxy"})
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "mesh-certs"})
			p.Spec.InitContainers[0].SecurityContext = &corev1.SecurityContext{RunAsNonRoot: new(bool)}
			// What the real API server does after our webhook (and why it reinvokes us): the
			// ServiceAccount plugin mounts its token into every container, ours included.
			sa := corev1.VolumeMount{Name: "kube-api-access-x1", ReadOnly: true, MountPath: "/var/run/secrets/kubernetes.io/serviceaccount"}
			for i := range p.Spec.InitContainers {
				p.Spec.InitContainers[i].VolumeMounts = append(p.Spec.InitContainers[i].VolumeMounts, sa)
				p.Spec.InitContainers[i].Env = append(p.Spec.InitContainers[i].Env, corev1.EnvVar{Name: "HTTP_PROXY", Value: "http://proxy"})
			}
			resp, again = e.admit(PathMutatePod, podReview(t, p, false))
			require.True(t, resp.Allowed, "%+v", resp.Result)
			assert.Nil(t, again, "other webhooks' additions stay and need no patch")
			assert.Len(t, e.drainEvents(), 1, "one Event: the first invocation's")
		})
	}
}

// A NonIndexed Job pod claims its slot once: the reinvocation keeps it (verified against the
// catalog), a forged token or a copy of a running pod's claim is refused.
func TestPodMutateReinvocationKeepsClaim(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	base := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
	delete(base.Annotations, "batch.kubernetes.io/job-completion-index")
	delete(base.Labels, "batch.kubernetes.io/job-completion-index")
	p := e.wired(t, podReview(t, base, false))
	slot0 := p.Annotations[wiring.AnnotationIdentity]

	// A new slot: nothing written yet, the slot is the one its token names.
	resp, again := e.admit(PathMutatePod, podReview(t, p, false))
	require.True(t, resp.Allowed, "%+v", resp.Result)
	assert.Nil(t, again, "same pod, same slot")

	// An existing slot (claimed at admission by an annotation): verified against that claim.
	require.NoError(t, e.client.Tracker().Add(catalog.NewPVC(catalog.PVCSpec{Namespace: "default", Name: catalog.PVCName(slot0), Identity: slot0})))
	require.NoError(t, e.wh.ctrl.store.EnsureClaim(context.Background(), "default", catalog.PVCName(slot0), slot0, p.Annotations[catalog.AnnotationClaim]))
	resp, again = e.admit(PathMutatePod, podReview(t, p, false))
	require.True(t, resp.Allowed, "%+v", resp.Result)
	assert.Nil(t, again)
	l, err := e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
	require.NoError(t, err)
	assert.Len(t, l.Items, 1, "no second slot")

	forged := p.DeepCopy()
	forged.Annotations[catalog.AnnotationClaim] = "0123456789abcdef01234567"
	resp, _ = e.admit(PathMutatePod, podReview(t, forged, false))
	require.False(t, resp.Allowed)
	assert.Contains(t, resp.Result.Message, "metadata.annotations[stasis.dev/claim]: the catalog's claim on "+slot0+" is not this pod's")

	// The pod runs; a copy of it (same token) would run a second pod on the same slot.
	running := p.DeepCopy()
	running.Name, running.Namespace, running.Status.Phase = "train-abcde", "default", corev1.PodRunning
	e.addPods(running)
	resp, _ = e.admit(PathMutatePod, podReview(t, p, false))
	require.False(t, resp.Allowed)
	assert.Contains(t, resp.Result.Message, "slot "+slot0+" is held by another running pod")

	other := p.DeepCopy()
	other.Annotations[wiring.AnnotationIdentity] = "job/default/eval/slot/0"
	resp, _ = e.admit(PathMutatePod, podReview(t, other, false))
	require.False(t, resp.Allowed)
	assert.Contains(t, resp.Result.Message, `"job/default/eval/slot/0" is not a slot of Job default/train`)

	// A new slot named by another token (someone else's slot name, own token): refused.
	stolen := p.DeepCopy()
	stolen.Annotations[wiring.AnnotationIdentity] = "job/default/train/slot/ffffffffff"
	resp, _ = e.admit(PathMutatePod, podReview(t, stolen, false))
	require.False(t, resp.Allowed)
	assert.Contains(t, resp.Result.Message, "the catalog's claim on job/default/train/slot/ffffffffff is not this pod's")
}

// A container another webhook injected after ours (and that the labels select) is wired on the
// reinvocation: the pieces Stasis lacks are added, never a reason to refuse.
func TestPodMutateReinvocationWiresInjectedContainer(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	p := e.wired(t, fixture(t, "pod-create-job-command.json"))
	p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "helper", Image: "helper:1", Command: []string{"/helper"}})
	resp, again := e.admit(PathMutatePod, podReview(t, p, false))
	require.True(t, resp.Allowed, "%+v", resp.Result)
	require.NotNil(t, again)
	var out corev1.Pod
	require.NoError(t, json.Unmarshal(again, &out))
	assert.Equal(t, []string{wiring.Binary, wiring.LauncherSubcommand, "--", "/helper"}, out.Spec.Containers[1].Command)
	assert.Contains(t, out.Spec.Containers[1].VolumeMounts, corev1.VolumeMount{Name: wiring.CheckpointVolume, MountPath: wiring.CheckpointMount})
}

// The PVC controller creates only the PVC Stasis gives the pod's (re-derived) identity: a pod that
// names another one (created while the webhook was not looking) gets nothing; a pod whose PVC
// exists changes nothing.
func TestPVCControllerCreatesOnlyOwnPVC(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	p := e.wired(t, fixture(t, "pod-create-job-command.json"))
	bad := p.DeepCopy()
	bad.GenerateName = "forged-"
	for i := range bad.Spec.Volumes {
		if bad.Spec.Volumes[i].Name == wiring.CheckpointVolume {
			bad.Spec.Volumes[i].PersistentVolumeClaim.ClaimName = catalog.PVCName("job/default/train/9")
		}
	}
	e.syncPVCs(bad)
	l, err := e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
	require.NoError(t, err)
	assert.Empty(t, l.Items)
	assert.True(t, containsEvent(e.drainEvents(), "Warning CheckpointConfigRefused checkpoint PVC "+catalog.PVCName("job/default/train/9")+" not created"))

	e.syncPVCs(p)
	e.syncPVCs(p) // again: the lister now has it
	l, err = e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
	require.NoError(t, err)
	require.Len(t, l.Items, 1)
	assert.Equal(t, catalog.PVCName("job/default/train/1"), l.Items[0].Name)
}

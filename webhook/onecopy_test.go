package webhook

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/stasis-k8s/stasis/wiring"
)

// A one-replica Deployment's pod is created while the previous pod of its identity terminates
// (kubectl delete pod: the ReplicaSet replaces it at once): 429 with a Retry-After and an Event,
// until the previous pod has ended or is past its grace period; other identities never wait.
func TestPodMutateWaitsForPreviousCopy(t *testing.T) {
	ctrl := func(kind, name string) []metav1.OwnerReference {
		return []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: kind, Name: name, UID: types.UID("u-" + name), Controller: ptr.To(true)}}
	}
	objs := []runtime.Object{
		&appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Name: "web-abc", Namespace: "default", UID: "u-web-abc", OwnerReferences: ctrl("Deployment", "web")},
			Spec: appsv1.ReplicaSetSpec{Replicas: ptr.To[int32](1)}},
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default", UID: "u-web"}, Spec: appsv1.DeploymentSpec{Replicas: ptr.To[int32](1)}},
	}
	newPod := func() *corev1.Pod {
		p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
		p.GenerateName, p.OwnerReferences = "web-abc-", ctrl("ReplicaSet", "web-abc")
		p.Labels = map[string]string{"memverge.ai/checkpoint-mode": "true"}
		p.Annotations = nil
		return p
	}
	now := time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC) // the env's clock
	old := func(name, identity string, deletion *time.Time, phase corev1.PodPhase) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default",
			Annotations: map[string]string{wiring.AnnotationIdentity: identity}}, Status: corev1.PodStatus{Phase: phase}}
		if deletion != nil {
			p.DeletionTimestamp = &metav1.Time{Time: *deletion}
		}
		return p
	}
	in := func(d time.Duration) *time.Time { x := now.Add(d); return &x }
	tests := []struct {
		name string
		old  *corev1.Pod
		wait bool
	}{
		{name: "previous pod terminating, grace period running: wait", old: old("web-abc-1", "deploy/default/web", in(20*time.Second), corev1.PodRunning), wait: true},
		{name: "previous pod just past its grace period: still wait a moment", old: old("web-abc-1", "deploy/default/web", in(-5*time.Second), corev1.PodRunning), wait: true},
		{name: "previous pod long past its grace period (node gone): go", old: old("web-abc-1", "deploy/default/web", in(-time.Minute), corev1.PodRunning)},
		{name: "previous pod terminated: go", old: old("web-abc-1", "deploy/default/web", in(20*time.Second), corev1.PodFailed)},
		{name: "a copy not being deleted (a surge): go", old: old("web-abc-1", "deploy/default/web", nil, corev1.PodRunning)},
		{name: "another identity terminating: go", old: old("other-1", "deploy/default/other", in(20*time.Second), corev1.PodRunning)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{}, objs)
			e.addPods(tt.old)
			code, body := e.post(PathMutatePod, podReview(t, newPod(), false))
			require.Equal(t, http.StatusOK, code)
			if !tt.wait {
				assert.Contains(t, body, `"allowed":true`)
				return
			}
			assert.Contains(t, body, `"code":429`)
			assert.Contains(t, body, `"retryAfterSeconds":1`)
			assert.Contains(t, body, "the previous pod web-abc-1 of Deployment default/web is still terminating")
			var waiting []string
			for _, ev := range e.drainEvents() {
				if strings.Contains(ev, ReasonWaitingForPreviousPod) {
					waiting = append(waiting, ev)
				}
			}
			assert.Len(t, waiting, 1, "an Event on the ReplicaSet: %q", e.events)
		})
	}
}

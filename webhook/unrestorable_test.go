package webhook

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// The decision: a pod-level PID namespace that is not the container's own is refused, naming the
// field; false and unset are fine.
func TestUnrestorable(t *testing.T) {
	yes, no := true, false
	tests := []struct {
		name string
		spec corev1.PodSpec
		want string // fragment of the error, "" for none
	}{
		{name: "unset", spec: corev1.PodSpec{}},
		{name: "shareProcessNamespace false", spec: corev1.PodSpec{ShareProcessNamespace: &no}},
		{name: "shareProcessNamespace true", spec: corev1.PodSpec{ShareProcessNamespace: &yes},
			want: "spec.shareProcessNamespace: true is not supported for a checkpoint-enabled pod"},
		{name: "hostPID", spec: corev1.PodSpec{HostPID: true}, want: "spec.hostPID: true is not supported"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := unrestorable(&tt.spec)
			if tt.want == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			assert.Contains(t, err.Error(), "PID 1", "the message says why")
		})
	}
}

// Through the pod webhook: both kinds of pod (a Job's, a plain one with its own PVC) are refused
// with 400 and an Event, and nothing is created for them; the same pod without the field is
// wired.
func TestPodMutateRefusesSharedProcessNamespace(t *testing.T) {
	for _, name := range []string{"pod-create-job-command.json", "pod-create-plain-nocommand.json"} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, Config{}, []runtime.Object{userPVC("checkpointing-volume")})
			p := reviewObject[corev1.Pod](t, fixture(t, name))
			yes := true
			p.Spec.ShareProcessNamespace = &yes
			resp, patched := e.admit(PathMutatePod, podReview(t, p, false))
			require.False(t, resp.Allowed, "must be refused; got patch %s", patched)
			assert.EqualValues(t, 400, resp.Result.Code)
			assert.Contains(t, resp.Result.Message, "stasis: spec.shareProcessNamespace: true is not supported")
			assert.True(t, containsEvent(e.drainEvents(), "Warning CheckpointConfigRefused"))
			pvcs, err := e.client.CoreV1().PersistentVolumeClaims("default").List(context.Background(), metav1.ListOptions{})
			require.NoError(t, err)
			assert.Len(t, pvcs.Items, 1, "only the user's PVC")

			p.Spec.ShareProcessNamespace = nil
			resp, patched = e.admit(PathMutatePod, podReview(t, p, false))
			require.True(t, resp.Allowed, "%+v", resp.Result)
			assert.NotNil(t, patched, "wired")
		})
	}
}

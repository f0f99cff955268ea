package webhook

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
)

func TestResolveIdentity(t *testing.T) {
	ctrl := func(apiVersion, kind, name string) []metav1.OwnerReference {
		return []metav1.OwnerReference{{APIVersion: apiVersion, Kind: kind, Name: name, UID: types.UID("u-" + name), Controller: ptr.To(true)}}
	}
	rs := func(name string, replicas int32, owner []metav1.OwnerReference) *appsv1.ReplicaSet {
		return &appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", OwnerReferences: owner}, Spec: appsv1.ReplicaSetSpec{Replicas: ptr.To(replicas)}}
	}
	deploy := func(name string, replicas *int32) *appsv1.Deployment {
		return &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", UID: types.UID("u-" + name)}, Spec: appsv1.DeploymentSpec{Replicas: replicas}}
	}
	tests := []struct {
		name      string
		pod       metav1.ObjectMeta
		objs      []runtime.Object
		key       string
		claimBase string
		owner     string
		err       string
	}{
		{name: "plain pod", pod: metav1.ObjectMeta{Name: "p"}, key: "pod/ns/p"},
		{name: "plain pod with generateName only", pod: metav1.ObjectMeta{GenerateName: "p-"},
			err: "pod without a controller has no metadata.name (only generateName): a re-created pod could never find its checkpoint"},
		{name: "Indexed Job (annotation)", pod: metav1.ObjectMeta{GenerateName: "j-2-", OwnerReferences: ctrl("batch/v1", "Job", "j"),
			Annotations: map[string]string{jobCompletionIndex: "2"}}, key: "job/ns/j/2", owner: "Job/j"},
		{name: "Indexed Job (label)", pod: metav1.ObjectMeta{GenerateName: "j-2-", OwnerReferences: ctrl("batch/v1", "Job", "j"),
			Labels: map[string]string{jobCompletionIndex: "4"}}, key: "job/ns/j/4", owner: "Job/j"},
		{name: "NonIndexed Job: claim", pod: metav1.ObjectMeta{GenerateName: "j-", OwnerReferences: ctrl("batch/v1", "Job", "j")},
			claimBase: "job/ns/j/slot", owner: "Job/j"},
		{name: "StatefulSet", pod: metav1.ObjectMeta{Name: "db-1", OwnerReferences: ctrl("apps/v1", "StatefulSet", "db")}, key: "sts/ns/db-1", owner: "StatefulSet/db"},
		{name: "single-replica Deployment", pod: metav1.ObjectMeta{GenerateName: "web-abc-", OwnerReferences: ctrl("apps/v1", "ReplicaSet", "web-abc")},
			objs: []runtime.Object{rs("web-abc", 1, ctrl("apps/v1", "Deployment", "web")), deploy("web", nil)}, key: "deploy/ns/web", owner: "Deployment/web"},
		{name: "scaled Deployment refused", pod: metav1.ObjectMeta{GenerateName: "web-abc-", OwnerReferences: ctrl("apps/v1", "ReplicaSet", "web-abc")},
			objs: []runtime.Object{rs("web-abc", 1, ctrl("apps/v1", "Deployment", "web")), deploy("web", ptr.To[int32](2))},
			err:  "Deployment ns/web has 2 replicas: its pods have no stable identity"},
		{name: "bare single-replica ReplicaSet", pod: metav1.ObjectMeta{GenerateName: "r-", OwnerReferences: ctrl("apps/v1", "ReplicaSet", "r")},
			objs: []runtime.Object{rs("r", 1, nil)}, key: "rs/ns/r", owner: "ReplicaSet/r"},
		{name: "ReplicaSet with 3 replicas refused", pod: metav1.ObjectMeta{GenerateName: "r-", OwnerReferences: ctrl("apps/v1", "ReplicaSet", "r")},
			objs: []runtime.Object{rs("r", 3, nil)}, err: "ReplicaSet ns/r has 3 replicas"},
		{name: "ReplicaSet not found", pod: metav1.ObjectMeta{GenerateName: "r-", OwnerReferences: ctrl("apps/v1", "ReplicaSet", "gone")},
			err: "reading ReplicaSet ns/gone"},
		{name: "DaemonSet refused", pod: metav1.ObjectMeta{GenerateName: "d-", OwnerReferences: ctrl("apps/v1", "DaemonSet", "d")},
			err: "pods owned by DaemonSet d are not supported; Stasis supports plain pods, Jobs, StatefulSets and single-replica Deployments/ReplicaSets"},
		{name: "custom controller refused", pod: metav1.ObjectMeta{GenerateName: "x-", OwnerReferences: ctrl("example.com/v1", "Job", "x")},
			err: "pods owned by Job x are not supported"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{}, tt.objs)
			id, err := e.wh.resolveIdentity(context.Background(), "ns", &corev1.Pod{ObjectMeta: tt.pod})
			if tt.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.key, id.Key)
			assert.Equal(t, tt.claimBase, id.ClaimBase)
			if tt.owner == "" {
				assert.Nil(t, id.Owner)
			} else {
				require.NotNil(t, id.Owner)
				assert.Equal(t, tt.owner, id.Owner.Kind+"/"+id.Owner.Name)
			}
		})
	}
}

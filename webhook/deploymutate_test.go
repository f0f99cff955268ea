package webhook

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admission/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

func deployment(enabled bool, strategy appsv1.DeploymentStrategy) *appsv1.Deployment {
	lbls := map[string]string{"app": "counter"}
	if enabled {
		lbls["memverge.ai/checkpoint-mode"] = "true"
	}
	return &appsv1.Deployment{
		TypeMeta:   metav1.TypeMeta{APIVersion: "apps/v1", Kind: "Deployment"},
		ObjectMeta: metav1.ObjectMeta{Name: "counter", Namespace: "default"},
		Spec: appsv1.DeploymentSpec{Replicas: ptr.To[int32](1), Strategy: strategy,
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "counter"}},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: lbls},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "counter", Image: "counter:v1"}}}}},
	}
}

// rollingDefault is what the API server's defaulting gives a Deployment that says nothing.
var rollingDefault = appsv1.DeploymentStrategy{Type: appsv1.RollingUpdateDeploymentStrategyType, RollingUpdate: &appsv1.RollingUpdateDeployment{
	MaxUnavailable: ptr.To(intstr.FromString("25%")), MaxSurge: ptr.To(intstr.FromString("25%"))}}

func TestSetRecreate(t *testing.T) {
	tests := []struct {
		name    string
		d       *appsv1.Deployment
		msg     string
		want    appsv1.DeploymentStrategyType
		rolling bool // rollingUpdate left as it was
	}{
		{name: "defaulted RollingUpdate on a checkpointed Deployment: Recreate", d: deployment(true, rollingDefault),
			msg: "spec.strategy set to Recreate (was RollingUpdate)", want: appsv1.RecreateDeploymentStrategyType},
		{name: "maxSurge 0 is not enough (the new pod does not wait for the old one's dump): Recreate",
			d: deployment(true, appsv1.DeploymentStrategy{Type: appsv1.RollingUpdateDeploymentStrategyType, RollingUpdate: &appsv1.RollingUpdateDeployment{
				MaxUnavailable: ptr.To(intstr.FromInt32(1)), MaxSurge: ptr.To(intstr.FromInt32(0))}}),
			msg: "was RollingUpdate", want: appsv1.RecreateDeploymentStrategyType},
		{name: "no strategy at all (not defaulted yet): Recreate", d: deployment(true, appsv1.DeploymentStrategy{}),
			msg: "was RollingUpdate", want: appsv1.RecreateDeploymentStrategyType},
		{name: "already Recreate: unchanged", d: deployment(true, appsv1.DeploymentStrategy{Type: appsv1.RecreateDeploymentStrategyType}),
			want: appsv1.RecreateDeploymentStrategyType},
		{name: "not checkpointed: unchanged", d: deployment(false, rollingDefault), want: appsv1.RollingUpdateDeploymentStrategyType, rolling: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg := SetRecreate("memverge.ai", tt.d)
			if tt.msg == "" {
				assert.Empty(t, msg)
			} else {
				assert.Contains(t, msg, tt.msg)
			}
			assert.Equal(t, tt.want, tt.d.Spec.Strategy.Type)
			assert.Equal(t, tt.rolling, tt.d.Spec.Strategy.RollingUpdate != nil, "rollingUpdate must go with Recreate (the API server refuses both)")
		})
	}
}

func deploymentReview(t *testing.T, d *appsv1.Deployment, op admissionv1.Operation) []byte {
	t.Helper()
	raw, err := json.Marshal(d)
	require.NoError(t, err)
	r := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID: "d0d0d0d0-0000-4000-8000-000000000001", Kind: metav1.GroupVersionKind{Group: "apps", Version: "v1", Kind: "Deployment"},
			Resource: metav1.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"}, Name: d.Name, Namespace: d.Namespace,
			Operation: op, Object: runtime.RawExtension{Raw: raw},
		},
	}
	b, err := json.Marshal(r)
	require.NoError(t, err)
	return b
}

// Through the handler: the patch turns the strategy into Recreate (rollingUpdate removed) and the
// answer carries a warning; a Recreate Deployment gets no patch and no warning.
func TestDeploymentMutateHandler(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	for _, op := range []admissionv1.Operation{admissionv1.Create, admissionv1.Update} {
		resp, patched := e.admit(PathMutateDeployment, deploymentReview(t, deployment(true, rollingDefault), op))
		require.True(t, resp.Allowed)
		require.NotNil(t, patched, "%s: patched", op)
		var d appsv1.Deployment
		require.NoError(t, json.Unmarshal(patched, &d))
		assert.Equal(t, appsv1.DeploymentStrategy{Type: appsv1.RecreateDeploymentStrategyType}, d.Spec.Strategy)
		require.Len(t, resp.Warnings, 1)
		assert.Contains(t, resp.Warnings[0], "stasis: spec.strategy set to Recreate (was RollingUpdate)")
		assert.Equal(t, "counter:v1", d.Spec.Template.Spec.Containers[0].Image, "nothing else changes")
	}
	resp, patched := e.admit(PathMutateDeployment, deploymentReview(t, deployment(true, appsv1.DeploymentStrategy{Type: appsv1.RecreateDeploymentStrategyType}), admissionv1.Update))
	assert.True(t, resp.Allowed)
	assert.Nil(t, patched)
	assert.Empty(t, resp.Warnings)
}

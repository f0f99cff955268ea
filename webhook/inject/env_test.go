package inject

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/wiring"
)

func TestNoMultipathTCP(t *testing.T) {
	tests := []struct {
		name string
		env  []corev1.EnvVar
		want string
	}{
		{"none: set", nil, "multipathtcp=0"},
		{"the user's settings kept", []corev1.EnvVar{{Name: "GODEBUG", Value: "http2debug=1"}}, "http2debug=1,multipathtcp=0"},
		{"the user's own choice wins", []corev1.EnvVar{{Name: "GODEBUG", Value: "multipathtcp=1"}}, "multipathtcp=1"},
		{"empty", []corev1.EnvVar{{Name: "GODEBUG"}}, "multipathtcp=0"},
		{"twice wired: once", []corev1.EnvVar{{Name: "GODEBUG", Value: "multipathtcp=0"}}, "multipathtcp=0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &corev1.Container{Env: tt.env}
			noMultipathTCP(c)
			var got []string
			for _, e := range c.Env {
				if e.Name == "GODEBUG" {
					got = append(got, e.Value)
				}
			}
			assert.Equal(t, []string{tt.want}, got)
		})
	}
}

// A sidecar another webhook added after Stasis wired the pod runs no launcher: evictions dump
// the containers the pod's checkpoint annotation lists, and nothing else.
func TestWrappedOnly(t *testing.T) {
	cfg := &labels.Config{Enabled: true, Containers: []labels.Container{{Name: "app"}, {Name: "vault-agent"}}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{}}}
	assert.Len(t, WrappedOnly(cfg, pod).Containers, 2, "no annotation (wired by an older Stasis): as derived")
	pod.Annotations[wiring.AnnotationCheckpoint] = `{"containers":[{"name":"app","dir":"/stasis/checkpoints/x/app"}]}`
	got := WrappedOnly(cfg, pod)
	require.Len(t, got.Containers, 1)
	assert.Equal(t, "app", got.Containers[0].Name)
	assert.Len(t, cfg.Containers, 2, "the derived config is left as it was")
}

package wire

import (
	"testing"

	"github.com/stretchr/testify/assert"
	corev1 "k8s.io/api/core/v1"
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

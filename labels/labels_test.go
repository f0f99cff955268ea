package labels

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

func spec(containers ...corev1.Container) *corev1.PodSpec {
	return &corev1.PodSpec{
		Containers: containers,
		Volumes:    []corev1.Volume{{Name: "ckpt"}},
	}
}

func ctr(name string, env ...corev1.EnvVar) corev1.Container {
	return corev1.Container{Name: name, Env: env}
}

func TestParse(t *testing.T) {
	p := "memverge.ai/"
	two := spec(ctr("app"), ctr("side"))
	tests := []struct {
		name        string
		labels      map[string]string
		annotations map[string]string
		spec        *corev1.PodSpec
		want        *Config
		wantErr     string
	}{
		{
			name: "no labels: disabled", spec: two,
			want: &Config{Prefix: DefaultPrefix},
		},
		{
			name: "mode false: disabled, rest not checked", spec: two,
			labels: map[string]string{p + Mode: "false", p + VolumeSize: "garbage"},
			want:   &Config{Prefix: DefaultPrefix},
		},
		{
			name: "mode not boolean", spec: two,
			labels:  map[string]string{p + Mode: "yes"},
			wantErr: `memverge.ai/checkpoint-mode: "yes" is not "true" or "false"`,
		},
		{
			name:   "enabled: every container but the default sidecars",
			spec:   spec(ctr("app"), ctr("istio-proxy"), ctr("worker"), ctr("nginx-proxy")),
			labels: map[string]string{p + Mode: "true"},
			want: &Config{Prefix: DefaultPrefix, Enabled: true,
				Containers: []Container{{Name: "app"}, {Name: "worker"}}},
		},
		{
			name: "only sidecars", spec: spec(ctr("istio-proxy")),
			labels:  map[string]string{p + Mode: "true"},
			wantErr: "memverge.ai/checkpoint-containers: not set, and the pod has no container besides istio-proxy, nginx-proxy",
		},
		{
			name: "containers label with label-safe separators", spec: spec(ctr("a"), ctr("b"), ctr("c")),
			labels: map[string]string{p + Mode: "true", p + Containers: "c_a"},
			want: &Config{Prefix: DefaultPrefix, Enabled: true,
				Containers: []Container{{Name: "a"}, {Name: "c"}}},
		},
		{
			name: "containers annotation wins over label", spec: spec(ctr("a"), ctr("b"), ctr("c")),
			labels:      map[string]string{p + Mode: "true", p + Containers: "a"},
			annotations: map[string]string{p + Containers: "b, c"},
			want: &Config{Prefix: DefaultPrefix, Enabled: true,
				Containers: []Container{{Name: "b"}, {Name: "c"}}},
		},
		{
			name: "unknown container", spec: two,
			labels:  map[string]string{p + Mode: "true", p + Containers: "app.db"},
			wantErr: `memverge.ai/checkpoint-containers: container "db" is not in the pod`,
		},
		{
			name: "storage volume present", spec: two,
			labels: map[string]string{p + Mode: "true", p + StorageVolume: "ckpt", p + StorageClass: "fast",
				p + VolumeSize: "2Gi", p + Diagnosis: "true", p + Rootfs: "true"},
			want: &Config{Prefix: DefaultPrefix, Enabled: true, StorageVolume: "ckpt", StorageClass: "fast",
				VolumeSize: ptr(resource.MustParse("2Gi")), Diagnosis: true, Rootfs: true,
				Containers: []Container{{Name: "app"}, {Name: "side"}}},
		},
		{
			name: "storage volume missing", spec: two,
			labels:  map[string]string{p + Mode: "true", p + StorageVolume: "checkpointing"},
			wantErr: `memverge.ai/checkpoint-storage-volume: volume "checkpointing" is not in the pod's volumes`,
		},
		{
			name: "bad size", spec: two,
			labels:  map[string]string{p + Mode: "true", p + VolumeSize: "2GB"},
			wantErr: `memverge.ai/checkpoint-volume-size: "2GB" is not a size (use e.g. 2Gi or 500Mi)`,
		},
		{
			name: "zero size", spec: two,
			labels:  map[string]string{p + Mode: "true", p + VolumeSize: "0"},
			wantErr: `memverge.ai/checkpoint-volume-size: "0" must be larger than zero`,
		},
		{
			name: "bad class", spec: two,
			labels:  map[string]string{p + Mode: "true", p + StorageClass: "Fast_SSD"},
			wantErr: `memverge.ai/checkpoint-storage-class: "Fast_SSD" is not a storage class name`,
		},
		{
			name: "bad diagnosis", spec: two,
			labels:  map[string]string{p + Mode: "true", p + Diagnosis: "1"},
			wantErr: `memverge.ai/checkpoint-diagnosis: "1" is not "true" or "false"`,
		},
		{
			name: "interval", spec: two,
			labels: map[string]string{p + Mode: "true", p + Interval: "15m"},
			want:   &Config{Prefix: DefaultPrefix, Enabled: true, Interval: 15 * time.Minute, Containers: []Container{{Name: "app"}, {Name: "side"}}},
		},
		{
			name: "interval too short", spec: two,
			labels:  map[string]string{p + Mode: "true", p + Interval: "2s"},
			wantErr: `memverge.ai/checkpoint-interval: "2s" is shorter than 10s`,
		},
		{
			name: "interval not a duration", spec: two,
			labels:  map[string]string{p + Mode: "true", p + Interval: "hourly"},
			wantErr: `memverge.ai/checkpoint-interval: "hourly" is not a duration`,
		},
		{
			name: "bad rootfs", spec: two,
			labels:  map[string]string{p + Mode: "true", p + Rootfs: "yes"},
			wantErr: `memverge.ai/checkpoint-rootfs: "yes" is not "true" or "false"`,
		},
		{
			name: "files and options from annotations, env overrides per container",
			spec: spec(ctr("app", corev1.EnvVar{Name: EnvCheckpointFiles, Value: "/var/run/x.pid"},
				corev1.EnvVar{Name: EnvRestoreAdvOptions, Value: "--tcp-close"}), ctr("side")),
			labels: map[string]string{p + Mode: "true"},
			annotations: map[string]string{p + Files: "/tmp/a, /data//b", p + CheckpointAdvancedOpts: "--tcp-established --ghost-limit=10M",
				p + RestoreAdvancedOpts: "--tcp-established"},
			want: &Config{Prefix: DefaultPrefix, Enabled: true, Containers: []Container{
				{Name: "app", Files: []string{"/var/run/x.pid"}, CheckpointOptions: []string{"--tcp-established", "--ghost-limit=10M"},
					RestoreOptions: []string{"--tcp-close"}},
				{Name: "side", Files: []string{"/tmp/a", "/data/b"}, CheckpointOptions: []string{"--tcp-established", "--ghost-limit=10M"},
					RestoreOptions: []string{"--tcp-established"}},
			}},
		},
		{
			name: "relative file", spec: two,
			labels:      map[string]string{p + Mode: "true"},
			annotations: map[string]string{p + Files: "tmp/a"},
			wantErr:     `memverge.ai/checkpoint-files: "tmp/a" is not an absolute path`,
		},
		{
			name: "file with ..", spec: two,
			labels:      map[string]string{p + Mode: "true"},
			annotations: map[string]string{p + Files: "/a/../etc"},
			wantErr:     `memverge.ai/checkpoint-files: "/a/../etc" contains ".."`,
		},
		{
			name: "forbidden CRIU option", spec: two,
			labels:      map[string]string{p + Mode: "true"},
			annotations: map[string]string{p + CheckpointAdvancedOpts: "--leave-running"},
			wantErr:     `memverge.ai/checkpoint-advanced-options: CRIU option "--leave-running" is not allowed`,
		},
		{
			name: "option needing a value without one", spec: two,
			labels:      map[string]string{p + Mode: "true"},
			annotations: map[string]string{p + RestoreAdvancedOpts: "--ghost-limit="},
			wantErr:     `memverge.ai/restore-advanced-options: CRIU option "--ghost-limit=" is not allowed`,
		},
		{
			name:    "bad env option names the container and variable",
			spec:    spec(ctr("app", corev1.EnvVar{Name: EnvCheckpointAdvOptions, Value: "--root=/"})),
			labels:  map[string]string{p + Mode: "true"},
			wantErr: `container "app" env MMC_CHECKPOINT_ADVANCED_OPTIONS: CRIU option "--root=/" is not allowed`,
		},
		{
			name:    "env from valueFrom refused",
			spec:    spec(ctr("app", corev1.EnvVar{Name: EnvCheckpointFiles, ValueFrom: &corev1.EnvVarSource{}})),
			labels:  map[string]string{p + Mode: "true"},
			wantErr: `container "app" env MMC_CHECKPOINT_FILES: must have a literal value`,
		},
		{
			name: "annotation mode false overrides label true", spec: two,
			labels:      map[string]string{p + Mode: "true"},
			annotations: map[string]string{p + Mode: "false"},
			want:        &Config{Prefix: DefaultPrefix},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse("", tt.labels, tt.annotations, tt.spec)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				var le *Error
				assert.ErrorAs(t, err, &le)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestParseCustomPrefix(t *testing.T) {
	c, err := Parse("example.com", map[string]string{"example.com/checkpoint-mode": "true", "memverge.ai/checkpoint-volume-size": "bad"}, nil, spec(ctr("a")))
	require.NoError(t, err)
	assert.True(t, c.Enabled)
	assert.Equal(t, "example.com/checkpoint-mode", c.Key(Mode))
	assert.True(t, Enabled("example.com", map[string]string{"example.com/checkpoint-mode": "true"}, nil))
	assert.False(t, Enabled("memverge.ai", map[string]string{"example.com/checkpoint-mode": "true"}, nil))
}

func TestVolumeSizeFor(t *testing.T) {
	def := resource.MustParse("10Gi")
	withLimit := func(q string) corev1.Container {
		return corev1.Container{Name: "c" + q, Resources: corev1.ResourceRequirements{
			Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse(q)}}}
	}
	tests := []struct {
		name  string
		label *resource.Quantity
		spec  *corev1.PodSpec
		want  string
	}{
		{"label wins", ptr(resource.MustParse("3Gi")), spec(withLimit("1Gi")), "3Gi"},
		{"sum of limits, three copies", nil, spec(withLimit("1Gi"), withLimit("512Mi")), "4608Mi"},
		{"a container without limit: default", nil, spec(withLimit("1Gi"), ctr("x")), "10Gi"},
		{"no limits: default", nil, spec(ctr("x")), "10Gi"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &Config{VolumeSize: tt.label}
			got := c.VolumeSizeFor(tt.spec, def, 3)
			assert.Equal(t, 0, got.Cmp(resource.MustParse(tt.want)), "got %s", got.String())
		})
	}
}

func ptr[T any](v T) *T { return &v }

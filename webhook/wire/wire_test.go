package wire

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"

	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/wiring"
)

func pod() *corev1.Pod {
	return &corev1.Pod{Spec: corev1.PodSpec{
		InitContainers: []corev1.Container{{Name: "user-init", Image: "init"}},
		Containers: []corev1.Container{
			{Name: "app", Image: "app:1", Command: []string{"/app", "serve"}, Args: []string{"--port", "80"},
				Env:             []corev1.EnvVar{{Name: "STASIS_IDENTITY", Value: "stale"}, {Name: "USER", Value: "x"}},
				SecurityContext: &corev1.SecurityContext{Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"SYS_ADMIN", "NET_RAW"}, Drop: []corev1.Capability{"ALL"}}}},
			{Name: "entry", Image: "entry:1"},
			{Name: "istio-proxy", Image: "proxy"},
		},
	}}
}

func input(restore *Restore) Input {
	return Input{
		Identity: "job/ns/j/0", ToolsImage: "stasis-agent:dev", CheckpointVolume: wiring.CheckpointVolume, PVCName: "pvc-0",
		Config:  &labels.Config{Enabled: true, Containers: []labels.Container{{Name: "app", RestoreOptions: []string{"--tcp-established"}}, {Name: "entry"}}},
		Restore: restore,
	}
}

func TestPod(t *testing.T) {
	tests := []struct {
		name    string
		restore *Restore
		inits   []string
	}{
		{"fresh", nil, []string{wiring.ToolsInitContainer, "user-init"}},
		{"restore", &Restore{Ref: wiring.RestoreRef{ID: "c1", Node: "n", Time: "t", Size: 5}, IDs: map[string]string{"app": "c1", "entry": "c1"}},
			[]string{wiring.ToolsInitContainer, "user-init"}},
		{"restore of no selected container: fresh", &Restore{IDs: map[string]string{"other": "c1"}}, []string{wiring.ToolsInitContainer, "user-init"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := pod()
			Pod(p, input(tt.restore))
			var inits []string
			for _, c := range p.Spec.InitContainers {
				inits = append(inits, c.Name)
			}
			assert.Equal(t, tt.inits, inits)

			app, entry, proxy := p.Spec.Containers[0], p.Spec.Containers[1], p.Spec.Containers[2]
			assert.Equal(t, []string{wiring.Binary, "launcher", "--", "/app", "serve"}, app.Command)
			assert.Equal(t, []string{"--port", "80"}, app.Args, "args stay: Kubernetes appends them after the command")
			assert.Equal(t, []string{wiring.Binary, "launcher", wiring.FlagEntrypointFromImage, "--"}, entry.Command)
			assert.Equal(t, pod().Spec.Containers[2], proxy, "unselected containers are left alone")

			env := map[string]corev1.EnvVar{}
			for _, e := range app.Env {
				env[e.Name] = e
			}
			assert.Equal(t, "job/ns/j/0", env[wiring.EnvIdentity].Value, "stale STASIS_ values are replaced")
			assert.Equal(t, "x", env["USER"].Value)
			assert.Equal(t, "/stasis/checkpoints/job_ns_j_0/app", env[wiring.EnvCheckpointDir].Value)
			assert.Equal(t, "metadata.uid", env[wiring.EnvPodUID].ValueFrom.FieldRef.FieldPath)
			assert.Equal(t, "app:1", env[wiring.EnvImage].Value)
			if tt.restore != nil && tt.restore.IDs["app"] != "" {
				assert.Equal(t, "c1", env[wiring.EnvRestoreID].Value)
				assert.Equal(t, `["--tcp-established"]`, env[wiring.EnvRestoreOptions].Value)
				assert.Contains(t, p.Annotations[wiring.AnnotationRestore], `"id":"c1"`)
				assert.Contains(t, p.Annotations[wiring.AnnotationRestore], `"containers":["app","entry"]`, "the containers that restore together")
			} else {
				assert.NotContains(t, env, wiring.EnvRestoreID)
				assert.NotContains(t, p.Annotations, wiring.AnnotationRestore)
			}
			assert.Equal(t, pod().Spec.Containers[0].SecurityContext, app.SecurityContext, "the pod's own security context, nothing added")
			tools := p.Spec.InitContainers[0]
			assert.Equal(t, []string{wiring.ImageBinary, wiring.ToolsInstallSubcommand, "--dest", wiring.ToolsMount}, tools.Command)
			assert.Equal(t, []corev1.Capability{"ALL"}, tools.SecurityContext.Capabilities.Drop)
			assert.True(t, *tools.SecurityContext.RunAsNonRoot)
			assert.False(t, *tools.SecurityContext.AllowPrivilegeEscalation)

			// Idempotent: wiring again changes nothing.
			again := p.DeepCopy()
			Pod(again, input(tt.restore))
			require.Equal(t, p, again)
		})
	}
}

func TestPodKeepsUserMount(t *testing.T) {
	p := pod()
	p.Spec.Volumes = []corev1.Volume{{Name: "mine"}}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "mine", MountPath: wiring.CheckpointMount}}
	in := input(nil)
	in.CheckpointVolume, in.PVCName = "mine", ""
	Pod(p, in)
	assert.Equal(t, []corev1.VolumeMount{{Name: "mine", MountPath: wiring.CheckpointMount},
		{Name: wiring.ToolsVolume, MountPath: wiring.ToolsMount, ReadOnly: true},
		{Name: wiring.AgentVolume, MountPath: wiring.AgentMount, ReadOnly: true}}, p.Spec.Containers[0].VolumeMounts,
		"the agent's socket directory is shared by the node's pods: read-only")
	var names []string
	for _, v := range p.Spec.Volumes {
		names = append(names, v.Name)
	}
	assert.Equal(t, []string{"mine", wiring.ToolsVolume, wiring.AgentVolume}, names, "no Stasis PVC volume for user storage")
}

package inject

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

// Whatever is mounted at one of Stasis' paths is replaced in place by Stasis' own mount (the webhook
// refuses such user mounts; the wiring itself never lets one survive).
func TestPodReplacesMountAtStasisPath(t *testing.T) {
	p := pod()
	p.Spec.Volumes = []corev1.Volume{{Name: "mine"}, {Name: "victim"}}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "victim", MountPath: wiring.CheckpointMount + "/"}}
	in := input(nil)
	in.CheckpointVolume, in.PVCName = "mine", ""
	Pod(p, in)
	mounts := p.Spec.Containers[0].VolumeMounts
	require.Len(t, mounts, 2)
	assert.Equal(t, corev1.VolumeMount{Name: "mine", MountPath: wiring.CheckpointMount}, mounts[0], "replaced in place")
	assert.Equal(t, corev1.VolumeMount{Name: wiring.ToolsVolume, MountPath: wiring.ToolsMount, ReadOnly: true}, mounts[1],
		"the launcher, read-only; no host path: the agent's channel is a socket in the pod's network namespace")
	var names []string
	for _, v := range p.Spec.Volumes {
		names = append(names, v.Name)
	}
	assert.Equal(t, []string{"mine", "victim", wiring.ToolsVolume}, names, "no Stasis PVC volume for user storage, no hostPath")
	for _, v := range p.Spec.Volumes {
		assert.Nil(t, v.HostPath, "volume %s", v.Name)
	}
}

// A forged piece with Stasis' name is overwritten in place, never kept.
func TestPodOverwritesForgedPieces(t *testing.T) {
	p := pod()
	p.Spec.Volumes = []corev1.Volume{{Name: wiring.CheckpointVolume, VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "victim"}}}}
	p.Spec.InitContainers = append(p.Spec.InitContainers, corev1.Container{Name: wiring.ToolsInitContainer, Image: "evil", Command: []string{"/evil"},
		Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{}}})
	Pod(p, input(nil))
	assert.Equal(t, "pvc-0", p.Spec.Volumes[0].PersistentVolumeClaim.ClaimName)
	tools := p.Spec.InitContainers[1]
	assert.Equal(t, wiring.ToolsInitContainer, tools.Name, "replaced where it was")
	assert.Equal(t, "stasis-agent:dev", tools.Image)
	assert.Equal(t, []string{wiring.ImageBinary, "tools-install", "--dest", wiring.ToolsMount}, tools.Command)
	assert.NotNil(t, tools.Resources.Limits, "fields Stasis does not own stay")
}

func TestReservedPath(t *testing.T) {
	for p, want := range map[string]bool{
		"/stasis": true, "/stasis/": true, "/stasis/checkpoints": true, "//stasis": true, "/x/../stasis/tools": true,
		"stasis/agent": true, "/stasis-data": false, "/data/stasis": false, "/": false, "/stasisx/y": false,
	} {
		assert.Equal(t, want, ReservedPath(p), p)
	}
}

// Foreign over a wired pod: identical → nothing; each kind of tampering → named.
func TestForeign(t *testing.T) {
	wired := func() *corev1.Pod {
		p := pod()
		Pod(p, input(nil))
		return p
	}
	tests := []struct {
		name   string
		tamper func(p *corev1.Pod)
		want   []string
	}{
		{"identical", func(*corev1.Pod) {}, nil},
		{"missing volume is added, not refused", func(p *corev1.Pod) { p.Spec.Volumes = p.Spec.Volumes[1:] }, nil},
		{"identity", func(p *corev1.Pod) { p.Annotations[wiring.AnnotationIdentity] = "job/ns/j/9" },
			[]string{`metadata.annotations[stasis.dev/identity]: "job/ns/j/9" is not what Stasis derives for this pod ("job/ns/j/0")`}},
		{"extra annotation", func(p *corev1.Pod) { p.Annotations[wiring.Prefix+"keep-forever"] = "true" },
			[]string{"metadata.annotations[stasis.dev/keep-forever]: stasis.dev/* annotations are Stasis' own, and Stasis sets no such field on this pod"}},
		{"annotation missing", func(p *corev1.Pod) { delete(p.Annotations, wiring.AnnotationWired) },
			[]string{"metadata.annotations[stasis.dev/wired]: missing (Stasis sets it on this pod)"}},
		{"extra mount under /stasis", func(p *corev1.Pod) {
			p.Spec.Containers[2].VolumeMounts = append(p.Spec.Containers[2].VolumeMounts, corev1.VolumeMount{Name: "x", MountPath: "/stasis/checkpoints"})
		}, []string{`spec.containers[2].volumeMounts[0].mountPath: "/stasis/checkpoints": mounts at or under /stasis are reserved for Stasis, and Stasis sets no such field on this pod`}},
		{"mount made read-write", func(p *corev1.Pod) { p.Spec.Containers[0].VolumeMounts[0].ReadOnly = false },
			[]string{"spec.containers[0].volumeMounts[0].mountPath: differs from what Stasis sets there for this pod"}},
		{"tools image", func(p *corev1.Pod) { p.Spec.InitContainers[0].Image = "evil" },
			[]string{"spec.initContainers[0].name: differs from what Stasis sets there for this pod"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := wired()
			tt.tamper(p)
			want := p.DeepCopy()
			Strip(want)
			Pod(want, input(nil))
			assert.Equal(t, tt.want, Foreign(p, want))
		})
	}
}

func TestStripThenWireIsWired(t *testing.T) {
	p := pod()
	Pod(p, input(nil))
	again := p.DeepCopy()
	Strip(again)
	assert.False(t, Marked(again))
	assert.Empty(t, Reserved(again))
	Pod(again, input(nil))
	assert.Empty(t, Foreign(p, again))
}

func TestSpecIdentity(t *testing.T) {
	p := pod()
	cfg := input(nil).Config
	assert.Empty(t, SpecIdentity(p, cfg), "not wired")
	Pod(p, input(nil))
	assert.Equal(t, "job/ns/j/0", SpecIdentity(p, cfg))
	p.Annotations[wiring.AnnotationIdentity] = "job/ns/other/0"
	assert.Equal(t, "job/ns/j/0", SpecIdentity(p, cfg), "annotations are not read")
	p.Spec.Containers[1].Env[len(p.Spec.Containers[1].Env)-1] = corev1.EnvVar{Name: "X"}
	setEnvFor(p, "entry", wiring.EnvIdentity, "job/ns/j/1")
	assert.Empty(t, SpecIdentity(p, cfg), "containers disagree")
}

func setEnvFor(p *corev1.Pod, container, name, value string) {
	for i := range p.Spec.Containers {
		if p.Spec.Containers[i].Name == container {
			setEnv(&p.Spec.Containers[i], corev1.EnvVar{Name: name, Value: value})
		}
	}
}

// Cluster Autoscaler may scale the node down despite Stasis' tools emptyDir; a user's own list
// of safe volumes is kept.
func TestPodSafeToEvictLocalVolumes(t *testing.T) {
	p := pod()
	Pod(p, input(nil))
	assert.Equal(t, wiring.ToolsVolume, p.Annotations[caSafeToEvict])
	p = pod()
	p.Annotations = map[string]string{caSafeToEvict: "scratch"}
	Pod(p, input(nil))
	assert.Equal(t, "scratch,"+wiring.ToolsVolume, p.Annotations[caSafeToEvict])
	again := p.DeepCopy()
	Pod(again, input(nil))
	assert.Equal(t, p.Annotations, again.Annotations, "idempotent")
}

// The ServiceAccount plugin's pass after our webhook finds nothing to add to Stasis' init
// container (it gets the token mount the plugin would give it, no second one on a reinvocation),
// so the API server has no reason to call the webhook again; a pod without the token volume
// gets no mount.
func TestPodPreAppliesServiceAccountTokenMount(t *testing.T) {
	tokenMount := corev1.VolumeMount{Name: "kube-api-access-x7k2p", ReadOnly: true, MountPath: serviceAccountTokenPath}
	p := pod()
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: tokenMount.Name})
	for i := range p.Spec.Containers {
		p.Spec.Containers[i].VolumeMounts = append(p.Spec.Containers[i].VolumeMounts, tokenMount)
	}
	p.Spec.InitContainers[0].VolumeMounts = append(p.Spec.InitContainers[0].VolumeMounts, tokenMount)
	Pod(p, input(nil))
	require.Equal(t, wiring.ToolsInitContainer, p.Spec.InitContainers[0].Name)
	assert.Equal(t, []corev1.VolumeMount{{Name: wiring.ToolsVolume, MountPath: wiring.ToolsMount}, tokenMount}, p.Spec.InitContainers[0].VolumeMounts)
	// What the plugin does on its second pass: every container with a mount at the path is left alone.
	for _, cs := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for _, c := range cs {
			n := 0
			for _, m := range c.VolumeMounts {
				if m.MountPath == serviceAccountTokenPath {
					n++
				}
			}
			assert.Equal(t, 1, n, "container %s: one token mount", c.Name)
		}
	}
	// Our own reinvocation (or a copy) wires to the same pod.
	again := p.DeepCopy()
	Pod(again, input(nil))
	assert.Equal(t, p, again)
	want := p.DeepCopy()
	Strip(want)
	Pod(want, input(nil))
	assert.Empty(t, Foreign(p, want))

	bare := pod()
	Pod(bare, input(nil))
	assert.Equal(t, []corev1.VolumeMount{{Name: wiring.ToolsVolume, MountPath: wiring.ToolsMount}}, bare.Spec.InitContainers[0].VolumeMounts, "automount off: no token")
}

// Package inject applies the pod-wiring contract (package wiring) to a pod spec: the tools
// init-container, the launcher-wrapped commands, the checkpoint and agent volumes, the environment
// and, when a checkpoint is restored, the restore init-container and annotation.
//
// Pod is idempotent and authoritative: every piece it owns (annotations stasis.dev/*, volumes and
// containers named stasis-*, mounts at Stasis' paths) is set to exactly Stasis' value, replacing what
// was there in place, so wiring a wired pod again (a reinvoked webhook, a retried request) changes
// nothing and a forged piece never survives. Foreign (check.go) tells the webhook which of a pod's
// reserved fields Stasis did not write.
package inject

import (
	"encoding/json"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/wiring"
)

// Input is what the webhook decided about a pod.
type Input struct {
	Identity string
	Config   *labels.Config
	// ToolsImage runs the tools and restore init-containers.
	ToolsImage string
	// CheckpointVolume is the pod volume holding checkpoints (the user's, or wiring.CheckpointVolume).
	CheckpointVolume string
	// PVCName, when set, adds wiring.CheckpointVolume backed by this claim (Stasis-created storage).
	PVCName string
	// Restore is the checkpoint to restore; nil for a fresh start.
	Restore *Restore
	// Extra annotations to set (e.g. the NonIndexed Job claim).
	Annotations map[string]string
	// Keep is the webhook's --keep-checkpoints, passed to agents.
	Keep int
}

// Restore names a complete checkpoint.
type Restore struct {
	Ref wiring.RestoreRef
	// IDs maps container name to the checkpoint ID to restore (below CheckpointDir(identity, name)).
	IDs map[string]string
}

// Pod wires pod in place.
func Pod(pod *corev1.Pod, in Input) {
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	pod.Annotations[wiring.AnnotationIdentity] = in.Identity
	pod.Annotations[wiring.AnnotationWired] = "true"
	// What the agent dumps when the pod ends without an admission review (SIGTERM): the same
	// request an eviction sends.
	spec, _ := json.Marshal(CheckpointRequest(in.Config, in.Identity, in.Keep, pod))
	pod.Annotations[wiring.AnnotationCheckpoint] = string(spec)
	safeToEvict(pod)
	for k, v := range in.Annotations {
		pod.Annotations[k] = v
	}

	ensureVolume(&pod.Spec, corev1.Volume{Name: wiring.ToolsVolume,
		VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	if in.PVCName != "" {
		ensureVolume(&pod.Spec, corev1.Volume{Name: wiring.CheckpointVolume,
			VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: in.PVCName}}})
	}

	toolsMount := corev1.VolumeMount{Name: wiring.ToolsVolume, MountPath: wiring.ToolsMount}
	ckptMount := corev1.VolumeMount{Name: in.CheckpointVolume, MountPath: wiring.CheckpointMount}

	setInitContainer(&pod.Spec, 0, corev1.Container{
		Name:            wiring.ToolsInitContainer,
		Image:           in.ToolsImage,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Command:         []string{wiring.ImageBinary, wiring.ToolsInstallSubcommand, "--dest", wiring.ToolsMount},
		VolumeMounts:    []corev1.VolumeMount{toolsMount},
		SecurityContext: restrictedContext(),
	})
	serviceAccountTokenMount(&pod.Spec, wiring.ToolsInitContainer)

	// The agent restores what the annotation names (it reads it from the runtime's pod sandbox):
	// the checkpoint, and the containers that restore from it together.
	delete(pod.Annotations, wiring.AnnotationRestore) // decided anew at every invocation
	if restored := restoredContainers(in); len(restored) > 0 {
		ref := in.Restore.Ref
		ref.Containers = restored
		b, _ := json.Marshal(ref)
		pod.Annotations[wiring.AnnotationRestore] = string(b)
	}

	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		cc, ok := in.Config.Container(c.Name)
		if !ok {
			continue
		}
		if !wiring.Wrapped(c.Command) {
			c.Command = wiring.LauncherCommand(c.Command)
		}
		fieldEnv := func(name, path string) corev1.EnvVar {
			// apiVersion as the API server defaults it, so that a reinvocation sees our own value.
			return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: path}}}
		}
		setEnv(c, fieldEnv(wiring.EnvPodName, "metadata.name"))
		setEnv(c, fieldEnv(wiring.EnvPodNamespace, "metadata.namespace"))
		setEnv(c, fieldEnv(wiring.EnvPodUID, "metadata.uid"))
		setEnv(c, corev1.EnvVar{Name: wiring.EnvContainerName, Value: c.Name})
		setEnv(c, corev1.EnvVar{Name: wiring.EnvImage, Value: c.Image})
		setEnv(c, corev1.EnvVar{Name: wiring.EnvCheckpointDir, Value: wiring.CheckpointDir(in.Identity, c.Name)})
		setEnv(c, corev1.EnvVar{Name: wiring.EnvIdentity, Value: in.Identity})
		setEnv(c, corev1.EnvVar{Name: wiring.EnvFreezeWatchdog, Value: freezeWatchdog(pod).String()})
		setEnv(c, corev1.EnvVar{Name: wiring.EnvGracePeriod, Value: strconv.FormatInt(gracePeriod(pod), 10)})
		noMultipathTCP(c)
		c.Env = without(c.Env, func(e corev1.EnvVar) bool { return e.Name == wiring.EnvRestoreID || e.Name == wiring.EnvRestoreOptions })
		if id := restoreID(in.Restore, c.Name); id != "" {
			setEnv(c, corev1.EnvVar{Name: wiring.EnvRestoreID, Value: id})
			if len(cc.RestoreOptions) > 0 {
				opts, _ := json.Marshal(cc.RestoreOptions)
				setEnv(c, corev1.EnvVar{Name: wiring.EnvRestoreOptions, Value: string(opts)})
			}
		}
		ensureMount(c, corev1.VolumeMount{Name: wiring.ToolsVolume, MountPath: wiring.ToolsMount, ReadOnly: true})
		ensureMount(c, ckptMount)
		// Read-only: connecting to the socket works, replacing it or filling the host's /run does not.
	}
}

// freezeWatchdog is the launcher's own limit on a frozen app: beyond the agent's thaw, and beyond
// the pod's grace period, so that the app of a pod whose preStop hook runs is not resumed.
func freezeWatchdog(pod *corev1.Pod) time.Duration {
	return wiring.DefaultFreezeWatchdog + time.Duration(gracePeriod(pod))*time.Second
}

// gracePeriod is the pod's terminationGracePeriodSeconds, defaulted as the API server does.
func gracePeriod(pod *corev1.Pod) int64 {
	if g := pod.Spec.TerminationGracePeriodSeconds; g != nil {
		return *g
	}
	return corev1.DefaultTerminationGracePeriodSeconds
}

// WrappedOnly narrows cfg (derived from the pod as it is now) to the containers Stasis wrapped
// when it wired the pod, as its checkpoint annotation lists them: a sidecar another mutating
// webhook added afterwards runs no launcher and cannot be dumped. Everything else stays derived
// (the annotation is mutable after creation; narrowing is all a forged one could do).
func WrappedOnly(cfg *labels.Config, pod *corev1.Pod) *labels.Config {
	v, ok := pod.Annotations[wiring.AnnotationCheckpoint]
	var spec agentapi.CheckpointRequest
	if !ok || json.Unmarshal([]byte(v), &spec) != nil {
		return cfg
	}
	wrapped := map[string]bool{}
	for _, c := range spec.Containers {
		wrapped[c.Name] = true
	}
	out := *cfg
	out.Containers = nil
	for _, c := range cfg.Containers {
		if wrapped[c.Name] {
			out.Containers = append(out.Containers, c)
		}
	}
	return &out
}

// CheckpointRequest is what an agent dumps of a pod: its checkpointed containers with their
// directories, files and options, and the pod's controller (the pod reference and the reason are
// the caller's).
func CheckpointRequest(cfg *labels.Config, identity string, keep int, pod *corev1.Pod) agentapi.CheckpointRequest {
	req := agentapi.CheckpointRequest{Diagnosis: cfg.Diagnosis, Keep: keep}
	if ref := metav1.GetControllerOf(pod); ref != nil {
		req.Owner = string(ref.UID)
	}
	if cfg.Interval > 0 {
		req.Interval = cfg.Interval.String()
	}
	for _, c := range cfg.Containers {
		req.Containers = append(req.Containers, agentapi.ContainerSpec{
			Name: c.Name, Dir: wiring.CheckpointDir(identity, c.Name),
			Files: c.Files, CriuOptions: c.CheckpointOptions, Rootfs: cfg.Rootfs,
		})
	}
	return req
}

func restoreID(r *Restore, container string) string {
	if r == nil {
		return ""
	}
	return r.IDs[container]
}

func named(name string) func(corev1.Container) bool {
	return func(c corev1.Container) bool { return c.Name == name }
}

// ensureVolume puts v in the pod, replacing a volume of the same name in place.
func ensureVolume(spec *corev1.PodSpec, v corev1.Volume) {
	if i := slices.IndexFunc(spec.Volumes, func(x corev1.Volume) bool { return x.Name == v.Name }); i >= 0 {
		spec.Volumes[i] = v
		return
	}
	spec.Volumes = append(spec.Volumes, v)
}

// ensureMount puts m in the container, replacing whatever is mounted at its path in place.
func ensureMount(c *corev1.Container, m corev1.VolumeMount) {
	if i := slices.IndexFunc(c.VolumeMounts, func(x corev1.VolumeMount) bool { return cleanPath(x.MountPath) == m.MountPath }); i >= 0 {
		c.VolumeMounts[i] = m
		return
	}
	c.VolumeMounts = append(c.VolumeMounts, m)
}

// setInitContainer inserts want at index at, or, when an init-container of its name exists, sets
// the fields Stasis owns in place (see projection): what others added (the ServiceAccount token
// mount, resources, a securityContext, proxy variables) stays.
// The ServiceAccount admission plugin's token volume and mount path (k8s.io/kubernetes
// plugin/pkg/admission/serviceaccount: ServiceAccountVolumeName, DefaultAPITokenMountPath).
const (
	serviceAccountVolumePrefix = "kube-api-access-"
	serviceAccountTokenPath    = "/var/run/secrets/kubernetes.io/serviceaccount"
)

// serviceAccountTokenMount gives Stasis' init container the mount the ServiceAccount admission
// plugin would give it. That plugin runs before the webhooks and mounts the pod's API token into
// every container without a mount at its path; ours comes after it, so the API server re-runs the
// plugin, which then adds the mount to our container, and the changed pod makes the API server
// call our webhook a second time (reinvocationPolicy IfNeeded): twice the admission work for every
// pod. With the mount already there the plugin changes nothing, and the pod ends the same as
// before. A pod without the token volume (automount off) gets nothing.
func serviceAccountTokenMount(spec *corev1.PodSpec, container string) {
	vol := slices.IndexFunc(spec.Volumes, func(v corev1.Volume) bool { return strings.HasPrefix(v.Name, serviceAccountVolumePrefix) })
	i := slices.IndexFunc(spec.InitContainers, named(container))
	if vol < 0 || i < 0 {
		return
	}
	c := &spec.InitContainers[i]
	if slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == serviceAccountTokenPath }) {
		return
	}
	c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: spec.Volumes[vol].Name, ReadOnly: true, MountPath: serviceAccountTokenPath})
}

func setInitContainer(spec *corev1.PodSpec, at int, want corev1.Container) {
	i := slices.IndexFunc(spec.InitContainers, named(want.Name))
	if i < 0 {
		spec.InitContainers = slices.Insert(spec.InitContainers, at, want)
		return
	}
	c := &spec.InitContainers[i]
	c.Image, c.Command, c.Args, c.WorkingDir, c.EnvFrom = want.Image, want.Command, want.Args, want.WorkingDir, want.EnvFrom
	c.Env = without(c.Env, func(e corev1.EnvVar) bool { return ownEnv(e.Name) })
	c.Env = append(slices.Clone(want.Env), c.Env...)
	c.VolumeMounts = without(c.VolumeMounts, ownMount)
	c.VolumeMounts = append(slices.Clone(want.VolumeMounts), c.VolumeMounts...)
}

// setEnv sets a variable, replacing one of the same name: Stasis owns the STASIS_* names.
// noMultipathTCP turns off Go's Multipath TCP (on by default for listeners since Go 1.24): CRIU
// cannot dump an MPTCP socket ("Unsupported proto 262"), so every Go server would refuse its
// drain. For Go programs the sockets become plain TCP, which nothing sees; other programs ignore
// GODEBUG. A user's own GODEBUG keeps its settings (and a multipathtcp setting of its own wins).
func noMultipathTCP(c *corev1.Container) {
	const setting = "multipathtcp=0"
	for i := range c.Env {
		e := &c.Env[i]
		if e.Name != "GODEBUG" {
			continue
		}
		if e.ValueFrom == nil && !strings.Contains(e.Value, "multipathtcp=") {
			e.Value = strings.TrimSuffix(e.Value+","+setting, ",")
			e.Value = strings.TrimPrefix(e.Value, ",")
		}
		return
	}
	c.Env = append(c.Env, corev1.EnvVar{Name: "GODEBUG", Value: setting})
}

func setEnv(c *corev1.Container, e corev1.EnvVar) {
	for i := range c.Env {
		if c.Env[i].Name == e.Name {
			c.Env[i] = e
			return
		}
	}
	c.Env = append(c.Env, e)
}

// restrictedContext is the tools init-container's: what Pod Security "restricted" asks of any
// container (it copies one file into an emptyDir and needs nothing else).
func restrictedContext() *corev1.SecurityContext {
	yes, no, user := true, false, int64(65532)
	return &corev1.SecurityContext{
		RunAsNonRoot: &yes, RunAsUser: &user, AllowPrivilegeEscalation: &no, ReadOnlyRootFilesystem: &yes,
		Capabilities:   &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
}

// restoredContainers are the wired containers the restore covers, in pod order.
func restoredContainers(in Input) []string {
	var out []string
	if in.Restore == nil {
		return nil
	}
	for _, c := range in.Config.Containers {
		if in.Restore.IDs[c.Name] != "" {
			out = append(out, c.Name)
		}
	}
	return out
}

// RestoredContainers lists the containers a restore covers, sorted.
func RestoredContainers(r *Restore) []string {
	var out []string
	for n, id := range r.IDs {
		if id != "" {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// caSafeToEvict is the Cluster Autoscaler annotation naming local volumes whose loss does not block
// scaling a node down. Stasis' tools volume holds only the launcher, copied again in every pod.
const caSafeToEvict = "cluster-autoscaler.kubernetes.io/safe-to-evict-local-volumes"

func safeToEvict(pod *corev1.Pod) {
	have := pod.Annotations[caSafeToEvict]
	for _, v := range strings.Split(have, ",") {
		if strings.TrimSpace(v) == wiring.ToolsVolume {
			return
		}
	}
	if have != "" {
		have += ","
	}
	pod.Annotations[caSafeToEvict] = have + wiring.ToolsVolume
}

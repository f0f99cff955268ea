package inject

import (
	"fmt"
	"path"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"

	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/wiring"
)

// Stasis' namespace in a pod: what only Stasis may write. A user field there would change where
// checkpoints are written or read (a volume named like Stasis' checkpoint volume, a mount over
// /stasis/checkpoints), whose identity a pod takes (stasis.dev/identity) or whether it is wired at
// all (stasis.dev/wired). Names are reserved by prefix so that a piece Stasis adds later is covered
// without a list to keep in step.
const (
	// ReservedPrefix starts the names of Stasis' volumes and containers.
	ReservedPrefix = "stasis-"
	// ReservedDir is where Stasis mounts its volumes in a container.
	ReservedDir = "/stasis"
)

// ReservedName reports whether a volume or container name is Stasis'.
func ReservedName(name string) bool { return strings.HasPrefix(name, ReservedPrefix) }

// ReservedPath reports whether a mount path is at or under ReservedDir ("/stasis/../stasis/x" and
// "//stasis" included).
func ReservedPath(p string) bool {
	c := cleanPath(p)
	return c == ReservedDir || strings.HasPrefix(c, ReservedDir+"/")
}

func cleanPath(p string) string { return path.Clean("/" + p) }

// Marked reports whether a pod carries any stasis.dev/* annotation: it claims to be wired already
// (our own reinvocation, a retried request, or a copy or forgery of a wired pod).
func Marked(pod *corev1.Pod) bool {
	for k := range pod.Annotations {
		if strings.HasPrefix(k, wiring.Prefix) {
			return true
		}
	}
	return false
}

// item is one field of Stasis' namespace in a pod.
type item struct {
	key   string // identifies the field across two versions of the pod
	field string // field path for messages
	what  string // why the field is Stasis': the refusal of a user-set field
	value any
}

// inventory lists a pod's fields in Stasis' namespace, in field order.
func inventory(pod *corev1.Pod) []item {
	var out []item
	for _, k := range sortedKeys(pod.Annotations) {
		if strings.HasPrefix(k, wiring.Prefix) {
			out = append(out, item{key: "a/" + k, field: fmt.Sprintf("metadata.annotations[%s]", k),
				what: fmt.Sprintf("%s* annotations are Stasis' own", wiring.Prefix), value: pod.Annotations[k]})
		}
	}
	for i, v := range pod.Spec.Volumes {
		if ReservedName(v.Name) {
			out = append(out, item{key: "v/" + v.Name, field: fmt.Sprintf("spec.volumes[%d].name", i),
				what: fmt.Sprintf("%q: names starting with %q are reserved for Stasis' volumes", v.Name, ReservedPrefix), value: v})
		}
	}
	out = append(out, containerItems("initContainers", pod.Spec.InitContainers)...)
	out = append(out, containerItems("containers", pod.Spec.Containers)...)
	for i, c := range pod.Spec.EphemeralContainers {
		out = append(out, mountItems("ephemeralContainers", i, c.Name, c.VolumeMounts)...)
	}
	return out
}

func containerItems(kind string, cs []corev1.Container) []item {
	var out []item
	for i, c := range cs {
		if ReservedName(c.Name) {
			// Compared as a whole: what it runs, with what, on which volumes.
			out = append(out, item{key: "c/" + kind + "/" + c.Name, field: fmt.Sprintf("spec.%s[%d].name", kind, i),
				what: fmt.Sprintf("%q: names starting with %q are reserved for Stasis' containers", c.Name, ReservedPrefix), value: projection(c)})
			continue
		}
		out = append(out, mountItems(kind, i, c.Name, c.VolumeMounts)...)
	}
	return out
}

func mountItems(kind string, i int, container string, mounts []corev1.VolumeMount) []item {
	var out []item
	for j, m := range mounts {
		key := "m/" + kind + "/" + container + "/" + cleanPath(m.MountPath)
		switch {
		case ReservedPath(m.MountPath):
			out = append(out, item{key: key, field: fmt.Sprintf("spec.%s[%d].volumeMounts[%d].mountPath", kind, i, j),
				what: fmt.Sprintf("%q: mounts at or under %s are reserved for Stasis", m.MountPath, ReservedDir), value: m})
		case ReservedName(m.Name):
			out = append(out, item{key: key, field: fmt.Sprintf("spec.%s[%d].volumeMounts[%d].name", kind, i, j),
				what: fmt.Sprintf("%q is Stasis' volume: only Stasis mounts it", m.Name), value: m})
		}
	}
	return out
}

// projection is what Stasis owns of its own containers: what runs, in which directory, its
// STASIS_* variables and its mounts of Stasis' volumes and paths. Admission plugins and other
// webhooks may set the rest (the ServiceAccount plugin adds its token mount to every container,
// after our webhook, which is why the API server reinvokes us; a mesh adds proxy variables)
// without making the pod look forged.
func projection(c corev1.Container) corev1.Container {
	return corev1.Container{Name: c.Name, Image: c.Image, Command: c.Command, Args: c.Args, WorkingDir: c.WorkingDir,
		Env: without(c.Env, func(e corev1.EnvVar) bool { return !ownEnv(e.Name) }), EnvFrom: c.EnvFrom,
		VolumeMounts: without(c.VolumeMounts, func(m corev1.VolumeMount) bool { return !ownMount(m) })}
}

func ownEnv(name string) bool { return strings.HasPrefix(name, "STASIS_") }

func ownMount(m corev1.VolumeMount) bool { return ReservedPath(m.MountPath) || ReservedName(m.Name) }

// Reserved lists the fields of Stasis' namespace an unmarked pod sets (each one user-set), as
// "field path: problem".
func Reserved(pod *corev1.Pod) []string {
	var out []string
	for _, it := range inventory(pod) {
		out = append(out, it.field+": "+it.what)
	}
	return out
}

// Foreign compares a marked pod with want, what Stasis produces for it, over Stasis' namespace, and
// lists every difference: every field the pod has there must be exactly Stasis' own, and it must
// carry exactly Stasis' annotations (a pod with only some of them set them itself). Volumes and
// mounts Stasis would add but the pod lacks are no difference: Pod adds them (a container another
// webhook injected after ours gets wired on our reinvocation). Empty means the pod is Stasis' own
// wiring for its re-derived identity: a reinvocation, or a copy that is harmless because it is
// what Stasis would write anyway.
func Foreign(pod, want *corev1.Pod) []string {
	have, wanted := inventory(pod), map[string]item{}
	// Decided anew at each invocation, and written anew by Pod whatever the pod holds: the
	// checkpoint spec follows the containers a reinvocation wires (another webhook's sidecar added
	// since), and the restore decision follows the catalog, whose cache may have seen a record
	// arrive between two invocations. Neither is trusted by the agent (it reads the checkpoint
	// spec from the runtime, and checks any checkpoint it restores).
	rederived := map[string]bool{"a/" + wiring.AnnotationCheckpoint: true, "a/" + wiring.AnnotationRestore: true}
	for _, it := range inventory(want) {
		wanted[it.key] = it
	}
	var out []string
	seen := map[string]bool{}
	for _, it := range have {
		seen[it.key] = true
		w, ok := wanted[it.key]
		switch {
		case rederived[it.key]:
		case !ok:
			out = append(out, it.field+": "+it.what+", and Stasis sets no such field on this pod")
		case equality.Semantic.DeepEqual(it.value, w.value):
		case strings.HasPrefix(it.key, "a/"):
			out = append(out, fmt.Sprintf("%s: %q is not what Stasis derives for this pod (%q)", it.field, it.value, w.value))
		default:
			out = append(out, it.field+": differs from what Stasis sets there for this pod")
		}
	}
	for _, it := range inventory(want) {
		if !seen[it.key] && strings.HasPrefix(it.key, "a/") && !rederived[it.key] {
			out = append(out, fmt.Sprintf("%s: missing (%s)", it.field, "Stasis sets it on this pod"))
		}
	}
	return out
}

// Strip removes every field of Stasis' namespace from pod: what is left is the user's pod, which
// Pod then wires from scratch (to compute what a marked pod should be).
func Strip(pod *corev1.Pod) {
	for k := range pod.Annotations {
		if strings.HasPrefix(k, wiring.Prefix) {
			delete(pod.Annotations, k)
		}
	}
	pod.Spec.Volumes = without(pod.Spec.Volumes, func(v corev1.Volume) bool { return ReservedName(v.Name) })
	notOurs := func(c corev1.Container) bool { return ReservedName(c.Name) }
	pod.Spec.InitContainers = without(pod.Spec.InitContainers, notOurs)
	pod.Spec.Containers = without(pod.Spec.Containers, notOurs)
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for i := range cs {
			cs[i].VolumeMounts = without(cs[i].VolumeMounts, ownMount)
		}
	}
	for i := range pod.Spec.EphemeralContainers {
		c := &pod.Spec.EphemeralContainers[i]
		c.VolumeMounts = without(c.VolumeMounts, ownMount)
	}
}

func without[T any](s []T, drop func(T) bool) []T {
	var out []T
	for _, x := range s {
		if !drop(x) {
			out = append(out, x)
		}
	}
	if out == nil && s != nil {
		return s[:0]
	}
	return out
}

// SpecIdentity is the identity written into a wired pod's spec (STASIS_IDENTITY of its
// checkpointed containers). The spec is immutable after creation, where the webhook set this
// value itself; annotations are not (anyone who may patch the pod may change them). Empty when a
// checkpointed container is not wired.
func SpecIdentity(pod *corev1.Pod, cfg *labels.Config) string {
	var id string
	for _, c := range pod.Spec.Containers {
		if _, ok := cfg.Container(c.Name); !ok {
			continue
		}
		v := envValue(c, wiring.EnvIdentity)
		if !wiring.Wrapped(c.Command) || v == "" || (id != "" && v != id) {
			return ""
		}
		id = v
	}
	return id
}

func envValue(c corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name && e.ValueFrom == nil {
			return e.Value
		}
	}
	return ""
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

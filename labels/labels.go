// Package labels is the user-facing API of Stasis: the MemVerge Transparent Checkpoint Operator
// labels (prefix configurable, default memverge.ai) and the per-container MMC_* environment
// overrides. Parse is the only parser; it returns one validated Config or an *Error that names the
// label and the problem.
//
// Label values cannot hold '/', spaces or commas, which paths and CRIU options need. Every key is
// therefore also accepted as an annotation of the same name, and the annotation wins over the label.
package labels

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
)

// DefaultPrefix is the label prefix of the MemVerge Transparent Checkpoint Operator.
const DefaultPrefix = "memverge.ai"

// Label names (without prefix).
const (
	Mode                    = "checkpoint-mode"
	StorageVolume           = "checkpoint-storage-volume"
	Containers              = "checkpoint-containers"
	StorageClass            = "checkpoint-storage-class"
	VolumeSize              = "checkpoint-volume-size"
	Files                   = "checkpoint-files"
	Diagnosis               = "checkpoint-diagnosis"
	Rootfs                  = "checkpoint-rootfs"
	CheckpointAdvancedOpts  = "checkpoint-advanced-options"
	RestoreAdvancedOpts     = "restore-advanced-options"
	EnvCheckpointFiles      = "MMC_CHECKPOINT_FILES"
	EnvCheckpointAdvOptions = "MMC_CHECKPOINT_ADVANCED_OPTIONS"
	EnvRestoreAdvOptions    = "MMC_RESTORE_ADVANCED_OPTIONS"
)

// Keys lists every label name, in the order of the reference table.
var Keys = []string{Mode, StorageVolume, Containers, StorageClass, VolumeSize, Files, Diagnosis,
	CheckpointAdvancedOpts, RestoreAdvancedOpts, Rootfs}

// DefaultExcludedContainers are left out when checkpoint-containers is not set: sidecars whose
// state is not worth keeping and that often cannot be dumped.
var DefaultExcludedContainers = []string{"istio-proxy", "nginx-proxy"}

// CheckpointOptions are the CRIU dump options a user may add (checkpoint-advanced-options,
// MMC_CHECKPOINT_ADVANCED_OPTIONS). Options that change where or how Stasis runs CRIU (images dir,
// leave-running, root, pid) are not among them: the agent owns those. A trailing '=' takes a value.
var CheckpointOptions = []string{"--tcp-established", "--tcp-close", "--tcp-skip-in-flight",
	"--skip-in-flight", "--file-locks", "--ext-unix-sk", "--shell-job", "--link-remap",
	"--ghost-limit=", "--timeout=", "--manage-cgroups=", "--network-lock=", "--external=",
	"--skip-mnt=", "--enable-external-masters", "--enable-external-sharing", "--track-mem",
	"--auto-dedup", "--compress"}

// RestoreOptions are the CRIU restore options a user may add (restore-advanced-options,
// MMC_RESTORE_ADVANCED_OPTIONS).
var RestoreOptions = []string{"--tcp-established", "--tcp-close", "--file-locks", "--ext-unix-sk",
	"--shell-job", "--link-remap", "--ghost-limit=", "--timeout=", "--manage-cgroups=",
	"--external=", "--skip-mnt=", "--enable-external-masters", "--enable-external-sharing",
	"--auto-dedup", "--lazy-pages"}

// Config is the validated checkpoint configuration of one pod.
type Config struct {
	// Prefix the keys were read with (e.g. "memverge.ai").
	Prefix string
	// Enabled: checkpoint-mode is "true".
	Enabled bool
	// StorageVolume is the pod volume that holds checkpoints; empty means Stasis provides a PVC
	// (controller-owned pods only).
	StorageVolume string
	// StorageClass for a PVC Stasis creates; empty means the cluster default.
	StorageClass string
	// VolumeSize for a PVC Stasis creates; nil when the label is not set (see DefaultVolumeSize).
	VolumeSize *resource.Quantity
	// Diagnosis keeps CRIU logs and the images of failed dumps.
	Diagnosis bool
	// Rootfs carries every change of the containers' writable layers (created, modified and
	// deleted paths) with their checkpoints, not only the files their processes hold (a Stasis
	// extension of the label set).
	Rootfs bool
	// Containers are the containers to checkpoint, in pod order, with their effective options.
	Containers []Container
}

// Container is one checkpointed container with the labels and its MMC_* overrides applied.
type Container struct {
	Name              string
	Files             []string
	CheckpointOptions []string
	RestoreOptions    []string
}

// Names returns the names of the selected containers.
func (c *Config) Names() []string {
	out := make([]string, len(c.Containers))
	for i, ct := range c.Containers {
		out[i] = ct.Name
	}
	return out
}

// Container returns the selected container with that name.
func (c *Config) Container(name string) (Container, bool) {
	for _, ct := range c.Containers {
		if ct.Name == name {
			return ct, true
		}
	}
	return Container{}, false
}

// Key returns the full key (prefix/name) of a label.
func (c *Config) Key(name string) string { return Key(c.Prefix, name) }

// Key returns the full key (prefix/name) of a label.
func Key(prefix, name string) string { return prefix + "/" + name }

// Error is a refused label value: it names the label (or env variable) and the problem.
type Error struct {
	Key     string
	Problem string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Key, e.Problem) }

// Lookup returns the value of a key: the annotation if present, else the label.
func Lookup(meta map[string]string, annotations map[string]string, key string) (string, bool) {
	if v, ok := annotations[key]; ok {
		return v, true
	}
	v, ok := meta[key]
	return v, ok
}

// Enabled reports whether labels/annotations turn checkpointing on, without validating the rest.
func Enabled(prefix string, lbls, annotations map[string]string) bool {
	v, _ := Lookup(lbls, annotations, Key(prefix, Mode))
	return strings.TrimSpace(v) == "true"
}

// ParsePod parses a pod's configuration.
func ParsePod(prefix string, pod *corev1.Pod) (*Config, error) {
	return Parse(prefix, pod.Labels, pod.Annotations, &pod.Spec)
}

// Parse validates the keys under prefix in labels and annotations against a pod spec. A pod
// without checkpoint-mode "true" gives a Config with Enabled false and nothing else checked.
func Parse(prefix string, lbls, annotations map[string]string, spec *corev1.PodSpec) (*Config, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	c := &Config{Prefix: prefix}
	get := func(name string) (string, bool) {
		v, ok := Lookup(lbls, annotations, Key(prefix, name))
		return strings.TrimSpace(v), ok
	}
	bad := func(name, format string, a ...any) error {
		return &Error{Key: Key(prefix, name), Problem: fmt.Sprintf(format, a...)}
	}

	// flag reads a "true"/"false" label; unset or empty is false.
	flag := func(name string, to *bool) error {
		switch v, _ := get(name); v {
		case "true":
			*to = true
		case "false", "":
		default:
			return bad(name, "%q is not \"true\" or \"false\"", v)
		}
		return nil
	}
	if err := flag(Mode, &c.Enabled); err != nil {
		return nil, err
	}
	if !c.Enabled {
		return c, nil
	}

	if v, ok := get(StorageVolume); ok && v != "" {
		if !slices.ContainsFunc(spec.Volumes, func(vol corev1.Volume) bool { return vol.Name == v }) {
			return nil, bad(StorageVolume, "volume %q is not in the pod's volumes", v)
		}
		c.StorageVolume = v
	}
	if v, ok := get(StorageClass); ok && v != "" {
		if errs := validation.IsDNS1123Subdomain(v); len(errs) > 0 {
			return nil, bad(StorageClass, "%q is not a storage class name: %s", v, strings.Join(errs, "; "))
		}
		c.StorageClass = v
	}
	if v, ok := get(VolumeSize); ok && v != "" {
		q, err := resource.ParseQuantity(v)
		if err != nil {
			return nil, bad(VolumeSize, "%q is not a size (use e.g. 2Gi or 500Mi)", v)
		}
		if q.Sign() <= 0 {
			return nil, bad(VolumeSize, "%q must be larger than zero", v)
		}
		c.VolumeSize = &q
	}
	if err := errors.Join(flag(Diagnosis, &c.Diagnosis), flag(Rootfs, &c.Rootfs)); err != nil {
		return nil, err
	}

	var podFiles, podCkpt, podRestore []string
	var err error
	if v, ok := get(Files); ok {
		if podFiles, err = parseFiles(v); err != nil {
			return nil, bad(Files, "%v", err)
		}
	}
	if v, ok := get(CheckpointAdvancedOpts); ok {
		if podCkpt, err = parseOptions(v, CheckpointOptions); err != nil {
			return nil, bad(CheckpointAdvancedOpts, "%v", err)
		}
	}
	if v, ok := get(RestoreAdvancedOpts); ok {
		if podRestore, err = parseOptions(v, RestoreOptions); err != nil {
			return nil, bad(RestoreAdvancedOpts, "%v", err)
		}
	}

	selected, err := selectContainers(spec, get)
	if err != nil {
		return nil, bad(Containers, "%v", err)
	}
	for _, ct := range spec.Containers {
		if !slices.Contains(selected, ct.Name) {
			continue
		}
		cc := Container{Name: ct.Name, Files: podFiles, CheckpointOptions: podCkpt, RestoreOptions: podRestore}
		envBad := func(env, format string, a ...any) error {
			return &Error{Key: fmt.Sprintf("container %q env %s", ct.Name, env), Problem: fmt.Sprintf(format, a...)}
		}
		for _, e := range ct.Env {
			var target *[]string
			var parse func(string) ([]string, error)
			switch e.Name {
			case EnvCheckpointFiles:
				target, parse = &cc.Files, parseFiles
			case EnvCheckpointAdvOptions:
				target, parse = &cc.CheckpointOptions, func(s string) ([]string, error) { return parseOptions(s, CheckpointOptions) }
			case EnvRestoreAdvOptions:
				target, parse = &cc.RestoreOptions, func(s string) ([]string, error) { return parseOptions(s, RestoreOptions) }
			default:
				continue
			}
			if e.ValueFrom != nil {
				return nil, envBad(e.Name, "must have a literal value (valueFrom cannot be read at admission)")
			}
			vals, err := parse(e.Value)
			if err != nil {
				return nil, envBad(e.Name, "%v", err)
			}
			*target = vals
		}
		c.Containers = append(c.Containers, cc)
	}
	return c, nil
}

// containerSep splits checkpoint-containers. Container names are DNS labels, so '_' and '.' (which
// label values allow) can separate them as well as ',' and spaces (annotations only).
var containerSep = regexp.MustCompile(`[\s,_.]+`)

func selectContainers(spec *corev1.PodSpec, get func(string) (string, bool)) ([]string, error) {
	var out []string
	if v, ok := get(Containers); ok && v != "" {
		for _, n := range containerSep.Split(v, -1) {
			if n == "" || slices.Contains(out, n) {
				continue
			}
			if !slices.ContainsFunc(spec.Containers, func(c corev1.Container) bool { return c.Name == n }) {
				return nil, fmt.Errorf("container %q is not in the pod", n)
			}
			out = append(out, n)
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("%q names no container", v)
		}
		return out, nil
	}
	for _, c := range spec.Containers {
		if !slices.Contains(DefaultExcludedContainers, c.Name) {
			out = append(out, c.Name)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("not set, and the pod has no container besides %s", strings.Join(DefaultExcludedContainers, ", "))
	}
	return out, nil
}

var listSep = regexp.MustCompile(`[\s,]+`)

// parseFiles reads a comma- or space-separated list of absolute paths.
func parseFiles(v string) ([]string, error) {
	var out []string
	for _, p := range listSep.Split(strings.TrimSpace(v), -1) {
		if p == "" {
			continue
		}
		if !path.IsAbs(p) {
			return nil, fmt.Errorf("%q is not an absolute path", p)
		}
		if slices.Contains(strings.Split(p, "/"), "..") {
			return nil, fmt.Errorf("%q contains \"..\"", p)
		}
		if path.Clean(p) == "/" {
			return nil, fmt.Errorf("%q would copy the whole filesystem", p)
		}
		out = append(out, path.Clean(p))
	}
	return out, nil
}

// CheckOptions checks CRIU options one by one against allowed (CheckpointOptions or
// RestoreOptions): the agent checks again what reaches it from a pod.
func CheckOptions(opts, allowed []string) error {
	for _, o := range opts {
		if strings.ContainsAny(o, " ,\n\r") {
			return fmt.Errorf("CRIU option %q: one option per element", o)
		}
		if _, err := parseOptions(o, allowed); err != nil {
			return err
		}
	}
	return nil
}

// parseOptions reads space- or comma-separated CRIU options and checks them against allowed.
func parseOptions(v string, allowed []string) ([]string, error) {
	var out []string
	for _, o := range listSep.Split(strings.TrimSpace(v), -1) {
		if o == "" {
			continue
		}
		name, _, hasValue := strings.Cut(o, "=")
		ok := false
		for _, a := range allowed {
			if base, ok2 := strings.CutSuffix(a, "="); ok2 {
				if name == base && hasValue && len(o) > len(a) {
					ok = true
				}
			} else if o == a {
				ok = true
			}
		}
		if !ok {
			return nil, fmt.Errorf("CRIU option %q is not allowed (allowed: %s)", o, strings.Join(allowed, " "))
		}
		out = append(out, o)
	}
	return out, nil
}

// MemoryLimits is the sum of the memory limits of all containers, and false when one of them has
// none (the sum would then not bound the checkpoint size).
func MemoryLimits(spec *corev1.PodSpec) (resource.Quantity, bool) {
	var sum resource.Quantity
	for _, c := range spec.Containers {
		l, ok := c.Resources.Limits[corev1.ResourceMemory]
		if !ok {
			return resource.Quantity{}, false
		}
		sum.Add(l)
	}
	return sum, len(spec.Containers) > 0
}

// VolumeSizeFor is the size of a PVC Stasis creates: the label, else room for copies checkpoints
// of the containers' memory (the sum of their memory limits each), else def.
func (c *Config) VolumeSizeFor(spec *corev1.PodSpec, def resource.Quantity, copies int) resource.Quantity {
	if c.VolumeSize != nil {
		return *c.VolumeSize
	}
	if q, ok := MemoryLimits(spec); ok {
		return *resource.NewQuantity(q.Value()*int64(max(copies, 1)), resource.BinarySI)
	}
	return def
}

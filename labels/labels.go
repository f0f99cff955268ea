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
	"time"

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
	Interval                = "checkpoint-interval"
	CheckpointAdvancedOpts  = "checkpoint-advanced-options"
	RestoreAdvancedOpts     = "restore-advanced-options"
	EnvCheckpointFiles      = "MMC_CHECKPOINT_FILES"
	EnvCheckpointAdvOptions = "MMC_CHECKPOINT_ADVANCED_OPTIONS"
	EnvRestoreAdvOptions    = "MMC_RESTORE_ADVANCED_OPTIONS"
)

// Keys lists every label name, in the order of the reference table.
var Keys = []string{Mode, StorageVolume, Containers, StorageClass, VolumeSize, Files, Diagnosis,
	CheckpointAdvancedOpts, RestoreAdvancedOpts, Rootfs, Interval}

// DefaultExcludedContainers are left out when checkpoint-containers is not set: sidecars whose
// state is not worth keeping and that often cannot be dumped.
var DefaultExcludedContainers = []string{"istio-proxy", "nginx-proxy"}

// CheckpointOptions are the CRIU dump options a user may add (checkpoint-advanced-options,
// MMC_CHECKPOINT_ADVANCED_OPTIONS). Options that change where or how Stasis runs CRIU (images dir,
// leave-running, root, pid, network lock) are not among them: the agent owns those.
// --tcp-established and --tcp-close are accepted for TCO manifests and change nothing: the agent
// always closes established connections (a new pod has a new IP; see docs/agent.md). A trailing '=' takes a value.
var CheckpointOptions = []string{"--tcp-established", "--tcp-close", "--tcp-skip-in-flight",
	"--skip-in-flight", "--file-locks", "--ext-unix-sk", "--shell-job", "--link-remap",
	"--ghost-limit=", "--timeout=", "--manage-cgroups=", "--external=",
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
	// Interval asks for periodic checkpoints with the app left running (a Stasis extension): what
	// a crash or a lost node costs is the work since the last one. Zero: none.
	Interval time.Duration
	// Containers are the containers to checkpoint, in pod order, with their effective options.
	Containers []Container
}

// MinInterval is the shortest checkpoint-interval: each periodic dump pauses the app.
const MinInterval = 10 * time.Second

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
	r := reader{prefix: prefix, lbls: lbls, annotations: annotations}
	c := &Config{Prefix: prefix}
	if err := r.flag(Mode, &c.Enabled); err != nil {
		return nil, err
	}
	if !c.Enabled {
		return c, nil
	}
	if err := r.storage(c, spec); err != nil {
		return nil, err
	}
	if err := errors.Join(r.flag(Diagnosis, &c.Diagnosis), r.flag(Rootfs, &c.Rootfs), r.interval(c)); err != nil {
		return nil, err
	}
	pod, err := r.podDefaults()
	if err != nil {
		return nil, err
	}
	selected, err := selectContainers(spec, r.get)
	if err != nil {
		return nil, r.bad(Containers, "%v", err)
	}
	for _, ct := range spec.Containers {
		if !slices.Contains(selected, ct.Name) {
			continue
		}
		cc, err := containerConfig(ct, pod)
		if err != nil {
			return nil, err
		}
		c.Containers = append(c.Containers, cc)
	}
	return c, nil
}

// reader reads one pod's keys (label or annotation, see Lookup) under a prefix.
type reader struct {
	prefix            string
	lbls, annotations map[string]string
}

func (r reader) get(name string) (string, bool) {
	v, ok := Lookup(r.lbls, r.annotations, Key(r.prefix, name))
	return strings.TrimSpace(v), ok
}

func (r reader) bad(name, format string, a ...any) error {
	return &Error{Key: Key(r.prefix, name), Problem: fmt.Sprintf(format, a...)}
}

// flag reads a "true"/"false" key; unset or empty is false.
func (r reader) flag(name string, to *bool) error {
	switch v, _ := r.get(name); v {
	case "true":
		*to = true
	case "false", "":
	default:
		return r.bad(name, "%q is not \"true\" or \"false\"", v)
	}
	return nil
}

// interval reads checkpoint-interval ("15m", "90s").
func (r reader) interval(c *Config) error {
	v, ok := r.get(Interval)
	if !ok || v == "" {
		return nil
	}
	d, err := time.ParseDuration(v)
	switch {
	case err != nil:
		return r.bad(Interval, "%q is not a duration (use e.g. 15m or 90s)", v)
	case d < MinInterval:
		return r.bad(Interval, "%q is shorter than %s (each periodic checkpoint pauses the app)", v, MinInterval)
	}
	c.Interval = d
	return nil
}

// storage reads where checkpoints are kept: the pod's volume, or the class and size of the PVC
// Stasis creates.
func (r reader) storage(c *Config, spec *corev1.PodSpec) error {
	if v, ok := r.get(StorageVolume); ok && v != "" {
		if !slices.ContainsFunc(spec.Volumes, func(vol corev1.Volume) bool { return vol.Name == v }) {
			return r.bad(StorageVolume, "volume %q is not in the pod's volumes", v)
		}
		c.StorageVolume = v
	}
	if v, ok := r.get(StorageClass); ok && v != "" {
		if errs := validation.IsDNS1123Subdomain(v); len(errs) > 0 {
			return r.bad(StorageClass, "%q is not a storage class name: %s", v, strings.Join(errs, "; "))
		}
		c.StorageClass = v
	}
	if v, ok := r.get(VolumeSize); ok && v != "" {
		q, err := resource.ParseQuantity(v)
		if err != nil {
			return r.bad(VolumeSize, "%q is not a size (use e.g. 2Gi or 500Mi)", v)
		}
		if q.Sign() <= 0 {
			return r.bad(VolumeSize, "%q must be larger than zero", v)
		}
		c.VolumeSize = &q
	}
	return nil
}

// podDefaults reads the pod-level files and CRIU options, which each container's MMC_* env may
// override.
func (r reader) podDefaults() (Container, error) {
	var c Container
	for _, k := range []struct {
		name  string
		to    *[]string
		parse func(string) ([]string, error)
	}{
		{Files, &c.Files, parseFiles},
		{CheckpointAdvancedOpts, &c.CheckpointOptions, func(v string) ([]string, error) { return parseOptions(v, CheckpointOptions) }},
		{RestoreAdvancedOpts, &c.RestoreOptions, func(v string) ([]string, error) { return parseOptions(v, RestoreOptions) }},
	} {
		v, ok := r.get(k.name)
		if !ok {
			continue
		}
		vals, err := k.parse(v)
		if err != nil {
			return c, r.bad(k.name, "%v", err)
		}
		*k.to = vals
	}
	return c, nil
}

// containerConfig applies a container's MMC_* env over the pod-level defaults.
func containerConfig(ct corev1.Container, pod Container) (Container, error) {
	cc := Container{Name: ct.Name, Files: pod.Files, CheckpointOptions: pod.CheckpointOptions, RestoreOptions: pod.RestoreOptions}
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
		bad := &Error{Key: fmt.Sprintf("container %q env %s", ct.Name, e.Name)}
		if e.ValueFrom != nil {
			bad.Problem = "must have a literal value (valueFrom cannot be read at admission)"
			return cc, bad
		}
		vals, err := parse(e.Value)
		if err != nil {
			bad.Problem = err.Error()
			return cc, bad
		}
		*target = vals
	}
	return cc, nil
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

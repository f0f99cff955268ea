package webhook

import (
	"fmt"
	"math"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/wiring"
)

// ReasonGracePeriodShort is the Event of a pod whose grace period cannot fit a dump of its memory.
const ReasonGracePeriodShort = "GracePeriodTooShort"

// Dump speed assumed by the grace warning when the flags do not say. Measured here (make bench,
// 1 GiB): the agent dumps about 1 GiB/s to a local disk with fsync. A durable dump to a network
// volume is several times slower, and a warning that comes too late is worth nothing: the default
// is the conservative 200 MiB/s, plus a fixed cost for freezing, CRIU's start and the manifest.
const (
	DefaultDumpSpeed    = 200 << 20 // bytes per second
	DefaultDumpOverhead = 2 * time.Second
)

// graceWarning returns a warning when the pod's terminationGracePeriodSeconds cannot fit a dump of
// its checkpointed containers' memory at the assumed speed: on kubectl delete, preemption,
// scale-down or a graceful node shutdown the launcher checkpoints within the grace period (less
// wiring.TerminationMargin), and a dump cut short leaves the previous checkpoint the newest.
// Evictions and Job suspends are held by the webhook instead and are not concerned. Empty when
// the dump fits or the memory is unknown (a container without a memory limit or request). Only a
// warning: the pod is never refused for it.
func graceWarning(cfg *labels.Config, spec *corev1.PodSpec, speed int64, overhead time.Duration) string {
	mem, ok := checkpointedMemory(cfg, spec)
	if !ok || mem <= 0 || speed <= 0 {
		return ""
	}
	grace := time.Duration(corev1.DefaultTerminationGracePeriodSeconds) * time.Second
	if spec.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second
	}
	budget := max(grace-wiring.TerminationMargin, time.Second) // as the launcher counts
	need := overhead + time.Duration(float64(mem)/float64(speed)*float64(time.Second))
	if need <= budget {
		return ""
	}
	fit := int64(math.Ceil((need + wiring.TerminationMargin).Seconds()))
	return fmt.Sprintf("terminationGracePeriodSeconds %d leaves %s to checkpoint on termination, but a dump of %s of memory "+
		"(the checkpointed containers' limits, or requests) takes about %s at the assumed %s/s plus %s (webhook --dump-speed, --dump-overhead): "+
		"on kubectl delete, preemption, scale-down or node shutdown the pod may end without a checkpoint and its replacement "+
		"continue from an older one (evictions and Job suspends are held until the dump is done); "+
		"set terminationGracePeriodSeconds to at least %d",
		int64(grace/time.Second), budget, agentapi.HumanBytes(mem), need.Round(100*time.Millisecond),
		resource.NewQuantity(speed, resource.BinarySI), overhead, fit)
}

// checkpointedMemory sums the memory limits (else requests) of the checkpointed containers; false
// when one of them has neither.
func checkpointedMemory(cfg *labels.Config, spec *corev1.PodSpec) (int64, bool) {
	want := map[string]bool{}
	for _, c := range cfg.Containers {
		want[c.Name] = true
	}
	var sum int64
	for _, c := range spec.Containers {
		if !want[c.Name] {
			continue
		}
		q, ok := c.Resources.Limits[corev1.ResourceMemory]
		if !ok {
			q, ok = c.Resources.Requests[corev1.ResourceMemory]
		}
		if !ok {
			return 0, false
		}
		sum += q.Value()
	}
	return sum, len(want) > 0
}

// templateGraceWarning is graceWarning for a controller's pod template, answered to the client
// that creates or updates the controller: kubectl shows it to the user who wrote the manifest,
// whereas the warning of a pod's admission goes to the controller that created the pod (the
// Event on the pod's owner is what a user sees of that one).
func (w *Webhook) templateGraceWarning(t *corev1.PodTemplateSpec) []string {
	cfg, err := labels.Parse(w.cfg.LabelPrefix, t.Labels, t.Annotations, &t.Spec)
	if err != nil || !cfg.Enabled {
		return nil // a bad label is refused, with its reason, when the pods are created
	}
	if msg := graceWarning(cfg, &t.Spec, w.cfg.DumpSpeed, w.cfg.DumpOverhead); msg != "" {
		return []string{"stasis: pod template: " + msg}
	}
	return nil
}

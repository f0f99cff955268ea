package agent

import (
	"context"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/wiring"
)

// Periodic checkpoints (checkpoint-interval, a Stasis extension): what no SIGTERM precedes — a
// crash, a node that dies — costs the work since the last one. The agent dumps such pods on their
// schedule and leaves the app running; each dump pauses it for the CRIU step
// (stasis_agent_freeze_seconds). The next pod of the identity finds the newest one on its volume
// like any other (termination.go); a node lost for good is survived as far as the volume is
// reachable from another node.

// PeriodicSandboxes lists the wired pods of the node with their sandbox annotations (the CRI
// client; the tests' stand-in lists the pods they started).
type PeriodicSandboxes interface {
	WiredPods(ctx context.Context) ([]WiredPod, error)
}

// WiredPod is a running wired pod as its sandbox describes it.
type WiredPod struct {
	Pod         agentapi.PodRef
	Annotations map[string]string
}

// RunPeriodic starts due periodic checkpoints every tick until ctx ends.
func (a *Agent) RunPeriodic(ctx context.Context, pods PeriodicSandboxes, tick time.Duration) {
	last := map[string]time.Time{} // by pod UID: when its last periodic checkpoint started
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		list, err := pods.WiredPods(ctx)
		if err != nil {
			a.cfg.Log.Warn().Err(err).Msg("periodic checkpoints: listing the node's pods")
			continue
		}
		now := a.cfg.Now()
		running := map[string]bool{}
		for _, p := range list {
			running[p.Pod.UID] = true
			req, every, ok := periodicRequest(p)
			if !ok {
				continue
			}
			if started, seen := last[p.Pod.UID]; !seen {
				last[p.Pod.UID] = now // the first one comes an interval after the pod is seen
				continue
			} else if now.Sub(started) < every {
				continue
			}
			last[p.Pod.UID] = now
			if _, err := a.Start(req); err != nil {
				a.cfg.Log.Warn().Err(err).Str("uid", p.Pod.UID).Msg("periodic checkpoint")
			}
		}
		for uid := range last {
			if !running[uid] {
				delete(last, uid)
			}
		}
	}
}

// periodicRequest is the pod's periodic checkpoint, if it asked for one.
func periodicRequest(p WiredPod) (agentapi.CheckpointRequest, time.Duration, bool) {
	if _, ok := p.Annotations[wiring.AnnotationCheckpoint]; !ok {
		return agentapi.CheckpointRequest{}, 0, false
	}
	req, err := checkpointSpec(p.Annotations)
	if err != nil || req.Interval == "" {
		return req, 0, false
	}
	every, err := time.ParseDuration(req.Interval)
	if err != nil || every <= 0 {
		return req, 0, false
	}
	req.Pod, req.Reason, req.LeaveRunning, req.Interval = p.Pod, ReasonPeriodic, true, ""
	return req, every, ValidateRequest(req) == nil
}

// ReasonPeriodic is the Reason of a periodic checkpoint.
const ReasonPeriodic = "periodic"

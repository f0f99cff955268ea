package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/internal/confine"
	"github.com/stasis-k8s/stasis/wiring"
)

// Every graceful ending of a pod reaches its launchers as SIGTERM: a deletion (kubectl delete,
// preemption, scale-down), a kubelet pressure eviction, a graceful node shutdown, and the
// evictions and suspends the webhook saw (their apps are frozen already). A launcher whose app
// still runs asks the agent to checkpoint the pod before it lets the app end; the agent dumps
// what the webhook wrote into the pod at creation (wiring.AnnotationCheckpoint). Nothing records
// such a checkpoint on the API: the next pod of the identity finds it on the volume (discover).

// ReasonTermination is the Reason of a checkpoint taken on SIGTERM.
const ReasonTermination = "termination"

// CheckpointOnTermination checkpoints the caller's pod (or joins the operation in flight for it:
// every container's launcher asks) and waits for the result within ctx. Only the container's
// PID 1 may ask.
func (a *Agent) CheckpointOnTermination(ctx context.Context, callerPID int, pod agentapi.PodRef, container string) (agentapi.CheckpointStatus, error) {
	t, err := a.cfg.Finder.Find(ctx, pod, container)
	if err != nil {
		return agentapi.CheckpointStatus{}, fmt.Errorf("%w: %v", ErrNotCaller, err)
	}
	if t.PID != callerPID {
		return agentapi.CheckpointStatus{}, fmt.Errorf("%w: process %d is not PID 1 of container %q of pod %s", ErrNotCaller, callerPID, container, pod.UID)
	}
	req, err := terminationRequest(t.PodAnnotations, pod)
	if err != nil {
		return agentapi.CheckpointStatus{Pod: pod, Phase: agentapi.PhaseFailed, Message: err.Error()}, nil
	}
	if _, err := a.Start(req); err != nil {
		return agentapi.CheckpointStatus{Pod: pod, Phase: agentapi.PhaseFailed, Message: err.Error()}, nil
	}
	st, err := a.Wait(ctx, pod.UID)
	if err != nil && ctx.Err() != nil {
		return st, nil // the launcher's time is up; the dump goes on, and completes or not
	}
	return st, err
}

// terminationRequest is the pod's checkpoint as the webhook described it.
func terminationRequest(ann map[string]string, pod agentapi.PodRef) (agentapi.CheckpointRequest, error) {
	req, err := checkpointSpec(ann)
	if err != nil {
		return req, err
	}
	req.Pod, req.Reason = pod, ReasonTermination
	return req, ValidateRequest(req)
}

// checkpointSpec reads wiring.AnnotationCheckpoint as the runtime's pod sandbox holds it (the
// value the webhook wrote at creation; later edits of the pod's annotations do not reach it).
func checkpointSpec(ann map[string]string) (agentapi.CheckpointRequest, error) {
	var req agentapi.CheckpointRequest
	v, ok := ann[wiring.AnnotationCheckpoint]
	if !ok {
		return req, fmt.Errorf("the pod has no %s annotation (wired by an older Stasis): nothing to checkpoint on termination", wiring.AnnotationCheckpoint)
	}
	if err := json.Unmarshal([]byte(v), &req); err != nil {
		return req, fmt.Errorf("annotation %s: %w", wiring.AnnotationCheckpoint, err)
	}
	return req, nil
}

// errNoCheckpoint: the pod's identity has no complete checkpoint to continue (a first start).
var errNoCheckpoint = errors.New("no checkpoint of this identity")

// restoreTarget decides which checkpoint a starting container continues, for the whole pod: the
// newest complete checkpoint that every restoring container has on the volume. The webhook's
// record (the restore annotation) names the newest one it knows; one taken on termination, which
// no admission review saw, may be newer, and a pod created without a record may still have one.
func (a *Agent) restoreTarget(root *os.File, ann map[string]string, req agentapi.RestoreRequest) (wiring.RestoreRef, string, error) {
	identity := ann[wiring.AnnotationIdentity]
	if identity == "" {
		return wiring.RestoreRef{}, "", fmt.Errorf("the pod has no %s annotation", wiring.AnnotationIdentity)
	}
	var ref wiring.RestoreRef
	if _, ok := ann[wiring.AnnotationRestore]; ok {
		var err error
		if ref, _, err = restoreRef(ann); err != nil {
			return ref, "", err
		}
		if ref.ID != req.CheckpointID {
			return ref, "", fmt.Errorf("the launcher asks for checkpoint %q, the pod was created to restore %q", req.CheckpointID, ref.ID)
		}
	} else {
		spec, err := checkpointSpec(ann)
		if err != nil {
			return ref, "", err
		}
		for _, c := range spec.Containers {
			ref.Containers = append(ref.Containers, c.Name)
		}
	}
	common, err := newestCommon(root, path.Join(a.cfg.CheckpointMount, wiring.IdentityDir(identity)), ref.Containers)
	if err != nil {
		return ref, "", err
	}
	ref.ID = pickNewer(ref.ID, common)
	if ref.ID == "" {
		return ref, "", errNoCheckpoint
	}
	return ref, identity, nil
}

// pickNewer chooses between the webhook's record (recorded, "" when none) and the checkpoints
// complete in every container on the volume (common, newest first). On the volume, the order is
// by generation (checkpoint.Rank), never by the node clocks the IDs start with. A recorded ID
// missing from the volume has no generation to compare: only then do the IDs' times decide.
func pickNewer(recorded string, common []checkpoint.Rank) string {
	if len(common) == 0 {
		return recorded
	}
	if recorded == "" {
		return common[0].ID
	}
	for _, r := range common {
		if r.ID == recorded {
			return common[0].ID // the recorded one is on the volume, common[0] ranks at least as high
		}
	}
	if common[0].ID > recorded {
		return common[0].ID
	}
	return recorded
}

// newestCommon ranks the checkpoints complete in every container's directory below identityDir,
// newest first (none when there is none), read inside the container's root. A checkpoint's rank
// is its highest generation among the containers: each container's generation grows with every
// commit in its directory, so the highest grows with every dump of the pod.
func newestCommon(root *os.File, identityDir string, containers []string) ([]checkpoint.Rank, error) {
	count := map[string]int{}
	gen := map[string]uint64{}
	for _, c := range containers {
		d, err := confine.Open(root, path.Join(identityDir, c), unix.O_RDONLY|unix.O_DIRECTORY)
		if errors.Is(err, unix.ENOENT) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		ranks, err := checkpoint.RanksAt(d)
		d.Close()
		if err != nil {
			return nil, err
		}
		for _, r := range ranks {
			count[r.ID]++
			gen[r.ID] = max(gen[r.ID], r.Generation)
		}
	}
	var out []checkpoint.Rank
	for id, n := range count {
		if n == len(containers) {
			out = append(out, checkpoint.Rank{Generation: gen[id], ID: id})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Newer(out[j]) })
	return out, nil
}

// Consume removes the caller's container's checkpoints once its app has exited 0 by itself: the
// work is done, and a later pod of the identity must start fresh rather than redo or resume it.
// Only the container's PID 1 may ask.
func (a *Agent) Consume(ctx context.Context, callerPID int, pod agentapi.PodRef, container string) (int, error) {
	t, err := a.cfg.Finder.Find(ctx, pod, container)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrNotCaller, err)
	}
	if t.PID != callerPID {
		return 0, fmt.Errorf("%w: process %d is not PID 1 of container %q of pod %s", ErrNotCaller, callerPID, container, pod.UID)
	}
	spec, err := checkpointSpec(t.PodAnnotations)
	if err != nil {
		return 0, nil // nothing Stasis checkpoints
	}
	root, err := confine.OpenRoot(fmt.Sprintf("/proc/%d/root", t.PID))
	if err != nil {
		return 0, fmt.Errorf("container root: %w", err)
	}
	defer root.Close()
	for _, c := range spec.Containers {
		if c.Name != container {
			continue
		}
		d, err := confine.Open(root, c.Dir, unix.O_RDONLY|unix.O_DIRECTORY)
		if errors.Is(err, unix.ENOENT) {
			return 0, nil
		}
		if err != nil {
			return 0, err
		}
		defer d.Close()
		n, err := checkpoint.RemoveCompleteAt(d)
		if n > 0 {
			a.cfg.Log.Info().Str("pod", pod.Namespace+"/"+pod.Name).Str("container", container).Int("checkpoints", n).Msg("the app exited 0: its checkpoints are consumed")
		}
		return n, err
	}
	return 0, nil
}
